"""Lockstep SWITCH (vllm_lockstep): the exchange's decisions, KV admission, failures and config.

That lockstep rollouts equal the HF reference and the other modes is checked with them in
test_vllm_generator.py; here are the parts only lockstep has."""
import dataclasses

import numpy as np
import pytest
import torch

from switchkd.rollout import switch
from switchkd.rollout.config import EngineConfig, ModelConfig, RolloutConfig, ServerConfig, SwitchConfig
from switchkd.rollout.engines import EngineHandle, PairEngine, engine_kwargs
from switchkd.rollout.sequences import Prompt, SequenceBuilder
from switchkd.rollout.vllm_generator import VLLMSwitchGenerator
from switchkd.rollout.vllm_lockstep import Exchange, LockstepError

EOS = 2


def _prompts(n, seed, low=3, high=40):
    rng = np.random.default_rng(seed)
    return [Prompt(i, rng.integers(3, 500, size=rng.integers(low, high)).tolist(), switch.prompt_seed(seed, i))
            for i in range(n)]


def _pair(tiny_models, **engine):
    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    cfg = EngineConfig(**engine)
    return EngineHandle(engine=PairEngine(engine_kwargs(model.teacher, model, cfg, 0),
                                          **engine_kwargs(model.student, model, cfg, 0)))


@pytest.fixture(scope="module")
def pairs(tiny_models):
    """PairEngines by name, made on first use and all shut down at the end of the module: vLLM's
    shutdown tears down process-wide state that the engines still running here need."""
    made = {}
    configs = {"default": {}, "small_kv": dict(kv_cache_space_gb=0.0015, max_model_len=256),
               "short": dict(max_model_len=48)}

    def get(name):
        if name not in made:
            made[name] = _pair(tiny_models, **configs[name])
        return made[name]

    yield get
    for handle in made.values():
        handle.shutdown()


@pytest.fixture
def pair(pairs):
    return pairs("default")


def _generate(pair, cfg, prompts):
    return VLLMSwitchGenerator(ModelConfig(), cfg, {EOS}, engines=(pair, pair)).generate(prompts)


def _idle(pair) -> bool:
    engine = pair.engine
    return not (engine.llm.llm_engine.has_unfinished_requests() or engine.teacher.llm.llm_engine.has_unfinished_requests())


# --- the exchange, without engines ------------------------------------------------------------------

def _rows(n, vocab, seed):
    return torch.log_softmax(torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3, -1)


def test_exchange_decides_like_the_owner_rule_and_records_both_rows():
    """The teacher's step decides every waiting student row at once: the tokens both engines are
    forced to are OwnerRule's draws, and each builder records d, tau, owner and the teacher top-k."""
    rule = switch.OwnerRule(SwitchConfig(tau0=0.3, decay=0.0, schedule="const"), temperature=1.0)
    prompts = _prompts(6, seed=3)
    seqs = {i: SequenceBuilder(p, topk=4) for i, p in enumerate(prompts)}
    teacher = _rows(6, 50, 2)
    student = torch.cat([teacher[:3] + 0.01 * _rows(3, 50, 3), _rows(3, 50, 1)])  # close for 3 rows, far for 3
    student = torch.log_softmax(student, -1)
    keys, positions = list(range(6)), [0] * 6
    calls = []

    def step_teacher():
        calls.append(exchange.teacher_rows(keys, positions, teacher))

    exchange = Exchange(rule, seqs, {EOS}, max_new_tokens=8, step_teacher=step_teacher)
    tokens = exchange.student_rows(keys, positions, student)
    assert calls == [tokens], "one teacher step decides the whole batch; both engines get the same tokens"
    d, tau, own = rule.decide(teacher, student, positions)
    assert 0 < own.float().mean() < 1, "both owners must appear for the test to mean anything"
    for i, seq in seqs.items():
        want = rule.draw(int(own[i]), teacher[i], student[i], prompts[i].seed, 0)
        assert seq.response_ids == [want] == [tokens[i]]
        assert seq.owner == [int(own[i])]
        np.testing.assert_allclose(seq.jsd, [float(d[i])])
        np.testing.assert_allclose(seq.student_logprob, [float(student[i, want])])
        np.testing.assert_array_equal(seq.topk_ids[0], torch.topk(teacher[i], 4).indices.numpy())


