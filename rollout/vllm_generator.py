"""SWITCH on two vLLM engines: block-speculative (default) and token-by-token (stepwise).

Block mode (DESIGN.md 4.2). Each sequence has a *drafter*, the model that owned its
last token (the student at the start). Per sequence, one block is:

  1. the drafter decodes up to k tokens, returning its full distribution at each;
  2. the other model scores prefix + draft in one prefill (prefix cache on), giving
     its distributions at the same positions;
  3. walking the block, d_j, tau_j and owner_j are computed exactly as the reference
     does; the first position owned by the other model ends the block with that
     model's token (drawn from its distribution, already in hand); later draft tokens
     are dropped and the other model drafts from there.

The engines take turns, and each turn is ONE batched engine call that drafts for the
sequences this engine drafts for and scores the drafts the other engine made in the
previous turn, so no sequence waits for a whole-batch round and each block costs two
engine calls, not four.

Tokens are a pure function of (owner distribution, seed, position) (switch.py), and
the engine's logits processor draws drafted tokens with that same function, so block
mode reproduces the token-by-token process exactly: same tokens, owners and, under
sampling, the same draws. k adapts per sequence and per drafter: doubled after a
fully accepted block, shrunk towards the observed run length after a switch, and
capped per call at the group's median so one long draft does not hold the batch.

Stepwise mode asks both engines for one next-token distribution per round trip: the
obviously-correct twin and the benchmark's comparison point.

Baseline rules (switch.OwnerRule) run on the same walk: under ``teacher`` (SeqKD) the
teacher drafts from the start and the student only scores; under ``student`` (GKD) the
student drafts every block. Under ``skd`` a student draft is its proposals (same key),
and a teacher draft is drawn with the teacher's own key (OwnerRule.draw_seed), so either
model can draft: a student block ends at the first proposal outside the teacher's top-k,
a teacher block at the first position where the student's proposal (from its scored
row) is inside it. The drafter follows the last owner, as in SWITCH, which keeps blocks
long both for a good student (few replacements) and an untrained one (few acceptances).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from switchkd.rollout import switch
from switchkd.rollout.config import ModelConfig, RolloutConfig
from switchkd.rollout.engines import start_engines
from switchkd.rollout.sequences import Prompt, SequenceBuilder



class _State:
    """Block-mode bookkeeping of one sequence: who drafts next and how far."""

    def __init__(self, seq: SequenceBuilder, k: int, drafter: int):
        self.seq = seq
        self.drafter = drafter
        self.draft = None          # the drafter's DecodeResult awaiting the other model's scores
        self.k = {switch.STUDENT: k, switch.TEACHER: k}

    @property
    def ids(self) -> list[int]:
        return self.seq.prompt.token_ids + self.seq.response_ids


class VLLMSwitchGenerator:
    """SWITCH rollouts on a teacher and a student vLLM engine (in-process, Ray actors or a server)."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig, eos_ids: set[int], engines=None):
        self.cfg, self.eos_ids = rollout, eos_ids
        self.teacher, self.student = engines or start_engines(model, rollout)
        self.engine_calls = 0
        self.rule = switch.OwnerRule(rollout.switch, rollout.temperature)

    def shutdown(self) -> None:
        """Stop both engines (frees KV caches and shared memory)."""
        self.teacher.shutdown()
        self.student.shutdown()

    def generate(self, prompts: list[Prompt], on_tokens: Callable[[int], None] = lambda n: None) -> list[SequenceBuilder]:
        """Roll out ``prompts`` in batches of rollout.batch_size; one builder per prompt, in order."""
        step = self._block_batch if self.cfg.mode == "block" else self._stepwise_batch
        out = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            seqs = [SequenceBuilder(p, self.cfg.teacher_topk) for p in prompts[start : start + self.cfg.batch_size]]
            step(seqs, on_tokens)
            out += seqs
        return out

    # -- stepwise -------------------------------------------------------------------------
    def _stepwise_batch(self, seqs: list[SequenceBuilder], on_tokens) -> None:
        while active := [s for s in seqs if not s.done]:
            ids = [s.prompt.token_ids + s.response_ids for s in active]
            starts = [len(x) for x in ids]
            pending = self.teacher.score_async(ids, starts), self.student.score_async(ids, starts)
            teacher_rows, student_rows = (p.result() for p in pending)
            for seq, t_row, s_row in zip(active, teacher_rows, student_rows):
                self._accept(seq, torch.from_numpy(t_row[0]), torch.from_numpy(s_row[0]))
                on_tokens(1)
            self.engine_calls += 2

    # -- block-speculative ---------------------------------------------------------------
    def _block_batch(self, seqs: list[SequenceBuilder], on_tokens) -> None:
        """Alternate the engines; each call drafts for the sequences it drafts for and scores
        the drafts the other engine just made, in one batched engine call."""
        states = [_State(s, self.cfg.draft_tokens, self.rule.first_drafter) for s in seqs]
        engines = {switch.STUDENT: self.student, switch.TEACHER: self.teacher}
        turn = switch.STUDENT
        while active := [st for st in states if not st.seq.done]:
            drafting = [st for st in active if st.draft is None and st.drafter == turn]
            scoring = [st for st in active if st.draft is not None and st.drafter != turn]
            if drafting or scoring:
                score = dict(sequences=[st.ids + st.draft.token_ids.tolist() for st in scoring],
                             starts=[len(st.ids) for st in scoring]) if scoring else None
                drafts, rows = engines[turn].step_async(self._draft_request(drafting), score).result()
                for st, draft in zip(drafting, drafts):
                    st.draft = draft
                for st, block in zip(scoring, rows):
                    draft, st.draft = st.draft, None
                    on_tokens(self._walk_block(st, draft, torch.from_numpy(block)))
                self.engine_calls += 1
            turn = 1 - turn

    def _draft_request(self, group: list[_State]) -> dict | None:
        if not group:
            return None
        # A decode call lasts as many engine steps as its longest draft: cap every draft at the
        # group's median k so one sequence in a long run does not hold the whole batch.
        cap = int(np.median([st.k[st.drafter] for st in group]))
        return dict(
            prompts=[st.ids for st in group],
            max_tokens=[min(st.k[st.drafter], cap, self.cfg.max_new_tokens - st.seq.position) for st in group],
            temperature=self.cfg.temperature,
            seeds=[self.rule.draw_seed(st.drafter, st.seq.prompt.seed) for st in group],
            positions=[st.seq.position for st in group],
            stop_token_ids=sorted(self.eos_ids),
        )

    def _walk_block(self, st: _State, draft, other_rows: torch.Tensor) -> int:
        """Accept the drafter's tokens up to the first position it does not own; returns tokens added."""
        drafted = torch.from_numpy(draft.logprobs)
        m = len(draft.token_ids)
        if st.drafter == switch.STUDENT:
            teacher_lp, student_lp = other_rows[:m], drafted
        else:
            teacher_lp, student_lp = drafted, other_rows[:m]
        # A student draft is its own draws (same function, rows, seed and positions): SKD's proposals.
        d, tau, own = self.rule.decide(teacher_lp, student_lp, np.arange(st.seq.position, st.seq.position + m),
                                       seeds=[st.seq.prompt.seed] * m,
                                       proposals=draft.token_ids if st.drafter == switch.STUDENT else None)
        flips = (own != st.drafter).nonzero()
        run = int(flips[0, 0]) if len(flips) else m
        if run:
            st.seq.extend(draft.token_ids[:run], own[:run], d[:run], tau[:run], student_lp[:run], teacher_lp[:run])
            st.seq.finish_if(self.eos_ids, self.cfg.max_new_tokens)
        added = run
        if run < m and not st.seq.done:
            self._accept(st.seq, teacher_lp[run], student_lp[run])
            added += 1
        self._adapt_k(st, run, m)
        if run < m:
            st.drafter = 1 - st.drafter
        return added

    def _adapt_k(self, st: _State, run: int, m: int) -> None:
        k = st.k[st.drafter]
        st.k[st.drafter] = min(2 * k, self.cfg.max_draft_tokens) if run == m else max(1, min(k, run + 1))

    def _accept(self, seq: SequenceBuilder, teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> None:
        """Decide and draw the token at seq.position from the two full distributions."""
        t = seq.position
        d, tau, own = self.rule.decide(teacher_lp[None], student_lp[None], [t], seeds=[seq.prompt.seed])
        token = self.rule.draw(int(own[0]), teacher_lp, student_lp, seq.prompt.seed, t)
        seq.extend([token], own, d, tau, student_lp[None], teacher_lp[None])
        seq.finish_if(self.eos_ids, self.cfg.max_new_tokens)
