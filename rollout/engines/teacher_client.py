"""The teacher engine behind a vLLM OpenAI-compatible server.

``ServerTeacher`` has the interface of ``VLLMEngine`` (``decode``, ``score``, ``vocab_size``,
``shutdown``) but talks HTTP to ``/v1/completions`` of a vLLM server: one request per
sequence (sent concurrently; the server batches them), token-id prompts,
``prompt_logprobs=-1`` / ``logprobs=-1`` (full vocabulary: the server must run with
``--max-logprobs -1``) and ``return_tokens_as_token_ids``. The JSON log-prob dicts become
dense float32 ``[rows, V]`` arrays. Tokens are drawn by the server exactly as in-process:
the request is greedy (``temperature=0``) and carries ``vllm_xargs`` = (seed, position,
temperature), which SWITCH's logits processor (server flag ``--logits-processors``
``teacher_launcher.LOGITS_PROCESSOR_FQCN``) turns into ``switch.sample_token`` of the raw log-probs. Every
returned token is checked against the returned rows, so a server without the processor
is refused with a clear error instead of silently sampling something else.

Robustness: per-request timeout, retries with exponential backoff on connection errors,
timeouts, HTTP 5xx and malformed answers, then one-line ``ServerError`` naming the
URL and the problem. HTTP 401/403 (API key) and other 4xx (a refused request) fail at once.

Where the server also has switchkd's rows endpoint (``teacher_plugin.RowsEndpoint``, found at
connect; a local server always has it), every call goes there instead: the rows come back as
binary float32 arrays, and with ``rows="hidden"`` as the teacher's final hidden states (d_model
values per token), which ``head`` (``output_head.OutputHead`` of the same teacher) turns into the
same full-vocabulary rows here.

``teacher_from_config`` connects to a running server or starts a local one
(``teacher_launcher``) that the client stops at ``shutdown()``.

Limits of the JSON path (a stock server: stock vLLM front end, no fast path): every full-vocab row is
sorted and serialised as JSON, and ``prompt_logprobs`` requests bypass the prefix cache and
return rows for the whole sequence, so ``score`` costs grow with the prefix length. Measured
on SmolLM2-135M (V = 49,152, 2 busy CPU cores): ~0.9 s per returned row (~4 MB of JSON each),
e.g. 34 s to score one 40-token sequence; usable for small vocabularies, not for real
teachers at rollout scale (the rows endpoint is the binary alternative). Log-probs
below -9999 come back clamped to -9999.0 (vLLM's JSON convention for -inf); they are kept
as -9999.0 (probability 0 either way).
"""
from __future__ import annotations

import io
import json
import logging
import operator
import os
import random
import subprocess
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import requests

from switchkd.rollout.engines.teacher_launcher import (
    ENDPOINT_PLUGIN,
    LOGITS_PROCESSOR_FQCN,
    ROWS_LOGITS_PROCESSOR,
    ServerError,
    start_local_server,
    stop_local_server,
)
from switchkd.rollout.engines.vllm_engine import FINISH_REASONS, DecodeResult, check_decode_args, check_score_args

log = logging.getLogger(__name__)

# SamplingParams.extra_args keys read by switch_sampling.SwitchSamplingLogitsProcessor (same
# strings as switch_sampling.SEED_KEY / POSITION_KEY / TEMPERATURE_KEY; a test checks it). Kept
# here so a client without vLLM installed can talk to a remote server.
SEED_KEY = "switch_seed"
POSITION_KEY = "switch_position"
TEMPERATURE_KEY = "switch_temperature"
TOKEN_ID_PREFIX = "token_id:"  # return_tokens_as_token_ids format (vLLM format_token_id_placeholder)
# switchkd's binary rows endpoint (teacher_plugin.RowsEndpoint) and the row kinds it sends.
ROWS_PATH = "/v1/switchkd/rows"
ROW_KINDS = ("logprobs", "hidden")
_CUT_PREFIX = operator.itemgetter(slice(len(TOKEN_ID_PREFIX), None))
_GET_LOGPROB = operator.itemgetter("logprob")


