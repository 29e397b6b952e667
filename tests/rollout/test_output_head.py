"""output_head.OutputHead: hidden-state rows -> log-prob rows with a model's own output layer."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from switchkd.rollout.config import RolloutConfig, ServerConfig, EngineConfig
from switchkd.rollout.engines.output_head import OutputHead, OutputHeadError


def _model(tmp_path, tensors: dict, **config) -> str:
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_untied_head_with_bias_is_log_softmax_of_the_affine_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(11, 4, generator=g), torch.randn(11, generator=g)
    head = OutputHead(_model(tmp_path, {"lm_head.weight": w, "lm_head.bias": b,
                                        "model.embed_tokens.weight": torch.zeros(11, 4)}, tie_word_embeddings=False))
    h = np.array([[1.0, 0.0, -2.0, 0.5], [0.0, 0.0, 0.0, 0.0]], np.float32)
    want = torch.log_softmax(torch.from_numpy(h).double() @ w.double().T + b.double(), -1).numpy()
    np.testing.assert_allclose(head(h), want, atol=1e-6)
    # The all-zero hidden state leaves only the bias.
    np.testing.assert_allclose(head(h)[1], torch.log_softmax(b.double(), -1).numpy(), atol=1e-6)


def test_tied_head_uses_the_input_embedding(tmp_path):
    e = torch.eye(3, 2)
    head = OutputHead(_model(tmp_path, {"model.embed_tokens.weight": e}, tie_word_embeddings=True))
    out = head(np.array([[2.0, 0.0]], np.float32))
    np.testing.assert_allclose(np.exp(out).sum(), 1.0, rtol=1e-6)
    assert out[0].argmax() == 0 and out[0, 1] == pytest.approx(out[0, 2])


@pytest.mark.parametrize("key,value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.5), ("logits_scaling", 8)])
def test_models_that_scale_or_cap_logits_are_refused_by_name(tmp_path, key, value):
    with pytest.raises(OutputHeadError, match=key):
        OutputHead(_model(tmp_path, {"lm_head.weight": torch.zeros(3, 2)}, **{key: value}))


def test_missing_weight_and_wrong_width_are_named(tmp_path):
    with pytest.raises(OutputHeadError, match="no output-layer weight"):
        OutputHead(_model(tmp_path, {"model.embed_tokens.weight": torch.zeros(3, 2)}, tie_word_embeddings=False))
    head = OutputHead(_model(tmp_path, {"lm_head.weight": torch.zeros(3, 2)}))
    with pytest.raises(OutputHeadError, match=r"\[n, 2\]"):
        head(np.zeros((1, 5), np.float32))


def test_hidden_rows_config_refuses_where_no_rows_cross(tmp_path):
    with pytest.raises(ValueError, match="rollout.teacher_rows=hidden: lockstep"):
        RolloutConfig(engine="vllm", teacher_rows="hidden")
    with pytest.raises(ValueError, match="rollout.teacher_rows=hidden: needs a vLLM teacher engine"):
        RolloutConfig(engine="hf", mode="block", teacher_rows="hidden")
    server = EngineConfig(server=ServerConfig(url="http://127.0.0.1:1"))  # hidden rows come from its rows endpoint
    assert RolloutConfig(engine="vllm", mode="block", teacher_rows="hidden", teacher=server).teacher_rows == "hidden"
    assert RolloutConfig(engine="vllm", mode="block", teacher_rows="hidden").teacher_rows == "hidden"
    assert RolloutConfig().teacher_rows == "auto" and RolloutConfig(engine="vllm").teacher_rows == "auto"  # any mode
    assert RolloutConfig(engine="vllm", source="reference", teacher_rows="hidden").teacher_rows == "hidden"
