"""`benchmarks/run.py --quick` runs every part of the suite and writes its JSON and plots (no timing assertions)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULT_FILES = ("rollout_tiny", "trainer", "weight_sync", "e2e_tiny", "scaling_rollout", "scaling_trainer")
PLOTS = ("rollout_methods", "trainer", "weight_sync_size", "e2e_tiny", "e2e_timeline_tiny", "scaling_rollout_length",
         "scaling_rollout_batch", "scaling_rollout_tau0", "scaling_trainer_length")


def test_run_quick_writes_every_result_and_plot(tmp_path):
    summary_path = tmp_path / "summary.json"
    res = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--results-dir", str(tmp_path / "results"),
                          "--json", str(summary_path)], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    summary = json.loads(summary_path.read_text())
    out = tmp_path / "results"
    assert json.loads((out / "suite.json").read_text()) == summary
    assert summary["quick"] is True and summary["machine"]["versions"]["torch"]
    assert set(summary["jobs"]) == set(RESULT_FILES)
    assert all(job["returncode"] == 0 and job["seconds"] > 0 for job in summary["jobs"].values())
    for name in RESULT_FILES:
        result = json.loads((out / f"{name}.json").read_text())
        assert result["machine"]["cpus"] > 0, name

    e2e = json.loads((out / "e2e_tiny.json").read_text())
    assert not e2e["errors"]
    assert set(e2e["methods"]) == {"switchkd_switch", "trl_gkd", "trl_distill"}
    for method in e2e["methods"].values():
        assert method["samples_per_s"] > 0 and method["tokens_per_s"] > 0 and method["timed_steps"] >= 1
        assert method["phases"]["generation_tokens_per_s"] > 0 and method["phases"]["training_tokens_per_s"] > 0
    assert e2e["ratios"]["switchkd_switch_over_trl"]["samples_per_s"] > 0
    assert e2e["ratios"]["switchkd_switch_over_trl_distill"]["samples_per_s"] > 0
    assert set(e2e["targets"]) == {"switch_over_trl_gkd", "switch_over_trl_distill", "training_over_trl"}
    assert all(t["value"] > 0 for t in e2e["targets"].values())
    distill = e2e["methods"]["trl_distill"]   # TRL's DistillationTrainer on its colocated vLLM engine
    assert distill["config"]["generation"] == "vllm" and distill["machine"]["versions"]["vllm"]
    assert distill["phases"]["sync_s"] > 0 and distill["phases"]["teacher_forward_s"] > 0
    timeline = e2e["methods"]["switchkd_switch"]["timeline"]
    assert timeline["steps"] == 4 and timeline["train_seconds"] > 0 and 0 <= timeline["rollout_hidden_fraction"] <= 1

    scaling = json.loads((out / "scaling_rollout.json").read_text())
    for sweep in ("length", "batch", "tau0"):
        assert scaling[sweep] and all(row["block"]["tokens_per_s"] > 0 and row["floor_over_block"] > 0
                                      for row in scaling[sweep]), sweep
    assert all("block_over_stepwise" in row for row in scaling["tau0"])
    for sweep in ("length", "batch", "tau0"):   # lockstep, the default mode, beside block
        assert all(row["lockstep"]["tokens_per_s"] > 0 and row["floor_over_lockstep"] > 0
                   and row["lockstep_over_block"] > 0 for row in scaling[sweep]), sweep
    assert len(scaling["superlinear_lockstep"]) == len(scaling["length"]) - 1
    rollout = json.loads((out / "rollout_tiny.json").read_text())
    for key in ("lockstep_tokens_per_s", "floor_over_lockstep", "lockstep_over_block",
                "floor_teacher_drafts_over_lockstep"):
        assert rollout[key] > 0, key
    assert summary["figures"]["rollout_tiny"]["floor_over_lockstep"] > 0
    trainer = json.loads((out / "scaling_trainer.json").read_text())
    assert all(row["plain"]["tokens_per_s"] > 0 and row["ratio_vs_plain"] > 0 for row in trainer["lengths"])

    assert set(summary["targets"]) == {"e2e_switch_over_trl_gkd", "e2e_switch_over_trl_distill", "e2e_training_over_trl",
                                       "rollout_floor_over_lockstep_every_length", "trainer_zero1_over_plain"}
    assert all(t["met"] is None for t in summary["targets"].values())   # --quick checks no target
    assert summary["targets"]["rollout_floor_over_lockstep_every_length"]["value"] > 0
    for plot in PLOTS:
        png = out / "plots" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    assert sorted(summary["plots"]) == sorted(f"plots/{p}.png" for p in PLOTS)
