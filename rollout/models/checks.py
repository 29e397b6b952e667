"""Checks on model directories, run before any engine starts, with one-line errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

from switchkd.rollout.errors import SwitchkdError

# Head sizes of vLLM 0.32's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ModelError(SwitchkdError, ValueError):
    """A model directory that cannot be used; the message names the config key and the problem."""


def read_model_config(path: str | Path, key: str) -> dict:
    """config.json of an HF model dir with safetensors weights, or ModelError naming ``key``."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{key}={path}: directory does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{key}={path}: not a model directory (no config.json)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for ext in PICKLE_SUFFIXES for p in path.glob(f"*{ext}"))
        found = f" (found {', '.join(pickles)}; pickled weights are not loaded)" if pickles else ""
        raise ModelError(f"{key}={path}: no *.safetensors weights{found}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{key}={path}: config.json is not valid JSON ({e})") from None
    except RecursionError:
        raise ModelError(f"{key}={path}: config.json is not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict) or not _positive_int(config.get("vocab_size")):
        raise ModelError(f"{key}={path}: config.json has no integer vocab_size")
    for name in SIZE_KEYS:  # optional, but when present they size the model: positive integers
        if config.get(name) is not None and not _positive_int(config[name]):
            raise ModelError(f"{key}={path}: config.json {name}={config[name]!r} is not a positive integer")
    _check_index(path, key)
    for file in weights:
        _check_safetensors(file, key)
    return config


# Pickle-based weight formats: named in the error, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SIZE_KEYS = ("hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings")
_MAX_HEADER = 100 << 20   # safetensors' own limit on the JSON header


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_safetensors(file: Path, key: str) -> None:
    """The file opens with a safetensors header (8-byte length + a JSON object) that fits in it:
    an empty, truncated or foreign file fails here, with its name, not inside an engine."""
    safetensors_header(file, key)


def safetensors_header(file: Path, key: str) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets); ModelError
    naming ``key`` and the file when it is unreadable, empty, truncated or not safetensors."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= min(size - 8, _MAX_HEADER) else None
    except OSError as e:
        raise ModelError(f"{key}: {file} cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError):   # JSON or UTF-8 errors
        header = None
    if not isinstance(header, dict):
        raise ModelError(f"{key}: {file} is not a safetensors file (bad or truncated header)")
    return header


def _check_index(path: Path, key: str) -> None:
    """A sharded model's index must name only shards that are there."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise ModelError(f"{key}={path}: {index.name} is not a valid index (no weight_map)") from None
    missing = sorted(str(s) for s in shards if not isinstance(s, str) or not (path / s).is_file())
    if missing:
        raise ModelError(f"{key}={path}: {index.name} names missing shards {', '.join(missing[:3])}")


def head_size(config: dict, key: str = "config.json") -> int:
    """Attention head size from an HF config dict (ModelError naming ``key`` when it has none)."""
    if config.get("head_dim"):
        return config["head_dim"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not (_positive_int(hidden) and _positive_int(heads)):
        raise ModelError(f"{key}: config.json gives no head size (head_dim, or hidden_size and num_attention_heads)")
    return hidden // heads


def check_pair(teacher: str, student: str, engine: str, device: str = "cpu") -> int:
    """Validate the teacher/student dirs for SWITCH; returns the shared vocab size."""
    t_cfg = read_model_config(teacher, "model.teacher")
    s_cfg = read_model_config(student, "model.student")
    if t_cfg["vocab_size"] != s_cfg["vocab_size"]:
        raise ModelError(
            f"model.teacher and model.student have different vocabularies "
            f"(teacher {t_cfg['vocab_size']}, student {s_cfg['vocab_size']}); SWITCH needs one shared vocabulary"
        )
    t_vocab, s_vocab = _tokenizer_vocab(teacher, "model.teacher"), _tokenizer_vocab(student, "model.student")
    if t_vocab != s_vocab:
        raise ModelError(
            f"model.teacher and model.student tokenizers differ (teacher {len(t_vocab)} tokens, "
            f"student {len(s_vocab)} tokens); SWITCH needs one shared tokenizer"
        )
    if engine == "vllm" and device == "cpu":
        for key, cfg in (("model.teacher", t_cfg), ("model.student", s_cfg)):
            size = head_size(cfg, key)
            if size not in CPU_HEAD_SIZES:
                raise ModelError(f"{key}: head size {size} is not supported by vLLM on the CPU (supported: {', '.join(map(str, CPU_HEAD_SIZES))})")
    return t_cfg["vocab_size"]


def _tokenizer_vocab(path: str, key: str) -> dict:
    tokenizer_file = Path(path) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelError(f"{key}={path}: no tokenizer.json (a fast tokenizer is required)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except Exception as e:  # transformers / tokenizers raise many types on damaged files
        message = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"{key}={path}: the tokenizer cannot be loaded ({type(e).__name__}: {message[:200]})") from None
