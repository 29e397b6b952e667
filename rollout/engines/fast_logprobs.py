"""The fast full-vocab log-prob path: patches of vLLM internals, written for vLLM 0.32.0
(``vllm_version`` checks it at import).

Why: a request with ``logprobs=-1`` /
``prompt_logprobs=-1`` makes stock vLLM (a) sort every full-vocab row in the worker
(``InputBatch.add_request`` / ``GPUModelRunner._update_states`` turn -1 into V, so
``Sampler.gather_logprobs`` runs ``torch.topk(k=V)`` plus a rank count, for sampled tokens
in ``Sampler.forward`` and for prompts in ``GPUModelRunner._get_prompt_logprobs_dict``),
then (b) turn every row into Python lists and ``FlatLogprobs`` entries in the front end
(``LogprobsProcessor._update_sample_logprobs`` / ``_update_prompt_logprobs``: ``.tolist()``
and ``append_logprobs_for_next_position``; ``LogprobsTensors.tolists`` itself only makes
numpy views). That, not the model, dominates a SWITCH rollout. Here, for requests that
ask for the full vocabulary (and only for those):

* worker, decode (``GPUModelRunner._sample``, which ``CPUModelRunner`` inherits): when
  every request of the batch that wants sample log-probs asks for ``-1``, the sampler is
  handed ``max_num_logprobs=-1``, which takes vLLM's own "full unsorted and unranked
  logprobs" branch (``Sampler.forward``): the raw ``[n, V]`` log-prob tensor, no sort, no
  ranks. Mixed batches (some top-k request alongside) keep the stock sorted path.
* worker, prompt (``GPUModelRunner._get_prompt_logprobs_dict``): ``-1`` requests are split
  off and computed here without ``gather_logprobs``' sort; only the rows the engine
  actually computes (from ``num_computed_tokens`` on, i.e. after a prefix-cache hit) are
  allocated and returned. Other requests go through the original method.
* hidden-state rows: a ``-1`` request whose ``extra_args`` carry ``HIDDEN_ROWS_ARGS`` gets the
  model's final hidden states (after the final norm, the input of its output layer; float32
  [rows, d_model]) in place of the log-prob rows, on both paths (``GPUModelRunner.sample_tokens``
  keeps the batch's sample hidden states for ``_sample``). The receiver applies the output layer
  (``output_head.OutputHead``): d_model values per token cross the wire instead of V.
* front end (``LogprobsProcessor.from_new_request``): ``-1`` requests get
  :class:`FastLogprobsProcessor`, which keeps numpy rows (views of the engine's tensors)
  in :class:`FullVocabLogprobs` / :class:`FullVocabPromptLogprobs` instead of Python
  objects. Those containers still behave like vLLM's (``len``, indexing to
  ``{token_id: Logprob}`` on demand) so nothing that reads them breaks, only slowly.

Wire layouts (``LogprobsTensors`` / ``LogprobsLists`` fields), full-vocab requests:
  fast:  logprob_token_ids 1-D and empty, logprobs [rows, V] by token id, ranks empty
         (prompt rows a request never computed are NaN)
  stock: logprob_token_ids [rows, V+1] (col 0 the sampled/prompt token, then the sorted
         top-V), logprobs same shape, ranks [rows]
The front end accepts both (stock = a mixed batch, or a worker without the patches), so the
result never depends on batch composition.

Everything is installed by :func:`install` (idempotent, once per process, originals kept in
``ORIGINALS``); ``switch_sampling.SwitchSamplingLogitsProcessor`` calls it from its constructor, so a
separate engine-core process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) patches its worker too.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import vllm

from switchkd.rollout.engines import vllm_version  # noqa: F401  (the version guard, before vLLM's internals)

from vllm.logprobs import Logprob  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.engine.logprobs import LogprobsProcessor  # noqa: E402
from vllm.v1.outputs import LogprobsLists, LogprobsTensors  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

# What install() replaces: (owner, attribute, signature of the original it was written for).
# tests/rollout/test_vllm_engine.py checks these against the installed vLLM.
PATCH_TARGETS: list[tuple[Any, str, str]] = [
    (GPUModelRunner, "sample_tokens", "(self, grammar_output: 'GrammarOutput | None') -> "
     "vllm.v1.outputs.ModelRunnerOutput | vllm.v1.outputs.AsyncModelRunnerOutput | "
     "vllm.sequence.IntermediateTensors"),
    (GPUModelRunner, "_sample", "(self, logits: torch.Tensor | None, spec_decode_metadata: "
     "vllm.v1.spec_decode.metadata.SpecDecodeMetadata | None) -> vllm.v1.outputs.SamplerOutput"),
    (GPUModelRunner, "_get_prompt_logprobs_dict", "(self, hidden_states: torch.Tensor, "
     "num_scheduled_tokens: dict[str, int]) -> dict[str, vllm.v1.outputs.LogprobsTensors | None]"),
    (LogprobsProcessor, "from_new_request", "(tokenizer: vllm.tokenizers.protocol.TokenizerLike | None, "
     "request: vllm.v1.engine.EngineCoreRequest) -> 'LogprobsProcessor'"),
]
# Kept on the vllm module so that a reload of this module (or a second import under another
# name) sees the patches already applied instead of wrapping them twice.
ORIGINALS: dict[str, Any] = vllm.__dict__.setdefault("_switchkd_fastpath_originals", {})
_RAW_ORIGINALS: dict[str, Any] = vllm.__dict__.setdefault("_switchkd_fastpath_raw_originals", {})
_install_lock = threading.Lock()

# ``SamplingParams.extra_args`` of a request that wants hidden-state rows instead of log-probs.
HIDDEN_ROWS_KEY = "switchkd_rows"
HIDDEN_ROWS_ARGS = {HIDDEN_ROWS_KEY: "hidden"}

# Which layout the front end received, per kind (rows): "fast" means the worker was patched
# and the batch qualified; "stock" means the sorted layout was scattered back into id order.
LAYOUT_STATS: dict[str, int] = {"sample_fast": 0, "sample_stock": 0, "prompt_fast": 0, "prompt_stock": 0}


# ----------------------------------------------------------------------------- containers


def _row_dict(row: np.ndarray, token_id: int | None) -> dict[int, Logprob]:
    """vLLM's per-position ``{token_id: Logprob}`` for one full-vocab row (compat path, slow)."""
    out: dict[int, Logprob] = {}
    if token_id is not None:
        rank = int(np.count_nonzero(row > row[token_id])) + 1
        out[int(token_id)] = Logprob(float(row[token_id]), rank)
    for i, v in enumerate(row.tolist()):
        if i not in out:
            out[i] = Logprob(v)
    return out


