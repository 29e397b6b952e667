"""Evaluation statistics: the per-prompt metrics against hand-computed values, the paired
bootstrap against cases whose distribution is known, seeded samples, and report comparison."""
import math

import numpy as np
import pytest

from switchkd.rollout.data.prompts import Example
from switchkd.rollout.evaluation.stats import compare, compare_lines, paired_bootstrap, prompts_to_decide, seeded_sample
from switchkd.rollout.evaluation.evaluate import Decoded, drawn_logprobs, score_responses
from switchkd.rollout.data.sequences import Prompt

EOS = 0


class WordTokenizer:
    """id i -> word 'w{i}' (id 0 is EOS, a special token)."""

    def batch_decode(self, batches, skip_special_tokens=True):
        return [" ".join(f"w{i}" for i in ids if not (skip_special_tokens and i == EOS)) for ids in batches]


def example(index, reference_words, reference_ids):
    return Example(prompt=Prompt(index, [5, 6], seed=index, reference_ids=reference_ids), text=f"p{index}",
                   response=" ".join(reference_words))


def test_score_responses_matches_hand_computed_metrics():
    examples = [example(0, ["w1", "w2"], [1, 2, EOS]), example(1, ["w3"] * 20, [3] * 20 + [EOS])]
    generated = [Decoded([1, 2, EOS], "stop", [math.log(0.5), math.log(0.25), math.log(0.5)]),
                 Decoded([4, 3], "length", [math.log(0.1), math.log(0.2)])]
    teacher_lps = [[math.log(0.25), math.log(0.5), math.log(0.5)], [math.log(0.4), math.log(0.1)]]
    summary, records = score_responses(examples, generated, WordTokenizer(), [EOS], 1.0,
                                       teacher_answers=["w1 w2", "w4"], teacher_lps=teacher_lps)
    # prompt 0: exact reference; prompt 1: "w4 w3" vs twenty "w3": LCS 1, P 1/2, R 1/20
    f1 = 2 * 0.5 * 0.05 / 0.55
    assert [r["rougeL"] for r in records] == pytest.approx([100.0, 100 * f1])
    # fidelity: "w1 w2" vs "w1 w2" = 100; "w4 w3" vs "w4": P 1/2, R 1 -> 2/3
    assert [r["fidelity"] for r in records] == pytest.approx([100.0, 100 * 2 / 3])
    # teacher NLL per token, EOS included
    nll = [-(math.log(0.25) + 2 * math.log(0.5)) / 3, -(math.log(0.4) + math.log(0.1)) / 2]
    assert [r["teacher_nll"] for r in records] == pytest.approx(nll)
    # reverse KL estimate: mean over tokens of log q - log p
    rkl = [(math.log(0.5 / 0.25) + math.log(0.25 / 0.5) + 0.0) / 3, (math.log(0.1 / 0.4) + math.log(0.2 / 0.1)) / 2]
    assert [r["reverse_kl"] for r in records] == pytest.approx(rkl)
    assert summary["reverse_kl"] == pytest.approx(sum(rkl) / 2)
    assert summary["by_reference_length"]["0-15"]["reverse_kl"] == pytest.approx(rkl[0])
    assert summary["by_reference_length"]["16-31"]["teacher_nll"] == pytest.approx(nll[1])
    assert summary["finish_reasons"] == {"stop": 1, "length": 1}
    assert summary["mean_response_tokens"] == 2.0   # EOS not counted
    assert [r["tokens"] for r in records] == [2, 2]


def test_greedy_responses_have_no_reverse_kl():
    examples = [example(0, ["w1"], [1, EOS])]
    summary, records = score_responses(examples, [Decoded([1, EOS], "stop", None)], WordTokenizer(), [EOS], 0.0,
                                       teacher_answers=["w1"], teacher_lps=[[-1.0, -2.0]])
    assert "reverse_kl" not in summary and "reverse_kl" not in records[0]
    assert records[0]["teacher_nll"] == pytest.approx(1.5)


def test_drawn_logprobs_use_the_tempered_distribution():
    raw = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]], dtype=np.float32))
    got = drawn_logprobs(raw, np.array([0, 2]), temperature=0.5)
    tempered = raw.astype(np.float64) / 0.5
    tempered -= np.log(np.exp(tempered).sum(1, keepdims=True))
    assert got == pytest.approx([tempered[0, 0], tempered[1, 2]], abs=1e-6)
    assert drawn_logprobs(raw, np.array([1, 1]), temperature=1.0) == pytest.approx([math.log(0.25), math.log(0.6)],
                                                                                   abs=1e-6)


