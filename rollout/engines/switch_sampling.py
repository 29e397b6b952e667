"""SWITCH sampling inside vLLM: a logits processor that makes vLLM's greedy argmax draw exactly
``switch.sample_token`` of the raw log-probs, and the request arguments that ask for it."""
from __future__ import annotations

from typing import Any

import torch

from switchkd.rollout import switch
from switchkd.rollout.engines.fast_logprobs import install  # the version guard, before vLLM's internals

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality  # noqa: E402

# extra_args keys of a SWITCH-sampled request.
SEED_KEY = "switch_seed"
POSITION_KEY = "switch_position"
TEMPERATURE_KEY = "switch_temperature"


def switch_extra_args(seed: int, position: int, temperature: float) -> dict[str, Any]:
    """``SamplingParams.extra_args`` of a request sampled by :class:`SwitchSamplingLogitsProcessor`
    (send it with ``temperature=0``)."""
    return {SEED_KEY: int(seed), POSITION_KEY: int(position), TEMPERATURE_KEY: float(temperature)}


class RequestStateLogitsProcessor(LogitsProcessor):
    """A logits processor with per-request state in ``self.states`` {batch index: state}, kept in
    step with vLLM's persistent batch (requests added, removed and moved between indices).
    Subclasses say which requests they act on with ``_new_state`` (None: not this one)."""

    def __init__(self) -> None:
        self.states: dict[int, Any] = {}

    @staticmethod
    def _new_state(params: SamplingParams, output_tok_ids: list[int]):
        raise NotImplementedError

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        states = self.states
        for index in batch_update.removed:
            states.pop(index, None)
        for index, params, _prompt, output_tok_ids in batch_update.added:
            state = self._new_state(params, output_tok_ids) if params is not None else None
            if state is None:
                states.pop(index, None)
            else:
                states[index] = state
        for a, b, direction in batch_update.moved:
            sa, sb = states.pop(a, None), states.pop(b, None)
            if sa is not None:
                states[b] = sa
            if direction == MoveDirectionality.SWAP and sb is not None:
                states[a] = sb


class SwitchSamplingLogitsProcessor(RequestStateLogitsProcessor):
    """Reproducible SWITCH sampling inside vLLM.

    For a request with ``extra_args = switch_extra_args(seed, t0, T)`` (and ``temperature=0``),
    the row becomes ``switch.sampling_scores(log_softmax(row), T, seed, t0 + n_generated)``
    so vLLM's greedy argmax draws exactly ``switch.sample_token(raw_logprobs_row, T, seed, t)``.
    The log-softmax is the sampler's own op on the same float32 batch tensor, so it is
    bit-identical to the raw log-probs the request returns (``logprobs_mode="raw_logprobs"``
    computes them before any logits processor). Not argmax-invariant.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        install()  # an engine core in its own process patches its worker here
        super().__init__()  # states: batch index -> (seed, first position, temperature, running output token list)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = sampling_params.extra_args or {}
        if SEED_KEY not in args:
            return
        seed, pos, temp = args.get(SEED_KEY), args.get(POSITION_KEY, 0), args.get(TEMPERATURE_KEY, 1.0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise ValueError(f"extra_args[{SEED_KEY!r}] must be an int in [0, 2**31), got {seed!r}")
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
            raise ValueError(f"extra_args[{POSITION_KEY!r}] must be an int >= 0, got {pos!r}")
        if not isinstance(temp, (int, float)) or isinstance(temp, bool) or temp < 0:
            raise ValueError(f"extra_args[{TEMPERATURE_KEY!r}] must be a number >= 0, got {temp!r}")
        if sampling_params.temperature != 0:
            raise ValueError("SWITCH-sampled requests must be sent with temperature=0 (greedy); "
                             f"the temperature goes in extra_args[{TEMPERATURE_KEY!r}]")

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _new_state(params: SamplingParams, output_tok_ids: list[int]):
        args = params.extra_args or {}
        if SEED_KEY not in args:
            return None
        return (int(args[SEED_KEY]), int(args.get(POSITION_KEY, 0)),
                float(args.get(TEMPERATURE_KEY, 1.0)), output_tok_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.states:
            return logits
        rows = sorted(i for i in self.states if i < logits.shape[0])
        if not rows:
            return logits
        # Same op and input as Sampler.compute_logprobs -> bit-identical to the raw log-probs.
        logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
        # switch.sampling_scores row by row, with its elementwise tail batched per temperature:
        # lp / T + noise is exactly rounded either way, and few large ops beat many small ones
        # (each is an OpenMP region in the engine). The noise is switch.gumbel_noise itself.
        by_temp: dict[float, tuple[list[int], list[torch.Tensor]]] = {}
        for i in rows:
            seed, t0, temperature, out = self.states[i]
            idx, noise = by_temp.setdefault(float(temperature), ([], []))
            idx.append(i)
            if temperature != 0:
                noise.append(switch.gumbel_noise(seed, t0 + len(out), logprobs.shape[-1]))
        for temperature, (idx, noise) in by_temp.items():
            if len(idx) == logits.shape[0]:
                index = slice(None)
            else:
                index = torch.tensor(idx, dtype=torch.long, device=logits.device)
            if temperature == 0:  # sampling_scores(lp, 0, ...) is lp itself
                logits[index] = logprobs[index]
            else:
                noise_t = torch.stack(noise).to(logits.device, non_blocking=True)
                logits[index] = logprobs[index] / temperature + noise_t
        return logits


LOGITS_PROCESSOR_FQCN = f"{__name__}:SwitchSamplingLogitsProcessor"  # vLLM wants "<module>:<type>"