class FullVocabLogprobs(Sequence):
    """Sample log-probs of one request as numpy rows: ``to_numpy()`` is float32 [n, V]."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.token_ids: list[int] = []

    def append_rows(self, rows: np.ndarray, token_ids: Sequence[int]) -> None:
        assert rows.ndim == 2 and rows.shape[0] == len(token_ids), (rows.shape, len(token_ids))
        self._chunks.append(rows)
        self.token_ids.extend(int(t) for t in token_ids)

    def to_numpy(self) -> np.ndarray:
        if not self._chunks:
            return np.zeros((0, 0), np.float32)
        if len(self._chunks) > 1 or not self._chunks[0].flags.c_contiguous:
            # One copy; drops the views into the engine's per-step batch tensors.
            self._chunks = [np.ascontiguousarray(np.concatenate(self._chunks, axis=0), np.float32)]
        return self._chunks[0]

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            out = FullVocabLogprobs()
            if len(self):
                out.append_rows(self.to_numpy()[index], self.token_ids[index])
            return out
        return _row_dict(self.to_numpy()[index], self.token_ids[index])

    def __repr__(self) -> str:
        return f"FullVocabLogprobs(n={len(self)})"


class FullVocabPromptLogprobs(Sequence):
    """Prompt log-probs of one request as numpy rows.

    ``to_numpy()[r]`` is the distribution predicting ``prompt_token_ids[first_position + r]``
    (float32 [prompt_len - first_position, V]). ``first_position`` is 1 without a prefix-cache
    hit, and ``num_cached_tokens + 1`` with one: rows inside the cached prefix are never
    computed, so they are not returned (stock vLLM returns uninitialised memory there).
    As a sequence it mimics vLLM's (``len == prompt_len``, item 0 and uncomputed items None).
    """

    def __init__(self, prompt_token_ids: Sequence[int] | None) -> None:
        self.prompt_token_ids = list(prompt_token_ids or [])
        self.first_position = len(self.prompt_token_ids)
        self._rows: np.ndarray | None = None

    def set_rows(self, rows: np.ndarray, first_position: int) -> None:
        assert rows.ndim == 2 and first_position + rows.shape[0] == len(self.prompt_token_ids), (
            rows.shape, first_position, len(self.prompt_token_ids))
        self._rows, self.first_position = rows, first_position

    def to_numpy(self) -> np.ndarray:
        if self._rows is None:
            return np.zeros((0, 0), np.float32)
        return self._rows

    def __len__(self) -> int:
        return len(self.prompt_token_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < max(1, self.first_position) or self._rows is None:
            return None
        return _row_dict(self._rows[index - self.first_position], self.prompt_token_ids[index])

    def __repr__(self) -> str:
        return f"FullVocabPromptLogprobs(first_position={self.first_position}, rows={len(self) - self.first_position})"


def _stock_layout_to_rows(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Stock full-vocab layout (col 0 the chosen token, then the sorted top-V) -> rows by id."""
    n, width = values.shape
    vocab = width - 1
    rows = np.full((n, vocab), np.nan, np.float32)
    if n:
        top = ids[:, 1:].astype(np.int64)
        ok = ((top >= 0) & (top < vocab)).all(axis=1)  # uncomputed (cached) rows hold garbage
        sub = rows[ok]
        np.put_along_axis(sub, top[ok], values[ok, 1:].astype(np.float32), axis=1)
        rows[ok] = sub
    return rows


