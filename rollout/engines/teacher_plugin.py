"""What a vLLM OpenAI-compatible server loads to serve as switchkd's teacher.

* ``ServerSamplingLogitsProcessor`` (``--logits-processors``): SWITCH sampling in a stock server,
  which then answers ``/v1/completions`` with JSON log-prob rows.
* ``RowsEndpoint`` (the ``vllm.endpoint_plugins`` entry point ``switchkd_rows``, enabled with
  ``VLLM_PLUGINS=switchkd_rows``, paired with ``--logits-processors``
  ``teacher_launcher.ROWS_LOGITS_PROCESSOR``, which installs the fast log-prob path in the engine
  core):
  ``POST /v1/switchkd/rows`` answers one request with its rows as binary numpy arrays (``.npz``,
  read without pickle): full-vocabulary log-prob rows, or the teacher's final hidden states
  (``"rows": "hidden"``, d_model values per token) that the client turns into the same rows with
  the teacher's output layer. No JSON per vocabulary entry, no sort. ``GET /v1/switchkd/rows``
  describes the endpoint (vocabulary and hidden sizes, row kinds). Both paths sit under ``/v1``,
  so the server's API key guards them.
"""
from __future__ import annotations

import io
import itertools

import numpy as np

from switchkd.rollout.engines.switch_sampling import SwitchSamplingLogitsProcessor, switch_extra_args
from switchkd.rollout.engines.teacher_client import ROW_KINDS, ROWS_PATH
from switchkd.rollout.engines.teacher_launcher import ENDPOINT_PLUGIN, ROWS_LOGITS_PROCESSOR


class ServerSamplingLogitsProcessor(SwitchSamplingLogitsProcessor):
    """SWITCH sampling for a stock vLLM server: the same processor, without installing the
    fast log-prob patches. Those replace the worker's log-prob layout and need the
    matching front end in the same process; the OpenAI server's front end is stock
    (it serialises ``{token_id: Logprob}`` dicts), so the server stays stock too."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:  # noqa: D107
        self.states = {}


def encode_rows(**arrays: np.ndarray) -> bytes:
    """The endpoint's answer: an uncompressed ``.npz`` of ``arrays``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class RowsEndpoint:
    """The ``switchkd_rows`` endpoint plugin (vLLM's ``EndpointPlugin`` protocol)."""

    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def __init__(self) -> None:
        from switchkd.rollout.engines import fast_logprobs

        fast_logprobs.install()  # this front end keeps the engine core's rows as numpy arrays
        self._fastpath = fast_logprobs
        self._ids = itertools.count()

    def attach_router(self, app) -> None:
        app.add_api_route(ROWS_PATH, self.describe, methods=["GET"])
        app.add_api_route(ROWS_PATH, self.rows, methods=["POST"])

    async def init_state(self, engine_client, state, args) -> None:
        self.engine = engine_client
        # The engine core keeps numpy rows (and samples SWITCH's draws) only with this processor.
        self.ready = ROWS_LOGITS_PROCESSOR in [str(p) for p in engine_client.model_config.logits_processors or ()]

    async def describe(self) -> dict:
        config = self.engine.model_config
        return {"vocab_size": config.get_vocab_size(), "hidden_size": config.get_hidden_size(),
                "max_model_len": config.max_model_len, "rows": list(ROW_KINDS) if self.ready else [],
                "logits_processor": ROWS_LOGITS_PROCESSOR if self.ready else None}

    async def rows(self, request: dict):
        """One request: ``prompt`` (token ids), ``max_tokens``, ``rows`` (a ROW_KINDS entry),
        ``prompt_rows`` (also return the prompt's rows), ``stop_token_ids``, and ``seed``,
        ``position``, ``temperature`` for SWITCH sampling. Answer: token_ids, rows, finish_reason,
        and with ``prompt_rows`` prompt_rows and prompt_first_position (row r predicts
        prompt[prompt_first_position + r])."""
        from fastapi.responses import JSONResponse, Response

        if not self.ready:
            return JSONResponse({"error": {"message": f"the server runs without --logits-processors "
                                                      f"{ROWS_LOGITS_PROCESSOR}, which the rows endpoint needs"}},
                                status_code=400)
        final = None
        try:
            params = _sampling_params(request, self._fastpath)
            async for out in self.engine.generate({"prompt_token_ids": request["prompt"]}, params,
                                                  f"switchkd-rows-{next(self._ids)}"):
                final = out
        except (KeyError, TypeError, ValueError) as e:  # vLLM's request validation raises ValueError
            return JSONResponse({"error": {"message": f"bad request: {e!s}"}}, status_code=400)
        if final is None or not final.finished:
            return JSONResponse({"error": {"message": "the request did not finish"}}, status_code=500)
        comp = final.outputs[0]
        arrays = {"token_ids": np.asarray(comp.token_ids, np.int64), "rows": comp.logprobs.to_numpy(),
                  "finish_reason": np.array(str(comp.finish_reason))}
        if params.prompt_logprobs is not None:
            plp = final.prompt_logprobs
            arrays.update(prompt_rows=plp.to_numpy(), prompt_first_position=np.array(plp.first_position))
        return Response(encode_rows(**arrays), media_type="application/octet-stream")


def _sampling_params(request: dict, fastpath):
    from vllm import SamplingParams

    prompt = request["prompt"]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
        raise ValueError("prompt must be a non-empty list of token ids")
    kind = request.get("rows", "logprobs")
    if kind not in ROW_KINDS:
        raise ValueError(f"rows={kind!r}, expected one of {ROW_KINDS}")
    extra = switch_extra_args(request["seed"], request["position"], request["temperature"]) \
        if "seed" in request else {}
    if kind == "hidden":
        extra.update(fastpath.HIDDEN_ROWS_ARGS)
    return SamplingParams(
        max_tokens=int(request["max_tokens"]), temperature=0.0, logprobs=-1, detokenize=False, ignore_eos=True,
        stop_token_ids=[int(t) for t in request.get("stop_token_ids", [])],
        # prompt rows inside a cached prefix are never computed: a request for them skips the cache
        prompt_logprobs=-1 if request.get("prompt_rows") else None,
        skip_reading_prefix_cache=bool(request.get("prompt_rows")),
        extra_args=extra or None)
