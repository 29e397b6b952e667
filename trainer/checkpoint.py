"""Checkpoint directories: written as tmp_step_N/, renamed to step_N/ when complete, last N kept.

    OUTPUT_DIR/checkpoints/step_N/
        deepspeed/          DeepSpeed engine state (weights, ZeRO optimizer shards, LR schedule)
        rng/rank_R.json     Python, NumPy and torch RNG states of each worker
        hf/                 full student weights (safetensors) + config + tokenizer: what export copies
        trainer_state.json  step, policy version, data position, DeepSpeed JSON, switchkd config

A directory is a checkpoint only under its final name and with trainer_state.json, which is
written last; a crash leaves tmp_* behind, which is never picked up and is swept on the next save.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from switchkd.trainer.ds_config import TrainerError

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def is_checkpoint(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) and (path / STATE_FILE).is_file()


def temp_dir(output_dir: str | Path, step: int) -> Path:
    """A fresh tmp_step_N/ (any leftover of a crashed save of the same step is removed), under an
    owner-only (0700) checkpoints/ directory."""
    root = checkpoints_dir(output_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # owner-only: the weights, optimizer state and config of every checkpoint below
    path = root / f"tmp_step_{step}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def finalize(tmp: Path, state: dict, keep_last: int) -> Path:
    """Write the state file last, fsync, rename tmp_step_N -> step_N, prune old and stale dirs."""
    _write_json(tmp / STATE_FILE, state)
    _fsync_tree(tmp)
    final = tmp.parent / tmp.name.removeprefix("tmp_")
    if final.exists():  # re-saving a step (e.g. after resume): replace atomically enough
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in complete_checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old)
    for stale in final.parent.glob("tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def save_rng(path: Path) -> None:
    """This process's RNG states as JSON (no pickle): Python, NumPy, torch CPU and CUDA."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, state)


def load_rng(path: Path) -> None:
    state = json.loads(path.read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def checkpoint_to_resume(output_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint a run starts from: the latest complete one with ``--resume`` (TrainerError if
    there is none), else None (TrainerError if ``output_dir`` already holds checkpoints)."""
    latest = latest_checkpoint(output_dir)
    if resume and latest is None:
        raise TrainerError(f"--resume: no complete checkpoint under {checkpoints_dir(output_dir)}")
    if not resume and latest is not None:
        raise TrainerError(f"trainer.output_dir={output_dir} already holds checkpoints ({latest.name}); "
                           f"pass --resume to continue, or choose a new trainer.output_dir")
    return latest
