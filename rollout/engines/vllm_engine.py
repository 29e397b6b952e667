"""One vLLM engine (teacher or student) with full-vocab log-probs kept as numpy arrays.

``VLLMEngine`` is a plain class: the generator wraps it with ``ray.remote`` (TeacherEngine /
StudentEngine), so its constructor takes plain picklable values. Two operations, each one
batched ``generate`` call:

* ``decode``: continue each prompt by up to ``max_tokens`` tokens, drawn with SWITCH's
  reproducible sampler (``switch.sample_token`` of the raw distribution, seed and response
  position), returning the raw full-vocab log-probs at every generated step.
* ``score``: the next-token distributions of a model along given sequences from a start
  position on (teacher verification of a draft), reading the prefix cache.

All full-vocab data comes through ``fast_logprobs`` (no sort, no per-token Python objects).
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

FINISH_REASONS = ("stop", "length")
ROW_KINDS = ("logprobs", "hidden")


@dataclass
class DecodeResult:
    token_ids: np.ndarray      # int64 [n]: generated tokens (a stop token included, last)
    logprobs: np.ndarray       # float32 [n, V]: raw distribution at each generated step ([n, d] hidden states for rows="hidden")
    finish_reason: str         # "stop" (a stop token) or "length" (max_tokens / max_model_len)


def check_decode_args(prompts, max_tokens, temperature, seeds, positions, vocab_size: int, max_model_len: int | None) -> None:
    """ValueError for a decode request no engine should see (shared by every engine type)."""
    n = len(prompts)
    if not (len(max_tokens) == len(seeds) == len(positions) == n):
        raise ValueError("prompts, max_tokens, seeds and positions must have the same length")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if any(m < 0 for m in max_tokens):
        raise ValueError("max_tokens must be >= 0")
    for i, seed in enumerate(seeds):
        if not 0 <= int(seed) < 2**31:
            raise ValueError(f"seeds[{i}]={seed} must be in [0, 2**31)")
    _check_tokens(prompts, list(max_tokens), "prompts", vocab_size, max_model_len)


def check_score_args(sequences, starts, vocab_size: int, max_model_len: int | None) -> None:
    """ValueError for a score request no engine should see (shared by every engine type)."""
    if len(sequences) != len(starts):
        raise ValueError("sequences and starts must have the same length")
    for i, (s, a) in enumerate(zip(sequences, starts)):
        if not 1 <= a <= len(s):
            raise ValueError(f"starts[{i}]={a} must be in [1, {len(s)}]")
    _check_tokens(sequences, [1] * len(sequences), "sequences", vocab_size, max_model_len)


def _check_tokens(seqs, extra, what: str, vocab_size: int, max_model_len: int | None) -> None:
    for i, (s, n) in enumerate(zip(seqs, extra)):
        if len(s) == 0:
            raise ValueError(f"{what}[{i}] is empty")
        if max_model_len and len(s) + n > max_model_len:
            raise ValueError(f"{what}[{i}]: {len(s)} tokens + {n} > max_model_len {max_model_len}")
        if min(s) < 0 or max(s) >= vocab_size:
            raise ValueError(f"{what}[{i}]: token id out of range [0, {vocab_size})")


def _configure_env(device: str, kv_cache_space_gb: float, threads: str) -> dict:
    """Process environment vLLM reads at engine creation; returns extra LLM kwargs."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    extra: dict = {}
    if device == "cpu":
        if float(kv_cache_space_gb).is_integer():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_space_gb))
        else:  # the env var takes whole GiB only and would override kv_cache_memory_bytes
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            extra["kv_cache_memory_bytes"] = int(kv_cache_space_gb * (1 << 30))
        if threads != "auto":
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(threads)
    else:
        # The fast path patches the V1 model runner; on GPU vLLM would pick Model Runner V2.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return extra


