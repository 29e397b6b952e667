"""Ray clusters on this host for the `ray job submit` tests: each node its own `ray start --block`
with every port apart, all on 127.0.0.1. Only these nodes' processes are stopped at the end
(`ray stop` would stop every Ray on the host, a user's run included)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from switchkd.rollout.local_ray import free_port

BIN = Path(sys.executable).parent


class LocalCluster:
    """A head and worker nodes started on demand; jobs submitted to its dashboard."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)   # Ray 2.60 needs RAY_AUTH_MODE=disabled without a token
        self._taken: set[int] = set()
        self.gcs, dashboard = self._port(), self._port()
        self.address = f"http://127.0.0.1:{dashboard}"
        self._head = ["--head", "--port", self.gcs, "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard,
                      "--include-dashboard", "true"]
        self.nodes: list[subprocess.Popen] = []

    def add_node(self, cpus: int, resources: dict | None = None) -> None:
        """Start a node (the first one is the head) and wait until Ray counts it alive."""
        i = len(self.nodes)
        role = self._head if i == 0 else ["--address", f"127.0.0.1:{self.gcs}"]
        args = [*role, "--num-cpus", cpus, "--resources", json.dumps(resources or {}), "--node-ip-address",
                "127.0.0.1", "--block", "--disable-usage-stats", *self._node_ports(20000 + 1000 * i)]
        with open(self.log_dir / f"ray-node-{i}.log", "w") as log:
            self.nodes.append(subprocess.Popen([str(BIN / "ray"), "start", *map(str, args)], env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 180
        while time.time() < deadline:
            exited = [j for j, node in enumerate(self.nodes) if node.poll() is not None]
            assert not exited, (self.log_dir / f"ray-node-{exited[0]}.log").read_text()[-3000:]
            try:
                if len(self.alive_nodes()) > i:
                    return
            except Exception:  # noqa: BLE001 - the head's dashboard is not up yet
                pass
            time.sleep(1)
        raise AssertionError(f"Ray node {i} did not come up within 180 s")

    def _port(self) -> int:
        """A free port none of this cluster's nodes was given yet: the head's ports are only bound once
        `ray start` runs, so the OS may offer one of them again, and Ray refuses a port given twice."""
        while (port := free_port()) in self._taken:
            pass
        self._taken.add(port)
        return port

    def _node_ports(self, first_worker_port: int) -> list:
        """Every port a raylet and its agents open, apart for each node, so nodes share one host."""
        return ["--node-manager-port", self._port(), "--object-manager-port", self._port(),
                "--dashboard-agent-listen-port", self._port(), "--dashboard-agent-grpc-port", self._port(),
                "--runtime-env-agent-port", self._port(), "--metrics-export-port", self._port(),
                "--min-worker-port", first_worker_port, "--max-worker-port", first_worker_port + 999]

    def alive_nodes(self) -> dict[str, dict]:
        """{node id: its total resources} of the nodes Ray counts alive."""
        from ray.util.state import list_nodes

        return {n.node_id: n.resources_total for n in list_nodes(address=self.address) if n.state == "ALIVE"}

    def submit(self, job_id: str, config: dict):
        """`ray job submit` of `switchkd train` with ``config`` (its own working dir); returns the client."""
        from ray.job_submission import JobSubmissionClient

        work = self.log_dir / job_id
        work.mkdir()
        (work / "job.yaml").write_text(yaml.safe_dump(config))
        submitted = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", self.address, "--working-dir", str(work),
             "--submission-id", job_id, "--no-wait", "--", "switchkd", "train", "--config", "job.yaml"],
            env=self.env, capture_output=True, text=True, timeout=180)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        return JobSubmissionClient(self.address)

    def wait(self, job_id: str, timeout_s: float = 900):
        """The job's final status and its logs."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.address)
        deadline, status = time.time() + timeout_s, None
        while time.time() < deadline and not (status := client.get_job_status(job_id)).is_terminal():
            time.sleep(2)
        return status, client.get_job_logs(job_id)

    def wait_for_a_step(self, job_id: str, out: Path, timeout_s: float = 600) -> None:
        """Wait until the job's run (output dir ``out``) has logged its first training step."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.address)
        deadline, metrics = time.time() + timeout_s, out / "metrics.jsonl"
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-4000:]
            time.sleep(1)

    @staticmethod
    def kill_node(node_id: str) -> None:
        """The node is gone: SIGKILL its raylet and every process the raylet started."""
        import psutil

        flag = f"--node_id={node_id}"
        raylets = [p for p in psutil.process_iter(["name", "cmdline"])
                   if p.info["name"] == "raylet" and flag in (p.info["cmdline"] or [])]
        assert len(raylets) == 1, f"no single raylet with {flag}"
        _kill_tree(raylets[0].pid)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            _kill_tree(node.pid)


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


@pytest.fixture
def local_cluster(tmp_path):
    """A LocalCluster with no nodes yet; every node it started is stopped afterwards."""
    cluster = LocalCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()
