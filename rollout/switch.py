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

The baselines are other owner rules on the same path (``rollout.switch.rule``, OwnerRule):
``student`` (on-policy / GKD), ``teacher`` (SeqKD) and ``skd`` (Speculative KD, Xu et al.
2024: the student proposes a token at each position; when the proposal is outside the
teacher's top ``skd_topk``, the teacher owns the position and draws its own token).
"""
from __future__ import annotations

import math

import numpy as np
import torch

STUDENT, TEACHER = 0, 1
SCHEDULES = ("exp", "linear", "const")
RULES = ("jsd", "student", "teacher", "skd")   # rollout.switch.rule: SWITCH, on-policy/GKD, SeqKD, SKD
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


def topk_view(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """The distribution an engine reporting only top-k log-probs implies: the top k exact, the
    remaining mass spread evenly over the other V - k ids (log-probs, same shape)."""
    lp = logprobs.to(torch.float32)
    vocab = lp.shape[-1]
    if k >= vocab:
        return lp
    values, ids = torch.topk(lp, k, dim=-1)
    tail = (-torch.expm1(torch.logsumexp(values, dim=-1, keepdim=True))).clamp(min=0.0)
    spread = torch.log(tail / (vocab - k)).expand_as(lp).clone()
    return spread.scatter_(-1, ids, values)


def decision_jsd(teacher_logprobs, student_logprobs, mode: str = "exact", k: int = 20) -> torch.Tensor:
    """The d_t that decides owners: exact JSD, or JSD of the top-k views (rollout.switch.logprobs=topk)."""
    lp, lq = torch.as_tensor(teacher_logprobs), torch.as_tensor(student_logprobs)
    if mode == "exact":
        return jsd(lp, lq)
    return jsd(topk_view(lp, k), topk_view(lq, k))


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


class OwnerRule:
    """The single place owners are decided and tokens drawn, for a rollout config's ``switch``
    section (rule, tau0, decay, schedule, logprobs, topk, skd_topk) and its sampling temperature.

    ``rule`` (rollout.switch.rule), per response position t:

        jsd      SWITCH: TEACHER where d_t > tau_t
        student  on-policy / GKD: always STUDENT (the teacher only scores)
        teacher  SeqKD: always TEACHER (the student only scores)
        skd      SKD: the student proposes s_t = draw(p_S, seed, t); TEACHER where
                 #{v : p_T(v) > p_T(s_t)} >= skd_topk (s_t outside the teacher's top-k; ties
                 at the k-th value count as inside), else STUDENT and y_t = s_t

    Every rule records d_t (as configured: exact or top-k JSD); tau_t is the schedule's value
    for ``jsd`` and NaN for the others (no threshold decides). A decision depends only on the
    two distributions, the prompt's seed and t, never on batch or block boundaries. In top-k
    mode the jsd rule also decides exactly on the same rows and counts agreement, so a run
    reports how often the cheap decision matched the exact one.
    """

    def __init__(self, cfg, temperature: float = 1.0):
        self.cfg, self.temperature = cfg, temperature
        self.rule = cfg.rule
        if self.rule not in RULES:
            raise ValueError(f"unknown owner rule {self.rule!r}; allowed: {', '.join(RULES)}")
        self.agreed = self.decided = 0

    def decide(self, teacher_lp: torch.Tensor, student_lp: torch.Tensor, positions, seeds=None,
               proposals=None) -> tuple:
        """(d, tau, owners) for rows of next-token log-probs at response ``positions``. Rule ``skd``
        decides on the student's proposals: ``seeds`` (the rows' prompt seeds) to draw them, or
        ``proposals`` when the caller already holds exactly those draws (a student engine's draft
        is: the engine draws with sample_token on the same rows, seed and positions)."""
        cfg = self.cfg
        d = decision_jsd(teacher_lp, student_lp, cfg.logprobs, cfg.topk)
        if self.rule == "jsd":
            tau = threshold(positions, cfg.tau0, cfg.decay, cfg.schedule)
            own = owners(d, tau)
            if cfg.logprobs != "exact":
                self.agreed += int((own == owners(jsd(teacher_lp, student_lp), tau)).sum())
                self.decided += len(own)
            return d, tau, own
        n = len(d)
        tau = torch.full((n,), math.nan, dtype=torch.float64)
        if self.rule in ("student", "teacher"):
            return d, tau, torch.full((n,), STUDENT if self.rule == "student" else TEACHER, dtype=torch.int8)
        if proposals is None:
            if seeds is None or len(seeds) != n:
                raise ValueError("rule skd needs one prompt seed per row to draw the student's proposals")
            lp_s = torch.as_tensor(student_lp)
            proposals = [sample_token(lp_s[i], self.temperature, int(seeds[i]), int(positions[i])) for i in range(n)]
        return d, tau, skd_owners(teacher_lp, torch.as_tensor(np.asarray(proposals), dtype=torch.long), cfg.skd_topk)

    def draw_seed(self, owner: int, seed: int) -> int:
        """The noise key a token owned by ``owner`` is drawn with (generators and the engines'
        drafts alike). SKD's teacher replaces a proposal that the student's noise made; reusing
        that noise would bias the replacement towards the rejected token, so it draws with an
        independent key. Every other rule decides before drawing; both models share the prompt's key."""
        return skd_teacher_seed(seed) if self.rule == "skd" and owner == TEACHER else seed

    def draw(self, owner: int, teacher_lp: torch.Tensor, student_lp: torch.Tensor, seed: int, position: int) -> int:
        """The token at ``position`` from the owner's distribution."""
        source = teacher_lp if owner == TEACHER else student_lp
        return sample_token(source, self.temperature, self.draw_seed(owner, seed), position)

    def noise_rows(self, seeds, positions, vocab: int) -> torch.Tensor | None:
        """The Gumbel noise [n, vocab] of draws with the prompts' own keys at ``positions`` (None at T = 0)."""
        if self.temperature == 0:
            return None
        return torch.stack([gumbel_noise(int(s), int(p), vocab) for s, p in zip(seeds, positions)])

    def draw_rows(self, owners: torch.Tensor, teacher_lp: torch.Tensor, student_lp: torch.Tensor, seeds,
                  positions, noise: torch.Tensor | None = None) -> list[int]:
        """draw() for many rows at once (same tokens: the same float32 scores, one argmax); ``noise``
        is noise_rows(seeds, positions, V) when the caller drew it already."""
        source = torch.where(owners.bool()[:, None], teacher_lp, student_lp).to(torch.float32)
        if self.temperature == 0:
            return torch.argmax(source, dim=-1).tolist()
        if noise is None:
            noise = self.noise_rows(seeds, positions, source.shape[-1])
        if self.rule == "skd":  # its teacher draws with a key of its own (draw_seed)
            for i in torch.nonzero(owners == TEACHER).flatten().tolist():
                noise[i] = gumbel_noise(self.draw_seed(TEACHER, int(seeds[i])), int(positions[i]), source.shape[-1])
        return torch.argmax(source / self.temperature + noise, dim=-1).tolist()

    @property
    def first_drafter(self) -> int:
        """Block mode: who drafts a sequence's first block (the teacher under SeqKD)."""
        return TEACHER if self.rule == "teacher" else STUDENT

    @property
    def agreement(self) -> float | None:
        """Fraction of top-k decisions equal to the exact ones (None in exact mode)."""
        return self.agreed / self.decided if self.decided else None


