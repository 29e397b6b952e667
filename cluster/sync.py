"""The driver's side of weight sync: move the trainer's current weights into the student engine,
versioned, with a timeout on every wait and a bounded number of retries.

    with sync_root(cfg.sync) as root:          # before the trainer: outlives its writers
        ...start the trainer...
        sync = WeightSync(cfg.sync, trainer, student_handle, backend="gloo", probe_ids=[...], root=root)
        info = sync.push()   # engine now serves trainer.policy_version; {"sync_seconds", ...}

Transports (switchkd.rollout.weight_sync): ``shm`` writes a version directory and tells the
engine to load it; ``collective`` starts the engine's receive, then has trainer rank 0 broadcast.
A failed attempt leaves the engine on its previous version (it refuses bad files before loading);
a collective group is rebuilt before a retry, since a broken broadcast leaves it unusable.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from switchkd.rollout.engines import ENGINE_DIED
from switchkd.rollout.weight_sync import SyncTicket, WeightSyncError
from switchkd.rollout.weight_sync_shm import default_root, prune

log = logging.getLogger(__name__)
# Largest total-variation distance between engine and trainer next-token distributions that
# sync.check_equal accepts, by engine dtype (bf16 rounding moves probabilities by ~1e-2).
CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}


class WeightSync:
    def __init__(self, cfg, trainer, engine, backend: str, dtype: str = "float32",
                 probe_ids: list[int] | None = None, root: Path | None = None):
        """``root``: the shm directory (from ``sync_root``); unused by the collective transport."""
        self.cfg, self.trainer, self.engine, self.backend, self.dtype = cfg, trainer, engine, backend, dtype
        self.probe_ids, self.root = probe_ids, root
        self.engine_version = int(engine.call("version"))
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
        """Sync the trainer's current weights (version trainer.policy_version) into the engine;
        nothing to do when the engine already serves them."""
        version = self.trainer.policy_version
        if version == self.engine_version:
            return {"sync_seconds": 0.0, "sync_attempts": 0, "engine_version": version}
        error = None
        for attempt in range(1, self.cfg.retries + 2):
            start = time.perf_counter()
            try:
                self._send(version)
            except (WeightSyncError, TimeoutError, *ENGINE_DIED) as e:
                error = e
                log.warning("weight sync of version %d failed (attempt %d of %d): %s",
                            version, attempt, self.cfg.retries + 1, e)
                if attempt <= self.cfg.retries:
                    self.reconnect()
                continue
            self.engine_version = version
            info = {"sync_seconds": time.perf_counter() - start, "sync_attempts": attempt, "engine_version": version}
            if self.cfg.check_equal:
                info["sync_max_tv"] = self.check_equal()
            return info
        raise WeightSyncError(f"weight sync of version {version} failed after {self.cfg.retries + 1} attempts "
                              f"(sync.retries={self.cfg.retries}): {error}")

    def reconnect(self) -> None:
        """After a failure: wait for the engine (a restarted actor reloads its model), learn the
        version it serves now, and rebuild the collective group (a broken or restarted peer
        leaves the old one unusable)."""
        self.engine.wait_until_ready(self.cfg.timeout_s)
        self.engine_version = int(self.engine.call("version"))
        if self.cfg.transport == "collective":
            self._join()

    def _send(self, version: int) -> None:
        if self.cfg.transport == "shm":
            ticket = self.trainer.push_weights("shm", str(self.root))
            self.engine.call("update_weights", ticket, timeout=self.cfg.timeout_s)
            prune(self.root, keep=Path(ticket["path"]))
            return
        pending = self.engine.submit("update_weights", SyncTicket(version, "collective").to_dict())
        self.trainer.push_weights("collective")
        pending.result(self.cfg.timeout_s)

    def check_equal(self) -> float:
        """Largest total-variation distance between the engine's and the trainer's next-token
        distributions along ``probe_ids``; WeightSyncError above the dtype's tolerance."""
        ids = self.probe_ids
        engine_lp = np.asarray(self.engine.call("score", [ids], [1])[0], dtype=np.float64)
        trainer_lp = torch.log_softmax(self.trainer.logits(torch.tensor([ids]))[0].double(), -1).numpy()
        tv = float(0.5 * np.abs(np.exp(engine_lp) - np.exp(trainer_lp)).sum(-1).max())
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
