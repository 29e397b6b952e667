"""metrics.jsonl on resume: the lines after the checkpoint's step go, a line a crash cut short too."""
from __future__ import annotations

import json

from switchkd.trainer.metrics import MetricsLogger


def test_resume_drops_later_steps_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(whole) + '\n{"step": 4, "lo')   # killed mid-write
    logger = MetricsLogger(tmp_path, tensorboard=False, start_step=2)
    logger.log({"step": 3, "loss": 0.5})
    logger.close()
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5}]
    assert list(tmp_path.iterdir()) == [path]   # no temporary file left beside it
