"""SWITCH math against independent float64 formulas."""
import math

import numpy as np
import pytest
import torch

from switchkd.rollout import switch


def _jsd_reference(p: np.ndarray, q: np.ndarray) -> float:
    """Textbook JSD in float64 with explicit 0 log 0 = 0."""
    m = 0.5 * (p + q)
    kl = lambda a: sum(ai * math.log(ai / mi) for ai, mi in zip(a, m) if ai > 0)
    return 0.5 * kl(p) + 0.5 * kl(q)


def _random_dists(rng, n, v, zeros=False):
    x = rng.gamma(0.3, size=(n, v))
    if zeros:
        x[rng.random((n, v)) < 0.4] = 0.0
        x[:, 0] += 1e-3  # keep every row normalisable
    return x / x.sum(-1, keepdims=True)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jsd_matches_float64_formula(zeros, dtype):
    rng = np.random.default_rng(0)
    p, q = _random_dists(rng, 16, 50, zeros), _random_dists(rng, 16, 50, zeros)
    with np.errstate(divide="ignore"):
        got = switch.jsd(torch.tensor(np.log(p), dtype=dtype), torch.tensor(np.log(q), dtype=dtype))
    want = np.array([_jsd_reference(a, b) for a, b in zip(p, q)])
    assert got.dtype == dtype
    assert not torch.isnan(got).any()
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_jsd_extremes():
    ninf = -math.inf
    same = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    disjoint_p = torch.tensor([[0.0, ninf, ninf]])
    disjoint_q = torch.tensor([[ninf, 0.0, ninf]])
    assert switch.jsd(same, same).item() == pytest.approx(0.0, abs=1e-7)
    assert switch.jsd(disjoint_p, disjoint_q).item() == pytest.approx(math.log(2), abs=1e-7)
    # Symmetric, and works on numpy input with a large vocabulary in float32.
    rng = np.random.default_rng(1)
    a, b = (np.log(_random_dists(rng, 4, 49152)).astype(np.float32) for _ in range(2))
    assert torch.allclose(switch.jsd(a, b), switch.jsd(b, a), atol=1e-6)
    want = [_jsd_reference(np.exp(x.astype(np.float64)), np.exp(y.astype(np.float64))) for x, y in zip(a, b)]
    np.testing.assert_allclose(switch.jsd(a, b).numpy(), want, atol=2e-5)


@pytest.mark.parametrize("schedule", switch.SCHEDULES)
def test_threshold_schedules(schedule):
    t = np.arange(0, 300)
    tau0, lam = 0.37, 0.011
    want = {
        "exp": tau0 * np.exp(-lam * t),
        "linear": tau0 * np.maximum(0.0, 1.0 - lam * t),
        "const": np.full(t.shape, tau0),
    }[schedule]
    np.testing.assert_allclose(switch.threshold(t, tau0, lam, schedule).numpy(), want, rtol=1e-12)


def test_threshold_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="allowed: exp, linear, const"):
        switch.threshold([0], 0.1, 0.1, "cosine")


def test_owner_is_teacher_only_strictly_above_threshold():
    d = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    tau = torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64)
    assert switch.owners(d, tau).tolist() == [switch.STUDENT, switch.STUDENT, switch.TEACHER]


def test_greedy_sampling_is_argmax():
    lp = torch.log_softmax(torch.randn(100, generator=torch.Generator().manual_seed(3)), -1)
    assert switch.sample_token(lp, 0.0, seed=5, position=7) == int(lp.argmax())


def test_sampling_follows_tempered_distribution():
    """Chi-square goodness of fit of Gumbel-max draws over many (seed, position) keys."""
    from scipy.stats import chisquare

    lp = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]), -1)
    temperature = 0.7
    draws = [switch.sample_token(lp, temperature, seed, pos) for seed in range(400) for pos in range(10)]
    counts = np.bincount(draws, minlength=6)
    probs = torch.softmax(lp.double() / temperature, -1).numpy()
    expected = probs / probs.sum() * counts.sum()
    assert chisquare(counts, expected).pvalue > 1e-3


