"""WeightSync's contract with fakes: retries after a refused or failed version (from the same
file), a hanging engine times out instead of blocking, nothing to do when the engine already
serves the version, a restarted engine gets its version back, and a bad sync dir is one line."""
from __future__ import annotations

import threading

import pytest

from switchkd.cluster.config import load_config
from switchkd.cluster.sync import WeightSync, sync_root
from switchkd.rollout.engines.actors import EngineHandle
from switchkd.rollout.weight_sync import WeightSyncError, check_newer


class _Trainer:
    """Fails its first ``failures`` writes."""

    def __init__(self, failures=0):
        self.policy_version, self.pushes, self.failures = 1, 0, failures

    def push_weights(self, transport, root):
        self.pushes += 1
        if self.failures:
            self.failures -= 1
            raise WeightSyncError("disk full")
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


def _sync(tmp_path, engine, *overrides, trainer=None):
    cfg = load_config(None, [f"sync.dir={tmp_path / 'sync'}", *overrides]).sync
    root = tmp_path / "sync"
    root.mkdir()
    trainer = trainer or _Trainer()
    return WeightSync(cfg, trainer, EngineHandle(engine=engine), "gloo", root=root), trainer


def test_a_failed_load_is_retried_from_the_same_file_and_lands(tmp_path):
    engine = _Engine(failures=2)
    sync, trainer = _sync(tmp_path, engine, "sync.retries=2")
    info = sync.push()
    assert info["sync_attempts"] == 3 and info["engine_version"] == 1 == engine.weight_version
    assert trainer.pushes == 1


def test_a_failed_write_is_retried(tmp_path):
    engine = _Engine()
    sync, trainer = _sync(tmp_path, engine, "sync.retries=1", trainer=_Trainer(failures=1))
    assert sync.push()["engine_version"] == 1 == engine.weight_version and trainer.pushes == 2


def test_the_engine_loads_the_version_it_was_given_not_a_newer_write(tmp_path):
    """The loop decides which version the next rollout uses before the trainer writes the next
    one; a write while the engine loads must neither be loaded early nor lost."""
    engine = _Engine()
    sync, trainer = _sync(tmp_path, engine)
    sync.write()
    given = sync.written
    trainer.policy_version = 2
    sync.write()
    assert sync.load(given)["engine_version"] == 1 == engine.weight_version
    assert sync.load(sync.written)["engine_version"] == 2 == engine.weight_version
    assert sync.load(given) == {} and trainer.pushes == 2


def test_a_restarted_engine_gets_the_version_it_served_back(tmp_path):
    engine = _Engine()
    sync, trainer = _sync(tmp_path, engine)
    sync.push()
    trainer.policy_version = 2  # the trainer moved on; the running rollout expects version 1
    engine.weight_version = 0   # what a restarted actor serves
    assert sync.reload() == 1 == engine.weight_version and trainer.pushes == 1


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
    assert sync.push() == {} and trainer.pushes == 1


def test_sync_root_is_private_and_removed(tmp_path):
    cfg = load_config(None, []).sync
    with sync_root(cfg) as root:
        assert root.is_dir() and oct(root.stat().st_mode & 0o777) == "0o700"
    assert not root.exists()
    with sync_root(load_config(None, ["sync.transport=collective"]).sync) as root:
        assert root is None