class _Malformed(Exception):
    """An answer that does not have the expected shape (retried like a server error)."""


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ----------------------------------------------------------------------------- JSON -> arrays


def _dense_rows(rows: Sequence[Any], vocab: int, keyed_by: str) -> np.ndarray:
    """Full-vocab JSON log-prob dicts -> float32 [len(rows), vocab].

    ``keyed_by="token_id"``: ``{"token_id:<id>": logprob}`` (completion ``top_logprobs``);
    ``keyed_by="int"``: ``{"<id>": {"logprob": x, ...}}`` (``prompt_logprobs``).
    Raises _Malformed unless every row covers the whole vocabulary exactly once.
    """
    out = np.empty((len(rows), vocab), np.float32)
    for r, d in enumerate(rows):
        if not isinstance(d, dict):
            raise _Malformed(f"log-prob row {r} is {type(d).__name__}, not an object")
        if len(d) != vocab:
            raise _Malformed(
                f"log-prob row {r} has {len(d)} entries, expected the full vocabulary ({vocab}); "
                f"is the server started with --max-logprobs -1?")
        try:
            if keyed_by == "token_id":
                ids = np.fromiter(map(int, map(_CUT_PREFIX, d)), np.int64, vocab)
                vals = np.fromiter(d.values(), np.float64, vocab)
            else:
                ids = np.fromiter(map(int, d), np.int64, vocab)
                vals = np.fromiter(map(_GET_LOGPROB, d.values()), np.float64, vocab)
        except (TypeError, ValueError, KeyError) as e:
            raise _Malformed(f"log-prob row {r}: {_one_line(e, 120)}") from None
        if ids.min() < 0 or ids.max() >= vocab:
            raise _Malformed(f"log-prob row {r}: token id out of range [0, {vocab})")
        mark = np.zeros(vocab, np.bool_)
        mark[ids] = True
        if not mark.all():
            raise _Malformed(f"log-prob row {r}: duplicate token ids (not a full-vocabulary row)")
        out[r, ids] = vals
    if not np.isfinite(out).all():  # -inf arrives as -9999.0; NaN / inf are not log-probs
        raise _Malformed("log-prob rows contain non-finite values")
    return out


def _token_ids(tokens: Any) -> np.ndarray:
    if not isinstance(tokens, list):
        raise _Malformed("logprobs.tokens missing")
    try:
        if any(not t.startswith(TOKEN_ID_PREFIX) for t in tokens):
            raise ValueError
        return np.fromiter(map(int, map(_CUT_PREFIX, tokens)), np.int64, len(tokens))
    except (AttributeError, ValueError):
        raise _Malformed("logprobs.tokens are not 'token_id:<id>' strings "
                         "(the server ignored return_tokens_as_token_ids)") from None


def _choice(data: Any) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or len(data["choices"]) != 1:
        raise _Malformed("answer has no single 'choices' entry")
    choice = data["choices"][0]
    if not isinstance(choice, dict):
        raise _Malformed("choices[0] is not an object")
    return choice


def _logprobs(choice: dict) -> dict:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("top_logprobs"), list):
        raise _Malformed("choices[0].logprobs.top_logprobs missing")
    return lp


