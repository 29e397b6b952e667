"""SWITCH in lockstep: one request per sequence in each engine, the token decided inside vLLM.

Block mode (vllm_generator) moves full-vocab rows out of the engines and, at every owner
change, starts new requests that prefill the prefix again. In lockstep mode both engines
hold each sequence as one request for the whole rollout and step together, in one process:

  1. the student engine's step runs its forward pass; its logits processor
     (:class:`LockstepLogitsProcessor`) offers the student's rows to the :class:`Exchange`
     and, inside that call, steps the teacher engine once (nested: the student's forward
     context is closed by then, vLLM samples outside it);
  2. the teacher's step runs its forward pass; its processor finds the student's rows for
     the same sequences and positions, and the exchange decides d_t, tau_t, the owner and
     the token with switch.OwnerRule (the same calls as every generator), records them in
     the sequences' builders, and forces the token (every other logit -inf, greedy);
  3. back in the student's processor the same tokens are forced there.

So each engine runs exactly one forward pass per token and no full-vocab row ever leaves
the process's tensors. Both engines must schedule the same requests in the same steps:
lockstep engines run without prefix caching and without chunked prefill (a partial
prefill would be sampled and thrown away by vLLM, which a processor cannot tell apart),
and the driver admits only as many sequences as both KV caches hold, so none is preempted.
An engine that gets out of step raises a clear error instead of deciding on wrong rows.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from switchkd.rollout import switch
from switchkd.rollout.sequences import Prompt, SequenceBuilder
from switchkd.rollout.vllm_fastpath import RequestStateLogitsProcessor

LOCKSTEP_KEY = "switchkd_lockstep"   # SamplingParams.extra_args: (exchange id, role, sequence key)
_EXCHANGES: dict[int, "Exchange"] = {}
_ids = itertools.count()


class LockstepError(RuntimeError):
    """The two engines did not schedule the same sequences in the same step."""


@dataclass
class Exchange:
    """Pairs the two engines' rows of one rollout and decides each sequence's next token."""

    rule: switch.OwnerRule
    seqs: dict[int, SequenceBuilder]
    eos_ids: set[int]
    max_new_tokens: int
    step_teacher: Callable[[], object]   # runs one teacher engine step
    id: int = field(default_factory=lambda: next(_ids))
    waiting: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)   # key -> (pos, student row)
    decided: dict[int, tuple[int, int]] = field(default_factory=dict)            # key -> (pos, token)

    def __enter__(self) -> "Exchange":
        _EXCHANGES[self.id] = self
        return self

    def __exit__(self, *exc) -> None:
        _EXCHANGES.pop(self.id, None)

    def student_rows(self, keys: list[int], positions: list[int], rows: torch.Tensor) -> list[int]:
        """The student's rows of one step; runs the teacher's step, which decides them; the tokens."""
        for key, pos, row in zip(keys, positions, rows):
            self.waiting[key] = (pos, row)
        self.step_teacher()  # one teacher step decides them all: both engines schedule alike
        missing = [k for k, p in zip(keys, positions) if self.decided.get(k, (None,))[0] != p]
        if missing:
            raise LockstepError(f"teacher engine out of step: sequences {missing[:8]} not decided by its step")
        return [self.decided[k][1] for k in keys]

    def teacher_rows(self, keys: list[int], positions: list[int], rows: torch.Tensor) -> list[int]:
        """The teacher's rows of one step: decide against the waiting student rows; the tokens."""
        student = []
        for key, pos in zip(keys, positions):
            got = self.waiting.pop(key, None)
            if got is None or got[0] != pos:
                raise LockstepError(f"student engine out of step: sequence {key} at position {pos} has "
                                    f"no student row ({'none' if got is None else f'position {got[0]}'})")
            if self.seqs[key].position != pos:
                raise LockstepError(f"sequence {key}: the engines are at position {pos}, the rollout at "
                                    f"{self.seqs[key].position}")
            student.append(got[1])
        student_lp = torch.stack(student)
        seeds = [self.seqs[k].prompt.seed for k in keys]
        d, tau, own = self.rule.decide(rows, student_lp, positions, seeds=seeds)
        tokens = []
        for i, (key, pos) in enumerate(zip(keys, positions)):
            seq = self.seqs[key]
            token = self.rule.draw(int(own[i]), rows[i], student_lp[i], seq.prompt.seed, pos)
            seq.extend([token], own[i : i + 1], d[i : i + 1], tau[i : i + 1], student_lp[i : i + 1], rows[i : i + 1])
            seq.finish_if(self.eos_ids, self.max_new_tokens)
            self.decided[key] = (pos, token)
            tokens.append(token)
        return tokens


