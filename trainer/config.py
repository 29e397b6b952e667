"""Typed config section owned by the trainer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainerConfig:
    output_dir: str = "runs/tiny"
