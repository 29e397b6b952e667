"""`switchkd train`: the closed loop (docs/closed-loop.md), on Ray actors placed by cluster.placement.

    batch n, rolled out by the student engine at policy version v  ->  train step n (version n+1)
    ->  sync version n+1 into the student engine  ->  batch n+1 ...

``loop.max_staleness=0`` is strictly on-policy: batch n+1 is rolled out after the sync of n+1.
``loop.max_staleness=1`` rolls batch n+1 out (engines driven from a background thread) while
step n trains, with the weights of version n. An engine's weights never change under a running
rollout, so the sync is split in its two halves (cluster.sync): with shm, the trainer writes
version n+1 as soon as step n is done, while rollout n+1 may still run, and the engine loads it at
the start of the background job that rolls out batch n+2, while step n+1 trains. Neither half
holds up the other side. Every batch carries the version that made it; the staleness (trainer
version - batch version) is checked against the bound and logged.

Each step's metrics record the sync work done during that step: ``sync_write_seconds`` (the
trainer writing the version it just made), ``sync_load_seconds`` and ``engine_version`` (the
engine's load that ran during the step and the version it serves at the end of it). With
max_staleness=1 the engine loads version n during step n; after the last step it loads the final
version, so the run ends with the engine serving the trainer's weights.

The data order is a pure function of (trainer.seed, step), as in train-offline, so a checkpoint's
step is its data position; prompt sampling seeds change per epoch.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from switchkd.cluster.config import ConfigError
from switchkd.cluster.memory import memory_killed_error, plan_memory, refuse_or_warn
from switchkd.cluster.placement import (STUDENT, TEACHER, TRAINER, ClusterError, bundle_nodes, lost_nodes,
                                        node_lost_error, placement_group_for, plan_placement, ray_session,
                                        record_placement, uses_private_ray)
from switchkd.cluster.sync import WeightSync, sync_root
from switchkd.rollout.data import schema
from switchkd.rollout.data.prompts import PromptError, load_prompts
from switchkd.rollout.engines.actors import ENGINE_DIED, InBackground, start_engines
from switchkd.rollout.errors import Terminated
from switchkd.rollout.generate import RolloutSummary, build_generator, summarize
from switchkd.rollout.logs import console
from switchkd.rollout.weight_sync.interface import WeightSyncError
from switchkd.rollout.models.checks import check_pair
from switchkd.rollout.data.sequences import Prompt
from switchkd.rollout.switch import prompt_seed
from switchkd.trainer import checkpoint
from switchkd.trainer.ds_config import TrainerError
from switchkd.trainer.group import Trainer
from switchkd.trainer.offline import batch_rows

log = logging.getLogger(__name__)

# Failures a lost node causes (an actor that died with it, a broadcast or call that lost its peer).
# After one, the driver waits this long for Ray to mark the node dead (its health checks take
# seconds) to tell a lost node from any other failure.
CLUSTER_FAILURES = (*ENGINE_DIED, ClusterError, WeightSyncError, TimeoutError)
NODE_LOSS_WAIT_S = 45.0


class Interrupt:
    """Ctrl-C and SIGTERM for the closed loop: each raises KeyboardInterrupt (Terminated for
    SIGTERM) as Python's own SIGINT handler does, and is latched, so the loop stops at its next
    step even if a library swallowed the exception (Python drops one raised where it cannot
    propagate, e.g. inside a C callback). Installed only from the main thread; the previous
    handlers come back on exit. A SIGTERM leaves as Terminated even where a library re-raised it
    as a plain KeyboardInterrupt (Ray's ``ray.get`` does), so the run exits 143, not 130."""

    SIGNALS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

    def __init__(self) -> None:
        self.received, self._previous = None, {}

    def __enter__(self) -> "Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if exc_type is KeyboardInterrupt and self.received is Terminated:
            raise Terminated from exc

    def _on_signal(self, signum, frame):
        self.received = self.SIGNALS[signum]
        raise self.received

    def check(self) -> None:
        """Raise KeyboardInterrupt (or Terminated) if a signal came since this was installed."""
        if self.received is not None:
            raise self.received


class EngineRestarted(RuntimeError):
    """An engine actor came back from a restart (with its initial weights) during a rollout."""


@dataclass
class RolloutBatch:
    step: int
    table: pa.Table
    version: int               # policy version of the student weights that generated it
    summary: RolloutSummary
    span: tuple[float, float]  # perf_counter at its start and end


class RolloutSource:
    """The prompts of each step, rolled out on the engines into schema tables.

    If an engine actor dies mid-rollout, Ray restarts it; ``recover`` waits for it, re-syncs the
    current weights and returns the version the student now serves, and the step's whole batch is
    rolled out again (same prompts and seeds). A batch is written and trained only once complete,
    so every prompt appears in the training data exactly once. The student's version is checked
    before and after each rollout: an actor that died between two calls and came back with its
    initial weights would otherwise answer the rest of the batch silently."""

    def __init__(self, generator, prompts: list[Prompt], batch_size: int, data_seed: int, run_seed: int,
                 out_dir: Path | None, student_version=None, recover=None, max_restarts: int = 0):
        self.generator, self.prompts, self.batch_size = generator, prompts, batch_size
        self.data_seed, self.run_seed, self.out_dir = data_seed, run_seed, out_dir
        self.student_version, self.recover, self.max_restarts = student_version, recover, max_restarts
        self.per_epoch = math.ceil(len(prompts) / batch_size)
        self.engine_restarts = 0

    def prompts_for(self, step: int) -> list[Prompt]:
        """Step ``step``'s prompts; sampling seeds differ per epoch (epoch 0: as `switchkd generate`)."""
        epoch = step // self.per_epoch
        run_seed = self.run_seed + 1_000_003 * epoch
        return [replace(self.prompts[i], seed=prompt_seed(run_seed, self.prompts[i].index))
                for i in batch_rows(len(self.prompts), self.batch_size, self.data_seed, step)]

    def run(self, step: int, version: int) -> RolloutBatch:
        while True:
            try:
                return self._run_once(step, version)
            except (*ENGINE_DIED, EngineRestarted) as e:
                if self.recover is None or self.engine_restarts >= self.max_restarts:
                    raise
                self.engine_restarts += 1
                log.warning("an engine died during the rollout of step %d (%s); restart %d of %d, rolling the "
                            "batch out again", step, str(e).splitlines()[0], self.engine_restarts, self.max_restarts)
                version = self.recover()

    def _check_student(self, version: int) -> None:
        if self.student_version is not None and (served := self.student_version()) != version:
            raise EngineRestarted(f"the student engine serves version {served}, expected {version}")

    def _run_once(self, step: int, version: int) -> RolloutBatch:
        start = time.perf_counter()
        self._check_student(version)
        seqs = self.generator.generate(self.prompts_for(step))
        self._check_student(version)
        table = schema.to_table([s.row(version) for s in seqs])
        if self.out_dir is not None:
            schema.write_parquet(table, self.out_dir / f"step_{step:06d}.parquet")
        end = time.perf_counter()
        return RolloutBatch(step, table, version, summarize(seqs, {}, end - start), (start, end))


def train(cfg, resume: bool = False, progress: bool = True) -> dict:
    """Run the closed loop for trainer.max_steps (or trainer.epochs over the prompts); returns a summary."""
    from transformers import AutoTokenizer

    tc = cfg.trainer
    if cfg.rollout.engine != "vllm":
        raise ConfigError(f"rollout.engine={cfg.rollout.engine}: switchkd train rolls out on vLLM engines; "
                          f"set rollout.engine=vllm")
    latest = checkpoint.checkpoint_to_resume(tc.output_dir, resume)
    plan = plan_placement(cfg)
    if warning := refuse_or_warn(plan_memory(cfg, plan)[1], cfg.cluster.check_memory, "the run"):
        log.warning(warning)
    check_pair(cfg.model.teacher, cfg.model.student, "vllm", cfg.rollout.student.device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.teacher)
    prompts, skipped = load_prompts(cfg.data, tokenizer, cfg.rollout.seed)
    if not prompts:
        raise PromptError(f"data.prompts={cfg.data.prompts}: no usable prompts (skipped: {dict(skipped) or 'none'})")
    total = tc.max_steps or tc.epochs * math.ceil(len(prompts) / tc.batch_size)
    data_state = {"prompts": str(cfg.data.prompts), "num_prompts": len(prompts)}
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    backend = "nccl" if plan.trainer_device == "cuda" and cfg.rollout.student.device == "cuda" else "gloo"
    with ExitStack() as stack:
        private_ray = stack.enter_context(ray_session(cfg.cluster, plan))
        interrupt = stack.enter_context(Interrupt())   # after ray.init, whose SIGTERM handler aborts
        pg = stack.enter_context(placement_group_for(plan, cfg.cluster, private_ray))
        placed = record_placement(pg, plan, tc.output_dir)
        log.info("placement: %s", "; ".join(f"{role} on node {p['node_id'][:8]} ({p['node_ip']})"
                                             for role, p in placed.items()))
        if cfg.sync.transport == "shm":
            _check_same_node(pg, plan)
        engines = start_engines(cfg.model, cfg.rollout, placement={
            key: plan.strategy_for(pg, role) for key, role in (("teacher", TEACHER), ("student", STUDENT))
            if plan.has(role)}, max_restarts=cfg.cluster.engine_max_restarts)
        stack.push(partial(_stop_engines, engines, private_ray))
        root = stack.enter_context(sync_root(cfg.sync))
        trainer = stack.enter_context(Trainer(cfg, total, resume_from=latest, placement=(pg, plan.index(TRAINER))))
        if latest is not None and {k: trainer.data_state.get(k) for k in data_state} != data_state:
            raise TrainerError(f"--resume: the checkpoint was trained on {trainer.data_state}, not on {data_state}")
        sync = WeightSync(cfg.sync, trainer, engines[1], backend, cfg.model.dtype, prompts[0].token_ids, root)
        sync.push()  # resumed: the engine starts from the initial student (a no-op on a fresh run)
        rollouts_dir = Path(tc.output_dir) / "rollouts" if cfg.loop.save_rollouts else None
        source = RolloutSource(build_generator(cfg.model, cfg.rollout, eos, engines=engines), prompts,
                               tc.batch_size, tc.seed, cfg.rollout.seed, rollouts_dir,
                               student_version=lambda: engines[1].call("version"),
                               recover=lambda: _recover_engines(engines, sync, cfg, pg, plan, placed, interrupt),
                               max_restarts=cfg.cluster.engine_max_restarts)
        try:
            result = _loop(cfg, trainer, sync, source, total, data_state, progress, interrupt)
        except Exception as e:
            # a private Ray is this one node: nothing to wait for when one of its actors dies
            wait = NODE_LOSS_WAIT_S if isinstance(e, CLUSTER_FAILURES) and not uses_private_ray(cfg.cluster) else 0.0
            if lost := lost_nodes(placed, wait):
                raise node_lost_error(placed, lost, trainer.step) from e
            if oom := memory_killed_error(e, trainer.step):
                raise ClusterError(oom) from e
            raise
        _record_moves(placed, record_placement(pg, plan, tc.output_dir))
        return {**result, "skipped_prompts": dict(skipped), "prompts": len(prompts)}


def _loop(cfg, trainer, sync, source: RolloutSource, total: int, data_state: dict, progress: bool,
          interrupt: Interrupt) -> dict:
    tc, bound = cfg.trainer, cfg.loop.max_staleness
    # shm: the trainer writes version n+1 while rollout n+1 still runs, and the engine loads it at
    # the start of the next background rollout, while step n+1 trains. A broadcast needs both
    # sides, so a collective sync waits for the rollout.
    write_early = cfg.sync.transport == "shm"
    first = last = None
    bar = tqdm(total=total, initial=trainer.step, unit="step", desc="train", disable=not progress, file=console())
    t0 = time.perf_counter()     # the timeline's origin: t_PHASE_start / t_PHASE_end in metrics.jsonl
    batch = source.run(trainer.step, sync.engine_version) if trainer.step < total else None
    while trainer.step < total:
        interrupt.check()
        step = trainer.step
        if trainer.policy_version - batch.version > bound:
            raise RuntimeError(f"step {step}: batch of version {batch.version} is older than loop.max_staleness="
                               f"{bound} allows at trainer version {trainer.policy_version}")
        ahead = (InBackground(_load_and_roll_out, sync, sync.written, source, step + 1)
                 if bound and step + 1 < total else None)
        last, train_span = _timed(trainer.train_step, batch.table, source=f"rollout of step {step}", log=False)
        written, write_span = _timed(sync.write) if write_early else ({}, None)
        following, (loaded, load_span) = ahead.result() if ahead is not None else (None, ({}, None))  # engine idle now
        if not write_early:
            written, write_span = _timed(sync.write)
        if following is None:  # no rollout in the background: load the new version now
            loaded, load_span = _timed(sync.load, sync.written)
        spans = {"rollout": batch.span, "train": train_span, "sync_write": written and write_span,
                 "sync_load": loaded and load_span}
        last.update({f"t_{name}_{end}": t - t0 for name, span in spans.items() if span
                     for end, t in zip(("start", "end"), span)})
        last.update(written, **loaded, rollout_seconds=batch.summary.seconds,
                    rollout_tokens_per_s=batch.summary.tokens / max(batch.summary.seconds, 1e-9),
                    rollout_teacher_fraction=batch.summary.teacher_fraction, engine_restarts=source.engine_restarts)
        last["engine_version"] = sync.engine_version
        trainer.log_metrics(last)
        first = first or last
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", teacher=f"{batch.summary.teacher_fraction:.2f}",
                        v=last["policy_version"])
        if (tc.save_every and trainer.step % tc.save_every == 0) or trainer.step == total:
            trainer.save_checkpoint({**data_state, "next_step": trainer.step})
        if trainer.step < total:
            batch = following or source.run(trainer.step, sync.engine_version)
    bar.close()
    out = {"steps": trainer.step, "policy_version": trainer.policy_version,
           "first_loss": first and first["loss"], "last_loss": last and last["loss"],
           "checkpoint": str(checkpoint.latest_checkpoint(tc.output_dir))}
    if cfg.loop.export:
        export_dir = Path(tc.output_dir) / "export"
        if export_dir.exists():
            import shutil

            shutil.rmtree(export_dir)  # the previous export of this run (before a --resume)
        out["export"] = str(trainer.export(export_dir))
    return out


