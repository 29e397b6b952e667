"""vLLM SWITCH generators (lockstep, block-speculative and stepwise) against the HF reference.

Greedy float32: tokens and owners identical to the HF reference on 32 prompts x 128
tokens for every schedule, in every mode. Sampling: the three modes make the very same draws
(tokens are keyed by seed and position), and those draws follow the owner's
distribution (chi-square). The baseline owner rules (SKD, on-policy, SeqKD) and the
reference source (KD on ground truth) are checked the same way against the HF reference.
"""
import dataclasses

import numpy as np
import pytest
import torch

from switchkd.rollout import switch
from switchkd.rollout.config import ModelConfig, RolloutConfig, SwitchConfig
from switchkd.rollout.engines.actors import EngineHandle, PairEngine, StudentEngine, TeacherEngine, engine_kwargs
from switchkd.rollout.generate import build_generator
from switchkd.rollout.models.hf_reference import HFSwitchGenerator, load_hf_model
from switchkd.rollout.data.sequences import Prompt
from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

EOS = 2
SCHEDULES = [("exp", 0.42, 0.008), ("linear", 0.42, 0.005), ("const", 0.37, 0.0)]


# Every way to roll out, by name: rollout.mode, and lockstep's teacher in a child process or inline.
MODES = {"lockstep": dict(mode="lockstep"), "lockstep_inline": dict(mode="lockstep", lockstep_teacher="inline"),
         "block": dict(mode="block"), "stepwise": dict(mode="stepwise")}


@pytest.fixture(scope="module")
def engines(tiny_models):
    """Engine handles by MODES name: a separate teacher and student (block, stepwise), and a
    PairEngine's handle twice (lockstep, without prefix caching): its teacher in a child process,
    or in this process (lockstep_inline)."""
    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    rollout = RolloutConfig(engine="vllm")
    teacher = EngineHandle(engine=TeacherEngine(**engine_kwargs(model.teacher, model, rollout.teacher, 0)))
    student = EngineHandle(engine=StudentEngine(**engine_kwargs(model.student, model, rollout.student, 0)))
    pair, inline = (EngineHandle(engine=PairEngine(engine_kwargs(model.teacher, model, rollout.teacher, 0),
                                                   teacher_process=process,
                                                   **engine_kwargs(model.student, model, rollout.student, 0)))
                    for process in (True, False))
    yield {"block": (teacher, student), "stepwise": (teacher, student), "lockstep": (pair, pair),
           "lockstep_inline": (inline, inline)}
    for handle in (teacher, student, pair, inline):
        handle.shutdown()


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return load_hf_model(str(tiny_models["teacher"]), "float32"), load_hf_model(str(tiny_models["student"]), "float32")


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [Prompt(i, rng.integers(3, 500, size=rng.integers(3, 40)).tolist(), switch.prompt_seed(seed, i)) for i in range(n)]


def _vllm(engines, cfg):
    inline = cfg.mode == "lockstep" and cfg.lockstep_teacher == "inline"
    return VLLMSwitchGenerator(ModelConfig(), cfg, {EOS}, engines=engines["lockstep_inline" if inline else cfg.mode])


def _assert_same_record(mode: str, ref, got) -> None:
    """The vLLM generator in ``mode`` made the same tokens, owners and distributions as the reference."""
    assert got.response_ids == ref.response_ids, f"{mode}: tokens differ for prompt {ref.prompt.index}"
    assert got.owner == ref.owner, f"{mode}: owners differ for prompt {ref.prompt.index}"
    assert got.finish_reason == ref.finish_reason
    np.testing.assert_allclose(got.jsd, ref.jsd, atol=1e-4)
    np.testing.assert_allclose(got.student_logprob, ref.student_logprob, atol=1e-3)


@pytest.mark.parametrize("schedule,tau0,decay", SCHEDULES)
def test_greedy_every_mode_equals_hf_reference(engines, hf_models, schedule, tau0, decay):
    cfg = RolloutConfig(engine="vllm", temperature=0.0, max_new_tokens=128, batch_size=32,
                        switch=SwitchConfig(tau0=tau0, decay=decay, schedule=schedule))
    prompts = _prompts(32, seed=len(schedule))
    reference = HFSwitchGenerator(*hf_models, cfg, {EOS}, pad_id=0).generate(prompts)
    owners = np.concatenate([r.owner for r in reference])
    assert 0.05 < owners.mean() < 0.95, "both owners must appear for the test to mean anything"
    assert sum(len(r.response_ids) for r in reference) > 32 * 100
    for mode, variant in MODES.items():
        seqs = _vllm(engines, dataclasses.replace(cfg, **variant)).generate(prompts)
        for ref, got in zip(reference, seqs):
            _assert_same_record(mode, ref, got)
            np.testing.assert_array_equal(np.stack(got.topk_ids)[:, :3], np.stack(ref.topk_ids)[:, :3])


