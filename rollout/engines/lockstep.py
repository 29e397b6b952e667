"""SWITCH in lockstep: one request per sequence in each engine, the token decided inside vLLM.

Block mode (vllm_generator) moves full-vocab rows out of the engines and, at every owner
change, starts new requests that prefill the prefix again. In lockstep mode both engines
hold each sequence as one request for the whole rollout and step together:

  1. the student engine's step runs its forward pass; its logits processor
     (:class:`LockstepLogitsProcessor`) offers the student's rows to the :class:`Exchange`,
     which gets the teacher's rows of the same sequences and positions from the teacher side;
  2. the exchange decides d_t, tau_t, the owner and the token with switch.OwnerRule (the same
     calls as every generator), records them in the sequences' builders, and both engines'
     processors force that token (every other logit -inf, greedy).

The teacher side is one of two (rollout.lockstep_teacher):

* ``process`` (lockstep_process.TeacherProcess): the teacher engine runs in a child process
  and is told to step when the student does, so the two forward passes run at the same
  time; its processor puts its rows in shared memory and waits for the tokens. A token
  costs max(student step, teacher step) + the decision instead of their sum.
* ``inline`` (:class:`InlineTeacher`): the teacher engine lives in the student's process; the
  student's processor steps it once, nested (the student's forward context is closed by
  then, vLLM samples outside it), and the teacher's processor decides.

Either way each engine runs exactly one forward pass per token and no full-vocab row is
turned into Python objects. Both engines must schedule the same requests in the same steps:
lockstep engines run without prefix caching and without chunked prefill (a partial prefill
would be sampled and thrown away by vLLM, which a processor cannot tell apart), and the
driver admits only as many sequences as both KV caches hold, so none is preempted.
An engine that gets out of step raises a clear error instead of deciding on wrong rows.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from switchkd.rollout import switch
from switchkd.rollout.data.sequences import Prompt, SequenceBuilder
from switchkd.rollout.switch import topk_logprobs
from switchkd.rollout.engines.switch_sampling import RequestStateLogitsProcessor

LOCKSTEP_KEY = "switchkd_lockstep"   # SamplingParams.extra_args: (exchange id, role, sequence key)
_EXCHANGES: dict[int, object] = {}   # exchange id -> its Exchange (in a teacher process: the parent link)
_ids = itertools.count()


def serve_exchange(exchange_id: int, side) -> None:
    """Route the teacher rows of rollout ``exchange_id`` to ``side`` (a teacher process's parent link)."""
    _EXCHANGES.setdefault(exchange_id, side)


def forget_exchanges() -> None:
    """Drop every routed rollout (a teacher process, once its parent's rollout ended)."""
    _EXCHANGES.clear()


class LockstepError(RuntimeError):
    """The two engines did not schedule the same sequences in the same step."""


def lockstep_params(budget: int, eos_ids, exchange_id: int, role: int, key: int):
    """The SamplingParams of one lockstep request: greedy over the forced logits, final output only."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=budget, temperature=0.0, detokenize=False, ignore_eos=True,
                            stop_token_ids=sorted(eos_ids), extra_args={LOCKSTEP_KEY: (exchange_id, role, key)})
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


@dataclass
class Exchange:
    """Pairs the two engines' rows of one rollout and decides each sequence's next token."""

    rule: switch.OwnerRule
    seqs: dict[int, SequenceBuilder]
    eos_ids: set[int]
    max_new_tokens: int
    teacher: object   # the teacher side: InlineTeacher or lockstep_process.TeacherProcess
    id: int = field(default_factory=lambda: next(_ids))

    def __enter__(self) -> "Exchange":
        _EXCHANGES[self.id] = self
        return self

    def __exit__(self, *exc) -> None:
        _EXCHANGES.pop(self.id, None)

    def student_rows(self, keys: list[int], positions: list[int], rows: torch.Tensor) -> list[int]:
        """The student's rows of one step; the teacher side brings its rows and the exchange decides; the tokens."""
        return self.teacher.exchange(self, keys, positions, rows)

    def teacher_rows(self, keys: list[int], positions: list[int], rows: torch.Tensor) -> list[int]:
        """The teacher's rows of one step, from its processor in this process (inline teacher)."""
        return self.teacher.teacher_rows(keys, positions, rows)

    def noise(self, keys: list[int], positions: list[int], vocab: int) -> torch.Tensor | None:
        """A step's sampling noise (switch.OwnerRule.noise_rows): it depends on seeds and positions only,
        so it can be drawn while the other engine's rows are still being computed."""
        return self.rule.noise_rows([self.seqs[k].prompt.seed for k in keys], positions, vocab)

    def decide(self, keys: list[int], positions: list[int], teacher_lp: torch.Tensor, student_lp: torch.Tensor,
               noise: torch.Tensor | None = None) -> list[int]:
        """Decide one step of ``keys`` (both engines' rows of the same positions); the tokens.
        record() then appends the step to the builders (it can wait until the tokens are sent)."""
        for key, pos in zip(keys, positions):
            if self.seqs[key].position != pos:
                raise LockstepError(f"sequence {key}: the engines are at position {pos}, the rollout at "
                                    f"{self.seqs[key].position}")
        seeds = [self.seqs[k].prompt.seed for k in keys]
        d, tau, own = self.rule.decide(teacher_lp, student_lp, positions, seeds=seeds)
        tokens = self.rule.draw_rows(own, teacher_lp, student_lp, seeds, positions, noise)
        self._decided = (keys, tokens, own, d, tau, teacher_lp, student_lp)
        return tokens

    def record(self) -> None:
        """Append the last decided step to its sequences' builders."""
        keys, tokens, own, d, tau, teacher_lp, student_lp = self._decided
        self._decided = None
        ids, lps = topk_logprobs(teacher_lp, self.seqs[keys[0]].topk)
        chosen = student_lp.to(torch.float32).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
        for i, key in enumerate(keys):
            seq = self.seqs[key]
            seq.append(tokens[i], own[i], d[i], tau[i], chosen[i], ids[i], lps[i])
            seq.finish_if(self.eos_ids, self.max_new_tokens)


class InlineTeacher:
    """The teacher engine in the student's process (rollout.lockstep_teacher=inline): the student's
    processor steps it, nested, and the teacher's processor decides against the waiting student rows."""

    def __init__(self, engine) -> None:
        self.engine = engine                       # a lockstep VLLMEngine
        self.core = engine.llm.llm_engine
        self.max_model_len, self.block_size = engine.max_model_len, engine.block_size
        self.num_blocks = self.core.vllm_config.cache_config.num_gpu_blocks
        self.waiting: dict[int, tuple[int, torch.Tensor]] = {}   # key -> (pos, student row)
        self.decided: dict[int, tuple[int, int]] = {}            # key -> (pos, token)
        self.current: Exchange | None = None                     # the exchange of the running step

    def add(self, request_id: str, token_ids: list[int], params) -> None:
        from vllm.inputs import tokens_input

        self.core.add_request(request_id, tokens_input(token_ids), params)

    def begin_step(self) -> None:
        """Nothing: the student's processor steps this engine."""

    def end_step(self) -> None:
        """Nothing: the step ran inside the student's."""

    def exchange(self, exchange: Exchange, keys, positions, rows: torch.Tensor) -> list[int]:
        for key, pos, row in zip(keys, positions, rows):
            self.waiting[key] = (pos, row)
        self.current = exchange
        self.core.step()  # one teacher step decides them all: both engines schedule alike
        missing = [k for k, p in zip(keys, positions) if self.decided.get(k, (None,))[0] != p]
        if missing:
            raise LockstepError(f"teacher engine out of step: sequences {missing[:8]} not decided by its step")
        return [self.decided[k][1] for k in keys]

    def teacher_rows(self, keys: list[int], positions: list[int], rows: torch.Tensor) -> list[int]:
        """The teacher's rows of one step (its processor): decide against the waiting student rows; the tokens."""
        student = []
        for key, pos in zip(keys, positions):
            got = self.waiting.pop(key, None)
            if got is None or got[0] != pos:
                raise LockstepError(f"student engine out of step: sequence {key} at position {pos} has "
                                    f"no student row ({'none' if got is None else f'position {got[0]}'})")
            student.append(got[1])
        tokens = self.current.decide(keys, positions, rows, torch.stack(student))
        self.current.record()
        self.decided.update((k, (p, t)) for k, p, t in zip(keys, positions, tokens))
        return tokens

    def abort(self, request_ids: list[str]) -> None:
        self.core.abort_request(request_ids)
        self.waiting.clear()

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished_requests()

    def shutdown(self) -> None:
        self.engine.shutdown()


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
    """Roll out ``prompts`` on a lockstep student VLLMEngine and a teacher side (InlineTeacher or
    lockstep_process.TeacherProcess); one builder per prompt, in order.

    Sequences are admitted while both KV caches can hold them whole (prompt + max_new_tokens),
    so vLLM never preempts one engine's request and not the other's; the rest wait for
    finished ones. After an error every request of this rollout is aborted in both engines."""
    from vllm.inputs import tokens_input

    core = student.llm.llm_engine
    seqs = [SequenceBuilder(p, topk) for p in prompts]
    max_len = min(teacher.max_model_len, student.max_model_len)
    block = max(teacher.block_size, student.block_size)
    capacity = min(teacher.num_blocks, core.vllm_config.cache_config.num_gpu_blocks)
    budgets = [min(max_new_tokens, max_len - len(p.token_ids)) for p in prompts]
    for p, budget in zip(prompts, budgets):
        if budget < 1:
            raise ValueError(f"prompt {p.index}: {len(p.token_ids)} tokens leave no room for a response "
                             f"within max_model_len {max_len}")
    need = [-(-(len(p.token_ids) + m) // block) for p, m in zip(prompts, budgets)]
    if max(need, default=0) > capacity:
        raise ValueError(f"a sequence of {max(need) * block} tokens does not fit the smaller KV cache "
                         f"({capacity} blocks of {block}); raise rollout.*.kv_cache_space_gb")
    exchange = Exchange(rule, dict(enumerate(seqs)), eos_ids, max_new_tokens, teacher)
    request_ids = [f"switchkd-lockstep-{exchange.id}-{key}" for key in range(len(seqs))]
    queue, running, used = list(range(len(seqs))), set(), 0
    with exchange:
        try:
            while queue or running:
                while queue and used + need[queue[0]] <= capacity:
                    key = queue.pop(0)
                    ids = prompts[key].token_ids
                    teacher.add(request_ids[key], ids,
                                lockstep_params(budgets[key], eos_ids, exchange.id, switch.TEACHER, key))
                    core.add_request(request_ids[key], tokens_input(ids),
                                     lockstep_params(budgets[key], eos_ids, exchange.id, switch.STUDENT, key))
                    running.add(key)
                    used += need[key]
                teacher.begin_step()
                core.step()
                teacher.end_step()
                for key in [k for k in running if seqs[k].done or seqs[k].position >= budgets[k]]:
                    running.discard(key)
                    used -= need[key]
            if core.has_unfinished_requests() or teacher.has_unfinished():
                raise LockstepError("an engine still has requests after every sequence finished")
        except BaseException:
            core.abort_request(request_ids)
            teacher.abort(request_ids)
            raise
    for seq in seqs:
        if not seq.done:  # stopped by max_model_len before max_new_tokens
            seq.finish_reason = "length"
    return seqs