def test_exchange_reports_engines_out_of_step():
    rule = switch.OwnerRule(SwitchConfig(), temperature=1.0)
    seqs = {0: SequenceBuilder(_prompts(1, seed=0)[0], topk=4)}
    stalled = Exchange(rule, seqs, {EOS}, 8, step_teacher=lambda: None)
    with pytest.raises(LockstepError, match="sequences \\[0\\] not decided by its step"):
        stalled.student_rows([0], [0], _rows(1, 50, 0))
    ahead = Exchange(rule, seqs, {EOS}, 8, step_teacher=lambda: None)
    with pytest.raises(LockstepError, match="sequence 0 at position 0 has no student row"):
        ahead.teacher_rows([0], [0], _rows(1, 50, 0))
    ahead.waiting[0] = (1, _rows(1, 50, 0)[0])
    with pytest.raises(LockstepError, match=r"sequence 0 at position 1 .* \(position 1\)|engines are at position 1"):
        ahead.teacher_rows([0], [1], _rows(1, 50, 0))


# --- on engines -------------------------------------------------------------------------------------

def test_more_sequences_than_the_kv_caches_hold_are_admitted_as_others_finish(pairs, pair):
    """A KV cache for ~4 sequences and a batch of 12: the rollout waits for room instead of letting vLLM
    preempt one engine's request (which would put the engines out of step), and gives the same tokens."""
    cfg = RolloutConfig(engine="vllm", mode="lockstep", temperature=1.0, max_new_tokens=64, batch_size=12,
                        switch=SwitchConfig(tau0=0.4, decay=0.01))
    prompts = _prompts(12, seed=21, low=20, high=60)
    want = _generate(pair, cfg, prompts)
    small = pairs("small_kv")
    capacity = small.engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert capacity < 12 * 3, "the cache must be too small for the whole batch"
    got = _generate(small, cfg, prompts)
    assert _idle(small)
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    assert [s.owner for s in got] == [s.owner for s in want]


def test_lockstep_rollout_stopped_half_way_leaves_the_engines_clean(pair, monkeypatch):
    from switchkd.rollout import vllm_lockstep

    cfg = RolloutConfig(engine="vllm", mode="lockstep", temperature=1.0, max_new_tokens=48, batch_size=8,
                        switch=SwitchConfig(tau0=0.42, decay=0.008))
    prompts = _prompts(8, seed=41)
    want = [s.response_ids for s in _generate(pair, cfg, prompts)]
    decide, calls = vllm_lockstep.Exchange.teacher_rows, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 12:
            raise RuntimeError("injected")
        return decide(self, *args)

    monkeypatch.setattr(vllm_lockstep.Exchange, "teacher_rows", failing)
    with pytest.raises(RuntimeError, match="injected"):
        _generate(pair, cfg, prompts)
    assert _idle(pair)
    monkeypatch.undo()
    assert [s.response_ids for s in _generate(pair, cfg, prompts)] == want


def test_a_prompt_without_room_for_a_response_names_the_prompt(pair):
    cfg = RolloutConfig(engine="vllm", mode="lockstep", max_new_tokens=8)
    long = Prompt(7, [5] * pair.engine.max_model_len, 0)
    with pytest.raises(ValueError, match="prompt 7: .* leave no room for a response"):
        _generate(pair, cfg, [long])
    assert _idle(pair)


def test_responses_stop_at_max_model_len_with_finish_reason_length(pairs):
    """A response the engines' max_model_len cuts short of max_new_tokens ends there, as "length"."""
    short = pairs("short")
    cfg = RolloutConfig(engine="vllm", mode="lockstep", temperature=1.0, max_new_tokens=64, batch_size=3)
    prompts = [Prompt(0, list(range(3, 43)), 1), Prompt(1, list(range(3, 13)), 2), Prompt(2, [5, 6], 3)]
    seqs = VLLMSwitchGenerator(ModelConfig(), cfg, set(), engines=(short, short)).generate(prompts)
    assert _idle(short)
    assert [len(s.response_ids) for s in seqs] == [8, 38, 46]
    assert [s.finish_reason for s in seqs] == ["length"] * 3


@pytest.mark.parametrize("override,message", [
    (dict(teacher=EngineConfig(server=ServerConfig(url="http://127.0.0.1:8000"))), "use rollout.mode=block"),
    (dict(teacher=EngineConfig(device="cuda", num_gpus=1)), "one process on one device"),
])
def test_lockstep_config_needs_both_engines_in_one_process(override, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(engine="vllm", mode="lockstep", **override)
    RolloutConfig(engine="vllm", mode="block", **override)  # block mode is how to run them apart
