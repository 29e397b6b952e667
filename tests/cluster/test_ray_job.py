"""`ray job submit` of the tiny closed loop to a local Ray head bound to 127.0.0.1 (Ray
2.60 needs RAY_AUTH_MODE=disabled for an unauthenticated local test cluster)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from switchkd.rollout.local_ray import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ray(*args, env, timeout=120):
    return subprocess.run([str(BIN / "ray"), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_the_tiny_loop(tiny_models, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    work = tmp_path / "job"
    work.mkdir()
    out = tmp_path / "run"
    config = {
        "model": {"teacher": str(tiny_models["teacher"]), "student": str(tiny_models["student"])},
        "data": {"prompts": str(REPO / "configs/prompts/tiny.jsonl"), "max_prompts": 16},
        "rollout": {"engine": "vllm", "max_new_tokens": 16},
        "trainer": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "micro_batch_size": 2,
                    "tensorboard": False},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(config))
    started = _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", gcs_port,
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", dash_port, "--include-dashboard", "true",
                   "--num-cpus", 3, "--disable-usage-stats", env=env)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        address = f"http://127.0.0.1:{dash_port}"
        submitted = _ray("job", "submit", "--address", address, "--working-dir", work, "--submission-id", "tiny-loop",
                         "--no-wait", "--", "switchkd", "train", "--config", "job.yaml", env=env)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address)
        deadline, status = time.time() + 600, None
        while time.time() < deadline:
            status = client.get_job_status("tiny-loop")
            if status.is_terminal():
                break
            time.sleep(2)
        logs = client.get_job_logs("tiny-loop")
        assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}"
        assert "trained to step 2 (policy version 2)" in logs
    finally:
        _ray("stop", "--force", env=env)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["engine_version"] for m in metrics] == [0, 2]  # max_staleness=1: loaded during the next step, the last at the end
    assert (out / "export" / "model.safetensors").is_file()
