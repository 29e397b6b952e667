"""benchmarks/trainer_throughput.py --quick runs and reports DeepSpeed vs plain per ZeRO stage."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trainer_throughput.py"


def test_quick_benchmark_writes_ratios(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("trainer_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--json", str(tmp_path / "out.json")]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert '"benchmark": "trainer_throughput"' in capsys.readouterr().out
    assert report["plain"]["tokens_per_s"] > 0
    assert set(report["deepspeed"]) == {f"deepspeed_zero{s}_workers1" for s in (1, 2, 3)}
    assert all(r["ratio_vs_plain"] > 0 for r in report["deepspeed"].values())
    assert set(report["target"]) == {"zero1_workers1_ratio", "required", "met"}
