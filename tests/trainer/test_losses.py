"""Tests for switchkd.trainer.losses against an independent float64 reference (plain loops).

The reference follows the documented conventions: natural log, teacher probabilities floored at
exp(-100), GKD/TRL generalized JSD, DistiLLM skew KL, and K+1 buckets for a sparse teacher.
"""
import math

import pytest
import torch

from switchkd.trainer import losses as L

FLOOR = -100.0
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("skew_kl", {}),
    ("skew_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("tv", {}),
]
IDS = [f"{n}-{p}" for n, p in CASES]


# ---------------------------------------------------------------- float64 reference
def ref_softmax(row):
    top = max(row)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_kl(a, b):
    return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)


def ref_div(name, p, q, beta=0.5, alpha=0.1):
    p = [max(pi, math.exp(FLOOR)) for pi in p]
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "jsd":
        if beta == 0.0:
            return ref_kl(p, q)
        if beta == 1.0:
            return ref_kl(q, p)
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skew_kl":
        return ref_kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)])
    if name == "skew_reverse_kl":
        return ref_kl(q, [alpha * qi + (1 - alpha) * pi for pi, qi in zip(p, q)])
    if name == "tv":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    raise AssertionError(name)


def ref_bucket(p, q, ids):
    """Collapse both distributions onto the valid top-k ids plus one tail bucket (if non-empty)."""
    valid = [i for i in ids if i >= 0]
    pb, qb = [p[i] for i in valid], [q[i] for i in valid]
    rest = [j for j in range(len(p)) if j not in valid]
    if rest:
        pb.append(max(1.0 - sum(pb), 0.0))
        qb.append(sum(q[j] for j in rest))
    return pb, qb


def ref_token(name, s_row, t_row, ids_row=None, **params):
    p, q = ref_softmax(t_row), ref_softmax(s_row)
    if ids_row is not None:
        p, q = ref_bucket(p, q, ids_row)
    return ref_div(name, p, q, **params)


def ref_loss(name, student, teacher, mask, ids=None, weights=None, **params):
    s, t, m = student.double().tolist(), teacher.double().tolist(), mask.tolist()
    total, count = 0.0, 0
    for b in range(len(m)):
        for i in range(len(m[b])):
            if m[b][i]:
                w = 1.0 if weights is None else float(weights[b][i])
                total += w * ref_token(name, s[b][i], t[b][i], None if ids is None else ids[b][i].tolist(), **params)
                count += 1
    return total / max(count, 1)


# ---------------------------------------------------------------- inputs
def make_inputs(seed=0, B=3, T=4, V=7, dtype=torch.float64, garbage=1e4):
    """Random logits with teacher zeros at response tokens and huge garbage at masked ones."""
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[0, 1] = mask[1, 2] = 1
    mask[2, 0] = 0
    teacher[0, 1, 2] = -math.inf
    teacher[1, 2, :3] = -math.inf
    off = mask == 0
    student[off] = garbage * torch.randn(int(off.sum()), V, generator=g, dtype=torch.float64)
    teacher[off] = garbage * torch.randn(int(off.sum()), V, generator=g, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype), mask


