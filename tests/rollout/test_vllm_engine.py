"""VLLMEngine and the vLLM fast path on the tiny models: values against stock vLLM and HF
float32, prefix-cache scoring, SWITCH sampling reproducibility, and the vLLM version guard.

One in-process eager engine per model for the whole module."""
from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from switchkd.rollout import switch  # noqa: E402
from switchkd.rollout.engines.switch_sampling import switch_extra_args  # noqa: E402

EOS = 2
ATOL_HF = 1e-4


@pytest.fixture(scope="module")
def fp():
    from switchkd.rollout.engines import fast_logprobs

    return fast_logprobs


@pytest.fixture(scope="module")
def engines(tiny_models):
    from switchkd.rollout.engines.vllm_engine import VLLMEngine

    made = {}
    try:
        for name in ("teacher", "student"):
            made[name] = VLLMEngine(str(tiny_models[name]), dtype="float32", block_size=32,
                                    kv_cache_space_gb=1, max_model_len=512, seed=0)
        yield made
    finally:
        for eng in made.values():
            eng.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_models):
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(str(tiny_models[name]), dtype=torch.float32).eval()
            for name in ("teacher", "student")}


def hf_logprobs(model, seq) -> np.ndarray:
    """float32 [len(seq), V]: row i is log p(. | seq[:i+1])."""
    with torch.no_grad():
        logits = model(torch.tensor([list(seq)])).logits[0].float()
    return torch.log_softmax(logits, -1).numpy()


def random_prompts(n, seed, lo=2, hi=24):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def flat_to_dense(flat, vocab) -> np.ndarray:
    """Stock vLLM FlatLogprobs (positions with an entry) -> float32 [n, V] by token id."""
    rows = []
    for i in range(len(flat)):
        s, e = flat.start_indices[i], flat.end_indices[i]
        if s == e:
            continue
        row = np.full(vocab, np.nan, np.float32)
        row[np.asarray(flat.token_ids[s:e])] = np.asarray(flat.logprobs[s:e], np.float32)
        rows.append(row)
    return np.stack(rows)


def _generate(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _stock(fp, fn):
    """Run fn() with vLLM's original code (patches removed), then put them back."""
    fp.uninstall()
    try:
        return fn()
    finally:
        fp.install()


# ------------------------------------------------------------------ fast path vs stock vLLM


def test_fast_path_equals_stock_flat_logprobs(engines, fp):
    from vllm import SamplingParams

    eng = engines["student"]
    V = eng.vocab_size
    prompts = random_prompts(3, 1)
    sp = SamplingParams(max_tokens=5, temperature=0.0, logprobs=-1, prompt_logprobs=-1,
                        flat_logprobs=True, detokenize=False, ignore_eos=True)
    before = dict(fp.LAYOUT_STATS)
    fast = _generate(eng.llm, prompts, sp)
    assert fp.LAYOUT_STATS["sample_fast"] - before["sample_fast"] == 15
    assert fp.LAYOUT_STATS["prompt_fast"] - before["prompt_fast"] == sum(len(p) - 1 for p in prompts)
    assert fp.LAYOUT_STATS["sample_stock"] == before["sample_stock"]
    stock = _stock(fp, lambda: _generate(eng.llm, prompts, sp))
    for f, s, p in zip(fast, stock, prompts):
        assert isinstance(s.outputs[0].logprobs, vllm.logprobs.FlatLogprobs)
        assert isinstance(f.outputs[0].logprobs, fp.FullVocabLogprobs)
        assert list(f.outputs[0].token_ids) == list(s.outputs[0].token_ids)
        np.testing.assert_array_equal(f.outputs[0].logprobs.to_numpy(), flat_to_dense(s.outputs[0].logprobs, V))
        assert f.prompt_logprobs.first_position == 1
        np.testing.assert_array_equal(f.prompt_logprobs.to_numpy(), flat_to_dense(s.prompt_logprobs, V))
        assert f.outputs[0].cumulative_logprob == pytest.approx(s.outputs[0].cumulative_logprob, abs=1e-4)
        # The containers still read like vLLM's (slow path, on demand).
        assert len(f.prompt_logprobs) == len(p) and f.prompt_logprobs[0] is None
        tok = p[1]
        assert f.prompt_logprobs[1][tok].logprob == s.prompt_logprobs[1][tok].logprob
        assert f.prompt_logprobs[1][tok].rank == s.prompt_logprobs[1][tok].rank
        t0 = f.outputs[0].token_ids[0]
        assert f.outputs[0].logprobs[0][t0].rank == s.outputs[0].logprobs[0][t0].rank == 1


def test_mixed_batch_keeps_topk_requests_stock(engines, fp):
    """A top-k request next to a full-vocab one: the top-k output is exactly stock's, and the
    full-vocab one (now sorted by the stock sampler) is scattered back to the same rows."""
    from vllm import SamplingParams

    eng = engines["student"]
    prompts = random_prompts(3, 2)
    full = SamplingParams(max_tokens=4, temperature=0.0, logprobs=-1, detokenize=False, ignore_eos=True)
    top5 = SamplingParams(max_tokens=4, temperature=0.0, logprobs=5, prompt_logprobs=3,
                          flat_logprobs=True, detokenize=False, ignore_eos=True)
    plain = SamplingParams(max_tokens=4, temperature=0.0, detokenize=False, ignore_eos=True)
    alone = _generate(eng.llm, prompts[:1], full)[0].outputs[0].logprobs.to_numpy()
    before = fp.LAYOUT_STATS["sample_stock"]
    mixed = _generate(eng.llm, prompts, [full, top5, plain])
    assert fp.LAYOUT_STATS["sample_stock"] - before == 4
    np.testing.assert_array_equal(mixed[0].outputs[0].logprobs.to_numpy(), alone)
    stock = _stock(fp, lambda: _generate(eng.llm, prompts[1:2], top5))[0]
    got, ref = mixed[1], stock
    for a, b in ((got.outputs[0].logprobs, ref.outputs[0].logprobs), (got.prompt_logprobs, ref.prompt_logprobs)):
        assert type(a) is type(b) is vllm.logprobs.FlatLogprobs
        assert (a.token_ids, a.ranks, a.start_indices) == (b.token_ids, b.ranks, b.start_indices)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-6)
    assert mixed[2].outputs[0].logprobs is None


