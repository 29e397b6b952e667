"""SWITCH on two vLLM engines: lockstep (default), block-speculative and token-by-token (stepwise).

Lockstep mode (lockstep) runs both engines in one process, one request per sequence
each, stepping together; the token is decided inside vLLM's sampler. It is the fastest
wherever both engines can share a process and device; block mode is for engines apart
(separate actors or devices, a teacher behind a server).

Block mode. Each sequence has a *drafter*, the model that owned its
last token (the student at the start). Per sequence, one block is:

  1. the drafter decodes up to k tokens, returning its full distribution at each;
  2. the other model scores prefix + draft in one prefill (prefix cache on), giving
     its distributions at the same positions;
  3. walking the block, d_j, tau_j and owner_j are computed exactly as the reference
     does; the block ends at the first position whose owner's draw differs from the drafted
     token, with that owner's token (drawn from its distribution, already in hand); later
     draft tokens are dropped and that model drafts from there. A position the other model
     owns whose draw equals the drafted token does not end the block: the prefix is the
     same, so the draft's later rows and the scorer's rows along it are still the exact
     ones (both models draw with the same noise, so this is common where they agree).

The engines take turns with continuous batching (VLLMEngine.advance): each call adds the
drafts and scorings that became due and returns as soon as some of that engine's
requests finish; the others stay in the engine and go on at its next call. So no
sequence waits for another's long draft, and each block costs one draft and one score
request, not a whole-batch round. With Ray actor engines the two engines step
concurrently (an engine's call is collected only when its turn comes again). After a
fully accepted block the scorer's distribution at the next position is already in hand
(the last row of its score), so its next score starts one row later and never depends
on what the prefix cache kept.

Tokens are a pure function of (owner distribution, seed, position) (switch.py), and
the engine's logits processor draws drafted tokens with that same function, so block
mode reproduces the token-by-token process exactly: same tokens, owners and, under
sampling, the same draws. k adapts per sequence and per drafter: doubled after a
fully accepted block, shrunk towards the observed run length after a switch.

Stepwise mode asks both engines for one next-token distribution per round trip: the
obviously-correct twin and the benchmark's comparison point.

Baseline rules (switch.OwnerRule) run on the same walk: under ``teacher`` (SeqKD) the
teacher drafts from the start and the student only scores; under ``student`` (GKD) the
student drafts every block. Under ``skd`` a student draft is its proposals (same key),
and a teacher draft is drawn with the teacher's own key (OwnerRule.draw_seed), so either
model can draft: a student block ends at the first proposal outside the teacher's top-k,
a teacher block at the first position where the student's proposal (from its scored
row) is inside it (in both cases unless the owner's draw is the drafted token). The drafter follows the last owner, as in SWITCH, which keeps blocks
long both for a good student (few replacements) and an untrained one (few acceptances).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from switchkd.rollout import switch
from switchkd.rollout.config import ModelConfig, RolloutConfig
from switchkd.rollout.engines.actors import start_engines
from switchkd.rollout.data.sequences import Prompt, SequenceBuilder

log = logging.getLogger(__name__)


def _tensor(rows: np.ndarray) -> torch.Tensor:
    """A tensor over engine rows. Arrays a Ray actor returned are read-only views of its object
    store, which torch warns about wrapping, so those (only) are copied."""
    return torch.from_numpy(np.require(rows, requirements="W"))


class _State:
    """Block-mode bookkeeping of one sequence: who drafts next and how far."""

    def __init__(self, key: int, seq: SequenceBuilder, k: int, drafter: int):
        self.key, self.seq = key, seq  # key: the sequence's index in its batch (engine request key)
        self.drafter = drafter
        self.draft = None          # the drafter's DecodeResult awaiting the other model's scores
        self.running = False       # a draft or score request of this sequence is in an engine
        # The scorer's next-token row at the current position, in hand after a fully accepted
        # block (the drafter, hence the scorer of the next draft, stays the same); else None.
        self.known = None
        self.k = {switch.STUDENT: k, switch.TEACHER: k}

    @property
    def ids(self) -> list[int]:
        return self.seq.prompt.token_ids + self.seq.response_ids


class VLLMSwitchGenerator:
    """SWITCH rollouts on a teacher and a student vLLM engine (in-process, Ray actors or a server)."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig, eos_ids: set[int], engines=None):
        self.cfg, self.eos_ids = rollout, eos_ids
        self.teacher, self.student = engines or start_engines(model, rollout)
        self.engine_calls = 0  # engine calls (round trips) so far
        self.drafts = 0        # block mode: draft requests (blocks) so far
        self.rule = switch.OwnerRule(rollout.switch, rollout.temperature)

    def shutdown(self) -> None:
        """Stop both engines (frees KV caches and shared memory)."""
        self.teacher.shutdown()
        self.student.shutdown()

    def generate(self, prompts: list[Prompt], on_tokens: Callable[[int], None] = lambda n: None) -> list[SequenceBuilder]:
        """Roll out ``prompts`` in batches of rollout.batch_size; one builder per prompt, in order."""
        step = {"block": self._block_batch, "stepwise": self._stepwise_batch}.get(self.cfg.mode)
        out = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            batch = prompts[start : start + self.cfg.batch_size]
            if step is None:
                out += self._lockstep_batch(batch, on_tokens)
                continue
            seqs = [SequenceBuilder(p, self.cfg.teacher_topk) for p in batch]
            step(seqs, on_tokens)
            out += seqs
        return out

    # -- lockstep -------------------------------------------------------------------------
    def _lockstep_batch(self, prompts: list[Prompt], on_tokens) -> list[SequenceBuilder]:
        """Both engines step together (lockstep; the handle is a PairEngine's)."""
        seqs, (agreed, decided) = self.student.call("lockstep", prompts, self.rule, sorted(self.eos_ids),
                                                    self.cfg.max_new_tokens, self.cfg.teacher_topk)
        self.rule.agreed += agreed
        self.rule.decided += decided
        self.engine_calls += 1
        on_tokens(sum(len(s.response_ids) for s in seqs))
        return seqs

    # -- stepwise -------------------------------------------------------------------------
    def _stepwise_batch(self, seqs: list[SequenceBuilder], on_tokens) -> None:
        while active := [s for s in seqs if not s.done]:
            ids = [s.prompt.token_ids + s.response_ids for s in active]
            starts = [len(x) for x in ids]
            pending = self.teacher.score_async(ids, starts), self.student.score_async(ids, starts)
            teacher_rows, student_rows = (p.result() for p in pending)
            for seq, t_row, s_row in zip(active, teacher_rows, student_rows):
                self._accept(seq, _tensor(t_row[0]), _tensor(s_row[0]))
                on_tokens(1)
            self.engine_calls += 2

    # -- block-speculative ---------------------------------------------------------------
    def _block_batch(self, seqs: list[SequenceBuilder], on_tokens) -> None:
        """Give each engine, in turn, the drafts and scorings that became due; a call returns as
        soon as some of that engine's requests finish (continuous batching). An engine's call
        is collected only when its turn comes again, so Ray actor engines step concurrently; an
        in-process call is already done when submitted and is collected at once."""
        states = [_State(i, s, self.cfg.draft_tokens, self.rule.first_drafter) for i, s in enumerate(seqs)]
        engines = {switch.STUDENT: self.student, switch.TEACHER: self.teacher}
        running = {switch.STUDENT: 0, switch.TEACHER: 0}   # requests in each engine
        pending = {switch.STUDENT: None, switch.TEACHER: None}

        def collect(turn: int) -> None:
            drafts, rows = pending[turn].result()
            pending[turn] = None
            running[turn] -= len(drafts) + len(rows)
            for key, draft in drafts.items():
                states[key].running, states[key].draft = False, draft
            for key, block in rows.items():
                st = states[key]
                block = _tensor(block)
                if st.known is not None:
                    block = torch.cat([st.known[None], block])
                draft, st.draft, st.running = st.draft, None, False
                on_tokens(self._walk_block(st, draft, block))

        try:
            while any(not st.seq.done for st in states):
                for turn in (switch.STUDENT, switch.TEACHER):
                    if pending[turn] is not None:
                        collect(turn)
                    idle = [st for st in states if not st.seq.done and not st.running]
                    drafting = [st for st in idle if st.draft is None and st.drafter == turn]
                    scoring = [st for st in idle if st.draft is not None and st.drafter != turn]
                    if drafting or scoring or running[turn]:
                        for st in drafting + scoring:
                            st.running = True
                        running[turn] += len(drafting) + len(scoring)
                        pending[turn] = engines[turn].advance_async(self._draft_request(drafting),
                                                                    self._score_request(scoring))
                        self.engine_calls += 1
                        if pending[turn].done():
                            collect(turn)
        finally:
            # Only an error ends the loop with work in flight: wait for the calls still out, then
            # leave both engines clean for the next batch. The error that stopped the loop is the
            # one to report; a dead engine that cannot answer these is only logged.
            if any(running.values()):
                for engine, call in ((engines[turn], pending[turn]) for turn in pending):
                    try:
                        if call is not None:
                            call.result()
                        engine.abort_all()
                    except Exception as e:
                        log.warning("engine not cleaned up after a failed rollout: %s", e)

    def _draft_request(self, group: list[_State]) -> dict | None:
        if not group:
            return None
        self.drafts += len(group)
        return dict(
            keys=[st.key for st in group],
            prompts=[st.ids for st in group],
            max_tokens=[min(st.k[st.drafter], self.cfg.max_new_tokens - st.seq.position) for st in group],
            temperature=self.cfg.temperature,
            seeds=[self.rule.draw_seed(st.drafter, st.seq.prompt.seed) for st in group],
            positions=[st.seq.position for st in group],
            stop_token_ids=sorted(self.eos_ids),
        )

    @staticmethod
    def _score_request(group: list[_State]) -> dict | None:
        if not group:
            return None
        # The scorer's row at the draft's first position is in hand after a fully accepted
        # block: ask only for the rows after it (a cached prefix would not recompute it).
        return dict(keys=[st.key for st in group],
                    sequences=[st.ids + st.draft.token_ids.tolist() for st in group],
                    starts=[len(st.ids) + (st.known is not None) for st in group])

    def _walk_block(self, st: _State, draft, other_rows: torch.Tensor) -> int:
        """Accept the drafter's tokens up to the first position whose owner draws a different
        token; returns tokens added. A position the other model owns does not end the block
        when its draw equals the drafted token: the prefix is then the same, so the draft's later
        rows and the scorer's rows along it stay exact (shared noise makes this common)."""
        drafted = _tensor(draft.logprobs)
        m = len(draft.token_ids)
        if st.drafter == switch.STUDENT:
            teacher_lp, student_lp = other_rows[:m], drafted
        else:
            teacher_lp, student_lp = drafted, other_rows[:m]
        # A student draft is its own draws (same function, rows, seed and positions): SKD's proposals.
        positions = np.arange(st.seq.position, st.seq.position + m)
        seed = st.seq.prompt.seed
        d, tau, own = self.rule.decide(teacher_lp, student_lp, positions, seeds=[seed] * m,
                                       proposals=draft.token_ids if st.drafter == switch.STUDENT else None)
        run, token = m, None
        for j in (own != st.drafter).nonzero()[:, 0].tolist():
            token = self.rule.draw(int(own[j]), teacher_lp[j], student_lp[j], seed, int(positions[j]))
            if token != int(draft.token_ids[j]):
                run = j
                break
        if run:
            st.seq.extend(draft.token_ids[:run], own[:run], d[:run], tau[:run], student_lp[:run], teacher_lp[:run])
            st.seq.finish_if(self.eos_ids, self.cfg.max_new_tokens)
        # The scorer's distribution right after an accepted draft: its next score needs no rescoring.
        st.known = other_rows[m] if run == m else None
        added = run
        if run < m and not st.seq.done:
            st.seq.extend([token], own[run : run + 1], d[run : run + 1], tau[run : run + 1],
                          student_lp[run : run + 1], teacher_lp[run : run + 1])
            st.seq.finish_if(self.eos_ids, self.cfg.max_new_tokens)
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
