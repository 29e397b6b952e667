"""Several Ray nodes on this host (tests/cluster/conftest.py): `ray job submit` of the tiny
closed loop with the trainer pinned to the head's node and the engines to a worker's, weights
broadcast across the nodes (sync.transport=collective), checked against a single-node run with
the same seeds (the same prompts in every step, the same final weights); and the engines' node
lost mid-run: one error naming it, or a recovery on a spare node."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ray.job_submission import JobStatus
from safetensors.torch import load_file

from switchkd.rollout.data.schema import read_rollouts

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _config(tiny_models, out: Path, restarts: int = 0, **trainer) -> dict:
    """The tiny loop with the engines on engine_node nodes, the trainer on trainer_node nodes."""
    return {
        "model": {"teacher": str(tiny_models["teacher"]), "student": str(tiny_models["student"])},
        "data": {"prompts": str(REPO / "configs/prompts/tiny.jsonl"), "max_prompts": 16},
        "rollout": {"engine": "vllm", "max_new_tokens": 16},
        "trainer": {"output_dir": str(out), "max_steps": STEPS, "batch_size": 4, "micro_batch_size": 2,
                    "lr": 0.003, "tensorboard": False, **trainer},
        "sync": {"transport": "collective"},
        "loop": {"max_staleness": 0},
        "cluster": {"engine_resource": "engine_node", "trainer_resource": "trainer_node",
                    "engine_max_restarts": restarts, "placement_timeout_s": 120},
    }


def _ledger(run: Path, steps: int = STEPS) -> list[list[int]]:
    return [read_rollouts(run / "rollouts" / f"step_{s:06d}.parquet").column("prompt_index").to_pylist()
            for s in range(steps)]


@pytest.fixture
def two_nodes(local_cluster):
    """A head (1 CPU, trainer_node) and a worker (3 CPUs, engine_node)."""
    local_cluster.add_node(1, {"trainer_node": 1})
    local_cluster.add_node(3, {"engine_node": 1})
    return local_cluster


def test_roles_spread_over_two_nodes_train_as_on_one(tiny_models, tmp_path, two_nodes):
    multi = tmp_path / "multi"
    two_nodes.submit("two-nodes", _config(tiny_models, multi))
    status, logs = two_nodes.wait("two-nodes")
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}"
    placed = json.loads((multi / "placement.json").read_text())
    engine_nodes = {placed["teacher engine"]["node_id"], placed["student engine"]["node_id"]}
    assert len(engine_nodes) == 1 and placed["trainer rank 0"]["node_id"] not in engine_nodes   # spread as pinned
    nodes = two_nodes.alive_nodes()
    assert "engine_node" in nodes[engine_nodes.pop()] and "trainer_node" in nodes[placed["trainer rank 0"]["node_id"]]

    single = tmp_path / "single"
    cfg = _config(tiny_models, single)
    del cfg["cluster"]
    (tmp_path / "single.yaml").write_text(json.dumps(cfg))
    local_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "switchkd.cluster.cli", "train", "--config", str(tmp_path / "single.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=local_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _ledger(multi) == _ledger(single)                       # the same prompts in every step
    a, b = (load_file(str(run / "export" / "model.safetensors")) for run in (multi, single))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5   # the same training, across nodes
    assert any(not torch.equal(a[k], load_file(str(Path(tiny_models["student"]) / "model.safetensors"))[k]) for k in a)


def test_losing_the_engines_node_stops_the_run_naming_it(tiny_models, tmp_path, two_nodes):
    """The engines' node dies mid-run (its raylet and workers killed): the job fails with one
    error line that names the node and what it hosted, and leaves no actor or placement group."""
    out = tmp_path / "run"
    two_nodes.submit("lose-a-node", _config(tiny_models, out, max_steps=10_000))
    two_nodes.wait_for_a_step("lose-a-node", out)
    engines_node = json.loads((out / "placement.json").read_text())["student engine"]["node_id"]
    two_nodes.kill_node(engines_node)
    status, logs = two_nodes.wait("lose-a-node")
    assert status == JobStatus.FAILED, f"{status}\n{logs[-4000:]}"
    errors = [line for line in logs.splitlines() if line.startswith("switchkd: error:")]
    assert len(errors) == 1 and f"Ray lost node {engines_node} (" in errors[0], logs[-4000:]
    assert "teacher engine, student engine" in errors[0] and "--resume" in errors[0]
    from ray.util.state import list_actors, list_placement_groups

    assert [a.class_name for a in list_actors(address=two_nodes.address) if a.state != "DEAD"] == []
    assert [g.state for g in list_placement_groups(address=two_nodes.address) if g.state != "REMOVED"] == []


@pytest.mark.slow
def test_losing_the_engines_node_with_a_spare_node_recovers(tiny_models, tmp_path, two_nodes):
    """Two engine nodes, engine restarts configured: the engines' node dies mid-run (in a rollout
    or in a weight sync, whichever runs), Ray places them on the spare node, the run gives them
    the weights there and finishes every step."""
    two_nodes.add_node(3, {"engine_node": 1})
    out, steps = tmp_path / "run", STEPS + 3
    two_nodes.submit("recover", _config(tiny_models, out, restarts=1, max_steps=steps))
    two_nodes.wait_for_a_step("recover", out)
    lost = json.loads((out / "placement.json").read_text())["student engine"]["node_id"]
    two_nodes.kill_node(lost)
    status, logs = two_nodes.wait("recover")
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    now = json.loads((out / "placement.json").read_text())
    assert now["student engine"]["node_id"] != lost and now["trainer rank 0"]["node_id"] != lost
    assert f"roles moved: teacher engine to node {now['teacher engine']['node_id'][:8]}" in logs, logs[-4000:]
    assert all(len(set(step)) == len(step) == 4 for step in _ledger(out, steps))   # every batch whole, none twice