# ------------------------------------------------------------------ decode / score vs HF


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_decode_and_score_match_hf(engines, hf, name):
    eng = engines[name]
    prompts = random_prompts(4, 3)
    res = eng.decode(prompts, [12, 9, 1, 12], temperature=0.8, seeds=[11, 12, 13, 14],
                     positions=[0, 5, 2, 0], stop_token_ids=[EOS])
    seqs, starts = [], []
    for p, r in zip(prompts, res):
        n = len(r.token_ids)
        assert r.token_ids.dtype == np.int64 and r.logprobs.dtype == np.float32
        assert r.logprobs.shape == (n, eng.vocab_size)
        ref = hf_logprobs(hf[name], p + r.token_ids.tolist())
        np.testing.assert_allclose(r.logprobs, ref[len(p) - 1: len(p) - 1 + n], rtol=0, atol=ATOL_HF)
        seqs.append(p + r.token_ids.tolist())
        starts.append(len(p))
    eng.reset_prefix_cache()
    scores = eng.score(seqs, starts)
    for s, a, got, r in zip(seqs, starts, scores, res):
        assert got.dtype == np.float32 and got.shape == (len(s) - a + 1, eng.vocab_size)
        np.testing.assert_allclose(got, hf_logprobs(hf[name], s)[a - 1:], rtol=0, atol=ATOL_HF)
        # The scoring prefill and the decode steps agree (same engine, same model).
        np.testing.assert_allclose(got[:-1], r.logprobs, rtol=0, atol=1e-5)


def test_score_with_prefix_cache_hits(engines, hf):
    """Warm a prefix, then score prefix + draft for prefix lengths around block multiples:
    rows equal the cache-less scores and HF, whatever the cache hit covered."""
    eng = engines["teacher"]
    eng.reset_prefix_cache()
    rng = np.random.default_rng(4)
    base = rng.integers(3, 500, size=100).tolist()
    draft = rng.integers(3, 500, size=8).tolist()
    lengths = [5, 31, 32, 33, 63, 64, 65, 96]
    seqs = [base[:a] + draft for a in lengths]
    eng.score([base], [len(base)])  # warm: caches blocks of base[:96]
    hot = eng.score(seqs, lengths)
    cached = eng.last_score_stats["num_cached_tokens"]
    assert cached == [0, 0, 32, 32, 32, 64, 64, 96], cached
    assert sorted(eng.last_score_stats["rescored"]) == [2, 5, 7]  # hit reached the row for s[a]
    cold = eng.score(seqs, lengths, read_prefix_cache=False)
    assert eng.last_score_stats["num_cached_tokens"] == [0] * len(seqs)
    teacher = hf["teacher"]
    for s, a, h, c in zip(seqs, lengths, hot, cold):
        assert h.shape == (len(draft) + 1, eng.vocab_size)
        np.testing.assert_allclose(h, c, rtol=0, atol=1e-5)
        np.testing.assert_allclose(h, hf_logprobs(teacher, s)[a - 1:], rtol=0, atol=ATOL_HF)
    print("prefix-cache hit vs recomputed: max |diff|", max(float(np.abs(h - c).max()) for h, c in zip(hot, cold)))
    # a == L: only the distribution after the whole sequence; also when the cache hit leaves
    # no prompt row at all (33 tokens, 32 cached: vLLM recomputes just the last one).
    edge = [seqs[0], base[:33]]
    eng.score([base], [len(base)])
    hot = eng.score(edge, [len(s) for s in edge])
    assert eng.last_score_stats["num_cached_tokens"] == [0, 32]
    cold = eng.score(edge, [len(s) for s in edge], read_prefix_cache=False)
    for h, c, s in zip(hot, cold, edge):
        assert h.shape == (1, eng.vocab_size)
        np.testing.assert_allclose(h, c, rtol=0, atol=1e-5)
        np.testing.assert_allclose(h, hf_logprobs(teacher, s)[-1:], rtol=0, atol=ATOL_HF)