def decode_rows(data: bytes) -> dict[str, np.ndarray]:
    """An answer of the rows endpoint (an ``.npz``) as {name: array}; read with
    ``allow_pickle=False``, so an object array is refused, never unpickled."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise _Malformed(f"not a rows answer ({type(e).__name__}: {_one_line(e, 120)})") from None


def _binary_rows(arrays: dict, name: str, count: int, width: int) -> np.ndarray:
    rows = arrays.get(name)
    if rows is None or rows.dtype != np.float32 or rows.shape != (count, width):
        got = "none" if rows is None else f"{rows.dtype} {rows.shape}"
        raise _Malformed(f"{name}: {got}, expected float32 ({count}, {width})")
    if not np.isfinite(rows).all():
        raise _Malformed(f"{name} contain non-finite values")
    return rows


# ----------------------------------------------------------------------------- client


class ServerTeacher:
    """A teacher engine served by vLLM's OpenAI-compatible server (same interface as VLLMEngine).

    ``url``: the server root (``http://host:port``, with or without ``/v1``). ``timeout_s``:
    per-request read timeout (connect timeout is ``min(timeout_s, 10)``); ``max_retries``:
    further attempts after a failed one, ``backoff_s * 2**i`` apart (at most ``backoff_max_s``).
    ``process``: a server started by :func:`start_local_server`, stopped by ``shutdown()``.
    ``rows``: what the server sends per token, "logprobs" or "hidden" (needs the rows endpoint
    and ``head``, the teacher's ``OutputHead``), or "auto": hidden where both are there, else
    log-probs (``self.rows`` holds the choice); ``binary``: use the rows endpoint (None: where
    the server has it). ``bytes_received`` counts the answers' bytes.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_concurrency: int = 16,
        model: str | None = None,
        vocab_size: int | None = None,
        process: subprocess.Popen | None = None,
        rows: str = "logprobs",
        head: Callable[[np.ndarray], np.ndarray] | None = None,
        binary: bool | None = None,
    ) -> None:
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_concurrency < 1:
            raise ValueError("timeout_s > 0, max_retries >= 0, backoff_s >= 0 and max_concurrency >= 1 required")
        if rows not in (*ROW_KINDS, "auto") or (rows == "hidden" and (head is None or binary is False)):
            raise ValueError(f"rows={rows!r}: one of {ROW_KINDS} or 'auto'; 'hidden' needs head (and the rows endpoint)")
        base = url.rstrip("/")
        self.url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.api_key = api_key
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_s, self.backoff_max_s = float(backoff_s), float(backoff_max_s)
        self.process = process
        self.rows, self.head = rows, head
        self.bytes_received = 0
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._max_concurrency = int(max_concurrency)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="teacher-http")
        self._caller = ThreadPoolExecutor(1, thread_name_prefix="teacher-call")
        self._closed = False
        try:
            card = self._model_card(model)
            self.model: str = card["id"]
            self.max_model_len: int | None = card.get("max_model_len")
            self.endpoint = None if binary is False else self._rows_endpoint(required=bool(binary) or rows == "hidden")
            if rows == "auto":
                offers_hidden = self.endpoint is not None and "hidden" in self.endpoint.get("rows", ())
                self.rows = "hidden" if offers_hidden and head is not None else "logprobs"
            if self.endpoint is not None:
                self._vocab_size = int(self.endpoint["vocab_size"])
                self._check_head()
            else:
                self._vocab_size = int(vocab_size) if vocab_size else self._probe_vocab_size()
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ HTTP

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=self._max_concurrency)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            if self.api_key:
                s.headers["Authorization"] = f"Bearer {self.api_key}"
            s.trust_env = not _is_loopback(self.url)  # no HTTP(S)_PROXY detour for 127.0.0.1
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _fail(self, path: str, problem: str) -> ServerError:
        return ServerError(f"teacher server {self.url}{path}: {_one_line(problem)}")

    def _request(self, method: str, path: str, payload: dict | None, parse: Callable[[Any], Any], *,
                 binary: bool = False, missing_ok: bool = False):
        """One call with retries; ``parse(answer)`` validates the answer (raising _Malformed): its
        JSON, or with ``binary`` the rows endpoint's arrays. ``missing_ok``: None for an HTTP
        404/405 (a server without that path)."""
        attempts = self.max_retries + 1
        problem, tried = "", 0
        for attempt in range(attempts):
            tried = attempt + 1
            if attempt:
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * (1.0 + 0.25 * random.random()))
            if self._closed:
                raise self._fail(path, "client is shut down")
            try:
                resp = self._session().request(
                    method, self.url + path, json=payload, timeout=(min(self.timeout_s, 10.0), self.timeout_s))
            except requests.Timeout:
                problem = f"no answer within the {self.timeout_s:g} s timeout"
                continue
            except requests.ConnectionError as e:
                problem = f"cannot connect ({_short_connection_error(e)})"
                continue
            except requests.RequestException as e:
                problem = f"request failed ({type(e).__name__}: {_one_line(e, 160)})"
                continue
            code = resp.status_code
            if code in (401, 403):
                raise self._fail(path, f"HTTP {code} {_error_text(resp)}: the API key was refused "
                                       "(check rollout.teacher.server.api_key)")
            if code >= 500:
                problem = f"HTTP {code} {_error_text(resp)}"
                continue
            if missing_ok and code in (404, 405):
                return None
            if code >= 400:
                raise self._fail(path, f"HTTP {code}: request refused: {_error_text(resp)}")
            with self._lock:
                self.bytes_received += len(resp.content)
            try:
                data = decode_rows(resp.content) if binary else json.loads(resp.content)
            except _Malformed as e:
                problem = f"malformed answer: {e}"
                continue
            except ValueError as e:
                problem = f"malformed JSON in the answer ({e}; starts {resp.content[:60]!r})"
                continue
            try:
                return parse(data)
            except _Malformed as e:
                problem = f"malformed answer: {e}"
                if "max-logprobs" in str(e):
                    break  # a configuration problem: retrying cannot help
                continue
        raise self._fail(path, f"{problem} (gave up after {tried} attempt{'s' if tried > 1 else ''})")

    def _model_card(self, model: str | None) -> dict:
        def parse(data):
            cards = data.get("data") if isinstance(data, dict) else None
            if not isinstance(cards, list) or not cards or not all(isinstance(c, dict) and "id" in c for c in cards):
                raise _Malformed("/v1/models lists no model")
            return cards

        cards = self._request("GET", "/v1/models", None, parse)
        if model is None:
            return cards[0]
        for c in cards:
            if c["id"] == model:
                return c
        raise self._fail("/v1/models", f"serves {[c['id'] for c in cards]}, not {model!r}")

    def _rows_endpoint(self, required: bool) -> dict | None:
        """The rows endpoint's description, or None where the server has none (an error if ``required``)."""
        def parse(data):
            if not isinstance(data, dict) or not all(isinstance(data.get(k), int) for k in ("vocab_size", "hidden_size")):
                raise _Malformed(f"{ROWS_PATH} describes no vocab_size / hidden_size")
            return data

        info = self._request("GET", ROWS_PATH, None, parse, missing_ok=True)
        start = (f"start the server with VLLM_PLUGINS={ENDPOINT_PLUGIN} and --logits-processors "
                 f"{ROWS_LOGITS_PROCESSOR} (docs/rollout.md), as url=local does")
        if info is None and required:
            raise self._fail(ROWS_PATH, f"not found: rows={self.rows!r} needs switchkd's rows endpoint; {start}")
        if info is not None and self.rows != "auto" and self.rows not in info.get("rows", ()):
            raise self._fail(ROWS_PATH, f"the endpoint sends no {self.rows!r} rows; {start}")
        return info

    def _check_head(self) -> None:
        info, head = self.endpoint, self.head
        if self.rows == "hidden" and (head.vocab_size, head.hidden_size) != (info["vocab_size"], info["hidden_size"]):
            raise self._fail(ROWS_PATH, f"the server's model has vocabulary {info['vocab_size']} and hidden size "
                                        f"{info['hidden_size']}, the local output layer {head.vocab_size} and "
                                        f"{head.hidden_size}: model.teacher must be the served model")

    def _rows_request(self, payload: dict, parse: Callable[[dict], Any]):
        return self._request("POST", ROWS_PATH, {**payload, "rows": self.rows}, parse, binary=True)

    def _full_rows(self, arrays: dict, name: str, count: int, skip: int = 0) -> np.ndarray:
        """The answer's ``count`` rows ``name`` from ``skip`` on, as float32 [count - skip, V]
        log-probs (hidden rows through ``head``)."""
        if self.rows == "hidden":
            return self.head(_binary_rows(arrays, name, count, self.endpoint["hidden_size"])[skip:])
        return _binary_rows(arrays, name, count, self._vocab_size)[skip:]

    def _probe_vocab_size(self) -> int:
        payload = {"model": self.model, "prompt": [0], "max_tokens": 1, "temperature": 0.0, "logprobs": -1,
                   "return_tokens_as_token_ids": True, "ignore_eos": True}

        def parse(data):
            top = _logprobs(_choice(data))["top_logprobs"]
            if len(top) != 1 or not isinstance(top[0], dict) or not top[0]:
                raise _Malformed("probe answer has no log-prob row")
            return len(top[0])

        return self._request("POST", "/v1/completions", payload, parse)

    # ------------------------------------------------------------------ interface

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def shutdown(self) -> None:
        """Close the HTTP client and stop the server if this object started it; idempotent."""
        self._closed = True
        for pool in (getattr(self, "_caller", None), getattr(self, "_pool", None)):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()
        if self.process is not None:
            stop_local_server(self.process)
            self.process = None

    def decode_async(self, *args, **kwargs) -> Future:
        """``decode`` on a background thread (a Future: ``.result()``)."""
        return self._caller.submit(self.decode, *args, **kwargs)

    def score_async(self, *args, **kwargs) -> Future:
        """``score`` on a background thread (a Future: ``.result()``)."""
        return self._caller.submit(self.score, *args, **kwargs)

    def _map(self, fn, items: list) -> list:
        if len(items) == 1:
            return [fn(items[0])]
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

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
        """Continue every prompt; token t of prompt i (t counted from ``positions[i]``) is
        ``switch.sample_token(logprobs_row, temperature, seeds[i], t)`` (checked here)."""
        n = len(prompts)
        check_decode_args(prompts, max_tokens, temperature, seeds, positions, self._vocab_size, self.max_model_len)
        stops = sorted({int(t) for t in stop_token_ids})
        V = self._vocab_size

        def one(i: int) -> DecodeResult:
            m = int(max_tokens[i])
            if m == 0:
                return DecodeResult(np.zeros(0, np.int64), np.zeros((0, V), np.float32), "length")
            if self.endpoint is not None:
                result = self._decode_rows(prompts[i], m, stops, int(seeds[i]), int(positions[i]), float(temperature))
                # Hidden rows rebuilt here are not bit-identical to the engine's in bf16, so draws are
                # checked on log-prob rows only; the endpoint itself refuses to run without the sampler.
                if self.rows == "logprobs":
                    self._check_draws(result, temperature, int(seeds[i]), int(positions[i]))
                return result
            payload = {
                "model": self.model, "prompt": [int(t) for t in prompts[i]], "max_tokens": m,
                "temperature": 0.0, "logprobs": -1, "return_tokens_as_token_ids": True,
                "ignore_eos": True, "stop_token_ids": stops, "skip_special_tokens": False,
                "vllm_xargs": {SEED_KEY: int(seeds[i]), POSITION_KEY: int(positions[i]),
                               TEMPERATURE_KEY: float(temperature)},
            }

            def parse(data) -> DecodeResult:
                choice = _choice(data)
                lp = _logprobs(choice)
                tokens = _token_ids(lp.get("tokens"))
                if not 1 <= len(tokens) <= m or len(lp["top_logprobs"]) != len(tokens):
                    raise _Malformed(f"{len(tokens)} tokens / {len(lp['top_logprobs'])} log-prob rows "
                                     f"for max_tokens={m}")
                reason = choice.get("finish_reason")
                if reason not in FINISH_REASONS:
                    raise _Malformed(f"finish_reason {reason!r}")
                return DecodeResult(tokens, _dense_rows(lp["top_logprobs"], V, "token_id"), reason)

            result = self._request("POST", "/v1/completions", payload, parse)
            self._check_draws(result, temperature, int(seeds[i]), int(positions[i]))
            return result

        return self._map(one, list(range(n)))

    def _decode_rows(self, prompt, m: int, stops: list[int], seed: int, position: int, temperature: float):
        payload = {"prompt": [int(t) for t in prompt], "max_tokens": m, "stop_token_ids": stops,
                   "seed": seed, "position": position, "temperature": temperature}

        def parse(arrays) -> DecodeResult:
            tokens = arrays.get("token_ids")
            if tokens is None or tokens.dtype != np.int64 or tokens.ndim != 1 or not 1 <= len(tokens) <= m:
                raise _Malformed(f"token_ids: {None if tokens is None else (tokens.dtype, tokens.shape)} "
                                 f"for max_tokens={m}")
            reason = str(arrays.get("finish_reason", ""))
            if reason not in FINISH_REASONS:
                raise _Malformed(f"finish_reason {reason!r}")
            return DecodeResult(tokens, self._full_rows(arrays, "rows", len(tokens)), reason)

        return self._rows_request(payload, parse)

    def _check_draws(self, result: DecodeResult, temperature: float, seed: int, position: int) -> None:
        """Every token must be switch.sample_token of its row: the server's logits processor is there."""
        from switchkd.rollout import switch

        tokens, rows = result.token_ids, result.logprobs
        if temperature == 0:  # greedy: the token's log-prob is the row maximum (ties allowed)
            bad = np.flatnonzero(rows[np.arange(len(tokens)), tokens] < rows.max(axis=1))[:1].tolist()
        else:
            bad = [j for j in range(len(tokens))
                   if switch.sample_token(rows[j], temperature, seed, position + j) != int(tokens[j])][:1]
        if bad:
            j = bad[0]
            raise self._fail("/v1/completions", (
                f"token {int(tokens[j])} at response position {position + j} is not SWITCH's draw from the "
                f"returned distribution (T={temperature:g}, seed={seed}): start the server with "
                f"--logits-processors {LOGITS_PROCESSOR_FQCN} (start_local_server does)"))

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[np.ndarray]:
        """For sequence s (length L) and start a (1 <= a <= L): float32 [L - a + 1, V] whose
        row r is the next-token distribution after s[:a + r] (the last row: after all of s)."""
        check_score_args(sequences, starts, self._vocab_size, self.max_model_len)
        V = self._vocab_size

        def one(i: int) -> np.ndarray:
            s, a = [int(t) for t in sequences[i]], int(starts[i])
            if self.endpoint is not None:
                return self._score_rows(s, a)
            payload = {
                "model": self.model, "prompt": s, "max_tokens": 1, "temperature": 0.0,
                "logprobs": -1, "prompt_logprobs": -1, "return_tokens_as_token_ids": True,
                "ignore_eos": True, "skip_special_tokens": False,
            }

            def parse(data) -> np.ndarray:
                choice = _choice(data)
                plp = choice.get("prompt_logprobs")
                if not isinstance(plp, list) or len(plp) != len(s):
                    raise _Malformed(f"prompt_logprobs has {len(plp) if isinstance(plp, list) else 'no'} "
                                     f"entries for a {len(s)}-token prompt")
                top = _logprobs(choice)["top_logprobs"]
                if len(top) != 1:
                    raise _Malformed(f"{len(top)} completion log-prob rows, expected 1")
                return _json_score_rows(plp[a:], top[0], V)

            return self._request("POST", "/v1/completions", payload, parse)

        return self._map(one, list(range(len(sequences))))

    def _score_rows(self, s: list[int], a: int) -> np.ndarray:
        """score() of one sequence through the rows endpoint: prompt rows a .. L-1 and the row after s."""
        def parse(arrays) -> np.ndarray:
            first = int(arrays.get("prompt_first_position", -1))
            if first < 1 or (a < len(s) and first > a):
                raise _Malformed(f"prompt rows start at position {first}, the score needs position {a}")
            last = self._full_rows(arrays, "rows", 1)
            if a == len(s):
                return last
            return np.concatenate([self._full_rows(arrays, "prompt_rows", len(s) - first, skip=a - first), last])

        payload = {"prompt": s, "max_tokens": 1, "prompt_rows": True}
        return self._rows_request(payload, parse)


