"""Typed config section owned by the trainer.

Batch sizes count sequences (rollout rows). One optimizer step consumes ``batch_size`` rows,
split over ``num_workers`` workers and ``micro_batch_size`` rows per forward pass, so the
gradient-accumulation count is derived, not configured: batch_size / (micro_batch_size * num_workers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from switchkd.rollout.config import bounded, choice
from switchkd.trainer.losses import DEFAULT_LOSS, LOSSES

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainerConfig:
    output_dir: str = "runs/tiny"                  # checkpoints/, metrics.jsonl, tensorboard/
    num_workers: int = bounded(1, lo=1)            # 1 = in-process, no Ray; >1 = Ray actors
    device: str = choice("auto", ("auto", "cpu", "cuda"))  # auto = cuda when available
    cpus_per_worker: float = bounded(1.0, lo=0.0)   # Ray actors: CPUs reserved and torch threads each
    zero_stage: int = choice(0, (0, 1, 2, 3))      # DeepSpeed ZeRO stage; 1-3 partition over workers
    batch_size: int = bounded(8, lo=1)             # rows per optimizer step, all workers together
    micro_batch_size: int = bounded(4, lo=1)       # rows per forward pass per worker
    precision: str = choice("auto", ("auto", "fp32", "bf16"))  # auto = bf16 on a GPU that has it
    lr: float = bounded(1e-5, lo=0.0, lo_open=True)   # peak learning rate (AdamW)
    weight_decay: float = bounded(0.0, lo=0.0)
    lr_schedule: str = choice("constant", LR_SCHEDULES)   # after the warm-up
    warmup_steps: int = bounded(0, lo=0)           # linear ramp to lr over the first steps
    grad_clip: float = bounded(1.0, lo=0.0)        # max global grad norm; 0 disables
    max_steps: Optional[int] = bounded(None, lo=1)  # None = epochs over the rollout file
    epochs: int = bounded(1, lo=1)                 # passes over the data when max_steps is None
    seed: int = 0                                  # data order and torch RNG
    loss: str = choice(DEFAULT_LOSS, tuple(LOSSES))  # the divergence per response token (docs/method.md)
    jsd_beta: float = bounded(0.5, lo=0.0, hi=1.0)          # loss=jsd
    skew_alpha: float = bounded(0.1, lo=0.0, hi=1.0)        # loss=skew_kl / skew_reverse_kl, < 1
    student_token_weight: float = bounded(1.0, lo=0.0)      # loss weight of student-owned tokens
    teacher_token_weight: float = bounded(1.0, lo=0.0)      # loss weight of teacher-owned tokens
    sft_ratio: float = bounded(0.0, lo=0.0, hi=1.0)  # loss = (1-r) distill + r SFT on reference_ids
    teacher_source: str = choice("batch", ("batch", "model"))  # batch top-k, or teacher forward
    save_every: int = bounded(0, lo=0)             # steps between checkpoints; 0 = only at the end
    keep_last: int = bounded(2, lo=1)              # complete checkpoints kept
    tensorboard: bool = True                       # also write the metrics to OUTPUT_DIR/tensorboard/
    deepspeed_config: Optional[str] = None         # user DeepSpeed JSON, merged over the generated one
    dist_timeout_s: float = bounded(600.0, lo=0.0, lo_open=True)  # collectives fail instead of hanging

    def __post_init__(self):
        per_pass = self.micro_batch_size * self.num_workers
        if self.batch_size % per_pass:
            raise ValueError(f"trainer.batch_size={self.batch_size}: must be a multiple of trainer.micro_batch_size "
                             f"* trainer.num_workers = {per_pass}")
        if self.loss in ("skew_kl", "skew_reverse_kl") and self.skew_alpha >= 1.0:
            raise ValueError(f"trainer.skew_alpha={self.skew_alpha}: must be < 1")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"trainer.warmup_steps={self.warmup_steps}: must be <= trainer.max_steps={self.max_steps}")
        if self.student_token_weight == 0 and self.teacher_token_weight == 0:
            raise ValueError("trainer.student_token_weight, trainer.teacher_token_weight: both 0 leaves nothing to train")

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)

    def loss_params(self) -> dict[str, float]:
        """Keyword parameters of the configured loss, for losses.distill_loss."""
        names = LOSSES[self.loss].params
        return {k: v for k, v in (("beta", self.jsd_beta), ("alpha", self.skew_alpha)) if k in names}
