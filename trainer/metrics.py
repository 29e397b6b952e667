"""Per-step metrics: one JSON line each in OUTPUT_DIR/metrics.jsonl, and TensorBoard scalars.

On resume from step k, lines and events after step k are dropped first, so a resumed run's
metrics read like an uninterrupted run's (the redone steps are not logged twice).
"""
from __future__ import annotations

import json
from pathlib import Path

from switchkd.rollout.io import atomic_write_bytes


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool, start_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)

    def _truncate_after(self, step: int) -> None:
        """Keep the lines up to ``step``; a line a crash cut short is dropped too. Rewritten
        atomically: a crash here leaves the old file whole."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [ln for ln in lines if (at := _step(ln)) is not None and at <= step]
        if len(kept) != len(lines):
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())

    def log(self, metrics: dict) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, metrics["step"])
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _step(line: str) -> int | None:
    """The step of one metrics line; None for a blank line or one a crash cut short."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return None