def _json_score_rows(prompt_rows: list, last_row: Any, vocab: int) -> np.ndarray:
    out = np.empty((len(prompt_rows) + 1, vocab), np.float32)
    out[:-1] = _dense_rows(prompt_rows, vocab, "int")
    out[-1] = _dense_rows([last_row], vocab, "token_id")[0]
    return out


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _error_text(resp: requests.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return _one_line(resp.text, 160) or resp.reason or ""
    if isinstance(data, dict):
        err = data.get("error", data.get("message", data))
        if isinstance(err, dict):
            err = err.get("message", err)
        return _one_line(err, 200)
    return _one_line(data, 160)


def _short_connection_error(e: Exception) -> str:
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "No route to host",
                   "Connection reset", "Remote end closed connection", "Temporary failure in name resolution"):
        if marker in text:
            return marker.lower()
    return _one_line(text, 160)


API_KEY_ENV = "SWITCHKD_TEACHER_API_KEY"
LOCAL_URL = "local"


def teacher_from_config(path: str, model, engine, rows: str = "auto") -> ServerTeacher:
    """The teacher engine for ``rollout.teacher.server`` (``engine``: the teacher's EngineConfig;
    ``rows``: rollout.teacher_rows; hidden rows are rebuilt with the output layer read from ``path``,
    and "auto" takes them where ``path`` has one and the server offers them).

    ``server.url=local``: switchkd starts its own server for ``path`` on 127.0.0.1 (with
    ``server.api_key`` or a generated key) and stops it at ``shutdown()``. Any other URL: a
    running server. The key may also come from $SWITCHKD_TEACHER_API_KEY (keeps it off the
    command line)."""
    srv = engine.server
    api_key = srv.api_key or os.environ.get(API_KEY_ENV) or None
    head = None
    if rows != "logprobs":
        from switchkd.rollout.engines.output_head import OutputHead, OutputHeadError

        try:
            head = OutputHead(path)
        except (OutputHeadError, OSError, ValueError) as e:  # no local copy of the served model's output layer
            if rows == "hidden":
                raise
            log.info("rollout.teacher_rows=auto: log-prob rows from the teacher server (%s)", e)
    if srv.url == LOCAL_URL:
        extra = ["--max-model-len", str(engine.max_model_len), "--block-size", str(engine.block_size),
                 "--seed", "0"]
        if model.trust_remote_code:
            extra.append("--trust-remote-code")
        if engine.device == "cuda":
            extra += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization),
                      "--tensor-parallel-size", str(engine.tensor_parallel_size)]
        return launch_teacher(
            path, dtype=model.dtype, timeout_s=srv.timeout_s, max_retries=srv.max_retries, api_key=api_key,
            extra_args=extra, kv_cache_space_gb=engine.kv_cache_space_gb,
            threads=None if engine.threads == "auto" else engine.threads, enforce_eager=engine.enforce_eager,
            rows=rows, head=head)
    return ServerTeacher(srv.url, api_key, timeout_s=srv.timeout_s, max_retries=srv.max_retries, rows=rows, head=head)


def launch_teacher(model_dir: str, *, dtype: str = "float32", timeout_s: float = 60.0, max_retries: int = 5,
                   rows: str = "auto", head=None, **server_kwargs) -> ServerTeacher:
    """Start a local server for ``model_dir`` and return a ServerTeacher that owns it."""
    url, key, proc = start_local_server(model_dir, dtype=dtype, **server_kwargs)
    try:
        return ServerTeacher(url, key, timeout_s=timeout_s, max_retries=max_retries, process=proc, rows=rows, head=head)
    except BaseException:
        stop_local_server(proc)
        raise
