"""`ray job submit` of the tiny closed loop to a local Ray head bound to 127.0.0.1
(tests/cluster/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_the_tiny_loop(tiny_models, tmp_path, local_cluster):
    from ray.job_submission import JobStatus

    out = tmp_path / "run"
    local_cluster.add_node(3)
    local_cluster.submit("tiny-loop", {
        "model": {"teacher": str(tiny_models["teacher"]), "student": str(tiny_models["student"])},
        "data": {"prompts": str(REPO / "configs/prompts/tiny.jsonl"), "max_prompts": 16},
        "rollout": {"engine": "vllm", "max_new_tokens": 16},
        "trainer": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "micro_batch_size": 2,
                    "tensorboard": False},
    })
    status, logs = local_cluster.wait("tiny-loop", timeout_s=600)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}"
    assert "trained to step 2 (policy version 2)" in logs
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["engine_version"] for m in metrics] == [0, 2]  # max_staleness=1: loaded during the next step, the last at the end
    assert (out / "export" / "model.safetensors").is_file()
