"""run.py's gpu part: its jobs, and GPU results reported apart from the CPU figures and targets."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import run  # noqa: E402

SIZE = {"layers": 2, "hidden": 128, "rows": 4, "micro": 2, "prompt": 8, "response": 24, "topk": 8}


def _trainer(plain_tps, zero1_ratio, device="cpu", precision="fp32"):
    machine = {"platform": "test", "cpus": 16, "python": "3", "versions": {"deepspeed": "0.19.8"}}
    if device == "cuda":
        machine["gpu"] = {"name": "Test GPU", "count": 1, "cuda": "13.0", "torch": "2.11"}
    variant = {"tokens_per_s": plain_tps * zero1_ratio, "best_tokens_per_s": plain_tps, "ratio_vs_plain": zero1_ratio}
    return {"benchmark": "trainer_throughput", "size": SIZE, "device": device, "precision": precision,
            "machine": machine, "plain": {"tokens_per_s": plain_tps, "best_tokens_per_s": plain_tps},
            "deepspeed": {"deepspeed_zero1_workers1": variant}}


def test_gpu_part_plans_cuda_jobs(tmp_path):
    jobs = run.plan(SimpleNamespace(only=["gpu"], quick=False, models="default"), tmp_path)
    assert [j.name for j in jobs] == list(run.GPU_RESULTS)
    assert all("--device" in j.argv and j.argv[j.argv.index("--device") + 1] == "cuda" for j in jobs)
    assert {j.argv[j.argv.index("--precision") + 1] for j in jobs} == {"fp32", "bf16"}


def test_gpu_results_never_enter_cpu_targets(tmp_path):
    (tmp_path / "trainer.json").write_text(json.dumps(_trainer(3000.0, 0.95)))
    (tmp_path / "trainer_gpu_bf16.json").write_text(json.dumps(_trainer(90000.0, 0.5, "cuda", "bf16")))

    head = run.headline(tmp_path)
    assert head["targets"]["trainer_zero1_over_plain"]["value"] == 0.95    # the CPU run's, not the GPU's 0.5
    assert head["figures"]["trainer_gpu_bf16"]["gpu"] == "Test GPU"
    plots = {p.name for p in run.draw_all(tmp_path)}
    assert {"trainer.png", "trainer_gpu_bf16.png"} <= plots
    summary = {"machine": {"platform": "test", "cpus": 2, "python": "3", "versions": {}}, "jobs": {},
               "plots": [], **head}
    text = run.render_tables(tmp_path, summary)
    cpu, gpu = text.split("**GPU**")
    assert "9e+04" not in cpu and "| deepspeed_zero1_workers1 | 2.85e+03 |" in cpu
    assert "Test GPU" in gpu and "Trainer on the GPU, bf16" in gpu and "| deepspeed_zero1_workers1 | 4.5e+04 |" in gpu


def test_no_gpu_section_without_gpu_results(tmp_path):
    (tmp_path / "trainer.json").write_text(json.dumps(_trainer(3000.0, 0.95)))
    head = run.headline(tmp_path)
    summary = {"machine": {"platform": "test", "cpus": 2, "python": "3", "versions": {}}, "jobs": {},
               "plots": [], **head}
    assert "**GPU**" not in run.render_tables(tmp_path, summary)