def topk_of(teacher, k, seed=1):
    """Distinct random ids per token (not only the largest) and the full teacher's log-probs there."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = teacher.shape
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * T)]).view(B, T, k)
    return ids, torch.log_softmax(teacher, -1).gather(-1, ids)


def tol(dtype):
    return dict(rel=1e-10, abs=1e-10) if dtype == torch.float64 else dict(rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------- full teacher
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_full_matches_reference(name, params, dtype):
    student, teacher, mask = make_inputs(dtype=dtype)
    student.requires_grad_(True)
    loss = L.distill_loss(name, student, teacher_logits=teacher, loss_mask=mask, **params)
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(ref_loss(name, student, teacher, mask, **params), **tol(dtype))
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[mask == 0] == 0).all()
    # Log-probs in place of logits give the same teacher; other garbage at masked tokens changes nothing.
    same = L.distill_loss(name, student, teacher_logits=torch.log_softmax(teacher, -1), loss_mask=mask, **params)
    assert same.item() == pytest.approx(loss.item(), **tol(dtype))
    student2, teacher2, _ = make_inputs(dtype=dtype, garbage=-3e3)
    assert (student2[mask == 1] == student[mask == 1]).all()
    other = L.distill_loss(name, student2, teacher_logits=teacher2, loss_mask=mask, **params)
    assert other.item() == loss.item()


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_per_token_and_masked_mean_agree_with_distill_loss(name, params):
    student, teacher, mask = make_inputs(garbage=1.0)
    per_tok = L.per_token_divergence(name, student, teacher_logits=teacher, **params)
    assert per_tok.shape == mask.shape
    s, t = student.tolist(), teacher.tolist()
    for b, i in zip(*torch.nonzero(mask, as_tuple=True)):
        assert per_tok[b, i].item() == pytest.approx(ref_token(name, s[b][i], t[b][i], **params), rel=1e-10, abs=1e-10)
    loss = L.distill_loss(name, student, teacher_logits=teacher, loss_mask=mask, **params)
    assert L.masked_token_mean(per_tok, mask).item() == pytest.approx(loss.item(), rel=1e-12)


def test_bf16_student_is_computed_in_float32():
    student, teacher, mask = make_inputs(dtype=torch.float32)
    s16 = student.to(torch.bfloat16)
    loss = L.distill_loss("forward_kl", s16, teacher_logits=teacher, loss_mask=mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss("forward_kl", s16.float(), teacher, mask), rel=1e-5)


# ---------------------------------------------------------------- sparse teacher
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_sparse_with_all_ids_equals_full(name, params):
    student, teacher, mask = make_inputs()
    ids, lps = topk_of(teacher, teacher.shape[-1])
    full = L.distill_loss(name, student, teacher_logits=teacher, loss_mask=mask, **params)
    sparse = L.distill_loss(name, student, teacher_topk_ids=ids, teacher_topk_logprobs=lps, loss_mask=mask, **params)
    assert sparse.item() == pytest.approx(full.item(), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_sparse_topk_matches_buckets_and_bounds_full(name, params, dtype):
    student, teacher, mask = make_inputs(dtype=dtype)
    ids, lps = topk_of(teacher, 3)
    # Garbage at masked tokens, even out-of-range ids and impossible log-probs, is never read.
    ids[mask == 0], lps[mask == 0] = 10**6, 5.0
    student.requires_grad_(True)
    loss = L.distill_loss(name, student, teacher_topk_ids=ids, teacher_topk_logprobs=lps, loss_mask=mask, **params)
    assert loss.item() == pytest.approx(ref_loss(name, student, teacher, mask, ids=ids, **params), **tol(dtype))
    loss.backward()
    assert torch.isfinite(student.grad).all()
    keep = mask == 1
    sparse_tok = L.per_token_divergence(name, student[keep], teacher_topk_ids=ids[keep],
                                        teacher_topk_logprobs=lps[keep], **params)
    full_tok = L.per_token_divergence(name, student[keep], teacher_logits=teacher[keep], **params)
    assert (sparse_tok <= full_tok + 1e-6).all()
    assert (sparse_tok < full_tok - 1e-4).any()  # K < V really loses information here


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_sparse_padding_is_ignored(name, params):
    student, teacher, mask = make_inputs()
    ids, lps = topk_of(teacher, 3)
    pad_ids = torch.full(ids.shape[:-1] + (2,), -1)
    pad_lps = torch.full(ids.shape[:-1] + (2,), -math.inf, dtype=lps.dtype)
    padded_ids = torch.cat([ids[..., :1], pad_ids[..., :1], ids[..., 1:], pad_ids[..., 1:]], -1)
    padded_lps = torch.cat([lps[..., :1], pad_lps[..., :1], lps[..., 1:], pad_lps[..., 1:]], -1)
    base = L.distill_loss(name, student, teacher_topk_ids=ids, teacher_topk_logprobs=lps, loss_mask=mask, **params)
    padded = L.distill_loss(name, student, teacher_topk_ids=padded_ids, teacher_topk_logprobs=padded_lps,
                            loss_mask=mask, **params)
    assert padded.item() == pytest.approx(base.item(), rel=1e-12, abs=1e-12)
    # A token with only padding puts all teacher and student mass in the tail: divergence 0.
    only_pad = L.per_token_divergence(name, student[0, 1], teacher_topk_ids=pad_ids[0, 1],
                                      teacher_topk_logprobs=pad_lps[0, 1], **params)
    assert only_pad.item() == pytest.approx(0.0, abs=1e-12)


def test_sparse_zero_teacher_tail_is_finite():
    """Teacher top-k holding all its mass (tail exactly 0) while the student has mass elsewhere."""
    student = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[[0, 1], [2, 3]]])
    probs = torch.tensor([[[0.5, 0.5, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]]], dtype=torch.float64)
    lps = torch.log(probs).gather(-1, ids)
    mask = torch.ones(1, 2)
    for name, params in CASES:
        loss = L.distill_loss(name, student, teacher_topk_ids=ids, teacher_topk_logprobs=lps, loss_mask=mask, **params)
        expected = ref_loss(name, student.detach(), torch.log(probs), mask, ids=ids, **params)
        assert loss.item() == pytest.approx(expected, rel=1e-10)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all()


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name,params", [("forward_kl", {}), ("jsd", {}), ("jsd", {"beta": 0.2}),
                                         ("reverse_kl", {}), ("skew_kl", {}), ("skew_reverse_kl", {})])
def test_gradcheck(name, params):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(1, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    teacher[0, 0, 1] = -math.inf
    mask = torch.tensor([[1, 1]])
    ids = torch.tensor([[[2, -1], [0, 3]]])
    lps = torch.log_softmax(teacher, -1).gather(-1, ids.clamp_min(0)).masked_fill(ids < 0, -math.inf)
    assert torch.autograd.gradcheck(
        lambda s: L.distill_loss(name, s, teacher_logits=teacher, loss_mask=mask, **params), (student,))
    assert torch.autograd.gradcheck(
        lambda s: L.distill_loss(name, s, teacher_topk_ids=ids, teacher_topk_logprobs=lps, loss_mask=mask, **params),
        (student,))


def test_empty_mask_gives_zero_with_grad():
    student, teacher, mask = make_inputs()
    student.requires_grad_(True)
    empty = torch.zeros_like(mask)
    ids, lps = topk_of(teacher, 2)
    for loss in (L.distill_loss("jsd", student, teacher_logits=teacher, loss_mask=empty),
                 L.distill_loss("reverse_kl", student, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                                loss_mask=empty),
                 L.sft_loss(student, torch.zeros(mask.shape, dtype=torch.long), empty)):
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, student)
        assert (grad == 0).all()
    assert L.masked_token_mean(torch.randn(mask.shape), empty).item() == 0.0


# ---------------------------------------------------------------- weights, JSD limits, SFT
def test_owner_weights_change_result_as_expected():
    student, teacher, mask = make_inputs()
    owner = torch.randint(0, 2, mask.shape, generator=torch.Generator().manual_seed(5))
    owner[mask == 0] = 7  # garbage outside the mask is allowed
    owner[0, 1], owner[1, 2] = 0, 1
    weights = L.owner_weights(owner, mask, student_weight=0.5, teacher_weight=2.0)
    assert weights.tolist() == [[0.0 if m == 0 else (2.0 if o == 1 else 0.5) for o, m in zip(orow, mrow)]
                                for orow, mrow in zip(owner.tolist(), mask.tolist())]
    loss = L.distill_loss("forward_kl", student, teacher_logits=teacher, loss_mask=mask, token_weights=weights)
    assert loss.item() == pytest.approx(ref_loss("forward_kl", student, teacher, mask, weights=weights), rel=1e-10)
    per_tok = L.per_token_divergence("forward_kl", student, teacher_logits=teacher)
    keep = mask == 1
    by_owner = (0.5 * per_tok[keep & (owner == 0)].sum() + 2.0 * per_tok[keep & (owner == 1)].sum()) / keep.sum()
    assert loss.item() == pytest.approx(by_owner.item(), rel=1e-12)
    ones = L.owner_weights(owner, mask, 1.0, 1.0)
    plain = L.distill_loss("forward_kl", student, teacher_logits=teacher, loss_mask=mask)
    assert L.distill_loss("forward_kl", student, teacher_logits=teacher, loss_mask=mask,
                          token_weights=ones).item() == pytest.approx(plain.item(), rel=1e-12)
    student_only = L.owner_weights(owner, mask, 1.0, 0.0)
    expected = per_tok[keep & (owner == 0)].sum() / keep.sum()
    assert L.distill_loss("forward_kl", student, teacher_logits=teacher, loss_mask=mask,
                          token_weights=student_only).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="owner"):
        L.owner_weights(torch.full(mask.shape, 2), mask)
    with pytest.raises(ValueError, match="teacher_weight"):
        L.owner_weights(owner, mask, 1.0, -1.0)


def test_jsd_beta_limits():
    student, teacher, mask = make_inputs()
    tok = lambda name, **p: L.per_token_divergence(name, student, teacher_logits=teacher, **p)[mask == 1]
    fkl, rkl = tok("forward_kl"), tok("reverse_kl")
    assert torch.equal(tok("jsd", beta=0.0), fkl)
    assert torch.equal(tok("jsd", beta=1.0), rkl)
    # The formula itself vanishes at the ends; scaled, it tends to the KL that TRL substitutes.
    assert torch.allclose(tok("jsd", beta=1e-6) / 1e-6, fkl, rtol=1e-3)
    finite = torch.isfinite(teacher).all(-1)[mask == 1]  # teacher zeros: reverse KL is the floor's, no limit
    assert not finite.all()
    assert torch.allclose((tok("jsd", beta=1 - 1e-6) / 1e-6)[finite], rkl[finite], rtol=1e-3)
    jsd = tok("jsd", beta=0.5)
    assert ((jsd >= 0) & (jsd <= math.log(2) + 1e-12)).all()
    assert tok("skew_kl", alpha=0.0).allclose(fkl) and tok("skew_reverse_kl", alpha=0.0).allclose(rkl)


def test_sft_loss_is_mean_token_nll():
    student, _, mask = make_inputs(garbage=1.0)
    targets = torch.randint(0, student.shape[-1], mask.shape, generator=torch.Generator().manual_seed(2))
    targets[mask == 0] = -100  # ignored
    s = student.tolist()
    nll = [-math.log(ref_softmax(s[b][i])[targets[b, i]]) for b, i in zip(*torch.nonzero(mask, as_tuple=True))]
    assert L.sft_loss(student, targets, mask).item() == pytest.approx(sum(nll) / len(nll), rel=1e-10)
    with pytest.raises(ValueError, match="target_ids"):
        L.sft_loss(student, torch.full(mask.shape, 99), mask)


# ---------------------------------------------------------------- errors
def test_invalid_names_params_and_inputs():
    student, teacher, mask = make_inputs()
    ids, lps = topk_of(teacher, 2)
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tv"):
        L.get_loss("kl")
    with pytest.raises(ValueError, match="unknown loss"):
        L.distill_loss("fkl", student, teacher_logits=teacher, loss_mask=mask)
    bad_params = [("forward_kl", {"beta": 0.5}, "unknown parameter"), ("jsd", {"alpha": 0.5}, "unknown parameter"),
                  ("jsd", {"beta": -0.1}, "beta must be in"), ("jsd", {"beta": 1.5}, "beta must be in"),
                  ("jsd", {"beta": float("nan")}, "beta must be in"), ("jsd", {"beta": "x"}, "number"),
                  ("skew_kl", {"alpha": 1.0}, "alpha must be in"), ("skew_reverse_kl", {"alpha": -0.2}, "alpha")]
    for name, params, msg in bad_params:
        with pytest.raises(ValueError, match=msg):
            L.distill_loss(name, student, teacher_logits=teacher, loss_mask=mask, **params)
    teachers = [{}, {"teacher_logits": teacher, "teacher_topk_ids": ids, "teacher_topk_logprobs": lps}]
    for kw in teachers:
        with pytest.raises(ValueError, match="exactly one teacher"):
            L.distill_loss("forward_kl", student, loss_mask=mask, **kw)
    with pytest.raises(ValueError, match="together"):
        L.distill_loss("forward_kl", student, teacher_topk_ids=ids, loss_mask=mask)
    with pytest.raises(ValueError, match="vocabulary"):
        L.distill_loss("forward_kl", student, teacher_logits=teacher[..., :-1], loss_mask=mask)
    with pytest.raises(ValueError, match="vocabulary size"):
        L.distill_loss("forward_kl", student, teacher_topk_ids=ids + 100, teacher_topk_logprobs=lps, loss_mask=mask)
    with pytest.raises(ValueError, match="not logits"):
        L.distill_loss("forward_kl", student, teacher_topk_ids=ids, teacher_topk_logprobs=lps + 3, loss_mask=mask)
    with pytest.raises(ValueError, match="integer"):
        L.distill_loss("forward_kl", student, teacher_topk_ids=ids.double(), teacher_topk_logprobs=lps, loss_mask=mask)
    with pytest.raises(ValueError, match="loss_mask shape"):
        L.distill_loss("forward_kl", student, teacher_logits=teacher, loss_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="token_weights shape"):
        L.distill_loss("forward_kl", student, teacher_logits=teacher, loss_mask=mask, token_weights=mask[:1])


# ---------------------------------------------------------------- pinned values
def pinned_inputs():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 5, dtype=torch.float64)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64)
    teacher[0, 1, 4] = -math.inf
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    ids = teacher.topk(2, dim=-1).indices
    ids[1, 2, 1] = -1
    lps = torch.log_softmax(teacher, -1).gather(-1, ids.clamp_min(0)).masked_fill(ids < 0, -math.inf)
    return student, teacher, mask, ids, lps


# Computed once from the float64 reference above; a change of convention must fail here.
PINNED = {
    # (name, params): (full teacher, sparse top-2 teacher)
    ("forward_kl", ()): (1.210491, 1.134171),
    ("reverse_kl", ()): (19.310863, 1.101765),  # full: dominated by the floor at the teacher zero
    ("jsd", ()): (0.253941, 0.229501),
    ("jsd", (("beta", 0.9),)): (0.108810, 0.089743),
    ("skew_kl", ()): (0.848086, 0.783032),
    ("skew_kl", (("alpha", 0.5),)): (0.258795, 0.223289),
    ("skew_reverse_kl", ()): (0.847533, 0.756314),
    ("tv", ()): (0.605460, 0.585996),
}


@pytest.mark.parametrize("key", list(PINNED), ids=[f"{n}-{dict(p)}" for n, p in PINNED])
def test_pinned_values(key):
    name, params = key[0], dict(key[1])
    student, teacher, mask, ids, lps = pinned_inputs()
    full, sparse = PINNED[key]
    got_full = L.distill_loss(name, student, teacher_logits=teacher, loss_mask=mask, **params)
    got_sparse = L.distill_loss(name, student, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                                loss_mask=mask, **params)
    assert got_full.item() == pytest.approx(full, abs=1e-6)
    assert got_sparse.item() == pytest.approx(sparse, abs=1e-6)