def _is_fast_layout(token_ids, values) -> bool:
    """Fast layout: a 1-D empty id array (stock ids are 2-D, [rows, V+1], even with 0 rows)."""
    return token_ids.ndim == 1 and token_ids.shape[0] == 0


def _to_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class FastLogprobsProcessor(LogprobsProcessor):
    """LogprobsProcessor for a request with ``logprobs=-1`` and/or ``prompt_logprobs=-1``:
    numpy rows instead of per-token Python objects. The other kind (top-k, when a request
    mixes a top-k side with a full side) is delegated to the stock methods."""

    full_sample: bool = False
    full_prompt: bool = False
    _pending_token_ids: list[int] | None = None

    @classmethod
    def for_request(cls, tokenizer, request) -> "FastLogprobsProcessor":
        sp = request.sampling_params
        base = ORIGINALS["LogprobsProcessor.from_new_request"](tokenizer, request)
        proc = cls(**{f: getattr(base, f) for f in base.__dataclass_fields__})
        proc.full_sample = _wants_full_sample(sp)
        proc.full_prompt = _wants_full_prompt(sp)
        if wants_hidden(sp):
            proc.cumulative_logprob = None  # the rows are hidden states, not log-probs
        if proc.full_sample:
            proc.logprobs = FullVocabLogprobs()
        if proc.full_prompt:
            proc.prompt_logprobs = FullVocabPromptLogprobs(request.prompt_token_ids)
        return proc

    def update_from_output(self, output) -> None:
        self._pending_token_ids = output.new_token_ids
        try:
            super().update_from_output(output)
        finally:
            self._pending_token_ids = None

    def _update_sample_logprobs(self, logprobs_lists: LogprobsLists) -> None:
        if not self.full_sample:
            return super()._update_sample_logprobs(logprobs_lists)
        token_ids_arr, values, _ranks, _ = logprobs_lists
        values = _to_numpy(values)
        if _is_fast_layout(token_ids_arr, values):
            rows = values
            token_ids = list(self._pending_token_ids or [])[: rows.shape[0]]
            LAYOUT_STATS["sample_fast"] += rows.shape[0]
        else:
            LAYOUT_STATS["sample_stock"] += values.shape[0]
            token_ids_arr = _to_numpy(token_ids_arr)
            rows = _stock_layout_to_rows(token_ids_arr, values)
            token_ids = token_ids_arr[:, 0].tolist()
        if rows.dtype != np.float32:
            rows = rows.astype(np.float32)
        assert len(token_ids) == rows.shape[0], (len(token_ids), rows.shape)
        self.logprobs.append_rows(rows, token_ids)
        if self.cumulative_logprob is not None and token_ids:
            self.cumulative_logprob += float(rows[np.arange(len(token_ids)), token_ids].sum())

    def _update_prompt_logprobs(self, prompt_logprobs_tensors: LogprobsTensors) -> None:
        if not self.full_prompt:
            return super()._update_prompt_logprobs(prompt_logprobs_tensors)
        token_ids_arr, values, *_ = prompt_logprobs_tensors
        values = _to_numpy(values)
        plp: FullVocabPromptLogprobs = self.prompt_logprobs
        prompt_len = len(plp.prompt_token_ids)
        if _is_fast_layout(token_ids_arr, values):
            rows = values
            LAYOUT_STATS["prompt_fast"] += rows.shape[0]
        else:
            rows = _stock_layout_to_rows(_to_numpy(token_ids_arr), values)
            LAYOUT_STATS["prompt_stock"] += rows.shape[0]
        plp.set_rows(rows, prompt_len - rows.shape[0])

    def pop_prompt_logprobs(self):
        plp = self.prompt_logprobs
        if self.full_prompt:
            if plp is not None and plp._rows is not None:
                self.prompt_logprobs = FullVocabPromptLogprobs(plp.prompt_token_ids)
                return plp
            return None
        return super().pop_prompt_logprobs()


