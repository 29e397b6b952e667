"""Shared fixtures: tiny random models built once per test session (nothing downloads)."""
from __future__ import annotations

import os

import pytest

# In-process, eager vLLM engines with a small KV cache: ~2.5 s per engine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """{'teacher': Path, 'student': Path} of the seed-0 tiny pair."""
    from switchkd.rollout.models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"), seed=0)
