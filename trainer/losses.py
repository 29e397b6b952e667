"""Distillation divergences between the teacher p and the student q_theta, per token, natural log.

One module for the whole family, chosen by name (``LOSSES``, ``get_loss``); pure tensor code.
Conventions, pinned by tests/trainer/test_losses.py:

- ``forward_kl`` KL(p||q) (the default), ``reverse_kl`` KL(q||p), ``tv`` 0.5 * sum |p - q|.
- ``jsd``: generalized JSD(beta) as in GKD and TRL: beta*KL(p||m) + (1-beta)*KL(q||m) with
  m = beta*p + (1-beta)*q. As in TRL, beta=0 *is* forward KL and beta=1 reverse KL (the formula
  itself vanishes at both ends; JSD(beta)/beta -> KL(p||q) as beta -> 0).
- ``skew_kl`` KL(p || alpha*p + (1-alpha)*q), ``skew_reverse_kl`` KL(q || alpha*q + (1-alpha)*p)
  (DistiLLM; alpha in [0, 1), 0 gives the plain KL).
- The teacher is a target: it is detached, and its log-probs are floored at LOGPROB_FLOOR so a
  teacher zero under student mass costs a large finite penalty (reverse KL) instead of +inf.

Sparse teacher (top-k from the rollout): ``teacher_topk_ids`` [B, T, K] (negative = padding,
ids in a row distinct) and ``teacher_topk_logprobs`` [B, T, K], log-probs of the *full* teacher
distribution at those ids. The teacher's remaining mass r = 1 - sum(exp(topk)) becomes one extra
"tail" bucket, and the student is collapsed onto the same K+1 buckets (its probs at the K ids,
plus all its other mass summed). The divergence is then exact on that K+1-bucket pair: equal to
the full one when the ids cover the vocabulary (tail mass 0), otherwise a lower bound on it
(data-processing inequality: the bucketing is one channel applied to both distributions).

Logits must already be aligned with the targets (position t predicts token t): nothing shifts here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOGPROB_FLOOR = -100.0  # nats; exp(-100) ~ 4e-44 adds nothing to forward terms
DEFAULT_LOSS = "forward_kl"
_NEG_INF = float("-inf")


def _kl(la: Tensor, lb: Tensor) -> Tensor:
    """KL(a||b) over the last dim from log-probs; zeros of a add 0 (masked, so no 0*inf NaN)."""
    has_a = la > _NEG_INF
    la_s = torch.where(has_a, la, 0.0)
    lb_s = torch.where(has_a, lb, 0.0)
    return torch.where(has_a, la_s.exp() * (la_s - lb_s), 0.0).sum(-1)


def _mix(la: Tensor, lb: Tensor, w: float) -> Tensor:
    """log(w*a + (1-w)*b) by logsumexp; w in {0, 1} returns an operand (no log(0) in autograd)."""
    if w == 0.0:
        return lb
    if w == 1.0:
        return la
    return torch.logsumexp(torch.stack([la + math.log(w), lb + math.log1p(-w)]), dim=0)


def _jsd(lp: Tensor, lq: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _kl(lp, lq)
    if beta == 1.0:
        return _kl(lq, lp)
    lm = _mix(lp, lq, beta)
    return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)


@dataclass(frozen=True)
class Param:
    """A scalar loss parameter: default and allowed interval [low, high] or [low, high)."""

    default: float
    low: float
    high: float
    high_inclusive: bool

    def check(self, loss: str, name: str, value: object) -> float:
        try:
            v = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"loss {loss!r}: {name} must be a number, got {value!r}") from None
        if not (self.low <= v and (v <= self.high if self.high_inclusive else v < self.high)):
            bracket = "]" if self.high_inclusive else ")"
            raise ValueError(f"loss {loss!r}: {name} must be in [{self.low}, {self.high}{bracket}, got {v}")
        return v


@dataclass(frozen=True)
class Divergence:
    """Registry entry: fn(teacher_logp, student_logp, **params) -> value summed over the last dim."""

    fn: Callable[..., Tensor]
    params: dict[str, Param] = field(default_factory=dict)


LOSSES: dict[str, Divergence] = {  # fn(lp, lq): lp teacher, lq student log-probs on common buckets
    "forward_kl": Divergence(lambda lp, lq: _kl(lp, lq)),
    "reverse_kl": Divergence(lambda lp, lq: _kl(lq, lp)),
    "jsd": Divergence(_jsd, {"beta": Param(0.5, 0.0, 1.0, True)}),
    "skew_kl": Divergence(lambda lp, lq, alpha: _kl(lp, _mix(lp, lq, alpha)),
                          {"alpha": Param(0.1, 0.0, 1.0, False)}),
    "skew_reverse_kl": Divergence(lambda lp, lq, alpha: _kl(lq, _mix(lq, lp, alpha)),
                                  {"alpha": Param(0.1, 0.0, 1.0, False)}),
    "tv": Divergence(lambda lp, lq: 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)),
}


def get_loss(name: str) -> Divergence:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    return LOSSES[name]


def _resolve_params(name: str, spec: Divergence, params: dict) -> dict[str, float]:
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        allowed = ", ".join(spec.params) or "none"
        raise ValueError(f"loss {name!r} got unknown parameter(s) {unknown}; it takes: {allowed}")
    return {k: p.check(name, k, params.get(k, p.default)) for k, p in spec.params.items()}


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (expm1 near 0, log1p far from it)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _topk_buckets(lq: Tensor, ids: Tensor, lp_k: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs on the K top-k buckets plus one tail bucket."""
    if ids.shape != lp_k.shape or ids.shape[:-1] != lq.shape[:-1]:
        raise ValueError(
            f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(lp_k.shape)} must "
            f"both be [*, K] with * = student_logits' leading shape {tuple(lq.shape[:-1])}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype}")
    vocab = lq.shape[-1]
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(f"teacher_topk_ids holds id {int(ids.max())} >= student vocabulary size {vocab}")
    valid = ids >= 0
    ids = ids.long()
    lp_k = torch.where(valid, lp_k.clamp_max(0.0), _NEG_INF)
    lse_k = torch.logsumexp(lp_k, dim=-1)
    if lse_k.numel() and float(lse_k.max()) > 1e-3:
        raise ValueError("teacher_topk_logprobs sum to more than probability 1: pass log-probabilities "
                         "of the full teacher distribution, not logits")
    # Membership of each vocab id in the row's top-k; padding writes to a spare column V.
    in_topk = torch.zeros(*lq.shape[:-1], vocab + 1, dtype=torch.bool, device=lq.device)
    in_topk = in_topk.scatter_(-1, torch.where(valid, ids, vocab), True)[..., :vocab]
    has_tail = ~in_topk.all(dim=-1)
    # Student tail = logsumexp over the ids outside the top-k (exact, no 1 - sum cancellation);
    # rows without a tail get a finite dummy so autograd never sees logsumexp of all -inf.
    rest = torch.where(has_tail.unsqueeze(-1), lq.masked_fill(in_topk, _NEG_INF), 0.0)
    tail_q = torch.where(has_tail, torch.logsumexp(rest, dim=-1), _NEG_INF)
    # An empty tail bucket has teacher mass 0 by definition; any residual there is rounding.
    tail_p = torch.where(has_tail, _log1mexp(lse_k.clamp_max(0.0)), _NEG_INF)
    lq_k = torch.where(valid, lq.gather(-1, ids.clamp_min(0)), _NEG_INF)
    return torch.cat([lp_k, tail_p.unsqueeze(-1)], -1), torch.cat([lq_k, tail_q.unsqueeze(-1)], -1)