def test_sampling_is_keyed_by_seed_and_position_only():
    lp = torch.zeros(1000)
    a = [switch.sample_token(lp, 1.0, 11, t) for t in range(20)]
    assert a == [switch.sample_token(lp, 1.0, 11, t) for t in range(20)]
    assert a != [switch.sample_token(lp, 1.0, 12, t) for t in range(20)]
    assert len(set(a)) > 10  # different positions get different noise


def test_prompt_seed_is_stable_and_spread():
    assert switch.prompt_seed(0, 0) == switch.prompt_seed(0, 0)
    seeds = {switch.prompt_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert switch.prompt_seed(1, 0) != switch.prompt_seed(0, 0)


# --- owner rules (rollout.switch.rule): the baselines on the SWITCH path --------------------------

def _rule(rule, temperature=1.0, **kw):
    from switchkd.rollout.config import SwitchConfig

    return switch.OwnerRule(SwitchConfig(rule=rule, **kw), temperature)


def _random_logprobs(seed, n, v):
    rng = np.random.default_rng(seed)
    return torch.log_softmax(torch.tensor(rng.normal(scale=2.0, size=(n, v)), dtype=torch.float32), -1)


@pytest.mark.parametrize("rule,owner", [("student", switch.STUDENT), ("teacher", switch.TEACHER)])
def test_student_and_teacher_rules_own_every_token(rule, owner):
    lp_t, lp_s = _random_logprobs(0, 40, 30), _random_logprobs(1, 40, 30)
    d, tau, own = _rule(rule).decide(lp_t, lp_s, np.arange(40), seeds=[7] * 40)
    assert own.tolist() == [owner] * 40
    assert torch.isnan(tau).all(), "no threshold decides: tau is NaN"
    want = [_jsd_reference(np.exp(a.double().numpy()), np.exp(b.double().numpy())) for a, b in zip(lp_t, lp_s)]
    np.testing.assert_allclose(d.double().numpy(), want, atol=1e-6)


def test_jsd_rule_is_switch():
    lp_t, lp_s = _random_logprobs(2, 64, 30), _random_logprobs(3, 64, 30)
    d, tau, own = _rule("jsd", tau0=0.3, decay=0.02).decide(lp_t, lp_s, np.arange(64))
    want_tau = 0.3 * np.exp(-0.02 * np.arange(64))
    np.testing.assert_allclose(tau.numpy(), want_tau, rtol=1e-12)
    assert own.tolist() == [int(x > y) for x, y in zip(d.double().numpy(), want_tau)]
    assert 0 < own.sum() < 64


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_skd_rule_matches_independent_formula(temperature, k):
    """Owner = teacher iff the student's proposal (its seeded draw) is outside the teacher's top k."""
    n, v = 200, 40
    lp_t, lp_s = _random_logprobs(4, n, v), _random_logprobs(5, n, v)
    seeds, positions = [switch.prompt_seed(9, i % 7) for i in range(n)], [i % 13 for i in range(n)]
    _, tau, own = _rule("skd", temperature, skd_topk=k).decide(lp_t, lp_s, positions, seeds=seeds)
    want = []
    for i in range(n):
        scores = lp_s[i].double().numpy()
        if temperature > 0:
            scores = scores / temperature + switch.gumbel_noise(seeds[i], positions[i], v).double().numpy()
        proposal = int(np.argmax(scores))
        top = set(np.argsort(-lp_t[i].double().numpy())[:k].tolist())
        want.append(int(proposal not in top))
    assert own.tolist() == want
    assert 0 < sum(want) < n, "both owners must appear for the test to mean anything"
    assert torch.isnan(tau).all()


def test_skd_rule_pinned_and_ties_count_as_inside():
    lp_t = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
    lp_s = torch.log(torch.tensor([[0.1, 0.1, 0.1, 0.5, 0.1, 0.1]]))      # greedy proposal: id 3, teacher rank 3
    assert _rule("skd", 0.0, skd_topk=3).decide(lp_t, lp_s, [0], seeds=[1])[2].tolist() == [switch.TEACHER]
    assert _rule("skd", 0.0, skd_topk=4).decide(lp_t, lp_s, [0], seeds=[1])[2].tolist() == [switch.STUDENT]
    tied = torch.log(torch.tensor([[0.3, 0.3, 0.2, 0.2]]))
    proposal_1 = torch.log(torch.tensor([[0.1, 0.7, 0.1, 0.1]]))
    proposal_3 = torch.log(torch.tensor([[0.1, 0.1, 0.1, 0.7]]))
    assert _rule("skd", 0.0, skd_topk=1).decide(tied, proposal_1, [0], seeds=[1])[2].tolist() == [switch.STUDENT]
    assert _rule("skd", 0.0, skd_topk=2).decide(tied, proposal_3, [0], seeds=[1])[2].tolist() == [switch.TEACHER]
    assert _rule("skd", 0.0, skd_topk=3).decide(tied, proposal_3, [0], seeds=[1])[2].tolist() == [switch.STUDENT]
    with pytest.raises(ValueError, match="needs one prompt seed per row"):
        _rule("skd").decide(tied, proposal_3, [0])


def test_skd_student_tokens_are_its_proposals_and_only_the_teacher_gets_a_new_key():
    rule = _rule("skd", 1.0, skd_topk=3)
    lp_t, lp_s = _random_logprobs(6, 50, 30), _random_logprobs(7, 50, 30)
    _, _, own = rule.decide(lp_t, lp_s, list(range(50)), seeds=[11] * 50)
    for t in range(50):
        token = rule.draw(int(own[t]), lp_t[t], lp_s[t], 11, t)
        if own[t] == switch.STUDENT:
            assert token == switch.sample_token(lp_s[t], 1.0, 11, t)
        else:
            assert token == switch.sample_token(lp_t[t], 1.0, switch.skd_teacher_seed(11), t)
    assert rule.draw_seed(switch.STUDENT, 11) == 11 and rule.draw_seed(switch.TEACHER, 11) != 11
    for other in ("jsd", "student", "teacher"):
        assert _rule(other).draw_seed(switch.TEACHER, 11) == 11   # owners decided before drawing: shared key


def test_skd_replacements_follow_the_teacher_distribution():
    """Chi-square: conditional on a rejected proposal, the teacher's token is distributed as p_T.
    With the student's noise reused, the replacement would lean towards the rejected token."""
    from scipy.stats import chisquare

    lp_t = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]), -1)
    lp_s = torch.full((8,), -math.log(8.0))                           # proposals uniform: most are rejected
    rule = _rule("skd", 1.0, skd_topk=2)
    seeds = [switch.prompt_seed(3, i) for i in range(3000)]
    _, _, own = rule.decide(lp_t.expand(3000, 8), lp_s.expand(3000, 8), [0] * 3000, seeds=seeds)
    drawn = [rule.draw(switch.TEACHER, lp_t, lp_s, s, 0) for s, o in zip(seeds, own) if o == switch.TEACHER]
    assert len(drawn) > 1500
    counts = np.bincount(drawn, minlength=8)
    expected = torch.softmax(lp_t.double(), -1).numpy() * len(drawn)
    merged = np.append(counts[:3], counts[3:].sum()), np.append(expected[:3], expected[3:].sum())
    assert chisquare(*merged).pvalue > 1e-3


@pytest.mark.parametrize("rule,first", [("jsd", 0), ("student", 0), ("teacher", 1), ("skd", 0)])
def test_block_mode_first_drafter(rule, first):
    assert _rule(rule).first_drafter == first


def test_skd_given_proposals_decide_like_drawn_ones():
    lp_t, lp_s = _random_logprobs(8, 30, 40), _random_logprobs(9, 30, 40)
    seeds, positions = [5] * 30, list(range(30))
    rule = _rule("skd", 1.0, skd_topk=4)
    drawn = [switch.sample_token(lp_s[t], 1.0, 5, t) for t in range(30)]
    want = rule.decide(lp_t, lp_s, positions, seeds=seeds)[2]
    assert rule.decide(lp_t, lp_s, positions, proposals=np.array(drawn))[2].tolist() == want.tolist()
    assert 0 < want.sum() < 30
