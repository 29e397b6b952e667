"""Lockstep SWITCH (vllm_lockstep): the exchange's decisions, KV admission, failures and config.

That lockstep rollouts equal the HF reference and the other modes is checked with them in
test_vllm_generator.py; here are the parts only lockstep has."""
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from switchkd.rollout import switch
from switchkd.rollout.config import EngineConfig, ModelConfig, RolloutConfig, ServerConfig, SwitchConfig
from switchkd.rollout.engines.actors import EngineHandle, PairEngine, engine_kwargs
from switchkd.rollout.engines.lockstep_process import TeacherProcess
from switchkd.rollout.data.sequences import Prompt, SequenceBuilder
from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator
from switchkd.rollout.engines.lockstep import Exchange, InlineTeacher, LockstepError

EOS = 2


def _prompts(n, seed, low=3, high=40):
    rng = np.random.default_rng(seed)
    return [Prompt(i, rng.integers(3, 500, size=rng.integers(low, high)).tolist(), switch.prompt_seed(seed, i))
            for i in range(n)]


def _pair(tiny_models, teacher_process=True, teacher_model=None, **engine):
    model = ModelConfig(teacher=teacher_model or str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    cfg = EngineConfig(**engine)
    return EngineHandle(engine=PairEngine(engine_kwargs(model.teacher, model, cfg, 0), teacher_process=teacher_process,
                                          **engine_kwargs(model.student, model, cfg, 0)))


@pytest.fixture(scope="module")
def pairs(tiny_models):
    """PairEngines by name, made on first use and all shut down at the end of the module: vLLM's
    shutdown tears down process-wide state that the engines still running here need."""
    made = {}
    configs = {"default": {}, "small_kv": dict(kv_cache_space_gb=0.0015, max_model_len=256),
               "short": dict(max_model_len=48), "inline": dict(teacher_process=False), "victim": {}}

    def get(name):
        if name not in made:
            made[name] = _pair(tiny_models, **configs[name])
        return made[name]

    yield get
    for handle in made.values():
        handle.shutdown()
    for handle in made.values():
        if isinstance(handle.engine.teacher, TeacherProcess):
            assert handle.engine.teacher.proc.poll() is not None, "shutdown must end the teacher process"


@pytest.fixture(params=["default", "inline"])
def pair(pairs, request):
    """A PairEngine with its teacher in a child process (default) or in this process (inline)."""
    return pairs(request.param)


def _generate(pair, cfg, prompts):
    return VLLMSwitchGenerator(ModelConfig(), cfg, {EOS}, engines=(pair, pair)).generate(prompts)


def _idle(pair) -> bool:
    engine = pair.engine
    return not (engine.llm.llm_engine.has_unfinished_requests() or engine.teacher.has_unfinished())


# --- the exchange, without engines ------------------------------------------------------------------

def _rows(n, vocab, seed):
    return torch.log_softmax(torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3, -1)


class _RowsTeacher:
    """A teacher side without an engine: its rows are given."""

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def exchange(self, exchange, keys, positions, student):
        self.calls += 1
        tokens = exchange.decide(keys, positions, self.rows, student, exchange.noise(keys, positions, student.shape[-1]))
        exchange.record()
        return tokens


def test_exchange_decides_like_the_owner_rule_and_records_both_rows():
    """One exchange decides every row of a step at once: the tokens both engines are forced to are
    OwnerRule's draws row by row, and each builder records d, tau, owner and the teacher top-k."""
    rule = switch.OwnerRule(SwitchConfig(tau0=0.3, decay=0.0, schedule="const"), temperature=1.0)
    prompts = _prompts(6, seed=3)
    seqs = {i: SequenceBuilder(p, topk=4) for i, p in enumerate(prompts)}
    teacher = _rows(6, 50, 2)
    student = torch.cat([teacher[:3] + 0.01 * _rows(3, 50, 3), _rows(3, 50, 1)])  # close for 3 rows, far for 3
    student = torch.log_softmax(student, -1)
    keys, positions = list(range(6)), [0] * 6
    side = _RowsTeacher(teacher)
    tokens = Exchange(rule, seqs, {EOS}, max_new_tokens=8, teacher=side).student_rows(keys, positions, student)
    assert side.calls == 1, "one exchange per step decides the whole batch"
    d, tau, own = rule.decide(teacher, student, positions)
    assert 0 < own.float().mean() < 1, "both owners must appear for the test to mean anything"
    for i, seq in seqs.items():
        want = rule.draw(int(own[i]), teacher[i], student[i], prompts[i].seed, 0)
        assert seq.response_ids == [want] == [tokens[i]]
        assert seq.owner == [int(own[i])]
        np.testing.assert_allclose(seq.jsd, [float(d[i])])
        np.testing.assert_allclose(seq.student_logprob, [float(student[i, want])])
        np.testing.assert_array_equal(seq.topk_ids[0], torch.topk(teacher[i], 4).indices.numpy())


@pytest.mark.parametrize("rule,temperature", [("jsd", 1.0), ("jsd", 0.0), ("skd", 1.0), ("student", 0.7)])
def test_draw_rows_equals_draw_row_by_row(rule, temperature):
    """The batched draw (with noise drawn ahead or not) gives draw()'s token on every row, SKD's own
    teacher key included."""
    cfg = SwitchConfig(rule=rule, tau0=0.3, decay=0.0, schedule="const", skd_topk=3)
    owner_rule = switch.OwnerRule(cfg, temperature)
    teacher, student = _rows(40, 300, 5), _rows(40, 300, 6)
    seeds, positions = [switch.prompt_seed(1, i) for i in range(40)], list(range(40))
    _, _, own = owner_rule.decide(teacher, student, positions, seeds=seeds)
    want = [owner_rule.draw(int(o), teacher[i], student[i], seeds[i], positions[i]) for i, o in enumerate(own)]
    assert owner_rule.draw_rows(own, teacher, student, seeds, positions) == want
    noise = owner_rule.noise_rows(seeds, positions, 300)
    assert owner_rule.draw_rows(own, teacher, student, seeds, positions, noise) == want
    if rule == "skd":
        assert 0 < own.float().mean() < 1, "both owners must appear for the test to mean anything"


def _inline_teacher(step):
    """An InlineTeacher over a stand-in engine whose step() is ``step``."""
    core = SimpleNamespace(step=step, vllm_config=SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=8)))
    return InlineTeacher(SimpleNamespace(llm=SimpleNamespace(llm_engine=core), max_model_len=64, block_size=16))