def _bucket_log_probs(student_logits: Tensor, teacher_logits: Tensor | None, teacher_topk_ids: Tensor | None,
                      teacher_topk_logprobs: Tensor | None) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-probs on common buckets: the vocabulary, or top-k + tail."""
    sparse = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if (teacher_logits is not None) == sparse:
        raise ValueError("give exactly one teacher representation: teacher_logits [B, T, V], or "
                         "teacher_topk_ids with teacher_topk_logprobs [B, T, K]")
    if sparse and (teacher_topk_ids is None or teacher_topk_logprobs is None):
        raise ValueError("teacher_topk_ids and teacher_topk_logprobs must be given together")
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
    lq = F.log_softmax(student_logits.to(dtype), dim=-1)
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
                             f"{tuple(student_logits.shape)} (teacher/student vocabulary mismatch?)")
        lp = F.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    else:
        lp, lq = _topk_buckets(lq, teacher_topk_ids, teacher_topk_logprobs.detach().to(dtype))
    # Buckets empty on both sides (padding, empty tail) become p = q = 1: every divergence here
    # adds exactly 0 for a bucket with p = q, and no -inf reaches a logsumexp or a product.
    both_zero = (lp == _NEG_INF) & (lq == _NEG_INF)
    return torch.where(both_zero, 0.0, lp.clamp_min(LOGPROB_FLOOR)), torch.where(both_zero, 0.0, lq)


def per_token_divergence(name: str, student_logits: Tensor, *, teacher_logits: Tensor | None = None,
                         teacher_topk_ids: Tensor | None = None, teacher_topk_logprobs: Tensor | None = None,
                         **params: float) -> Tensor:
    """Unreduced divergence [*] for logits [*, V] (callers log it per owner); no masking here."""
    spec = get_loss(name)
    kwargs = _resolve_params(name, spec, params)
    lp, lq = _bucket_log_probs(student_logits, teacher_logits, teacher_topk_ids, teacher_topk_logprobs)
    return spec.fn(lp, lq, **kwargs)


def _keep(loss_mask: Tensor, shape: torch.Size) -> Tensor:
    if loss_mask.shape != shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != token shape {tuple(shape)}")
    return loss_mask != 0


def masked_token_mean(values: Tensor, loss_mask: Tensor, token_weights: Tensor | None = None) -> Tensor:
    """sum(mask*weight*values) / sum(mask): weights rescale tokens, the denominator stays the
    token count; masked values (even inf/NaN) are selected out, and an empty mask gives 0."""
    keep = _keep(loss_mask, values.shape)
    if token_weights is not None:
        if token_weights.shape != values.shape:
            raise ValueError(f"token_weights shape {tuple(token_weights.shape)} != {tuple(values.shape)}")
        values = values * token_weights.to(values.dtype)
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp_min(1)


def distill_loss(name: str, student_logits: Tensor, *, teacher_logits: Tensor | None = None,
                 teacher_topk_ids: Tensor | None = None, teacher_topk_logprobs: Tensor | None = None,
                 loss_mask: Tensor, token_weights: Tensor | None = None, **params: float) -> Tensor:
    """The training loss: divergence averaged over the response tokens in ``loss_mask``.

    Only the masked-in rows are gathered and computed, so prompt and padding positions cost
    nothing and cannot leak values or NaN gradients into the result.
    """
    keep = _keep(loss_mask, student_logits.shape[:-1])
    div = per_token_divergence(
        name, student_logits[keep],
        teacher_logits=None if teacher_logits is None else teacher_logits[keep],
        teacher_topk_ids=None if teacher_topk_ids is None else teacher_topk_ids[keep],
        teacher_topk_logprobs=None if teacher_topk_logprobs is None else teacher_topk_logprobs[keep],
        **params)
    if token_weights is not None:
        if token_weights.shape != loss_mask.shape:
            raise ValueError(f"token_weights shape {tuple(token_weights.shape)} != {tuple(loss_mask.shape)}")
        div = div * token_weights[keep].to(div.dtype)
    return div.sum() / keep.sum().clamp_min(1)


def owner_weights(owner: Tensor, mask: Tensor, student_weight: float = 1.0,
                  teacher_weight: float = 1.0) -> Tensor:
    """Per-token weights from SWITCH owners (0 student, 1 teacher), 0 outside the mask."""
    for label, w in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"{label} must be finite and >= 0, got {w}")
    keep = _keep(mask, owner.shape)
    if bool((keep & (owner != 0) & (owner != 1)).any()):
        raise ValueError("owner must be 0 (student) or 1 (teacher) at every masked-in token")
    weights = torch.where(owner == 1, float(teacher_weight), float(student_weight))
    return torch.where(keep, weights, 0.0).to(torch.float32)


def sft_loss(student_logits: Tensor, target_ids: Tensor, mask: Tensor) -> Tensor:
    """Mean token NLL of the ground truth over the mask, the supervised mixing term."""
    if target_ids.shape != student_logits.shape[:-1]:
        raise ValueError(f"target_ids shape {tuple(target_ids.shape)} != logits shape "
                         f"{tuple(student_logits.shape[:-1])}")
    keep = _keep(mask, target_ids.shape)
    targets = target_ids[keep].long()
    vocab = student_logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"target_ids under the mask must be in [0, {vocab})")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logp = F.log_softmax(student_logits[keep].to(dtype), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll.sum() / keep.sum().clamp_min(1)
