"""WeightSync's contract with fakes: retries after a refused or failed version, a hanging engine
times out instead of blocking, nothing to do when the engine already serves the version, and a
bad sync dir is one line."""
from __future__ import annotations

import threading

import pytest

from switchkd.cluster.config import load_config
from switchkd.cluster.sync import WeightSync, sync_root
from switchkd.rollout.engines import EngineHandle
from switchkd.rollout.weight_sync import WeightSyncError, check_newer


class _Trainer:
    def __init__(self):
        self.policy_version, self.pushes = 1, 0

    def push_weights(self, transport, root):
        self.pushes += 1
        return {"version": self.policy_version, "transport": "shm", "path": f"{root}/v{self.policy_version}"}


class _Engine:
    """Refuses the first ``failures`` loads, or hangs on them when ``hang`` is set."""

    def __init__(self, failures=0, hang=False):
        self.weight_version, self.failures, self.hang, self.release = 0, failures, hang, threading.Event()

    def version(self):
        return self.weight_version

    def update_weights(self, ticket):
        if self.failures:
            self.failures -= 1
            if self.hang:
                self.release.wait(30)
            raise WeightSyncError("corrupt file")
        check_newer(ticket["version"], self.weight_version)
        self.weight_version = ticket["version"]
        return self.weight_version


def _sync(tmp_path, engine, *overrides):
    cfg = load_config(None, [f"sync.dir={tmp_path / 'sync'}", *overrides]).sync
    root = tmp_path / "sync"
    root.mkdir()
    trainer = _Trainer()
    return WeightSync(cfg, trainer, EngineHandle(engine=engine), "gloo", root=root), trainer


def test_a_failed_sync_is_retried_and_lands(tmp_path):
    engine = _Engine(failures=2)
    sync, trainer = _sync(tmp_path, engine, "sync.retries=2")
    info = sync.push()
    assert info["sync_attempts"] == 3 and info["engine_version"] == 1 == engine.weight_version
    assert trainer.pushes == 3


def test_a_sync_that_keeps_failing_raises_after_the_retries(tmp_path):
    engine = _Engine(failures=5)
    sync, trainer = _sync(tmp_path, engine, "sync.retries=1")
    with pytest.raises(WeightSyncError, match="failed after 2 attempts .*sync.retries=1.*corrupt file"):
        sync.push()
    assert engine.weight_version == 0 and sync.engine_version == 0


def test_a_hanging_engine_times_out(tmp_path):
    engine = _Engine(failures=2, hang=True)
    sync, _ = _sync(tmp_path, engine, "sync.retries=1", "sync.timeout_s=0.2")
    try:
        with pytest.raises(WeightSyncError, match="did not finish within"):
            sync.push()
    finally:
        engine.release.set()


def test_nothing_to_do_when_the_engine_serves_the_version(tmp_path):
    engine = _Engine()
    sync, trainer = _sync(tmp_path, engine)
    sync.push()
    assert sync.push()["sync_attempts"] == 0 and trainer.pushes == 1


def test_sync_root_is_private_and_removed(tmp_path):
    cfg = load_config(None, []).sync
    with sync_root(cfg) as root:
        assert root.is_dir() and oct(root.stat().st_mode & 0o777) == "0o700"
    assert not root.exists()
    with sync_root(load_config(None, ["sync.transport=collective"]).sync) as root:
        assert root is None
