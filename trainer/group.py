"""The trainer as the driver sees it: one object, whatever the number of workers.

    trainer = Trainer(cfg, total_steps=100)
    metrics = trainer.train_step(table)          # one optimizer step on a rollout batch
    trainer.save_checkpoint({"epoch": 0, ...})   # data position is the caller's to give
    weights = trainer.state_dict_for_sync()      # full student weights, for the rollout engine
    trainer.export("out/model"); trainer.shutdown()

trainer.num_workers=1 runs the worker in this process (no Ray); more workers are Ray actors in
one placement group, joined in one torch.distributed group (gloo on CPU, nccl on GPU). This
process coordinates: it checks batches before any worker sees them, fans every call out to all
ranks (the calls are collective) and takes rank 0's answer.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pyarrow as pa
import torch

from switchkd.rollout.local_ray import free_port, init_ray
from switchkd.rollout.models.checks import check_pair, read_model_config
from switchkd.trainer import checkpoint
from switchkd.trainer.batch import check_references, check_rows, reference_tokens
from switchkd.trainer.ds_config import TrainerError, build_ds_config, lr_factor, resolve_device
from switchkd.trainer.export import check_new_dir
from switchkd.trainer.metrics import MetricsLogger
from switchkd.trainer.worker import TrainWorker


class Trainer:
    def __init__(self, cfg, total_steps: int | None = None, resume_from: str | Path | None = None,
                 placement: tuple | None = None):
        """``placement`` = (Ray placement group, index of the first of num_workers bundles): the
        workers become actors there, even a single one (the closed loop places every role)."""
        from transformers import AutoTokenizer

        self.cfg, self.tc = cfg, cfg.trainer
        model_cfg = read_model_config(cfg.model.student, "model.student")
        if self.tc.teacher_source == "model":
            check_pair(cfg.model.teacher, cfg.model.student, engine="hf")
        self.vocab_size = model_cfg["vocab_size"]
        self.max_len = model_cfg.get("max_position_embeddings") or 2**31
        self.device = resolve_device(self.tc, local=placement is None)
        build_ds_config(self.tc, self.device)   # user-facing errors here, before any worker starts
        lr_factor(self.tc, total_steps)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.student)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.step = 0
        self.policy_version = 0  # version of the current weights; the driver may set it when it syncs
        self.data_state: dict = {}
        self._ray_started, self._workers, self._actors, self._pg, self.metrics = False, None, None, None, None
        try:
            self._start_workers(total_steps, pad_id, placement)
            if resume_from is not None:
                self.load_checkpoint(resume_from)
            self.metrics = MetricsLogger(self.tc.output_dir, self.tc.tensorboard, start_step=self.step)
        except BaseException:
            self.shutdown()  # no actors, placement group or Ray left behind by a failed start
            raise

    # --- workers -------------------------------------------------------------------------------
    def _start_workers(self, total_steps, pad_id, placement):
        args = (self.device, total_steps, pad_id)
        if self.tc.num_workers == 1 and placement is None:
            self._workers = [TrainWorker(self.cfg, 0, 1, *args)]
            self._workers[0].start("127.0.0.1", free_port(), 0)
            return
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            init_ray(num_cpus=max(1, int(self.tc.num_workers * self.tc.cpus_per_worker)))
            self._ray_started = True
        gpus = 1 if self.device == "cuda" else 0
        bundle = {"CPU": self.tc.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        if placement is None:
            self._pg = placement_group([bundle] * self.tc.num_workers, strategy="PACK")
            try:
                ray.get(self._pg.ready(), timeout=self.tc.dist_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise TrainerError(f"trainer.num_workers={self.tc.num_workers}: Ray could not place "
                                   f"{self.tc.num_workers} workers of {bundle} within {self.tc.dist_timeout_s:.0f} s "
                                   f"(cluster has {ray.cluster_resources()})") from None
        pg, first = placement or (self._pg, 0)
        cls = ray.remote(TrainWorker)
        self._actors = []
        for rank in range(self.tc.num_workers):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first + rank)
            self._actors.append(cls.options(num_cpus=self.tc.cpus_per_worker, num_gpus=gpus,
                                      scheduling_strategy=strategy).remote(
                self.cfg, rank, self.tc.num_workers, *args, in_actor=True))
        addresses = ray.get([a.rendezvous_address.remote() for a in self._actors])
        ips = [ip for ip, _ in addresses]
        local_ranks = [ips[:rank].count(ip) for rank, ip in enumerate(ips)]  # DeepSpeed's per-node index
        ray.get([a.start.remote(*addresses[0], local) for a, local in zip(self._actors, local_ranks)])

    def _rank0(self, method: str, *args):
        """Call ``method`` on rank 0 only (not collective)."""
        if self._actors is None:
            return getattr(self._workers[0], method)(*args)
        import ray

        return ray.get(getattr(self._actors[0], method).remote(*args))

    def _all(self, method: str, *args):
        """Call ``method`` on every rank (collective) and return rank 0's result."""
        if self._actors is None:
            return getattr(self._workers[0], method)(*args)
        import ray

        refs = [getattr(a, method).remote(*args) for a in self._actors]
        return ray.get(refs)[0]

    # --- training ------------------------------------------------------------------------------
    def check_batch(self, table: pa.Table, source: str) -> tuple[pa.Table, int]:
        """Rows to train on and empty responses skipped; SchemaError names ``source`` and the row."""
        return check_rows(table, source, self.vocab_size, self.max_len)

    def train_step(self, table: pa.Table, source: str = "<batch>", checked: bool = False, log: bool = True) -> dict:
        """One optimizer step on up to trainer.batch_size rollout rows; returns its metrics and logs
        them (``log=False``: the caller adds its own figures and calls ``log_metrics``)."""
        start = time.perf_counter()
        skipped = 0
        if not checked:
            table, skipped = self.check_batch(table, source)
        if table.num_rows > self.tc.batch_size:
            raise TrainerError(f"{source}: {table.num_rows} rows, trainer.batch_size is {self.tc.batch_size}")
        if table.num_rows == 0:
            raise TrainerError(f"{source}: no rows with a response to train on")
        if self.tc.sft_ratio > 0:
            check_references(table, source, self.max_len)
        total_tokens = sum(table.column("response_ids").combine_chunks().value_lengths().to_pylist())
        ref_tokens = reference_tokens(table) if self.tc.sft_ratio > 0 else 0
        rows, batch_version = table.num_rows, min(table.column("policy_version").to_pylist())
        if self._actors is not None:
            import ray

            table = ray.put(table)  # one copy in the object store, read by every actor
        sums = self._all("train_step", table, total_tokens, ref_tokens)
        staleness = self.policy_version - batch_version
        self.step += 1
        self.policy_version += 1
        seconds = time.perf_counter() - start
        metrics = {
            "step": self.step, "loss": sums["loss"],
            "loss_student_tokens": _ratio(sums["div_student"], sums["tokens_student"]),
            "loss_teacher_tokens": _ratio(sums["div_teacher"], sums["tokens_teacher"]),
            "sft_loss": _ratio(sums["sft_nll"], sums["tokens_ref"]),
            "tokens": total_tokens, "tokens_per_s": total_tokens / seconds, "seconds": seconds,
            "lr": sums["lr"], "grad_norm": sums["grad_norm"],
            "teacher_fraction": _ratio(sums["tokens_teacher"], total_tokens),
            "rows": rows, "skipped_rows": skipped, "policy_version": self.policy_version,
            "batch_policy_version": batch_version, "staleness": staleness,
        }
        if log:
            self.log_metrics(metrics)
        return metrics

    def log_metrics(self, metrics: dict) -> None:
        """Append one step's metrics to metrics.jsonl (and TensorBoard)."""
        self.metrics.log(metrics)

    # --- checkpoints, weights, export -----------------------------------------------------------
    def save_checkpoint(self, data_state: dict | None = None) -> Path:
        """Write OUTPUT_DIR/checkpoints/step_N atomically; ``data_state`` is the caller's data position."""
        if data_state is not None:
            self.data_state = dict(data_state)
        tmp = checkpoint.temp_dir(self.tc.output_dir, self.step)
        self._all("save", str(tmp), self.cfg.model.student)
        state = {"step": self.step, "policy_version": self.policy_version, "data": self.data_state,
                 "num_workers": self.tc.num_workers, "zero_stage": self.tc.zero_stage,
                 "deepspeed_config": build_ds_config(self.tc, self.device), "config": dataclasses.asdict(self.cfg)}
        return checkpoint.finalize(tmp, state, self.tc.keep_last)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore engine, RNG, step, policy version; returns the saved data position."""
        path = Path(path)
        if not checkpoint.is_checkpoint(path):
            raise TrainerError(f"{path}: not a complete checkpoint")
        state = checkpoint.read_state(path)
        for key in ("num_workers", "zero_stage"):
            if state[key] != getattr(self.tc, key):
                raise TrainerError(f"trainer.{key}={getattr(self.tc, key)}: checkpoint {path} was written with "
                                   f"{state[key]}; resume with the same value")
        self._all("load", str(path))
        self.step, self.policy_version = state["step"], state["policy_version"]
        self.data_state = state["data"]
        if self.metrics is not None:  # drop metrics of the steps about to be redone
            self.metrics.close()
            self.metrics = MetricsLogger(self.tc.output_dir, self.tc.tensorboard, start_step=self.step)
        return self.data_state

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        """Full student weights (CPU tensors, HF names), gathered from every ZeRO shard."""
        return self._all("full_state_dict")

    def sync_address(self) -> tuple[str, int]:
        """(host, free port) on rank 0's node, where it hosts the collective weight-sync group."""
        return self._rank0("sync_address")

    def node_id(self) -> str | None:
        """Ray node of rank 0 (None without Ray): the shm transport needs the engine on it."""
        return self._rank0("node_id")

    def init_weight_group(self, host: str, port: int, world: int, backend: str, timeout_s: float) -> None:
        """Rank 0 joins the weight-sync group as its rank 0 (blocks until all ``world`` ranks join)."""
        self._rank0("init_weight_group", host, port, world, backend, timeout_s)

    def push_weights(self, transport: str, root: str | None = None) -> dict:
        """Send the current weights as version ``policy_version`` (weight_sync); the engine's ticket."""
        return self._all("push_weights", transport, self.policy_version, root)

    def export(self, out_dir: str | Path) -> Path:
        """Write the current student as an HF model directory (safetensors + config + tokenizer)."""
        out = check_new_dir(out_dir)
        self._all("export", str(out), self.cfg.model.student)
        return out

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Student logits for ``input_ids`` [B, L] from the live engine (eval mode)."""
        return self._all("logits", input_ids)

    def shutdown(self) -> None:
        """Close logs and stop the workers (and the Ray this trainer started)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self._actors is not None or self._pg is not None:
            import ray
            from ray.util.placement_group import remove_placement_group

            for actor in self._actors or ():
                ray.kill(actor)
            if self._pg is not None:
                remove_placement_group(self._pg)
            self._actors = self._pg = None
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False
        self._workers = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None

