"""Soak (make test-slow): the closed loop for three epochs while engine actors are killed at random
moments; at the end every prompt of every epoch was trained exactly once, the run finished, and
neither the process tree's memory nor /dev/shm grew."""
from __future__ import annotations

import json
import random
import subprocess
import time

import psutil
import pytest

from test_driver import REPO, SWITCHKD, _config, _kill, _shm_entries

pytestmark = pytest.mark.slow


def _tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)] if p.is_running())


def test_soak_with_random_engine_kills(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from switchkd.cluster.config import load_config
    from switchkd.rollout.data.prompts import load_prompts
    from switchkd.rollout.data.schema import read_rollouts

    rng = random.Random(1234)
    shm_before = _shm_entries()
    args = _config(tiny_models, tmp_path, "trainer.epochs=3", "cluster.engine_max_restarts=10", "sync.check_equal=true")
    proc = subprocess.Popen([*SWITCHKD, "train", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def steps_done() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    while steps_done() < 1:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    rss_start, kills = _tree_rss(proc.pid), 0
    for at_step in sorted(rng.sample(range(2, 13), 4)):
        while steps_done() < at_step and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
        time.sleep(rng.uniform(0.0, 1.0))
        _kill("PairEngine")  # rollout.mode=lockstep: both engines in one actor (and its child)
        kills += 1
    rss_end = _tree_rss(proc.pid) if proc.poll() is None else None
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-4000:]
    assert kills == 4
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["policy_version"] for m in rows] == list(range(1, len(rows) + 1))
    assert all(m["sync_max_tv"] < 1e-3 for m in rows if "sync_max_tv" in m)
    cfg = load_config(args[1], args[2:])
    prompts, _ = load_prompts(cfg.data, AutoTokenizer.from_pretrained(tiny_models["teacher"]), 0)
    per_epoch = -(-len(prompts) // cfg.trainer.batch_size)
    files = sorted((tmp_path / "run" / "rollouts").glob("step_*.parquet"))
    assert len(files) == 3 * per_epoch
    for epoch in range(3):
        trained = [i for f in files[epoch * per_epoch:(epoch + 1) * per_epoch]
                   for i in read_rollouts(f).column("prompt_index").to_pylist()]
        assert sorted(trained) == sorted(p.index for p in prompts), f"epoch {epoch}"
    if rss_end is not None:
        assert rss_end < 2 * rss_start, f"process tree memory grew from {rss_start >> 20} MB to {rss_end >> 20} MB"
    assert _shm_entries() - shm_before == set()
