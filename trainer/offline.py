"""`switchkd train-offline`: distil on rollout Parquet files already on disk.

The data order is a pure function of (trainer.seed, epoch): a fresh permutation of the rows each
epoch, cut into trainer.batch_size slices. So the data position is just the step count, and a
resumed run replays exactly the batches an uninterrupted run would have seen next.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from switchkd.rollout.models.checks import read_model_config
from switchkd.rollout.data.schema import read_rollouts
from switchkd.trainer import checkpoint
from switchkd.trainer.batch import check_references, check_rows
from switchkd.trainer.ds_config import TrainerError
from switchkd.trainer.group import Trainer


def load_rollouts(paths: list[str], student_dir: str, sft_ratio: float = 0.0) -> tuple[pa.Table, int]:
    """All rows of ``paths``, checked (errors name file and row); returns (rows, empty ones skipped).
    With ``sft_ratio`` > 0 every file must carry reference_ids (trainer.sft_ratio)."""
    model = read_model_config(student_dir, "model.student")
    vocab, max_len = model["vocab_size"], model.get("max_position_embeddings") or 2**31
    tables, skipped = [], 0
    for path in paths:
        table, n = check_rows(read_rollouts(path, vocab), str(path), vocab, max_len)
        if sft_ratio > 0:
            check_references(table, str(path), max_len)
        tables.append(table)
        skipped += n
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if table.num_rows == 0:
        raise TrainerError(f"--rollouts {', '.join(map(str, paths))}: no rows with a response to train on")
    return table, skipped


def batch_rows(num_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of 0-based ``step``: epochs of seeded permutations, cut into batches (last one short)."""
    per_epoch = -(-num_rows // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return order[index * batch_size:(index + 1) * batch_size]


def train_offline(cfg, rollouts: list[str], resume: bool = False, stop_after: int | None = None,
                  progress: bool = True) -> dict:
    """Train on ``rollouts``; checkpoints every trainer.save_every steps and at the end.

    ``stop_after`` ends the loop after that step without a final checkpoint, as a crash would
    (tests use it to check that resuming reproduces an uninterrupted run).
    """
    tc = cfg.trainer
    latest = checkpoint.checkpoint_to_resume(tc.output_dir, resume)
    table, skipped = load_rollouts(rollouts, cfg.model.student, tc.sft_ratio)
    per_epoch = -(-table.num_rows // tc.batch_size)
    total_steps = tc.max_steps or tc.epochs * per_epoch
    if resume and checkpoint.read_state(latest)["step"] >= total_steps:
        raise TrainerError(f"--resume: the checkpoint is at step {checkpoint.read_state(latest)['step']}, the run "
                           f"ends at step {total_steps}; raise trainer.max_steps or trainer.epochs to train further")
    with Trainer(cfg, total_steps=total_steps, resume_from=latest if resume else None) as trainer:
        data = {"rollouts": [str(Path(p).resolve()) for p in rollouts], "rows": table.num_rows}
        if resume and {k: trainer.data_state.get(k) for k in data} != data:
            raise TrainerError(f"--resume: checkpoint was trained on {trainer.data_state.get('rollouts')} "
                               f"({trainer.data_state.get('rows')} rows), not on these rollouts ({table.num_rows} rows)")
        first_loss = last = None
        bar = tqdm(total=total_steps, initial=trainer.step, unit="step", desc="train", disable=not progress)
        while trainer.step < total_steps:
            idx = batch_rows(table.num_rows, tc.batch_size, tc.seed, trainer.step)
            last = trainer.train_step(table.take(idx), source=", ".join(map(str, rollouts)), checked=True)
            first_loss = last["loss"] if first_loss is None else first_loss
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            position = {**data, "epoch": (trainer.step - 1) // per_epoch, "next_step": trainer.step}
            if stop_after is not None and trainer.step >= stop_after:
                bar.close()
                return {"steps": trainer.step, "stopped": True}
            if (tc.save_every and trainer.step % tc.save_every == 0) or trainer.step == total_steps:
                trainer.save_checkpoint(position)
        bar.close()
        return {"steps": trainer.step, "first_loss": first_loss, "last_loss": last and last["loss"],
                "skipped_rows": skipped, "checkpoint": str(checkpoint.latest_checkpoint(tc.output_dir))}

