"""benchmarks/trainer_throughput.py --quick runs and reports DeepSpeed vs plain per ZeRO stage, the
plain loop's phases, and the step with the output layer over every position."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trainer_throughput.py"


def test_quick_benchmark_writes_ratios(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("trainer_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.SIZES["quick"]["full_logits_too"] = True     # the ablation smollm2's size runs
    assert bench.main(["--quick", "--json", str(tmp_path / "out.json")]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert '"benchmark": "trainer_throughput"' in capsys.readouterr().out
    assert report["plain"]["tokens_per_s"] > 0
    assert set(report["deepspeed"]) == {f"deepspeed_zero{s}_workers1" for s in (1, 2, 3)} | {
        "deepspeed_zero1_workers1_full_logits"}
    phases = report["plain"]["phase_seconds"]
    assert set(phases) == set(bench.PHASES) and all(v > 0 for v in phases.values())
    assert all(r["ratio_vs_plain"] > 0 for r in report["deepspeed"].values())
    assert set(report["target"]) == {"zero1_workers1_ratio", "required", "met"}

    # The suite reports a SmolLM2-size result the same way, with the plain loop's phase table.
    import sys
    sys.path.insert(0, str(SCRIPT.parent))
    import run

    (tmp_path / "trainer_smollm2.json").write_text(json.dumps(report))
    figures = run.headline(tmp_path)["figures"]["trainer_smollm2"]
    assert figures["plain_phase_seconds"] == phases
    assert figures["deepspeed_zero1_workers1_full_logits"]["ratio_vs_plain"] > 0
    text = run.render_tables(tmp_path, {"machine": {"platform": "test", "cpus": 1, "python": "3", "versions": {}},
                                        "jobs": {}, "plots": [], "figures": {}, "targets": {}})
    assert "**Trainer on the SmolLM2 student**" in text and "| backward |" in text