def test_sampled_modes_equal_draw_for_draw(engines):
    cfg = RolloutConfig(engine="vllm", mode="block", temperature=1.0, max_new_tokens=64, batch_size=16,
                        switch=SwitchConfig(tau0=0.4, decay=0.01))
    prompts = _prompts(16, seed=99)
    block = _vllm(engines, cfg).generate(prompts)
    assert 0 < np.mean(np.concatenate([s.owner for s in block])) < 1
    for mode in ("stepwise", "lockstep", "lockstep_inline"):
        other = _vllm(engines, dataclasses.replace(cfg, **MODES[mode])).generate(prompts)
        for b, s in zip(block, other):
            assert b.response_ids == s.response_ids and b.owner == s.owner, mode
            np.testing.assert_allclose(s.jsd, b.jsd, atol=1e-5)
            np.testing.assert_allclose(np.stack(s.topk_lps), np.stack(b.topk_lps), atol=1e-4)
    for mode, variant in MODES.items():
        again = _vllm(engines, dataclasses.replace(cfg, **variant, batch_size=5)).generate(prompts)
        assert [s.response_ids for s in again] == [s.response_ids for s in block], f"{mode}: seeded runs must reproduce"


def test_sampled_first_tokens_follow_owner_distribution(engines, hf_models):
    """Chi-square: the first token over many seeds is distributed as the owner's softmax(logits / T)."""
    from scipy.stats import chisquare

    temperature, n = 0.8, 600
    prompt_ids = _prompts(1, seed=5)[0].token_ids
    prompts = [Prompt(i, prompt_ids, switch.prompt_seed(123, i)) for i in range(n)]
    cfg = RolloutConfig(engine="vllm", temperature=temperature, max_new_tokens=1, batch_size=n)
    seqs = _vllm(engines, cfg).generate(prompts)  # lockstep: the token is drawn inside the engines
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
    """A student that owns every token (tau0 > ln 2) is drafted in k = 8, 16, 32 ... blocks: at most 4
    drafts per sequence and a handful of engine calls, where stepwise needs 2 calls per token."""
    cfg = RolloutConfig(engine="vllm", mode="block", temperature=1.0, max_new_tokens=64, batch_size=8,
                        switch=SwitchConfig(tau0=0.7, decay=0.0, schedule="const"))
    block, stepwise = _vllm(engines, cfg), _vllm(engines, dataclasses.replace(cfg, mode="stepwise"))
    seqs = block.generate(_prompts(8, seed=4))
    assert all(o == 0 for s in seqs for o in s.owner)
    assert [s.response_ids for s in seqs] == [s.response_ids for s in stepwise.generate(_prompts(8, seed=4))]
    longest = max(len(s.response_ids) for s in seqs)
    assert block.drafts <= 4 * len(seqs) and stepwise.engine_calls == 2 * longest
    assert block.engine_calls <= 16



# --- baselines on the same path: owner rules and the reference source ------------------------------

RULE_CASES = [("skd", 0.0, 16, 96), ("skd", 1.0, 16, 64), ("student", 1.0, 16, 64), ("teacher", 1.0, 16, 64),
              ("teacher", 0.0, 8, 64)]