def test_inline_teacher_reports_engines_out_of_step():
    rule = switch.OwnerRule(SwitchConfig(), temperature=1.0)
    seqs = {0: SequenceBuilder(_prompts(1, seed=0)[0], topk=4)}
    stalled = Exchange(rule, seqs, {EOS}, 8, teacher=_inline_teacher(lambda: None))
    with pytest.raises(LockstepError, match="sequences \\[0\\] not decided by its step"):
        stalled.student_rows([0], [0], _rows(1, 50, 0))
    ahead = Exchange(rule, seqs, {EOS}, 8, teacher=_inline_teacher(lambda: None))
    with pytest.raises(LockstepError, match="sequence 0 at position 0 has no student row"):
        ahead.teacher_rows([0], [0], _rows(1, 50, 0))
    ahead.teacher.waiting[0] = (1, _rows(1, 50, 0)[0])
    ahead.teacher.current = ahead
    with pytest.raises(LockstepError, match="engines are at position 1, the rollout at 0"):
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
    from switchkd.rollout.engines import lockstep as vllm_lockstep

    cfg = RolloutConfig(engine="vllm", mode="lockstep", temperature=1.0, max_new_tokens=48, batch_size=8,
                        switch=SwitchConfig(tau0=0.42, decay=0.008))
    prompts = _prompts(8, seed=41)
    want = [s.response_ids for s in _generate(pair, cfg, prompts)]
    decide, calls = vllm_lockstep.Exchange.decide, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 12:
            raise RuntimeError("injected")
        return decide(self, *args)

    monkeypatch.setattr(vllm_lockstep.Exchange, "decide", failing)
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
    (dict(teacher=EngineConfig(device="cuda", num_gpus=1)), "side by side on one device"),
])
def test_lockstep_config_needs_both_engines_side_by_side(override, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(engine="vllm", mode="lockstep", **override)
    RolloutConfig(engine="vllm", mode="block", **override)  # block mode is how to run them apart


# --- the teacher engine in a child process -----------------------------------------------------------

def test_a_teacher_process_that_cannot_start_reports_the_childs_error(tmp_path):
    teacher = TeacherProcess({"model": str(tmp_path / "no-such-model")}, teacher_threads=1)
    try:
        with pytest.raises(LockstepError, match="(?s)lockstep teacher process failed:.*no-such-model"):
            teacher.wait_ready()
        assert teacher.proc.wait(timeout=60) is not None
    finally:
        teacher.shutdown()


def test_a_killed_teacher_process_fails_the_rollout_with_a_clear_error(pairs):
    victim = pairs("victim")
    cfg = RolloutConfig(engine="vllm", mode="lockstep", temperature=1.0, max_new_tokens=16, batch_size=4)
    assert len(_generate(victim, cfg, _prompts(4, seed=1))) == 4
    child = victim.engine.teacher.proc
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    with pytest.raises(LockstepError, match="lockstep teacher process exited"):
        _generate(victim, cfg, _prompts(4, seed=1))
    assert not victim.engine.llm.llm_engine.has_unfinished_requests(), "the student's requests are aborted"