def test_bootstrap_of_a_constant_difference_is_that_difference():
    a = np.arange(50, dtype=float)
    r = paired_bootstrap(a, a + 2.5)
    assert (r["diff"], r["lo"], r["hi"], r["n"]) == pytest.approx((2.5, 2.5, 2.5, 50))


def test_bootstrap_of_two_prompts_has_the_known_distribution():
    # differences (0, 1): a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are 0 and 1
    r = paired_bootstrap([0.0, 0.0], [0.0, 1.0])
    assert (r["diff"], r["lo"], r["hi"]) == (0.5, 0.0, 1.0)


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, size=2000)
    r = paired_bootstrap(np.zeros_like(d), d)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert r["lo"] == pytest.approx(d.mean() - half, abs=0.01)
    assert r["hi"] == pytest.approx(d.mean() + half, abs=0.01)
    assert r["lo"] > 0 and r["hi"] > r["lo"]


def test_bootstrap_over_seeds_widens_the_interval_by_the_seed_spread():
    base = np.random.default_rng(2).normal(0.0, 1.0, size=400)
    one = paired_bootstrap(base, base + 1.0)
    seeds = paired_bootstrap(base, np.stack([base + 0.0, base + 1.0, base + 2.0]))
    assert seeds["diff"] == pytest.approx(1.0)
    assert one["hi"] - one["lo"] < 1e-9 < seeds["hi"] - seeds["lo"]
    assert seeds["lo"] < 0.5 and seeds["hi"] > 1.5   # the seed means 0, 1, 2 dominate


def test_bootstrap_drops_nan_prompts_and_rejects_unpaired_scores():
    r = paired_bootstrap([1.0, math.nan, 3.0], [2.0, 5.0, 4.0])
    assert r["n"] == 2 and r["diff"] == 1.0
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_seeded_sample_is_reproducible_ordered_and_not_a_prefix():
    items = list(range(100))
    first = seeded_sample(items, 10, seed=3)
    assert first == seeded_sample(items, 10, seed=3) == sorted(first)
    assert first != items[:10] and len(set(first)) == 10
    assert seeded_sample(items, 10, seed=4) != first
    assert seeded_sample(items, None, seed=3) == items == seeded_sample(items, 500, seed=3)


def fake_report(scores: dict[int, float], bucket_of=lambda i: "0-15" if i < 3 else "16-31"):
    return {"rows": [{"index": i, "bucket": bucket_of(i), "greedy": {"rougeL": s, "fidelity": 2 * s}}
                     for i, s in scores.items()]}


def test_compare_pairs_prompts_by_index_and_splits_buckets():
    a = fake_report({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0})
    b = fake_report({4: 6.0, 3: 5.0, 2: 4.0, 1: 3.0, 0: 2.0, 9: 100.0})   # other order, one extra prompt
    result = compare([a], [b])
    assert set(result) == {"greedy"} and set(result["greedy"]) == {"rougeL", "fidelity"}
    overall = result["greedy"]["rougeL"]["all"]
    assert (overall["n"], overall["diff"], overall["lo"], overall["hi"]) == pytest.approx((5, 1.0, 1.0, 1.0))
    assert result["greedy"]["fidelity"]["all"]["diff"] == 2.0
    assert result["greedy"]["rougeL"]["0-15"]["n"] == 3 and result["greedy"]["rougeL"]["16-31"]["n"] == 2
    lines = compare_lines(result, "a.json", "b.json")
    assert any("ROUGE-L vs reference" in line and "*" in line and "(B better)" in line for line in lines)


def test_prompts_to_decide_follows_the_square_root_law():
    """A normal difference of 0.3 with unit spread needs about (1.96 / 0.3)^2 = 43 prompts for a
    95% interval that excludes 0, whatever the number measured."""
    rng = np.random.default_rng(3)
    for n in (200, 2000):
        d = rng.normal(0.3, 1.0, size=n)
        r = paired_bootstrap(np.zeros_like(d), d)
        want = n * (1.96 * d.std(ddof=1) / math.sqrt(n)) ** 2 / d.mean() ** 2
        assert r["n_to_decide"] == pytest.approx(want, rel=0.1)
        assert 30 < r["n_to_decide"] < 60
    assert paired_bootstrap([0.0, 1.0], [0.0, 1.0])["n_to_decide"] is None   # no difference: undecidable
    assert prompts_to_decide(100, -0.5, 1.0) == 400 and prompts_to_decide(100, 0.5, 0.1) == 4