@pytest.mark.parametrize("rule,temperature,n,max_new", RULE_CASES)
def test_baseline_rules_every_mode_equals_hf_reference(engines, hf_models, rule, temperature, n, max_new):
    """SKD (the decision depends on the student's seeded proposal), on-policy and SeqKD: block and
    stepwise and lockstep give the HF reference's tokens and owners, greedy and sampled."""
    cfg = RolloutConfig(engine="vllm", temperature=temperature, max_new_tokens=max_new, batch_size=n,
                        switch=SwitchConfig(rule=rule, skd_topk=64))
    prompts = _prompts(n, seed=17 + n)
    reference = HFSwitchGenerator(*hf_models, cfg, {EOS}, pad_id=0).generate(prompts)
    owners = np.concatenate([r.owner for r in reference])
    assert len(owners) > n * max_new * 0.75
    if rule == "skd":
        assert 0.05 < owners.mean() < 0.95, "both owners must appear for the test to mean anything"
    else:
        assert set(owners.tolist()) == {switch.STUDENT if rule == "student" else switch.TEACHER}
    for mode, variant in MODES.items():
        generator = _vllm(engines, dataclasses.replace(cfg, **variant))
        seqs = generator.generate(prompts)
        for ref, got in zip(reference, seqs):
            _assert_same_record(mode, ref, got)
            assert np.isnan(got.tau).all()
        if mode == "block" and rule == "teacher":
            # The teacher drafts from the first token: k = 8, 16, 32, 8, at most 4 drafts per sequence.
            assert generator.drafts <= 4 * n


def test_skd_block_mode_is_independent_of_block_boundaries(engines):
    """Other draft lengths and batch sizes move every block boundary; the SKD draws must not move."""
    cfg = RolloutConfig(engine="vllm", mode="block", temperature=1.0, max_new_tokens=40, batch_size=8,
                        switch=SwitchConfig(rule="skd", skd_topk=64))
    prompts = _prompts(8, seed=31)
    base = _vllm(engines, cfg).generate(prompts)
    other = _vllm(engines, dataclasses.replace(cfg, draft_tokens=3, max_draft_tokens=6, batch_size=3)).generate(prompts)
    assert [s.response_ids for s in other] == [s.response_ids for s in base]
    assert [s.owner for s in other] == [s.owner for s in base]
    assert 0 < np.mean(np.concatenate([s.owner for s in base])) < 1


def _reference_prompts(n, seed):
    """Prompts with random references (EOS appended), one longer than the budget, one without any."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i, p in enumerate(_prompts(n, seed)):
        reference = rng.integers(3, 500, size=40 if i == 1 else rng.integers(1, 20)).tolist() + [EOS]
        prompts.append(dataclasses.replace(p, reference_ids=[] if i == 2 else reference))
    return prompts


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_reference_source_scores_the_reference_like_a_teacher_forward(engines, hf_models, tiny_models, engine):
    """rollout.source=reference: the response is the reference (cut at max_new_tokens), every owner is
    the teacher, and the teacher top-k / student log-probs are those of a plain HF forward over
    prompt + reference."""
    max_new, k = 24, 8
    cfg = RolloutConfig(engine=engine, source="reference", max_new_tokens=max_new, batch_size=4, teacher_topk=k)
    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    generator = build_generator(model, cfg, {EOS}, engines=engines["block"] if engine == "vllm" else None)
    prompts = _reference_prompts(9, seed=8)
    seqs = generator.generate(prompts)
    assert [s.prompt.index for s in seqs] == [p.index for p in prompts if p.reference_ids]
    assert generator.skipped == {"no reference response": 1}
    teacher, student = hf_models
    for seq in seqs:
        want = seq.prompt.reference_ids[:max_new]
        assert seq.response_ids == want
        assert seq.finish_reason == ("length" if len(seq.prompt.reference_ids) > max_new else "stop")
        assert seq.owner == [switch.TEACHER] * len(want)
        ids = torch.tensor([seq.prompt.token_ids + want])
        P = len(seq.prompt.token_ids)
        with torch.no_grad():
            lp_t = torch.log_softmax(teacher(ids).logits[0, P - 1:-1].double(), -1)
            lp_s = torch.log_softmax(student(ids).logits[0, P - 1:-1].double(), -1)
        top_lp, top_ids = torch.topk(lp_t, k, dim=-1)
        np.testing.assert_array_equal(np.stack(seq.topk_ids)[:, :3], top_ids[:, :3].numpy())
        np.testing.assert_allclose(np.stack(seq.topk_lps), top_lp.numpy(), atol=1e-4)
        np.testing.assert_allclose(seq.student_logprob, lp_s.gather(1, torch.tensor(want)[:, None])[:, 0].numpy(),
                                   atol=1e-3)
        np.testing.assert_allclose(seq.jsd, switch.jsd(lp_t, lp_s).numpy(), atol=1e-4)


def test_block_rollout_stopped_half_way_leaves_the_engines_clean(engines, monkeypatch):
    """An error in the middle of a block rollout (requests still running in both engines) is
    raised, no request stays behind in either engine, and the next rollout is the same as one on
    fresh engines would be."""
    cfg = RolloutConfig(engine="vllm", mode="block", temperature=1.0, max_new_tokens=48, batch_size=8,
                        switch=SwitchConfig(tau0=0.42, decay=0.008))
    prompts = _prompts(8, seed=41)
    want = [s.response_ids for s in _vllm(engines, cfg).generate(prompts)]
    generator = _vllm(engines, cfg)
    walk, calls = generator._walk_block, []

    def failing_walk(*args):
        calls.append(1)
        if len(calls) == 12:
            raise RuntimeError("injected")
        return walk(*args)

    monkeypatch.setattr(generator, "_walk_block", failing_walk)
    with pytest.raises(RuntimeError, match="injected"):
        generator.generate(prompts)
    assert all(not h.engine.llm.llm_engine.has_unfinished_requests() for h in engines["block"])
    monkeypatch.undo()
    assert [s.response_ids for s in _vllm(engines, cfg).generate(prompts)] == want


@pytest.fixture(scope="module")
def hidden_teacher(tiny_models):
    """A teacher engine that sends final hidden states (rows="hidden"), behind a handle that turns
    them into log-prob rows with the teacher's output layer (rollout.teacher_rows=hidden)."""
    from switchkd.rollout.engines.output_head import OutputHead

    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    kwargs = engine_kwargs(model.teacher, model, RolloutConfig(engine="vllm").teacher, 0)
    handle = EngineHandle(engine=TeacherEngine(**kwargs, rows="hidden"), head=OutputHead(model.teacher))
    yield handle
    handle.shutdown()


