"""A model's output layer on the receiving side of hidden-state rows (rollout.teacher_rows=hidden).

An engine asked for hidden-state rows (``fast_logprobs.HIDDEN_ROWS_ARGS``) returns, per token,
its final hidden state: the output of the final norm, the input of the output layer, d_model
values instead of V log-probs. ``OutputHead`` loads that layer's weight (``lm_head.weight``, or
the input embedding when the model ties them) from the model's safetensors and computes
``log_softmax(h @ W.T + b)`` in float32: the same full-vocabulary distribution the engine would
have sent, so SWITCH's divergence stays exact. Models whose logits are scaled or soft-capped
after the output layer are refused (the engine's rows would differ from ``h @ W.T``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

# config.json keys that change the logits after the output layer (vLLM's LogitsProcessor
# applies them): such a model's rows cannot be rebuilt from h @ W.T alone.
UNSUPPORTED_LOGIT_KEYS = ("logit_scale", "logits_scaling", "final_logit_softcapping")
WEIGHT_NAMES = ("lm_head.weight",)
TIED_NAMES = ("model.embed_tokens.weight",)


class OutputHeadError(ValueError):
    """The model's output layer cannot rebuild its log-prob rows from hidden states."""


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} of a model directory."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise OutputHeadError(f"{model_dir}: no *.safetensors file (hidden-state rows need the output layer's weight)")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            out.update({name: file for name in f.keys()})
    return out


def _load(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(files[name]), framework="pt") as f:
        return f.get_tensor(name).to(torch.float32)


class OutputHead:
    """The output layer of the model in ``model_dir``: hidden-state rows -> float32 log-prob rows."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        for key in UNSUPPORTED_LOGIT_KEYS:
            if config.get(key) not in (None, 1, 1.0):
                raise OutputHeadError(f"{model_dir}: config.json sets {key}={config[key]}, which changes the logits "
                                      "after the output layer; use rollout.teacher_rows=logprobs for this model")
        files = _tensor_files(model_dir)
        name = next((n for n in WEIGHT_NAMES if n in files), None)
        if name is None and config.get("tie_word_embeddings", True):
            name = next((n for n in TIED_NAMES if n in files), None)
        if name is None:
            raise OutputHeadError(f"{model_dir}: no output-layer weight found (looked for {WEIGHT_NAMES}, and "
                                  f"{TIED_NAMES} for tied embeddings); use rollout.teacher_rows=logprobs")
        self.weight = _load(files, name)  # [V, d]
        bias = name.replace(".weight", ".bias")
        self.bias = _load(files, bias) if bias in files else None
        self.vocab_size, self.hidden_size = self.weight.shape

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """float32 [n, d_model] final hidden states -> float32 [n, V] log-probs."""
        if hidden.ndim != 2 or hidden.shape[1] != self.hidden_size:
            raise OutputHeadError(f"hidden-state rows of shape {hidden.shape}: the output layer takes "
                                  f"[n, {self.hidden_size}]")
        logits = torch.from_numpy(np.require(hidden, np.float32, "W")) @ self.weight.T
        if self.bias is not None:
            logits += self.bias
        return torch.log_softmax(logits, dim=-1).numpy()