def _load_and_roll_out(sync, written, source: RolloutSource, step: int) -> tuple[RolloutBatch, tuple[dict, tuple]]:
    """The background job of max_staleness=1: load ``written`` into the engine, then roll out
    ``step``; returns (the batch, (the load's sync metrics, its span))."""
    loaded = _timed(sync.load, written)
    return source.run(step, sync.engine_version), loaded


def _timed(fn, *args, **kwargs) -> tuple[object, tuple[float, float]]:
    """fn's result and the perf_counter span of the call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, (start, time.perf_counter())


def _recover_engines(engines, sync, cfg, pg, plan, placed: dict, interrupt: Interrupt) -> int:
    """After an engine died: wait until Ray has placed the group again (an engine whose node was
    lost restarts on another node with capacity), wait for the restarted actors, give the student
    engine back the weights it served (a restarted one serves its initial weights) and return its
    version. ``placed`` is updated to where the roles are now. A run that is stopping (a signal,
    which may also have been what stopped the engine) does not recover."""
    deadline = time.monotonic() + cfg.cluster.placement_timeout_s
    while not pg.wait(timeout_seconds=1):
        interrupt.check()
        if time.monotonic() > deadline:
            raise ClusterError(f"Ray could not place the engines again within cluster.placement_timeout_s="
                               f"{cfg.cluster.placement_timeout_s:g} s")
    interrupt.check()
    for handle in engines:
        if handle.actor is not None:
            handle.wait_until_ready(cfg.sync.timeout_s)
    _record_moves(placed, record_placement(pg, plan, cfg.trainer.output_dir))
    return sync.reload()


def _record_moves(placed: dict, now: dict) -> None:
    """Log the roles that Ray placed on another node (after a lost node) and update ``placed``."""
    if moved := [f"{role} to node {where['node_id'][:8]}" for role, where in now.items()
                 if placed[role]["node_id"] != where["node_id"]]:
        log.warning("roles moved: %s", "; ".join(moved))
    placed.update(now)


def _check_same_node(pg, plan) -> None:
    nodes = bundle_nodes(pg)
    student, rank0 = nodes[plan.index(STUDENT)], nodes[plan.index(TRAINER)]
    if student != rank0:
        raise ClusterError(f"sync.transport=shm needs trainer rank 0 and the student engine on one node, but Ray "
                           f"placed them on {rank0[:8]} and {student[:8]}; use sync.transport=collective or "
                           f"cluster.placement_strategy=STRICT_PACK")


def _stop_engines(engines, private_ray: bool, exc_type, exc, tb) -> bool:
    """Stop the engines as the run's context exits; a failure is logged, never masks the run's own
    error. A run on its private Ray that fails or is stopped leaves them to Ray's shutdown, next:
    what stopped it may have reached Ray's daemons too (`kill -TERM -PGID`, a scheduler, the OOM
    killer), an engine actor may be waiting for a restart that never comes, and Ray ends a driver
    whose GCS is gone for a minute (exit status 1) before the run can report why it stopped."""
    if exc_type is not None and private_ray:
        return False
    for handle in reversed(engines):
        try:
            handle.shutdown()
        except Exception as e:  # noqa: BLE001 - cleanup of a possibly dead actor
            log.warning("engine shutdown failed: %s", e)
    return False