def test_advance_keeps_requests_running_across_calls(engines):
    """Continuous batching: a call returns when some request finishes (here the one-step
    scores), the long drafts go on at later calls, joined by new requests; every result equals
    what decode / score return for the same request, and abort_all leaves the engine empty."""
    eng = engines["student"]
    eng.reset_prefix_cache()
    prompts = random_prompts(3, 11)
    seeds = [switch.prompt_seed(1, i) for i in range(3)]
    kw = dict(temperature=1.0, stop_token_ids=[])
    seqs, starts = [p + [7, 8, 9] for p in prompts], [len(p) for p in prompts]
    drafts, rows = eng.advance(dict(keys=["a", "b"], prompts=prompts[:2], max_tokens=[12, 20], seeds=seeds[:2],
                                    positions=[0, 0], **kw),
                               dict(keys=["s"], sequences=seqs[:1], starts=starts[:1]))
    assert drafts == {} and list(rows) == ["s"]
    drafts, rows = eng.advance(dict(keys=["c"], prompts=prompts[2:], max_tokens=[1], seeds=seeds[2:], positions=[5],
                                    **kw), None)
    assert list(drafts) == ["c"] and rows == {}
    got = {}
    while len(got) < 2:
        more, none = eng.advance(None, None)
        assert none == {} and more
        got.update(more)
    assert eng.advance(None, None) == ({}, {})  # nothing left: returns at once
    want = eng.decode(prompts, [12, 20, 1], seeds=seeds, positions=[0, 0, 5], **kw)
    for key, w in zip("abc", want):
        r = got.get(key, drafts.get(key))
        np.testing.assert_array_equal(r.token_ids, w.token_ids)
        np.testing.assert_array_equal(r.logprobs, w.logprobs)
    scored = eng.advance(None, dict(keys=[0, 1], sequences=seqs[1:], starts=starts[1:]))[1]
    for key, w in zip((0, 1), eng.score(seqs[1:], starts[1:], read_prefix_cache=False)):
        np.testing.assert_allclose(scored[key], w, rtol=0, atol=1e-5)
    eng.advance(dict(keys=["x"], prompts=prompts[:1], max_tokens=[30], seeds=seeds[:1], positions=[0], **kw),
                dict(keys=["y"], sequences=seqs[:1], starts=starts[:1]))
    eng.abort_all()
    assert eng.advance(None, None) == ({}, {}) and not eng.llm.llm_engine.has_unfinished_requests()


def test_score_and_decode_validate_inputs(engines):
    eng = engines["teacher"]
    with pytest.raises(ValueError, match="starts"):
        eng.score([[5, 6, 7]], [0])
    with pytest.raises(ValueError, match="starts"):
        eng.score([[5, 6, 7]], [4])
    with pytest.raises(ValueError, match="out of range"):
        eng.score([[5, 6, 9999]], [1])
    with pytest.raises(ValueError, match="same length"):
        eng.decode([[5, 6]], [3, 4], temperature=0.0, seeds=[1], positions=[0], stop_token_ids=[])


# ------------------------------------------------------------------ SWITCH sampling


def test_greedy_decode_is_argmax_of_returned_logprobs(engines):
    eng = engines["student"]
    prompts = random_prompts(5, 5)
    res = eng.decode(prompts, [10] * 5, temperature=0.0, seeds=list(range(5)), positions=[0] * 5,
                     stop_token_ids=[EOS])
    for r in res:
        np.testing.assert_array_equal(r.token_ids, r.logprobs.argmax(-1))
        assert r.finish_reason in ("stop", "length")