def _wants_full_sample(sp: SamplingParams | None) -> bool:
    return sp is not None and sp.logprobs == -1 and not sp.logprob_token_ids


def _wants_full_prompt(sp: SamplingParams | None) -> bool:
    return sp is not None and sp.prompt_logprobs == -1 and sp.prompt_logprob_token_ids is None


def wants_hidden(sp: SamplingParams | None) -> bool:
    """A request that asked for hidden-state rows (``HIDDEN_ROWS_ARGS``) instead of log-probs."""
    return sp is not None and (sp.extra_args or {}).get(HIDDEN_ROWS_KEY) == HIDDEN_ROWS_ARGS[HIDDEN_ROWS_KEY]


def _patched_from_new_request(tokenizer, request) -> LogprobsProcessor:
    sp = request.sampling_params
    if _wants_full_sample(sp) or _wants_full_prompt(sp):
        return FastLogprobsProcessor.for_request(tokenizer, request)
    return ORIGINALS["LogprobsProcessor.from_new_request"](tokenizer, request)


# ----------------------------------------------------------------------------- worker side


def _patched_sample_tokens(self: GPUModelRunner, grammar_output):
    """Stock ``sample_tokens``; keeps the batch's sample hidden states in reach of ``_sample``."""
    state = self.execute_model_state
    self.switchkd_sample_hidden = None if state is None else state.sample_hidden_states
    try:
        return ORIGINALS["GPUModelRunner.sample_tokens"](self, grammar_output)
    finally:
        self.switchkd_sample_hidden = None


