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
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from ray.job_submission import JobStatus
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


@contextmanager
def _ray_cluster(log_dir: Path, engine_nodes: int):
    """A head (1 CPU, custom resource trainer_node) and ``engine_nodes`` workers (3 CPUs each,
    engine_node), each a `ray start --block` of its own; yields the environment and the dashboard
    address. Only these nodes' processes are stopped at the end (`ray stop` would stop every Ray
    on the host)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    head = ["--head", "--port", gcs, "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard,
            "--include-dashboard", "true", "--num-cpus", 1, "--resources", json.dumps({"trainer_node": 1})]
    worker = ["--address", f"127.0.0.1:{gcs}", "--num-cpus", 3, "--resources", json.dumps({"engine_node": 1})]
    nodes = []
    try:
        for i, args in enumerate([head] + [worker] * engine_nodes):
            with open(log_dir / f"ray-node-{i}.log", "w") as log:
                nodes.append(subprocess.Popen(
                    [str(BIN / "ray"), "start", *map(str, args), "--node-ip-address", "127.0.0.1", "--block",
                     "--disable-usage-stats", *map(str, _node_ports(20000 + 1000 * i))],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            _wait_for_nodes(address, i + 1, nodes, log_dir)
        yield env, address
    finally:
        for node in reversed(nodes):
            _kill_tree(node.pid)


def _wait_for_nodes(address: str, count: int, nodes: list, log_dir: Path, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        exited = [i for i, node in enumerate(nodes) if node.poll() is not None]
        assert not exited, (log_dir / f"ray-node-{exited[0]}.log").read_text()[-3000:]
        try:
            if len(_alive_nodes(address)) >= count:
                return
        except Exception:  # noqa: BLE001 - the head's dashboard is not up yet
            pass
        time.sleep(1)
    raise AssertionError(f"{count} Ray nodes did not come up within {timeout_s:.0f} s")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started."""
    import psutil

    try:
        root = psutil.Process(pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


def _kill_node(node_id: str) -> None:
    """The node is gone: SIGKILL its raylet and every process the raylet started."""
    import psutil

    flag = f"--node_id={node_id}"
    raylets = [p for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "raylet" and flag in (p.info["cmdline"] or [])]
    assert len(raylets) == 1, f"no single raylet with {flag}"
    _kill_tree(raylets[0].pid)


@pytest.fixture
def two_nodes(tmp_path):
    with _ray_cluster(tmp_path, engine_nodes=1) as cluster:
        yield cluster


def test_roles_spread_over_two_nodes_train_as_on_one(tiny_models, tmp_path, two_nodes):
    env, address = two_nodes
    multi = tmp_path / "multi"
    client = _submit(tiny_models, tmp_path, address, env, multi, "two-nodes")
    status, logs = _wait(client, "two-nodes")
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


def test_losing_the_engines_node_stops_the_run_naming_it(tiny_models, tmp_path, two_nodes):
    """The engines' node dies mid-run (its raylet and workers killed): the job fails with one
    error line that names the node and what it hosted, and leaves no actor or placement group."""
    env, address = two_nodes
    out = tmp_path / "run"
    client = _submit(tiny_models, tmp_path, address, env, out, "lose-a-node", max_steps=10_000)
    _wait_for_a_step(client, "lose-a-node", out)
    engines_node = json.loads((out / "placement.json").read_text())["student engine"]["node_id"]
    _kill_node(engines_node)
    status, logs = _wait(client, "lose-a-node")
    assert status == JobStatus.FAILED, f"{status}\n{logs[-4000:]}"
    errors = [line for line in logs.splitlines() if line.startswith("switchkd: error:")]
    assert len(errors) == 1 and f"Ray lost node {engines_node} (" in errors[0], logs[-4000:]
    assert "teacher engine, student engine" in errors[0] and "--resume" in errors[0]
    from ray.util.state import list_actors, list_placement_groups

    assert [a.class_name for a in list_actors(address=address) if a.state != "DEAD"] == []
    assert [g.state for g in list_placement_groups(address=address) if g.state != "REMOVED"] == []


@pytest.mark.slow
def test_losing_the_engines_node_with_a_spare_node_recovers(tiny_models, tmp_path):
    """Two engine nodes, engine restarts configured: the engines' node dies mid-run (in a rollout
    or in a weight sync, whichever runs), Ray places them on the spare node, the run gives them
    the weights there and finishes every step."""
    with _ray_cluster(tmp_path, engine_nodes=2) as (env, address):
        out = tmp_path / "run"
        client = _submit(tiny_models, tmp_path, address, env, out, "recover", restarts=1, max_steps=STEPS + 3)
        _wait_for_a_step(client, "recover", out)
        lost = json.loads((out / "placement.json").read_text())["student engine"]["node_id"]
        _kill_node(lost)
        status, logs = _wait(client, "recover")
        assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-4000:]}"
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, STEPS + 4))
        now = json.loads((out / "placement.json").read_text())
        assert now["student engine"]["node_id"] != lost and now["trainer rank 0"]["node_id"] != lost
        assert f"roles moved: teacher engine to node {now['teacher engine']['node_id'][:8]}" in logs, logs[-4000:]
        ledger = [read_rollouts(out / "rollouts" / f"step_{s:06d}.parquet").column("prompt_index").to_pylist()
                  for s in range(STEPS + 3)]
        assert all(len(set(step)) == len(step) == 4 for step in ledger)   # every batch whole, none repeated


def _wait_for_a_step(client, job_id: str, out: Path, timeout_s: float = 600) -> None:
    """Wait until the run has logged its first training step."""
    deadline, metrics = time.time() + timeout_s, out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-4000:]
        time.sleep(1)


def _submit(tiny_models, tmp_path: Path, address: str, env: dict, out: Path, job_id: str, restarts: int = 0,
            **trainer):
    """`ray job submit` of `switchkd train` with the engines and the trainer pinned to their nodes
    and ``restarts`` engine restarts."""
    from ray.job_submission import JobSubmissionClient

    work = tmp_path / job_id
    work.mkdir()
    cfg = _config(tiny_models, out, engine_resource="engine_node", trainer_resource="trainer_node",
                  engine_max_restarts=restarts, placement_timeout_s=120)
    cfg["trainer"].update(trainer)
    (work / "job.yaml").write_text(yaml.safe_dump(cfg))
    submitted = _ray("job", "submit", "--address", address, "--working-dir", work, "--submission-id", job_id,
                     "--no-wait", "--", "switchkd", "train", "--config", "job.yaml", env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    return JobSubmissionClient(address)


def _wait(client, job_id: str, timeout_s: float = 900):
    """The job's final status and its logs."""
    deadline, status = time.time() + timeout_s, None
    while time.time() < deadline and not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(2)
    return status, client.get_job_logs(job_id)


def _alive_nodes(address: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [{"NodeID": n.node_id, "Resources": n.resources_total} for n in list_nodes(address=address)
            if n.state == "ALIVE"]