class VLLMEngine:
    """Owns one in-process ``vllm.LLM`` with the fast log-prob path and SWITCH sampler.
    ``lockstep=True`` makes one half of a lockstep pair (lockstep, actors.PairEngine):
    its logits processor, and no prefix caching, chunked prefill or async scheduling, so that
    both engines of the pair schedule every step alike."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int = 32,
        kv_cache_space_gb: float = 1.0,
        threads: str = "auto",
        enforce_eager: bool = True,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.4,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        trust_remote_code: bool = False,
        lockstep: bool = False,
        rows: str = "logprobs",
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if rows not in ROW_KINDS:
            raise ValueError(f"rows must be one of {ROW_KINDS}, got {rows!r}")
        if kv_cache_space_gb <= 0:
            raise ValueError(f"kv_cache_space_gb must be > 0, got {kv_cache_space_gb}")
        self.model = str(model)
        self.device = device
        self.block_size = int(block_size)
        self.max_model_len = int(max_model_len)
        extra = _configure_env(device, kv_cache_space_gb, str(threads))

        from switchkd.rollout.engines import fast_logprobs, switch_sampling  # vLLM version guard at import
        from switchkd.rollout.engines.lockstep import LOGITS_PROCESSOR_FQCN as LOCKSTEP_PROCESSOR
        from switchkd.rollout.weight_sync.vllm_worker import WORKER_EXTENSION_FQCN

        fast_logprobs.install()
        from vllm import LLM

        kwargs = dict(
            model=self.model,
            dtype=dtype,
            block_size=self.block_size,
            enforce_eager=enforce_eager,
            max_model_len=self.max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            trust_remote_code=trust_remote_code,
            max_logprobs=-1,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=True,
            skip_tokenizer_init=True,
            logits_processors=[switch_sampling.LOGITS_PROCESSOR_FQCN] + ([LOCKSTEP_PROCESSOR] if lockstep else []),
            worker_extension_cls=WORKER_EXTENSION_FQCN,
            **extra,
        )
        if lockstep:
            kwargs.update(enable_prefix_caching=False, enable_chunked_prefill=False, async_scheduling=False,
                          max_num_batched_tokens=max(self.max_model_len, 8192))
        if device != "cpu":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if tensor_parallel_size > 1:  # TP workers as processes inside this engine's host (one node)
            kwargs["distributed_executor_backend"] = "mp"
        self._fastpath, self._sampling = fast_logprobs, switch_sampling
        self.llm = LLM(**kwargs)
        self._vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        # rows="hidden": every row this engine returns is a final hidden state (d_model wide)
        # for the receiver's output_head.OutputHead, instead of a full-vocabulary log-prob row.
        self._row_args = dict(fast_logprobs.HIDDEN_ROWS_ARGS) if rows == "hidden" else {}
        self.row_width = (int(self.llm.llm_engine.model_config.get_hidden_size()) if rows == "hidden"
                          else self._vocab_size)
        self._closed = False
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.weight_version = 0  # version of the weights served; 0 = as loaded from ``model``
        # Diagnostics of the last score() call: prefix-cache hits per sequence, and which
        # sequences were scored again without reading the cache.
        self.last_score_stats: dict = {"num_cached_tokens": [], "rescored": []}
        self._inflight: dict[str, tuple] = {}  # request id -> (kind, caller key, request) of advance()
        self._request_ids = itertools.count()

    # ------------------------------------------------------------------ properties / admin

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def shutdown(self) -> None:
        """Stop the engine core (frees its shared memory); idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    # ------------------------------------------------------------------ weight sync

    def version(self) -> int:
        """The weight version this engine serves (0 = the weights it started with)."""
        return self.weight_version

    def num_sync_ranks(self) -> int:
        """Workers that join a collective weight-sync group (one per tensor-parallel rank)."""
        return self.tensor_parallel_size

    def init_weight_group(self, host: str, port: int, world: int, backend: str, timeout_s: float) -> list[int]:
        """Join the collective weight-sync group hosted by trainer rank 0 (see weight_sync)."""
        return self.llm.collective_rpc("switchkd_init_weight_group", args=(host, port, world, backend, timeout_s))

    def update_weights(self, ticket: dict) -> int:
        """Load the weight version a ``weight_sync.SyncTicket`` describes, then drop the prefix
        cache (its KV blocks belong to the old weights). A refused or failed version raises
        WeightSyncError and the engine keeps serving the weights it had."""
        from switchkd.rollout.weight_sync import TRANSPORTS, WeightSyncError, check_newer

        version, transport = int(ticket["version"]), ticket["transport"]
        if transport not in TRANSPORTS:
            raise WeightSyncError(f"unknown weight-sync transport {transport!r}")
        if transport == "shm":
            check_newer(version, self.weight_version)
        received = self.llm.collective_rpc("switchkd_update_weights", args=(dict(ticket), self.weight_version))
        if any(v != version for v in received):
            raise WeightSyncError(f"{transport} weight sync: workers received versions {received}, "
                                  f"the ticket says {version}")
        self.reset_prefix_cache()
        self.weight_version = version
        return version

    def _generate(self, prompts: Sequence[Sequence[int]], params: list):
        if self._closed:
            raise RuntimeError("VLLMEngine is shut down")
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        return self.llm.generate(inputs, params, use_tqdm=False)

    # ------------------------------------------------------------------ decode

    def decode(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        *,
        temperature: float,
        seeds: list[int],
        positions: list[int],
        stop_token_ids: list[int],
    ) -> list[DecodeResult]:
        """Continue every prompt (one batched call). Token t of prompt i (t counted from
        ``positions[i]``) is ``switch.sample_token(logprobs_row, temperature, seeds[i], t)``."""
        todo_prompts, params, todo, results = self._decode_requests(
            prompts, max_tokens, temperature=temperature, seeds=seeds, positions=positions,
            stop_token_ids=stop_token_ids)
        if todo:
            self._decode_collect(results, todo, self._generate(todo_prompts, params))
        return results

    # ------------------------------------------------------------------ continuous batching

    def advance(self, decode: dict | None, score: dict | None) -> tuple[dict, dict]:
        """Continuous batching across calls (block-speculative SWITCH). Add the decode and score
        requests (``decode`` / ``score`` keyword arguments plus ``keys``, one caller key per
        request), then run engine steps until at least one request of this engine finishes, or
        none is left. Requests still running stay in the engine and go on at the next call, so a
        long draft never holds back the others. Returns ({key: DecodeResult}, {key: score rows})
        of the requests that finished, each exactly what ``decode`` / ``score`` would return."""
        if self._closed:
            raise RuntimeError("VLLMEngine is shut down")
        drafts: dict = {}
        scores: dict = {}
        if decode:
            decode = dict(decode)
            keys = decode.pop("keys")
            prompts, params, todo, results = self._decode_requests(**decode)
            for i, result in enumerate(results):
                if result is not None:  # max_tokens == 0: nothing to run
                    drafts[keys[i]] = result
            for i, prompt, param in zip(todo, prompts, params):
                self._add(("decode", keys[i], None), prompt, param)
        if score:
            for key, seq, start in zip(score["keys"], score["sequences"], score["starts"]):
                self._add_score(key, seq, start, read_cache=True)
        engine = self.llm.llm_engine
        while not (drafts or scores) and self._inflight:
            for out in engine.step():
                if out.finished:
                    self._finish(self._inflight.pop(out.request_id), out, drafts, scores)
        return drafts, scores

    def abort_all(self) -> None:
        """Drop every request ``advance`` left running (a rollout that stopped half way)."""
        if self._inflight:
            self.llm.llm_engine.abort_request(list(self._inflight))
            self._inflight.clear()

    def _add(self, tag: tuple, prompt, params) -> None:
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind

        request_id = f"switchkd-{next(self._request_ids)}"
        params.output_kind = RequestOutputKind.FINAL_ONLY
        self.llm.llm_engine.add_request(request_id, tokens_input([int(t) for t in prompt]), params)
        self._inflight[request_id] = tag

    def _add_score(self, key, sequence, start: int, read_cache: bool) -> None:
        (prompt,), (params,) = self._score_requests([sequence], [start], read_cache=read_cache)
        self._add(("score", key, (sequence, start, read_cache)), prompt, params)

    def _finish(self, tag: tuple, out, drafts: dict, scores: dict) -> None:
        kind, key, request = tag
        if kind == "decode":
            results = [None]
            self._decode_collect(results, [0], [out])
            drafts[key] = results[0]
            return
        sequence, start, read_cache = request
        results = [None]
        if not self._score_rows(results, [sequence], [start], [0], [out], read_cache=read_cache):
            scores[key] = results[0]
        elif read_cache:  # the cached prefix covered a needed row: score it again without the cache
            self._add_score(key, sequence, start, read_cache=False)
        else:
            raise RuntimeError(f"prompt log-probs missing for a sequence of {len(sequence)} tokens without the prefix cache")

    def _decode_requests(self, prompts, max_tokens, *, temperature, seeds, positions, stop_token_ids):
        from vllm import SamplingParams

        n = len(prompts)
        check_decode_args(prompts, max_tokens, temperature, seeds, positions, self._vocab_size, self.max_model_len)
        stops = sorted({int(t) for t in stop_token_ids})
        results: list = [
            DecodeResult(np.zeros(0, np.int64), np.zeros((0, self.row_width), np.float32), "length") if m == 0 else None
            for m in max_tokens
        ]
        todo = [i for i in range(n) if max_tokens[i] > 0]
        params = [
            SamplingParams(
                max_tokens=int(max_tokens[i]), temperature=0.0, logprobs=-1, detokenize=False,
                ignore_eos=True, stop_token_ids=stops,
                extra_args={**self._sampling.switch_extra_args(seeds[i], positions[i], temperature), **self._row_args},
            )
            for i in todo
        ]
        return [prompts[i] for i in todo], params, todo, results

    def _decode_collect(self, results: list, todo: list[int], outs) -> None:
        V = self.row_width
        for i, out in zip(todo, outs):
            comp = out.outputs[0]
            tokens = np.asarray(comp.token_ids, dtype=np.int64)
            lp = comp.logprobs
            if not isinstance(lp, self._fastpath.FullVocabLogprobs):
                raise RuntimeError(f"fast log-prob path not active (got {type(lp).__name__})")
            rows = lp.to_numpy()
            if rows.shape != (len(tokens), V):
                raise RuntimeError(f"log-prob rows {rows.shape} do not match {len(tokens)} tokens x {V}")
            reason = comp.finish_reason
            if reason not in FINISH_REASONS:
                raise RuntimeError(f"request {i} finished with {reason!r}")
            results[i] = DecodeResult(tokens, rows, reason)

    # ------------------------------------------------------------------ score

    def score(self, sequences: list[list[int]], starts: list[int], *,
              read_prefix_cache: bool = True) -> list[np.ndarray]:
        """For sequence s (length L) and start a (1 <= a <= L): float32 [L - a + 1, V] whose
        row r is the next-token distribution after s[:a + r]. One batched call (plus one for
        the requests whose prefix-cache hit covered the row predicting s[a]).
        ``read_prefix_cache=False`` computes every sequence from scratch (for checks)."""
        prompts, params = self._score_requests(sequences, starts, read_cache=read_prefix_cache)
        request = dict(sequences=sequences, starts=starts)
        return self._score_collect(request, self._generate(prompts, params), read_cache=read_prefix_cache)

    def _score_requests(self, sequences, starts, *, read_cache: bool):
        from vllm import SamplingParams

        check_score_args(sequences, starts, self._vocab_size, self.max_model_len)
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=-1, prompt_logprobs=-1, detokenize=False,
            ignore_eos=True, skip_reading_prefix_cache=not read_cache, extra_args=dict(self._row_args) or None,
        )
        return list(sequences), [params] * len(sequences)

    def _score_collect(self, request: dict, outs, *, read_cache: bool = True) -> list[np.ndarray]:
        sequences, starts = request["sequences"], request["starts"]
        results: list[np.ndarray | None] = [None] * len(sequences)
        cached = [0] * len(sequences)
        retry = self._score_rows(results, sequences, starts, range(len(sequences)), outs, read_cache=read_cache,
                                 cached=cached if read_cache else None)
        self.last_score_stats = {"num_cached_tokens": cached, "rescored": list(retry)}
        if retry:
            if not read_cache:
                raise RuntimeError(f"prompt log-probs missing for sequences {retry} without the prefix cache")
            prompts, params = self._score_requests([sequences[i] for i in retry], [starts[i] for i in retry], read_cache=False)
            left = self._score_rows(results, sequences, starts, retry, self._generate(prompts, params), read_cache=False)
            if left:
                raise RuntimeError(f"prompt log-probs missing for sequences {left} even without the prefix cache")
        return results  # type: ignore[return-value]

    def _score_rows(self, results, sequences, starts, idx, outs, *, read_cache: bool, cached=None) -> list[int]:
        """Fill results[i] for i in idx from outs; returns the indices whose rows were not computed.
        ``cached[i]``, when given, receives the prefix-cache hit of sequence i."""
        V = self.row_width
        missing = []
        for i, out in zip(idx, outs):
            s, a = sequences[i], starts[i]
            plp = out.prompt_logprobs
            if not isinstance(plp, self._fastpath.FullVocabPromptLogprobs):
                raise RuntimeError(f"fast log-prob path not active (got {type(plp).__name__})")
            # vLLM never computes the rows inside the cached prefix: they hold garbage.
            hit = int(out.num_cached_tokens or 0)
            if cached is not None:
                cached[i] = hit
            first = max(plp.first_position, hit + 1)
            if a < len(s) and first > a:
                missing.append(i)
                continue
            last = out.outputs[0].logprobs.to_numpy()
            if last.shape != (1, V):
                raise RuntimeError(f"final-step log-probs have shape {last.shape}, expected (1, {V})")
            rows = plp.to_numpy()[a - plp.first_position:] if a < len(s) else np.zeros((0, V), np.float32)
            if np.isnan(rows).any():  # a row the engine did not compute (see fast_logprobs)
                missing.append(i)
                continue
            block = np.empty((len(s) - a + 1, V), np.float32)
            block[:-1] = rows
            block[-1] = last[0]
            results[i] = block
        return missing
