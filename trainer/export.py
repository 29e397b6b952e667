"""HF model directories (safetensors + config + tokenizer) that transformers and vLLM load.

Every checkpoint already holds one under hf/, gathered from all ZeRO shards when it was saved,
so exporting a checkpoint is a checked copy and needs neither DeepSpeed nor its pickled state.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from switchkd.trainer import checkpoint
from switchkd.trainer.ds_config import TrainerError


def write_hf_dir(model, state_dict: dict, tokenizer_dir: str, out: Path) -> Path:
    """Save ``state_dict`` with ``model``'s config and the tokenizer of ``tokenizer_dir``, atomically."""
    from transformers import AutoTokenizer

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(mode=0o700)  # owner-only, like checkpoints and weight-sync files
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    tmp.rename(out)  # fails rather than replace a non-empty directory
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint dir, given itself or a run's output_dir (then its latest checkpoint)."""
    path = Path(path)
    if checkpoint.is_checkpoint(path):
        return path
    latest = checkpoint.latest_checkpoint(path)
    if latest is not None:
        return latest
    if path.name.startswith("tmp_step_") and path.is_dir():
        raise TrainerError(f"--checkpoint {path}: a half-written checkpoint (its save never finished)")
    raise TrainerError(f"--checkpoint {path}: not a complete checkpoint (step_N/ with {checkpoint.STATE_FILE}) "
                       f"nor a run directory holding one")


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Copy a checkpoint's gathered HF weights to ``out`` (atomically); returns the checkpoint used."""
    ckpt = resolve_checkpoint(path)
    src = ckpt / "hf"
    if not (src / "config.json").is_file() or not any(src.glob("*.safetensors")):
        raise TrainerError(f"--checkpoint {ckpt}: has no hf/ model directory")
    out = check_new_dir(out)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.chmod(tmp, 0o700)  # owner-only, like the checkpoint it comes from
    tmp.rename(out)
    return ckpt


def check_new_dir(out: str | Path) -> Path:
    """``out`` as a Path whose parent exists; refuses to overwrite a non-empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainerError(f"--out {out}: already exists and is not empty; choose a new directory")
    if out.is_dir():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