def _patched_sample(self: GPUModelRunner, logits, spec_decode_metadata):
    """Stock ``_sample``, but a batch whose sample-logprob requests all ask for -1 reaches the
    sampler with ``max_num_logprobs=-1`` (vLLM's unsorted full-vocab branch); when they all
    want hidden-state rows, the rows are the sample hidden states instead."""
    original = ORIGINALS["GPUModelRunner._sample"]
    batch = self.input_batch
    num_logprobs = batch.num_logprobs
    md = batch.sampling_metadata
    if (
        spec_decode_metadata is not None
        or not num_logprobs
        or md.logprob_token_ids
        or md.max_num_logprobs is None
        or not all(_wants_full_sample(self.requests[r].sampling_params) for r in num_logprobs)
    ):
        return original(self, logits, spec_decode_metadata)
    fast_md = copy.copy(md)
    fast_md.max_num_logprobs = -1
    batch.sampling_metadata = fast_md
    try:
        out = original(self, logits, spec_decode_metadata)
    finally:
        if batch.sampling_metadata is fast_md:
            batch.sampling_metadata = md
    hidden = getattr(self, "switchkd_sample_hidden", None)
    if (hidden is not None and out.logprobs_tensors is not None and hidden.shape[0] == logits.shape[0]
            and all(wants_hidden(self.requests[r].sampling_params) for r in num_logprobs)):
        out.logprobs_tensors = out.logprobs_tensors._replace(logprobs=hidden.to(torch.float32))
    return out


def _patched_get_prompt_logprobs_dict(self: GPUModelRunner, hidden_states, num_scheduled_tokens):
    """Stock for top-k prompt log-probs; for -1 requests, unsorted rows from the first
    computed position on (mirrors the stock method's chunking and bookkeeping)."""
    original = ORIGINALS["GPUModelRunner._get_prompt_logprobs_dict"]
    pending = self.num_prompt_logprobs
    if not pending:
        return {}
    fast = [r for r in pending if r in self.requests and _wants_full_prompt(self.requests[r].sampling_params)]
    if not fast:
        return original(self, hidden_states, num_scheduled_tokens)

    stock = {r: n for r, n in pending.items() if r not in set(fast)}
    out: dict[str, LogprobsTensors | None] = {}
    if stock:
        self.num_prompt_logprobs = stock
        try:
            out.update(original(self, hidden_states, num_scheduled_tokens))
        finally:
            self.num_prompt_logprobs = pending
            for r in list(pending):
                if r not in fast and r not in stock:
                    del pending[r]  # completed by the original

    completed = []
    for req_id in fast:
        num_tokens = num_scheduled_tokens.get(req_id)
        if num_tokens is None:  # preempted during prefill
            continue
        request = self.requests[req_id]
        if request.prompt_token_ids is None:  # prompt embeds: no prompt log-probs
            continue
        num_prompt_tokens = len(request.prompt_token_ids)
        start_idx = request.num_computed_tokens
        hidden = wants_hidden(request.sampling_params)
        buf = request.in_progress_prompt_logprobs_cpu
        if buf is None:
            # Rows [base, P-1): only what this request will compute (prefix-cache hits skip).
            base = min(start_idx, num_prompt_tokens - 1) if num_prompt_tokens else 0
            width = hidden_states.shape[-1] if hidden else self.input_batch.vocab_size
            # NaN, not uninitialised memory: a row that is never computed (a preempted request
            # resumed past it) is then visible as such instead of holding garbage.
            buf = LogprobsTensors(
                torch.empty(0, dtype=torch.int32),
                torch.full((max(num_prompt_tokens - 1 - base, 0), width), float("nan"), dtype=torch.float32),
                torch.empty(0, dtype=torch.int32),
            )
            request.in_progress_prompt_logprobs_cpu = buf
        num_remaining = num_prompt_tokens - (start_idx + 1)
        if num_tokens <= num_remaining:
            num_logits = num_tokens
        else:
            num_logits = num_remaining
            completed.append(req_id)
            out[req_id] = buf
        if num_logits <= 0:
            continue
        base = num_prompt_tokens - 1 - buf.logprobs.shape[0]
        skip = max(base - start_idx, 0)  # resumed below the first kept row: drop those
        if skip >= num_logits:
            continue
        req_idx = self.input_batch.req_id_to_index[req_id]
        offset = self.query_start_loc.np[req_idx].item()
        rows = hidden_states[offset + skip: offset + num_logits]
        if hidden:
            scores = rows.to(torch.float32)
        elif self.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
            scores = self.model.compute_logits(rows).to(torch.float32)
        else:
            scores = self.sampler.compute_logprobs(self.model.compute_logits(rows))
        lo = start_idx + skip - base
        buf.logprobs[lo: lo + scores.shape[0]].copy_(scores, non_blocking=True)

    for req_id in completed:
        del pending[req_id]
        self.requests[req_id].in_progress_prompt_logprobs_cpu = None
    if completed:
        self._sync_device()
    return out


