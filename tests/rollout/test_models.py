"""Model-directory checks run before any engine starts: one-line errors naming key and problem."""
import json
import shutil

import pytest

from switchkd.rollout.models.checks import ModelError, check_pair


def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_good_pair_returns_vocab(tiny_models):
    assert check_pair(str(tiny_models["teacher"]), str(tiny_models["student"]), "vllm") == 512


def test_head_size_vllm_cpu_cannot_run(tiny_models, tmp_path):
    student = _copy(tiny_models["student"], tmp_path / "s", head_dim=48)
    with pytest.raises(ModelError, match="model.student: head size 48 is not supported by vLLM on the CPU"):
        check_pair(str(tiny_models["teacher"]), str(student), "vllm")
    assert check_pair(str(tiny_models["teacher"]), str(student), "hf") == 512  # transformers runs it


def test_pickled_weights_are_not_loaded(tiny_models, tmp_path):
    teacher = _copy(tiny_models["teacher"], tmp_path / "t")
    (teacher / "model.safetensors").rename(teacher / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"no \*.safetensors weights \(found pytorch_model.bin; pickled weights are not loaded\)"):
        check_pair(str(teacher), str(tiny_models["student"]), "hf")


def test_different_tokenizers_are_refused(tiny_models, tmp_path):
    student = _copy(tiny_models["student"], tmp_path / "s")
    tok = json.loads((student / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10], sorted(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different mapping
    (student / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_pair(str(tiny_models["teacher"]), str(student), "hf")
