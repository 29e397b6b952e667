"""Per-prompt accumulation of SWITCH decisions into schema rows (shared by every generator)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from switchkd.rollout.switch import topk_logprobs


@dataclass
class Prompt:
    index: int            # row in the prompt file
    token_ids: list[int]
    seed: int             # per-prompt sampling seed
    reference_ids: list[int] = field(default_factory=list)  # reference response (EOS appended); [] = none


@dataclass
class SequenceBuilder:
    """The growing response of one prompt and its per-token SWITCH record."""
    prompt: Prompt
    topk: int
    response_ids: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    jsd: list[float] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    student_logprob: list[float] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_lps: list[np.ndarray] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def position(self) -> int:
        """Response position of the next token."""
        return len(self.response_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def extend(self, tokens, owners, d, tau, student_lp: torch.Tensor, teacher_lp: torch.Tensor) -> None:
        """Append m decided tokens; student_lp / teacher_lp are the [m, V] distributions they came from."""
        tokens = [int(x) for x in tokens]
        idx = torch.as_tensor(tokens, dtype=torch.long)[:, None]
        ids, lps = topk_logprobs(teacher_lp, self.topk)
        student_logprob = student_lp.to(torch.float32).gather(1, idx)[:, 0].tolist()
        for row in zip(tokens, owners, d, tau, student_logprob, ids, lps):
            self.append(*row)

    def append(self, token: int, owner, d, tau, student_logprob: float, topk_ids: np.ndarray,
               topk_lps: np.ndarray) -> None:
        """Append one decided token whose teacher top-k and student log-prob are already taken."""
        self.response_ids.append(int(token))
        self.owner.append(int(owner))
        self.jsd.append(float(d))
        self.tau.append(float(tau))
        self.student_logprob.append(float(student_logprob))
        self.topk_ids.append(topk_ids)
        self.topk_lps.append(topk_lps)

    def finish_if(self, eos_ids: set[int], max_new_tokens: int) -> None:
        """Set finish_reason when the last token is EOS or the length budget is used."""
        if self.response_ids and self.response_ids[-1] in eos_ids:
            self.finish_reason = "stop"
        elif len(self.response_ids) >= max_new_tokens:
            self.finish_reason = "length"

    def row(self, policy_version: int) -> dict:
        """The schema row (see switchkd.rollout.data.schema)."""
        return {
            "prompt_index": self.prompt.index, "prompt_ids": self.prompt.token_ids,
            "response_ids": self.response_ids, "owner": self.owner, "jsd": self.jsd, "tau": self.tau,
            "student_logprob": self.student_logprob,
            "teacher_topk_ids": [a.tolist() for a in self.topk_ids],
            "teacher_topk_logprobs": [a.tolist() for a in self.topk_lps],
            "policy_version": policy_version, "seed": self.prompt.seed, "finish_reason": self.finish_reason,
            "reference_ids": self.prompt.reference_ids,
        }