# ----------------------------------------------------------------------------- install


_PATCHES = {
    "GPUModelRunner.sample_tokens": (GPUModelRunner, "sample_tokens", _patched_sample_tokens),
    "GPUModelRunner._sample": (GPUModelRunner, "_sample", _patched_sample),
    "GPUModelRunner._get_prompt_logprobs_dict": (
        GPUModelRunner, "_get_prompt_logprobs_dict", _patched_get_prompt_logprobs_dict),
    "LogprobsProcessor.from_new_request": (
        LogprobsProcessor, "from_new_request", staticmethod(_patched_from_new_request)),
}


def install() -> None:
    """Apply the patches in this process (idempotent). Call before the first request."""
    with _install_lock:
        if ORIGINALS:
            return
        for key, (owner, name, patched) in _PATCHES.items():
            _RAW_ORIGINALS[key] = owner.__dict__[name]   # staticmethod/classmethod objects as-is
            ORIGINALS[key] = getattr(owner, name)        # what the patches call
            setattr(owner, name, patched)


def uninstall() -> None:
    """Restore vLLM's originals (for tests comparing against stock behaviour)."""
    with _install_lock:
        for key, (owner, name, _patched) in _PATCHES.items():
            if key in _RAW_ORIGINALS:
                setattr(owner, name, _RAW_ORIGINALS.pop(key))
        ORIGINALS.clear()


def installed() -> bool:
    return bool(ORIGINALS)


