"""``rollout.source=reference``: the response is the data's reference, scored, never sampled.

KD on ground truth (and SFT) on the rollout path: for each prompt with a reference response
(``Prompt.reference_ids``, EOS appended by the data layer), the response is that reference,
cut after its first EOS and at ``rollout.max_new_tokens`` (the budget every method gets).
Both models score prompt + response in one batched call each: the teacher's rows give the
top-k the trainer distils towards, the student's give ``student_logprob`` and, with the
teacher's, ``jsd``. Every token's owner is TEACHER: the token is ground truth, drawn by
neither model, and TEACHER is the owner under which the trainer's "teacher-owned token"
weights and the teacher fraction read correctly (the response is not the student's). ``tau``
is NaN (no threshold decides). ``rollout.switch`` and ``rollout.temperature`` are not used.

Prompts without a reference are skipped and counted in ``skipped``; a call where no prompt
has one is a PromptError. The generator has the interface of the sampling generators
(``generate(prompts, on_tokens) -> list[SequenceBuilder]``), so `switchkd generate` and the
closed loop use it unchanged (switchkd.rollout.generate.build_generator picks it).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Callable

import numpy as np
import torch

from switchkd.rollout import switch
from switchkd.rollout.config import RolloutConfig
from switchkd.rollout.data.prompts import PromptError
from switchkd.rollout.data.sequences import Prompt, SequenceBuilder

log = logging.getLogger(__name__)
NO_REFERENCE = "no reference response"


def reference_response(prompt: Prompt, eos_ids: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    """The response a reference source trains on, and its finish reason: the reference up to and
    including its first EOS ("stop"), at most ``max_new_tokens`` tokens ("length" when cut)."""
    ids = list(prompt.reference_ids)
    stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    if stop is not None:
        ids = ids[: stop + 1]
    if len(ids) > max_new_tokens:
        return ids[:max_new_tokens], "length"
    return ids, "stop" if stop is not None else "length"


class ReferenceGenerator:
    """Reference responses scored by a teacher and a student (``scorer``: HF or vLLM, below)."""

    def __init__(self, scorer, cfg: RolloutConfig, eos_ids: set[int]):
        self.scorer, self.cfg, self.eos_ids = scorer, cfg, eos_ids
        self.rule = switch.OwnerRule(cfg.switch, cfg.temperature)   # not used to decide; reports no agreement
        self.skipped: Counter = Counter()

    def shutdown(self) -> None:
        getattr(self.scorer, "shutdown", lambda: None)()

    def generate(self, prompts: list[Prompt], on_tokens: Callable[[int], None] = lambda n: None) -> list[SequenceBuilder]:
        """One builder per prompt that has a reference, in order; the others are skipped and counted."""
        usable = [p for p in prompts if p.reference_ids]
        if len(usable) < len(prompts):
            missing = len(prompts) - len(usable)
            self.skipped[NO_REFERENCE] += missing
            log.warning("rollout.source=reference: %d of %d prompts have no reference response; skipped",
                        missing, len(prompts))
        if not usable:
            raise PromptError(f"rollout.source=reference: none of the {len(prompts)} prompts has a reference "
                              f"response; the data needs a 'response' field (see data.prompts)")
        out = []
        for start in range(0, len(usable), self.cfg.batch_size):
            out += self._score_batch(usable[start : start + self.cfg.batch_size], on_tokens)
        return out

    def _score_batch(self, prompts: list[Prompt], on_tokens) -> list[SequenceBuilder]:
        responses = [reference_response(p, self.eos_ids, self.cfg.max_new_tokens) for p in prompts]
        sequences = [p.token_ids + ids for p, (ids, _) in zip(prompts, responses)]
        starts = [len(p.token_ids) for p in prompts]
        teacher_rows, student_rows = self.scorer.score(sequences, starts)
        seqs = []
        for p, (ids, reason), t_rows, s_rows in zip(prompts, responses, teacher_rows, student_rows):
            n = len(ids)
            teacher_lp, student_lp = torch.as_tensor(t_rows[:n]), torch.as_tensor(s_rows[:n])
            seq = SequenceBuilder(p, self.cfg.teacher_topk)
            seq.extend(ids, [switch.TEACHER] * n, switch.jsd(teacher_lp, student_lp), [math.nan] * n,
                       student_lp, teacher_lp)
            seq.finish_reason = reason
            seqs.append(seq)
            on_tokens(n)
        return seqs


class VLLMScorer:
    """Both vLLM engines' ``score`` (EngineHandle.score_async), the two running concurrently."""

    def __init__(self, teacher, student):
        self.teacher, self.student = teacher, student

    def score(self, sequences: list[list[int]], starts: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        pending = self.teacher.score_async(sequences, starts), self.student.score_async(sequences, starts)
        return tuple(p.result() for p in pending)

    def shutdown(self) -> None:
        self.teacher.shutdown()
        self.student.shutdown()


class HFScorer:
    """Both models in transformers: one right-padded forward each, rows as the engines give them
    (row r of sequence s with start a: the next-token distribution after s[:a + r])."""

    def __init__(self, teacher, student, pad_id: int):
        self.teacher, self.student, self.pad_id = teacher, student, pad_id

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], starts: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        out = []
        for model in (self.teacher, self.student):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            out.append([torch.log_softmax(logits[i, a - 1 : len(s)].float(), dim=-1)
                        for i, (s, a) in enumerate(zip(sequences, starts))])
        return out[0], out[1]
