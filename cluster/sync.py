"""The driver's side of weight sync: move the trainer's current weights into the student engine,
versioned, with a timeout on every wait and a bounded number of retries.

    with sync_root(cfg.sync) as root:          # before the trainer: outlives its writers
        ...start the trainer...
        sync = WeightSync(cfg.sync, trainer, student_handle, backend="gloo", probe_ids=[...], root=root)
        info = sync.push()   # engine now serves trainer.policy_version; {"sync_load_seconds", ...}

A sync has two halves, so that the closed loop can hide each behind other work:

* ``write()``, the trainer's half. ``shm``: trainer rank 0 writes a version directory. The engine
  may still be rolling out meanwhile: nothing it reads changes. ``collective``: the whole
  broadcast, which needs the engine idle and receiving, so the transfer happens here.
* ``load()``, the engine's half: load the newest written version (shm). The trainer is not
  involved, so it may run while the trainer trains the next step.

Transports (switchkd.rollout.weight_sync): ``shm`` writes a version directory and tells the
engine to load it; ``collective`` starts the engine's receive, then has trainer rank 0 broadcast.
A failed load leaves the engine on its previous version (it refuses bad files before loading)
and is retried from the same file; a collective group is rebuilt before a retry, since a broken
broadcast leaves it unusable.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from switchkd.rollout.engines.actors import ENGINE_DIED
from switchkd.rollout.weight_sync import SyncTicket, WeightSyncError
from switchkd.rollout.weight_sync.shm import default_root, prune

log = logging.getLogger(__name__)
# Largest total-variation distance between engine and trainer next-token distributions that
# sync.check_equal accepts, by engine dtype (bf16 rounding moves probabilities by ~1e-2).
CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}
RETRIABLE = (WeightSyncError, TimeoutError, *ENGINE_DIED)


@dataclass(frozen=True)
class Written:
    """A version the trainer wrote for the engine (shm), with the trainer's log-probs along the
    probe (sync.check_equal), taken while the trainer still held exactly these weights."""
    version: int
    ticket: dict
    reference: np.ndarray | None


class WeightSync:
    def __init__(self, cfg, trainer, engine, backend: str, dtype: str = "float32",
                 probe_ids: list[int] | None = None, root: Path | None = None):
        """``root``: the shm directory (from ``sync_root``); unused by the collective transport."""
        self.cfg, self.trainer, self.engine, self.backend, self.dtype = cfg, trainer, engine, backend, dtype
        self.probe_ids, self.root = probe_ids, root
        self.engine_version = int(engine.call("version"))
        self.written: Written | None = None    # the newest version written (shm)
        self._loaded: Written | None = None    # what the engine serves, to load again after a restart (shm)
        if cfg.transport == "collective":
            self._join()

    def _join(self) -> None:
        """Build the collective group: the engine's workers join while trainer rank 0 hosts it."""
        host, port = self.trainer.sync_address()
        world = 1 + int(self.engine.call("num_sync_ranks"))
        args = (host, port, world, self.backend, self.cfg.timeout_s)
        pending = self.engine.submit("init_weight_group", *args)
        self.trainer.init_weight_group(*args)
        pending.result(self.cfg.timeout_s)

    def push(self) -> dict:
        """Sync the trainer's current weights (version trainer.policy_version) into the engine, both
        halves now; nothing to do when the engine already serves them."""
        return {**self.write(), **self.load(self.written)}

    def write(self) -> dict:
        """The trainer's half of syncing its current weights (see the module docstring); {} when
        that version is already written or served."""
        version = self.trainer.policy_version
        if version in (self.engine_version, self.written and self.written.version):
            return {}
        start = time.perf_counter()
        if self.cfg.transport == "collective":
            _, attempts = self._attempts(version, lambda: self._broadcast(version), reconnect=True)
            self.engine_version = version
            info = {"sync_attempts": attempts, "engine_version": version}
            if self.cfg.check_equal:
                info["sync_max_tv"] = self._check(self._reference())
            return {**info, "sync_write_seconds": time.perf_counter() - start}
        ticket, _ = self._attempts(version, lambda: self.trainer.push_weights("shm", str(self.root)), reconnect=False)
        self.written = Written(version, ticket, self._reference() if self.cfg.check_equal else None)
        return {"sync_write_seconds": time.perf_counter() - start}

    def load(self, written: Written | None) -> dict:
        """The engine's half: load ``written`` (shm; pass ``self.written`` as it was when the
        engine's next rollout was decided); {} when the engine serves it or newer. The engine
        must not be rolling out."""
        if written is None or written.version <= self.engine_version:
            return {}
        start = time.perf_counter()
        _, attempts = self._attempts(written.version, lambda: self._load(written), reconnect=True)
        info = {"sync_attempts": attempts, "sync_load_seconds": time.perf_counter() - start,
                "engine_version": written.version}
        if written.reference is not None:
            info["sync_max_tv"] = self._check(written.reference)
        return info

    def reload(self) -> int:
        """After the engine restarted (with its initial weights): give it the version it served
        before (shm), or the trainer's current one (collective, which needs the trainer); returns
        the version it serves now."""
        self.reconnect()
        if self.cfg.transport == "collective":
            self.write()
        elif self._loaded is not None and self._loaded.version > self.engine_version:
            self._attempts(self._loaded.version, lambda: self._load(self._loaded), reconnect=True)
        return self.engine_version

    def reconnect(self) -> None:
        """After a failure: wait for the engine (a restarted actor reloads its model), learn the
        version it serves now, and rebuild the collective group (a broken or restarted peer
        leaves the old one unusable)."""
        self.engine.wait_until_ready(self.cfg.timeout_s)
        self.engine_version = int(self.engine.call("version"))
        if self.cfg.transport == "collective":
            self._join()

    def _attempts(self, version: int, attempt, reconnect: bool) -> tuple:
        """``attempt()`` up to sync.retries + 1 times, reconnecting between tries if ``reconnect``;
        returns (its value, the number of tries)."""
        error = None
        for n in range(1, self.cfg.retries + 2):
            try:
                value = attempt()
            except RETRIABLE as e:
                error = e
                log.warning("weight sync of version %d failed (attempt %d of %d): %s",
                            version, n, self.cfg.retries + 1, e)
                if reconnect and n <= self.cfg.retries:
                    self.reconnect()
                continue
            return value, n
        raise WeightSyncError(f"weight sync of version {version} failed after {self.cfg.retries + 1} attempts "
                              f"(sync.retries={self.cfg.retries}): {error}")

    def _load(self, written: Written) -> None:
        self.engine.call("update_weights", written.ticket, timeout=self.cfg.timeout_s)
        self.engine_version, self._loaded = written.version, written
        prune(self.root, older_than=written.version)  # newer ones may be written already

    def _broadcast(self, version: int) -> None:
        pending = self.engine.submit("update_weights", SyncTicket(version, "collective").to_dict())
        self.trainer.push_weights("collective")
        pending.result(self.cfg.timeout_s)

    def _reference(self) -> np.ndarray:
        """The trainer's next-token log-probs along ``probe_ids``."""
        logits = self.trainer.logits(torch.tensor([self.probe_ids]))[0].double()
        return torch.log_softmax(logits, -1).numpy()

    def _check(self, reference: np.ndarray) -> float:
        """Largest total-variation distance between the engine's next-token distributions along
        ``probe_ids`` and ``reference``; WeightSyncError above the dtype's tolerance."""
        engine_lp = np.asarray(self.engine.call("score", [self.probe_ids], [1])[0], dtype=np.float64)
        tv = float(0.5 * np.abs(np.exp(engine_lp) - np.exp(reference)).sum(-1).max())
        if tv > CHECK_TOLERANCE[self.dtype]:
            raise WeightSyncError(f"sync.check_equal: engine and trainer disagree after syncing version "
                                  f"{self.engine_version} (total variation {tv:.2e} > {CHECK_TOLERANCE[self.dtype]:g})")
        return tv


@contextmanager
def sync_root(cfg):
    """The shm transport's directory for one run (sync.dir, or a private one on /dev/shm), removed
    on exit if this run created it. Enter it before the trainer, so that it outlives the workers
    that write into it."""
    if cfg.transport != "shm":
        yield None
        return
    root = default_root() if cfg.dir is None else Path(cfg.dir)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise WeightSyncError(f"sync.dir={cfg.dir}: cannot create the weight-sync directory ({e.strerror})") from None
    try:
        yield root
    finally:
        if cfg.dir is None:
            shutil.rmtree(root, ignore_errors=True)
