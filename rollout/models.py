"""Checks on model directories, run before any engine starts, with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

# Head sizes of vLLM 0.32's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ModelError(ValueError):
    """A model directory that cannot be used; the message names the config key and the problem."""


def read_model_config(path: str | Path, key: str) -> dict:
    """config.json of an HF model dir with safetensors weights, or ModelError naming ``key``."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{key}={path}: directory does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{key}={path}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        found = f" (found {', '.join(pickles)}; pickled weights are not loaded)" if pickles else ""
        raise ModelError(f"{key}={path}: no *.safetensors weights{found}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{key}={path}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
        raise ModelError(f"{key}={path}: config.json has no integer vocab_size")
    return config


def head_size(config: dict) -> int:
    """Attention head size from an HF config dict."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


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
            size = head_size(cfg)
            if size not in CPU_HEAD_SIZES:
                raise ModelError(f"{key}: head size {size} is not supported by vLLM on the CPU (supported: {', '.join(map(str, CPU_HEAD_SIZES))})")
    return t_cfg["vocab_size"]


def _tokenizer_vocab(path: str, key: str) -> dict:
    tokenizer_file = Path(path) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelError(f"{key}={path}: no tokenizer.json (a fast tokenizer is required)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()
