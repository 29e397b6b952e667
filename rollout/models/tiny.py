"""Tiny random teacher/student pairs for tests and configs/tiny.yaml (nothing downloads).

Both are llama-architecture models with head size 64 (vLLM's CPU attention supports
32, 64, 80 and up) and share one byte-level BPE tokenizer trained here on a fixed
corpus, whose size equals the models' vocab. Weights are scaled so the two random
models disagree often enough for both owners to appear at the default thresholds.
Deterministic for a seed: same seed, same bytes.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

VOCAB_SIZE = 512
HIDDEN = 128
TEACHER_LAYERS = 4
STUDENT_LAYERS = [0, 3]
LOGIT_SCALE = 8.0
STUDENT_NOISE = 0.3
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]
_WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came show every good me "
    "give our under name very through just form sentence great think say help low line differ turn "
    "cause much mean before move right boy old too same tell does set three want air well also play"
).split()


def _corpus(seed: int, n_lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) + "." for _ in range(n_lines)]


def build_tokenizer(seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with exactly VOCAB_SIZE entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    # Pad with unused tokens so tokenizer length == model vocab (vLLM requires it).
    missing = VOCAB_SIZE - tok.get_vocab_size()
    tok.add_tokens([f"<|unused_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        model_max_length=2048,
    )


def _build_model(tokenizer, num_layers: int, hidden: int, seed: int, logit_scale: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.eval()


def _layer_subset_student(teacher, tokenizer, layers: list[int], seed: int, noise: float):
    """A student made of some teacher layers (plus noise), like a layer-dropped real student."""
    student = _build_model(tokenizer, len(layers), teacher.config.hidden_size, seed, logit_scale=1.0)
    t_state = teacher.state_dict()
    mapping = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(layers)}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in student.state_dict().items():
            src = name
            for s_prefix, t_prefix in ((v, k) for k, v in mapping.items()):
                if name.startswith(s_prefix):
                    src = t_prefix + name[len(s_prefix):]
            w = t_state[src]
            param.copy_(w + noise * w.std() * torch.randn(w.shape, generator=gen))
    return student


def build_tiny_models(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write DIR/teacher and DIR/student (safetensors HF dirs sharing one tokenizer)."""
    out = Path(out)
    tokenizer = build_tokenizer(seed)
    teacher = _build_model(tokenizer, TEACHER_LAYERS, HIDDEN, seed * 2 + 1, logit_scale=LOGIT_SCALE)
    student = _layer_subset_student(teacher, tokenizer, STUDENT_LAYERS, seed * 2 + 2, noise=STUDENT_NOISE)
    paths = {}
    for role, model in (("teacher", teacher), ("student", student)):
        path = out / role
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        paths[role] = path
    return paths