def test_hidden_state_rows_are_d_model_wide_and_rebuild_the_logprob_rows(engines, hidden_teacher):
    """The hidden engine returns d_model values per token on both paths (decode and score); the
    output layer turns them into the rows the log-prob engine returns."""
    teacher, _ = engines["block"]
    engine = hidden_teacher.engine
    assert engine.row_width == 128 and engine.vocab_size > engine.row_width  # the tiny teacher's d_model
    prompts = [p.token_ids for p in _prompts(6, seed=5)]
    decode = dict(prompts=prompts, max_tokens=[9] * 6, temperature=0.0, seeds=list(range(6)),
                  positions=[0] * 6, stop_token_ids=[])
    raw = engine.decode(**decode)
    assert all(r.logprobs.shape == (len(r.token_ids), 128) for r in raw)
    got, want = hidden_teacher.decode_async(**decode).result(), teacher.decode_async(**decode).result()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.token_ids, w.token_ids)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    sequences = [p + r.token_ids.tolist() for p, r in zip(prompts, want)]
    starts = [len(p) for p in prompts]
    assert engine.score(sequences, starts)[0].shape == (10, 128)
    for g, w in zip(hidden_teacher.score_async(sequences, starts).result(), teacher.score_async(sequences, starts).result()):
        assert g.shape == w.shape == (10, engine.vocab_size)
        np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("mode,temperature", [("block", 0.0), ("block", 1.0), ("stepwise", 1.0)])
def test_hidden_state_rows_give_the_same_rollouts_as_logprob_rows(engines, hidden_teacher, mode, temperature):
    """float32: rollouts whose teacher sends hidden states make the same tokens and owners, with the
    same divergences and teacher top-k, as rollouts whose teacher sends full log-prob rows."""
    cfg = RolloutConfig(engine="vllm", mode=mode, temperature=temperature, max_new_tokens=64, batch_size=16,
                        switch=SwitchConfig(tau0=0.42, decay=0.008))
    prompts = _prompts(16, seed=7)
    want = _vllm(engines, cfg).generate(prompts)
    got = VLLMSwitchGenerator(ModelConfig(), cfg, {EOS}, engines=(hidden_teacher, engines[mode][1])).generate(prompts)
    owners = np.concatenate([s.owner for s in want])
    assert 0.05 < owners.mean() < 0.95, "both owners must appear for the test to mean anything"
    for w, g in zip(want, got):
        assert g.response_ids == w.response_ids and g.owner == w.owner
        np.testing.assert_allclose(g.jsd, w.jsd, atol=1e-5)
        np.testing.assert_array_equal(np.stack(g.topk_ids)[:, :3], np.stack(w.topk_ids)[:, :3])
        np.testing.assert_allclose(np.stack(g.topk_lps), np.stack(w.topk_lps), atol=1e-5)
