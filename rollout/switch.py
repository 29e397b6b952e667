"""SWITCH math: Jensen-Shannon divergence, the decaying threshold, owners and sampling.

Every generator (HF reference, vLLM stepwise, vLLM block-speculative) makes its
decisions through these functions, so they agree by construction:

    d_t     = JSD(p_T, p_S)                       natural log, 0 <= d_t <= ln 2
    tau_t   = tau0 * exp(-decay * t)              "exp"   (the paper's schedule)
            = tau0 * max(0, 1 - decay * t)        "linear"
            = tau0                                "const"
    owner_t = TEACHER if d_t > tau_t else STUDENT
    y_t     = argmax(log p_owner / T + g(seed, t))   (Gumbel-max; T = 0 is plain argmax)

Sampling uses the Gumbel-max trick with noise that depends only on (seed, t),
drawn from a counter-keyed generator. A token is therefore a pure function of
the owner's distribution, the prompt's seed and the position: batch composition,
engine and the block boundaries of speculative decoding cannot change it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

STUDENT, TEACHER = 0, 1
SCHEDULES = ("exp", "linear", "const")
LN2 = math.log(2.0)
_MASK64 = (1 << 64) - 1


def jsd(teacher_logprobs, student_logprobs) -> torch.Tensor:
    """JSD between two distributions given as log-probs over the last axis (natural log).

    Exact where probabilities are zero (-inf log-probs): 0 * log 0 terms count as 0.
    Accepts torch tensors or numpy arrays; returns a tensor in the input float dtype.
    """
    lp = torch.as_tensor(teacher_logprobs)
    lq = torch.as_tensor(student_logprobs)
    log_m = torch.logaddexp(lp, lq) - LN2
    return (0.5 * (_kl_terms(lp, log_m) + _kl_terms(lq, log_m)).sum(-1)).clamp(0.0, LN2)


def _kl_terms(log_a: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """Elementwise a * (log a - log m), with 0 where a == 0 (log m is finite wherever a > 0)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_m), torch.zeros_like(a))


def threshold(positions, tau0: float, decay: float, schedule: str) -> torch.Tensor:
    """tau_t for response positions t (0-based from the first generated token), float64."""
    t = torch.as_tensor(positions, dtype=torch.float64)
    if schedule == "exp":
        return tau0 * torch.exp(-decay * t)
    if schedule == "linear":
        return tau0 * torch.clamp(1.0 - decay * t, min=0.0)
    if schedule == "const":
        return torch.full_like(t, float(tau0))
    raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def owners(d: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """TEACHER (1) where d > tau, else STUDENT (0); compared in float64."""
    return (d.to(torch.float64) > tau.to(torch.float64)).to(torch.int8)


def splitmix64(x: int) -> int:
    """One SplitMix64 step: a well-mixed 64-bit integer from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def prompt_seed(run_seed: int, prompt_index: int) -> int:
    """The per-prompt seed (31 bits) derived from the run seed and the prompt's index."""
    return splitmix64((run_seed & 0xFFFFFFFF) << 32 | (prompt_index & 0xFFFFFFFF)) & 0x7FFFFFFF


def gumbel_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise [vocab_size] (float32) determined by (seed, position) only."""
    gen = torch.Generator().manual_seed(splitmix64(seed << 32 | position) >> 1)
    u = torch.rand(vocab_size, generator=gen, dtype=torch.float64).clamp_(min=1e-300)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def sampling_scores(logprobs: torch.Tensor, temperature: float, seed: int, position: int) -> torch.Tensor:
    """Scores whose argmax is the sampled token: log p / T + Gumbel(seed, t); log p when T == 0.

    float32 throughout; the vLLM logits processor applies this same function to the same
    log-probs, so engine-side and generator-side draws are bit-identical.
    """
    logprobs = logprobs.to(torch.float32)
    if temperature == 0:
        return logprobs
    return logprobs / temperature + gumbel_noise(seed, position, logprobs.shape[-1])


def sample_token(logprobs, temperature: float, seed: int, position: int) -> int:
    """Draw one token from softmax(log p / T) (argmax at T == 0), reproducibly per (seed, t)."""
    return int(torch.argmax(sampling_scores(torch.as_tensor(logprobs), temperature, seed, position)))


def topk_logprobs(logprobs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (int32) and log-probs (float32) over the last axis, highest first."""
    values, ids = torch.topk(logprobs.to(torch.float32), min(k, logprobs.shape[-1]), dim=-1)
    return ids.to(torch.int32).numpy(), values.numpy()
