"""vLLM SWITCH generators (block-speculative and stepwise) against the HF reference.

Greedy float32: tokens and owners identical to the HF reference on 32 prompts x 128
tokens for every schedule. Sampling: block and stepwise make the very same draws
(tokens are keyed by seed and position), and those draws follow the owner's
distribution (chi-square).
"""
import dataclasses

import numpy as np
import pytest
import torch

from switchkd.rollout import switch
from switchkd.rollout.config import ModelConfig, RolloutConfig, SwitchConfig
from switchkd.rollout.engines import EngineHandle, StudentEngine, TeacherEngine, engine_kwargs
from switchkd.rollout.hf_reference import HFSwitchGenerator, load_hf_model
from switchkd.rollout.sequences import Prompt
from switchkd.rollout.vllm_generator import VLLMSwitchGenerator

EOS = 2
SCHEDULES = [("exp", 0.42, 0.008), ("linear", 0.42, 0.005), ("const", 0.37, 0.0)]


@pytest.fixture(scope="module")
def engines(tiny_models):
    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    rollout = RolloutConfig(engine="vllm")
    teacher = EngineHandle(engine=TeacherEngine(**engine_kwargs(model.teacher, model, rollout.teacher, 0)))
    student = EngineHandle(engine=StudentEngine(**engine_kwargs(model.student, model, rollout.student, 0)))
    yield teacher, student
    teacher.shutdown()
    student.shutdown()


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return load_hf_model(str(tiny_models["teacher"]), "float32"), load_hf_model(str(tiny_models["student"]), "float32")


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [Prompt(i, rng.integers(3, 500, size=rng.integers(3, 40)).tolist(), switch.prompt_seed(seed, i)) for i in range(n)]


def _vllm(engines, cfg):
    return VLLMSwitchGenerator(ModelConfig(), cfg, {EOS}, engines=engines)


@pytest.mark.parametrize("schedule,tau0,decay", SCHEDULES)
def test_greedy_block_and_stepwise_equal_hf_reference(engines, hf_models, schedule, tau0, decay):
    cfg = RolloutConfig(engine="vllm", temperature=0.0, max_new_tokens=128, batch_size=32,
                        switch=SwitchConfig(tau0=tau0, decay=decay, schedule=schedule))
    prompts = _prompts(32, seed=len(schedule))
    reference = HFSwitchGenerator(*hf_models, cfg, {EOS}, pad_id=0).generate(prompts)
    owners = np.concatenate([r.owner for r in reference])
    assert 0.05 < owners.mean() < 0.95, "both owners must appear for the test to mean anything"
    assert sum(len(r.response_ids) for r in reference) > 32 * 100
    for mode in ("block", "stepwise"):
        seqs = _vllm(engines, dataclasses.replace(cfg, mode=mode)).generate(prompts)
        for ref, got in zip(reference, seqs):
            assert got.response_ids == ref.response_ids, f"{mode}: tokens differ for prompt {ref.prompt.index}"
            assert got.owner == ref.owner, f"{mode}: owners differ for prompt {ref.prompt.index}"
            assert got.finish_reason == ref.finish_reason
            np.testing.assert_allclose(got.jsd, ref.jsd, atol=1e-4)
            np.testing.assert_allclose(got.student_logprob, ref.student_logprob, atol=1e-3)
            np.testing.assert_array_equal(np.stack(got.topk_ids)[:, :3], np.stack(ref.topk_ids)[:, :3])


def test_sampled_block_equals_stepwise_draw_for_draw(engines):
    cfg = RolloutConfig(engine="vllm", temperature=1.0, max_new_tokens=64, batch_size=16,
                        switch=SwitchConfig(tau0=0.4, decay=0.01))
    prompts = _prompts(16, seed=99)
    block = _vllm(engines, cfg).generate(prompts)
    stepwise = _vllm(engines, dataclasses.replace(cfg, mode="stepwise")).generate(prompts)
    for b, s in zip(block, stepwise):
        assert b.response_ids == s.response_ids and b.owner == s.owner
    again = _vllm(engines, dataclasses.replace(cfg, batch_size=5)).generate(prompts)
    assert [s.response_ids for s in again] == [s.response_ids for s in block], "seeded runs must reproduce"


def test_sampled_first_tokens_follow_owner_distribution(engines, hf_models):
    """Chi-square: the first token over many seeds is distributed as the owner's softmax(logits / T)."""
    from scipy.stats import chisquare

    temperature, n = 0.8, 600
    prompt_ids = _prompts(1, seed=5)[0].token_ids
    prompts = [Prompt(i, prompt_ids, switch.prompt_seed(123, i)) for i in range(n)]
    cfg = RolloutConfig(engine="vllm", temperature=temperature, max_new_tokens=1, batch_size=n)
    seqs = _vllm(engines, cfg).generate(prompts)
    owner = seqs[0].owner[0]
    assert all(s.owner == [owner] for s in seqs)
    model = hf_models[0] if owner == switch.TEACHER else hf_models[1]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1].double() / temperature, -1).numpy()
    top = np.argsort(-probs)[:6]
    counts = np.bincount([s.response_ids[0] for s in seqs], minlength=len(probs))
    observed = np.append(counts[top], n - counts[top].sum())
    expected = np.append(probs[top], 1 - probs[top].sum()) * n
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_block_mode_speculates_long_runs(engines):
    """A student that owns every token (tau0 > ln 2) is drafted in k = 8, 16, 32 ... blocks: 4 blocks
    (8 engine calls: draft + verify), where stepwise needs 2 calls per token."""
    cfg = RolloutConfig(engine="vllm", temperature=1.0, max_new_tokens=64, batch_size=8,
                        switch=SwitchConfig(tau0=0.7, decay=0.0, schedule="const"))
    block, stepwise = _vllm(engines, cfg), _vllm(engines, dataclasses.replace(cfg, mode="stepwise"))
    seqs = block.generate(_prompts(8, seed=4))
    assert all(o == 0 for s in seqs for o in s.owner)
    assert [s.response_ids for s in seqs] == [s.response_ids for s in stepwise.generate(_prompts(8, seed=4))]
    longest = max(len(s.response_ids) for s in seqs)
    assert block.engine_calls <= 8 and stepwise.engine_calls == 2 * longest