class LockstepLogitsProcessor(RequestStateLogitsProcessor):
    """Hands each lockstep request's row (log-softmax, float32: the sampler's own op) to its
    exchange and forces the token the exchange decided. Other requests are left alone."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__()  # states: batch index -> (exchange id, role, key, running output token list)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(LOCKSTEP_KEY)
        if args is None:
            return
        if not (isinstance(args, (list, tuple)) and len(args) == 3 and args[1] in (switch.STUDENT, switch.TEACHER)):
            raise ValueError(f"extra_args[{LOCKSTEP_KEY!r}] must be (exchange id, role, key), got {args!r}")
        if sampling_params.temperature != 0:
            raise ValueError("lockstep requests must be sent with temperature=0 (the exchange draws the token)")

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _new_state(params, output_tok_ids: list[int]):
        args = (params.extra_args or {}).get(LOCKSTEP_KEY)
        return None if args is None else (int(args[0]), int(args[1]), int(args[2]), output_tok_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = sorted(i for i in self.states if i < logits.shape[0])
        if not rows:
            return logits
        exchange_id, role = self.states[rows[0]][:2]
        exchange = _EXCHANGES.get(exchange_id)
        if exchange is None:
            raise LockstepError(f"lockstep request of a finished or unknown rollout (exchange {exchange_id})")
        # Usually every request of the batch is a lockstep one: then work on the tensor itself
        # (a row gather of [n, V] costs more than the sampler's own work on CPU).
        every = len(rows) == logits.shape[0]
        index = slice(None) if every else torch.tensor(rows, dtype=torch.long, device=logits.device)
        logprobs = logits[index].log_softmax(dim=-1, dtype=torch.float32)
        keys = [self.states[i][2] for i in rows]
        positions = [len(self.states[i][3]) for i in rows]
        offer = exchange.teacher_rows if role == switch.TEACHER else exchange.student_rows
        tokens = torch.tensor(offer(keys, positions, logprobs.cpu()), dtype=torch.long, device=logits.device)
        at = torch.tensor(rows, dtype=torch.long, device=logits.device)
        if every:
            logits.fill_(float("-inf"))
        else:
            logits[at] = float("-inf")
        logits[at, tokens] = 0.0
        return logits


LOGITS_PROCESSOR_FQCN = f"{__name__}:LockstepLogitsProcessor"


def run_lockstep(teacher, student, prompts: list[Prompt], rule: switch.OwnerRule, eos_ids: set[int],
                 max_new_tokens: int, topk: int) -> list[SequenceBuilder]:
    """Roll out ``prompts`` on two in-process lockstep VLLMEngines; one builder per prompt, in order.

    Sequences are admitted while both KV caches can hold them whole (prompt + max_new_tokens),
    so vLLM never preempts one engine's request and not the other's; the rest wait for
    finished ones. After an error every request of this rollout is aborted in both engines."""
    from vllm import SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    engines = {switch.STUDENT: student.llm.llm_engine, switch.TEACHER: teacher.llm.llm_engine}
    seqs = [SequenceBuilder(p, topk) for p in prompts]
    max_len = min(teacher.max_model_len, student.max_model_len)
    block = max(teacher.block_size, student.block_size)
    capacity = min(e.vllm_config.cache_config.num_gpu_blocks for e in engines.values())
    budgets = [min(max_new_tokens, max_len - len(p.token_ids)) for p in prompts]
    for p, budget in zip(prompts, budgets):
        if budget < 1:
            raise ValueError(f"prompt {p.index}: {len(p.token_ids)} tokens leave no room for a response "
                             f"within max_model_len {max_len}")
    need = [-(-(len(p.token_ids) + m) // block) for p, m in zip(prompts, budgets)]
    if max(need, default=0) > capacity:
        raise ValueError(f"a sequence of {max(need) * block} tokens does not fit the smaller KV cache "
                         f"({capacity} blocks of {block}); raise rollout.*.kv_cache_space_gb")
    exchange = Exchange(rule, dict(enumerate(seqs)), eos_ids, max_new_tokens, engines[switch.TEACHER].step)
    request_ids = [f"switchkd-lockstep-{exchange.id}-{key}" for key in range(len(seqs))]
    queue, running, used = list(range(len(seqs))), set(), 0
    with exchange:
        try:
            while queue or running:
                while queue and used + need[queue[0]] <= capacity:
                    key = queue.pop(0)
                    for role, engine in engines.items():
                        params = SamplingParams(max_tokens=budgets[key], temperature=0.0, detokenize=False,
                                                ignore_eos=True, stop_token_ids=sorted(eos_ids),
                                                extra_args={LOCKSTEP_KEY: (exchange.id, role, key)})
                        params.output_kind = RequestOutputKind.FINAL_ONLY
                        engine.add_request(request_ids[key], tokens_input(prompts[key].token_ids), params)
                    running.add(key)
                    used += need[key]
                engines[switch.STUDENT].step()
                for key in [k for k in running if seqs[k].done or seqs[k].position >= budgets[k]]:
                    running.discard(key)
                    used -= need[key]
            if any(e.has_unfinished_requests() for e in engines.values()):
                raise LockstepError("an engine still has requests after every sequence finished")
        except BaseException:
            for engine in engines.values():
                engine.abort_request(request_ids)
            raise
    for seq in seqs:
        if not seq.done:  # stopped by max_model_len before max_new_tokens
            seq.finish_reason = "length"
    return seqs