def verify_vllm_internals() -> list[str]:
    """What this module assumes about vLLM beyond the patched signatures; returns the
    problems found (empty when everything is as in 0.32.0). Run by the version-guard test."""
    import dataclasses
    import inspect

    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import ExecuteModelState

    problems: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    for owner, name, sig in PATCH_TARGETS:
        target = _RAW_ORIGINALS.get(f"{owner.__name__}.{name}", owner.__dict__.get(name))
        if target is None:
            problems.append(f"{owner.__name__}.{name} is gone")
            continue
        func = target.__func__ if isinstance(target, (classmethod, staticmethod)) else target
        if name == "from_new_request":
            need(isinstance(target, classmethod), "LogprobsProcessor.from_new_request is no classmethod")
            got = str(inspect.signature(target.__get__(None, owner)))
        else:
            got = str(inspect.signature(func))
        need(got == sig, f"{owner.__name__}.{name} signature changed: {got}")
    forward = inspect.getsource(Sampler.forward)
    need("elif num_logprobs == -1:" in forward and "LogprobsTensors(\n                torch.empty(0), raw_logprobs, torch.empty(0)" in forward,
         "Sampler.forward lost its unsorted full-vocab branch (max_num_logprobs == -1)")
    i_raw = forward.find("raw_logprobs = self.compute_logprobs(logits)")
    i_lp = forward.find("self.apply_logits_processors(")
    need(0 <= i_raw < i_lp, "raw log-probs are no longer computed before the logits processors")
    need("logits.log_softmax(dim=-1, dtype=torch.float32)" in inspect.getsource(Sampler.compute_logprobs),
         "Sampler.compute_logprobs changed (SWITCH sampling relies on the same op)")
    tokens_src = inspect.getsource(ORIGINALS.get("GPUModelRunner.sample_tokens", GPUModelRunner.sample_tokens))
    need("sample_hidden_states," in tokens_src and "self._sample(logits, spec_decode_metadata)" in tokens_src,
         "GPUModelRunner.sample_tokens no longer unpacks sample_hidden_states before _sample")
    need("sample_hidden_states" in ExecuteModelState._fields, "ExecuteModelState.sample_hidden_states is gone")
    sample_src = inspect.getsource(ORIGINALS.get("GPUModelRunner._sample", GPUModelRunner._sample))
    need("sampling_metadata = self.input_batch.sampling_metadata" in sample_src,
         "GPUModelRunner._sample no longer reads input_batch.sampling_metadata")
    plp_src = inspect.getsource(ORIGINALS.get("GPUModelRunner._get_prompt_logprobs_dict",
                                              GPUModelRunner._get_prompt_logprobs_dict))
    for snippet in ("self.num_prompt_logprobs", "request.in_progress_prompt_logprobs_cpu",
                    "start_idx = request.num_computed_tokens", "self.query_start_loc.np[req_idx]",
                    "self.model.compute_logits(", "self.sampler.compute_logprobs(logits)",
                    "del num_prompt_logprobs_dict[req_id]", "self._sync_device()"):
        need(snippet in plp_src, f"GPUModelRunner._get_prompt_logprobs_dict no longer has {snippet!r}")
    md_fields = {f.name for f in dataclasses.fields(SamplingMetadata)}
    need({"max_num_logprobs", "logprob_token_ids"} <= md_fields, "SamplingMetadata fields changed")
    need("in_progress_prompt_logprobs_cpu" in {f.name for f in dataclasses.fields(CachedRequestState)},
         "CachedRequestState.in_progress_prompt_logprobs_cpu is gone")
    init_src = inspect.getsource(InputBatch.__init__) + inspect.getsource(InputBatch.add_request)
    need("self.num_logprobs" in init_src and "self.vocab_size" in init_src, "InputBatch.num_logprobs / vocab_size changed")
    lp_fields = {f.name for f in dataclasses.fields(LogprobsProcessor)}
    need({"tokenizer", "logprobs", "prompt_logprobs", "cumulative_logprob", "num_logprobs",
          "num_prompt_logprobs"} <= lp_fields, f"LogprobsProcessor fields changed: {sorted(lp_fields)}")
    for meth in ("_update_sample_logprobs", "_update_prompt_logprobs", "update_from_output", "pop_prompt_logprobs"):
        need(hasattr(LogprobsProcessor, meth), f"LogprobsProcessor.{meth} is gone")
    upd = inspect.getsource(LogprobsProcessor.update_from_output)
    need("self._update_sample_logprobs(output.new_logprobs)" in upd
         and "self._update_prompt_logprobs(output.new_prompt_logprobs_tensors)" in upd,
         "LogprobsProcessor.update_from_output changed")
    eco = set(getattr(EngineCoreOutput, "__struct_fields__", ()))
    need({"new_token_ids", "new_logprobs", "new_prompt_logprobs_tensors"} <= eco, "EngineCoreOutput fields changed")
    need(list(LogprobsLists._fields[:3]) == ["logprob_token_ids", "logprobs", "sampled_token_ranks"],
         "LogprobsLists fields changed")
    need(list(LogprobsTensors._fields[:3]) == ["logprob_token_ids", "logprobs", "selected_token_ranks"],
         "LogprobsTensors fields changed")
    need({f.name for f in dataclasses.fields(BatchUpdate)} == {"batch_size", "removed", "added", "moved"},
         "BatchUpdate fields changed")
    need(set(LogitsProcessor.__abstractmethods__) == {"__init__", "apply", "is_argmax_invariant", "update_state"},
         "LogitsProcessor interface changed")
    return problems
