"""A two-node Ray cluster on this host (a head and a worker, each its own raylet, all on
127.0.0.1): `ray job submit` of the tiny closed loop with the trainer pinned to the head's node
and the engines to the worker's, weights broadcast across the nodes (sync.transport=collective),
checked against a single-node run with the same seeds: the same prompts in every step and the
same final weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from switchkd.rollout.data.schema import read_rollouts
from switchkd.rollout.local_ray import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 3


def _ray(*args, env, timeout=180):
    return subprocess.run([str(BIN / "ray"), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def _node_ports(first_worker_port: int) -> list:
    """Every port a raylet and its agents open, apart for each node, so two nodes share one host."""
    return ["--node-manager-port", free_port(), "--object-manager-port", free_port(),
            "--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
            "--runtime-env-agent-port", free_port(), "--metrics-export-port", free_port(),
            "--min-worker-port", first_worker_port, "--max-worker-port", first_worker_port + 999]


def _config(tiny_models, out: Path, **cluster) -> dict:
    return {
        "model": {"teacher": str(tiny_models["teacher"]), "student": str(tiny_models["student"])},
        "data": {"prompts": str(REPO / "configs/prompts/tiny.jsonl"), "max_prompts": 16},
        "rollout": {"engine": "vllm", "max_new_tokens": 16},
        "trainer": {"output_dir": str(out), "max_steps": STEPS, "batch_size": 4, "micro_batch_size": 2,
                    "lr": 0.003, "tensorboard": False},
        "sync": {"transport": "collective"},
        "loop": {"max_staleness": 0},
        "cluster": cluster,
    }


def _ledger(run: Path) -> list[list[int]]:
    return [read_rollouts(run / "rollouts" / f"step_{s:06d}.parquet").column("prompt_index").to_pylist()
            for s in range(STEPS)]


@pytest.fixture
def two_nodes(tmp_path):
    """Head (1 CPU, custom resource trainer_node) and worker (3 CPUs, engine_node); yields the
    dashboard address and the two node ids; stops both."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    try:
        head = _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", gcs, "--dashboard-host",
                    "127.0.0.1", "--dashboard-port", dashboard, "--include-dashboard", "true", "--num-cpus", 1,
                    "--resources", json.dumps({"trainer_node": 1}), "--disable-usage-stats", *_node_ports(20000), env=env)
        assert head.returncode == 0, head.stderr[-3000:]
        worker = _ray("start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1", "--num-cpus", 3,
                      "--resources", json.dumps({"engine_node": 1}), "--disable-usage-stats", *_node_ports(21000), env=env)
        assert worker.returncode == 0, worker.stderr[-3000:]
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _ray("stop", "--force", env=env)


def test_roles_spread_over_two_nodes_train_as_on_one(tiny_models, tmp_path, two_nodes):
    env, address = two_nodes
    work, multi = tmp_path / "job", tmp_path / "multi"
    work.mkdir()
    (work / "job.yaml").write_text(yaml.safe_dump(_config(tiny_models, multi, engine_resource="engine_node",
                                                          trainer_resource="trainer_node")))
    submitted = _ray("job", "submit", "--address", address, "--working-dir", work, "--submission-id", "two-nodes",
                     "--no-wait", "--", "switchkd", "train", "--config", "job.yaml", env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline, status = time.time() + 900, None
    while time.time() < deadline and not (status := client.get_job_status("two-nodes")).is_terminal():
        time.sleep(2)
    logs = client.get_job_logs("two-nodes")
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}"
    placed = json.loads((multi / "placement.json").read_text())
    engine_nodes = {placed["teacher engine"]["node_id"], placed["student engine"]["node_id"]}
    assert len(engine_nodes) == 1 and placed["trainer rank 0"]["node_id"] not in engine_nodes   # spread as pinned
    nodes = {n["NodeID"]: n["Resources"] for n in _alive_nodes(address)}
    assert "engine_node" in nodes[engine_nodes.pop()] and "trainer_node" in nodes[placed["trainer rank 0"]["node_id"]]

    single = tmp_path / "single"
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(_config(tiny_models, single)))
    local_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "switchkd.cluster.cli", "train", "--config", str(tmp_path / "single.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=local_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _ledger(multi) == _ledger(single)                       # the same prompts in every step
    a, b = (load_file(str(run / "export" / "model.safetensors")) for run in (multi, single))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5   # the same training, across nodes
    assert any(not torch.equal(a[k], load_file(str(Path(tiny_models["student"]) / "model.safetensors"))[k]) for k in a)


def _alive_nodes(address: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [{"NodeID": n.node_id, "Resources": n.resources_total} for n in list_nodes(address=address)
            if n.state == "ALIVE"]