def skd_owners(teacher_lp: torch.Tensor, proposals: torch.Tensor, k: int) -> torch.Tensor:
    """TEACHER (1) where the proposal is outside the teacher's top-k: at least k ids strictly more
    likely under the teacher (ties at the k-th value count as inside, so the result never depends
    on how a top-k routine orders equal values); else STUDENT (0)."""
    lp = torch.as_tensor(teacher_lp).to(torch.float32)
    chosen = lp.gather(-1, proposals.view(-1, 1).to(torch.long))
    return ((lp > chosen).sum(-1) >= k).to(torch.int8)


def skd_teacher_seed(seed: int) -> int:
    """SKD's teacher noise key (31 bits), a fixed function of the prompt seed, independent of it."""
    return splitmix64(seed ^ 0x5D5EED_7EAC4E5) & 0x7FFFFFFF


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
    """Standard Gumbel noise [vocab_size] (float32) determined by (seed, position) only.

    float32 throughout (5x cheaper than float64 at V = 49k; this runs once per sampled
    token inside the engine). u = 0 gives -inf: that token is never drawn, as it should not be.
    """
    gen = torch.Generator().manual_seed(splitmix64(seed << 32 | position) >> 1)
    u = torch.rand(vocab_size, generator=gen, dtype=torch.float32)
    return -torch.log(-torch.log(u))


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