def test_sampled_decode_matches_switch_sampler_and_is_reproducible(engines):
    eng = engines["student"]
    T = 0.8
    prompts = random_prompts(5, 6)
    seeds = [switch.prompt_seed(0, i) for i in range(5)]
    positions = [0, 3, 10, 0, 7]
    res = eng.decode(prompts, [14] * 5, temperature=T, seeds=seeds, positions=positions, stop_token_ids=[EOS])
    for r, s, t0 in zip(res, seeds, positions):
        for j, (tok, row) in enumerate(zip(r.token_ids.tolist(), r.logprobs)):
            assert switch.sample_token(torch.from_numpy(row), T, s, t0 + j) == tok, (s, t0, j)
    # The draws are random: they are not the greedy path.
    assert any((r.token_ids != r.logprobs.argmax(-1)).any() for r in res)
    again = eng.decode(prompts, [14] * 5, temperature=T, seeds=seeds, positions=positions, stop_token_ids=[EOS])
    for a, b in zip(res, again):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
    # Batch composition and order do not matter.
    sub = eng.decode([prompts[3], prompts[1]], [14, 14], temperature=T, seeds=[seeds[3], seeds[1]],
                     positions=[positions[3], positions[1]], stop_token_ids=[EOS])
    np.testing.assert_array_equal(sub[0].token_ids, res[3].token_ids)
    np.testing.assert_array_equal(sub[1].token_ids, res[1].token_ids)
    # Another seed, another draw (same prompt).
    other = eng.decode([prompts[0]], [14], temperature=T, seeds=[seeds[0] + 1], positions=[0], stop_token_ids=[EOS])
    assert not np.array_equal(other[0].token_ids, res[0].token_ids)


def test_stop_tokens_and_zero_max_tokens(engines):
    eng = engines["student"]
    stops = list(range(3, 512, 2))  # every odd id: stops within a few tokens
    res = eng.decode(random_prompts(3, 7) + [[5, 6]], [40, 40, 40, 0], temperature=1.0, seeds=[1, 2, 3, 4],
                     positions=[0, 0, 0, 0], stop_token_ids=stops)
    for r in res[:3]:
        assert r.finish_reason == "stop"
        assert r.token_ids[-1] % 2 == 1 and all(t % 2 == 0 for t in r.token_ids[:-1].tolist())
        assert r.logprobs.shape == (len(r.token_ids), eng.vocab_size)
    assert res[3].token_ids.shape == (0,) and res[3].logprobs.shape == (0, eng.vocab_size)
    assert res[3].finish_reason == "length"


def test_logits_processor_rejects_nonzero_temperature(engines, fp):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=2, temperature=0.7, extra_args=switch_extra_args(1, 0, 0.7))
    with pytest.raises(Exception, match="temperature=0"):  # VLLMValidationError
        _generate(engines["student"].llm, [[5, 6, 7]], sp)


# ------------------------------------------------------------------ version guard (keep last)


def test_patch_targets_unchanged(fp):
    """Fails loudly when vLLM changes what the fast path patches or relies on."""
    from switchkd.rollout.engines.vllm_version import VLLM_VERSION

    assert VLLM_VERSION == "0.32.0"
    for owner, name, sig in fp.PATCH_TARGETS:
        assert hasattr(owner, name), f"{owner.__name__}.{name} is gone"
        original = fp.ORIGINALS.get(f"{owner.__name__}.{name}", getattr(owner, name))
        assert str(inspect.signature(original)) == sig, f"{owner.__name__}.{name} changed signature"
    assert fp.verify_vllm_internals() == []
    assert fp.installed()


def test_import_guard_rejects_other_vllm_versions(fp, monkeypatch):
    from switchkd.rollout.engines import vllm_version

    monkeypatch.delenv(vllm_version.ALLOW_ENV, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    try:
        with pytest.raises(ImportError, match=r"vllm==0\.32\.0.*vllm==0\.33\.0"):
            importlib.reload(vllm_version)
        monkeypatch.setenv(vllm_version.ALLOW_ENV, "1")
        importlib.reload(vllm_version)  # allowed by the escape hatch
        importlib.reload(fp)
        assert fp.installed()  # the patches survive a reload (state lives on the vllm module)
    finally:
        monkeypatch.setattr(vllm, "__version__", vllm_version.VLLM_VERSION)
        monkeypatch.delenv(vllm_version.ALLOW_ENV, raising=False)
        importlib.reload(vllm_version)
        importlib.reload(fp)
