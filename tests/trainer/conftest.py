"""Trainer fixtures: one small rollout Parquet from the tiny pair, and configs pointing at it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The DeepSpeed shm op compiles once (~30 s) into a stable directory (the Makefile sets the same).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))


@pytest.fixture(scope="session")
def rollout_file(tiny_models, tmp_path_factory) -> Path:
    """8 prompts x 8 tokens of HF-reference SWITCH rollouts (both owners present)."""
    from switchkd.cluster.config import load_config
    from switchkd.rollout.generate import run_generate

    out = tmp_path_factory.mktemp("rollouts") / "rollouts.parquet"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}",
        f"data.prompts={REPO / 'configs' / 'prompts' / 'tiny.jsonl'}", "data.max_prompts=8",
        "rollout.engine=hf", "rollout.max_new_tokens=8", "rollout.teacher_topk=16"])
    run_generate(cfg.model, cfg.data, cfg.rollout, str(out))
    return out


@pytest.fixture
def make_cfg(tiny_models, tmp_path):
    """make_cfg(**trainer_overrides) -> Config for the tiny pair, output under tmp_path."""
    from switchkd.cluster.config import load_config

    def make(output_dir=None, **trainer):
        values = {"output_dir": output_dir or tmp_path / "run", "lr": 0.003, "batch_size": 4,
                  "micro_batch_size": 2, "tensorboard": False, **trainer}
        return load_config(REPO / "configs" / "tiny.yaml", [
            f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}",
            *(f"trainer.{k}={v}" for k, v in values.items())])

    return make
