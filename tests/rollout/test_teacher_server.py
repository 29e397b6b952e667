"""ServerTeacher against a real vLLM OpenAI server (tiny teacher) and against fake HTTP servers.

One real server for the module (~30 s to start on the CPU); the failure modes (5xx, malformed
JSON, timeouts, refused connections, a server without SWITCH's logits processor) use a small
http.server on 127.0.0.1 with tiny timeouts and backoff, so they take well under a second each.
"""
from __future__ import annotations

import io
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from switchkd.rollout import switch
from switchkd.rollout.models.checks import ModelError
from switchkd.rollout.engines.output_head import OutputHead
from switchkd.rollout.engines.teacher_client import (
    POSITION_KEY,
    ROWS_PATH,
    SEED_KEY,
    TEMPERATURE_KEY,
    ServerTeacher,
)
from switchkd.rollout.engines.teacher_launcher import (
    ServerError,
    start_local_server,
    stop_local_server,
    wait_for_server,
)
from switchkd.rollout.local_ray import free_port

PROMPTS = [[1, 40, 41, 42, 43], [1, 100, 7, 300, 12, 9, 77, 5, 250]]


@pytest.fixture(scope="module", autouse=True)
def server_process(tiny_models):
    """Started (not awaited) before the module's first test, so the fake-server tests run
    while it boots; stopped after the last one."""
    url, key, proc = start_local_server(tiny_models["teacher"], dtype="float32", wait=False)
    try:
        yield url, key, proc
    finally:
        stop_local_server(proc)
        assert proc.poll() is not None


@pytest.fixture(scope="module")
def server(server_process):
    url, key, proc = server_process
    wait_for_server(proc, timeout_s=400)
    teacher = ServerTeacher(url, key, timeout_s=60, max_retries=2, backoff_s=0.2)
    yield teacher, url, key, proc
    teacher.shutdown()


def test_local_server_rejects_bad_model_dir(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        start_local_server(tmp_path / "missing")


def test_local_server_dying_at_start_shows_log_tail(tiny_models, monkeypatch, tmp_path):
    from switchkd.rollout.engines import teacher_launcher

    crash = [sys.executable, "-c", "import sys; print('loading...'); print('RuntimeError: no luck'); sys.exit(3)"]
    monkeypatch.setattr(teacher_launcher, "server_command", lambda *a, **k: crash)
    with pytest.raises(ServerError, match="exited with code 3") as e:
        start_local_server(tiny_models["teacher"], startup_timeout_s=30, log_path=tmp_path / "server.log")
    assert "RuntimeError: no luck" in str(e.value)


# ----------------------------------------------------------------------------- fake servers

V = 4
LOGPROBS = np.log(np.array([0.1, 0.2, 0.3, 0.4])).tolist()


def good_answer(req: dict) -> dict:
    """A well-formed /v1/completions answer over a fixed 4-token distribution (greedy: token 3)."""
    xargs = req.get("vllm_xargs") or {}
    T = xargs.get(TEMPERATURE_KEY, 0.0)
    tokens = []
    for j in range(req["max_tokens"]):
        tokens.append(switch.sample_token(torch.tensor(LOGPROBS), T, xargs.get(SEED_KEY, 0),
                                          xargs.get(POSITION_KEY, 0) + j) if T else 3)
    top = [{f"token_id:{i}": LOGPROBS[i] for i in (3, 0, 2, 1)} for _ in tokens]
    choice = {"index": 0, "text": "", "finish_reason": "length",
              "logprobs": {"tokens": [f"token_id:{t}" for t in tokens], "top_logprobs": top}}
    if req.get("prompt_logprobs") is not None:
        row = {str(i): {"logprob": LOGPROBS[i], "rank": 4 - i, "decoded_token": None} for i in range(V)}
        choice["prompt_logprobs"] = [None] + [row] * (len(req["prompt"]) - 1)
    return {"id": "x", "object": "text_completion", "choices": [choice]}


def good_rows_answer(req: dict, mode: str) -> bytes:
    """The rows endpoint's answer (an .npz) over the same distribution; ``mode`` "garbage" sends
    bytes that are no .npz, "pickle" an .npz whose rows are a pickled object array."""
    if mode == "garbage":
        return b"PK\x03\x04 not really a zip"
    xargs = {SEED_KEY: req["seed"], POSITION_KEY: req["position"], TEMPERATURE_KEY: req["temperature"]} \
        if "seed" in req else None
    answer = good_answer({"max_tokens": req["max_tokens"], "vllm_xargs": xargs})
    tokens = [int(t.split(":")[1]) for t in answer["choices"][0]["logprobs"]["tokens"]]
    rows = np.tile(np.float32(LOGPROBS), (len(tokens), 1))
    arrays = {"token_ids": np.array(tokens, np.int64), "rows": rows, "finish_reason": np.array("length")}
    if mode == "pickle":
        arrays["rows"] = np.array([{"not": "rows"}], dtype=object)
    if req.get("prompt_rows"):
        arrays.update(prompt_rows=np.tile(np.float32(LOGPROBS), (len(req["prompt"]) - 1, 1)),
                      prompt_first_position=np.array(1))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class FakeServer:
    """Serves /v1/models and /v1/completions; ``modes`` (consumed per completion request,
    then ``default``): "good", "500", "garbage", "slow", "short" (rows missing entries),
    "greedy" (ignores vllm_xargs, as a server without the logits processor would).
    ``rows_endpoint``: also serves switchkd's rows endpoint (modes "good", "garbage", "pickle"; "unready":
    one whose server runs without the processor it needs); without it that path is a 404, as on a
    stock vLLM server."""

    def __init__(self, modes=(), default="good", delay=1.0, rows_endpoint=False):
        self.modes, self.default, self.delay = list(modes), default, delay
        self.hits = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if self.path == ROWS_PATH:
                    if not rows_endpoint:
                        return self._send(404, b'{"detail": "Not Found"}')
                    kinds = [] if rows_endpoint == "unready" else ["logprobs", "hidden"]
                    info = {"vocab_size": V, "hidden_size": 2, "max_model_len": 64, "rows": kinds}
                    return self._send(200, json.dumps(info).encode())
                self._send(200, json.dumps({"data": [{"id": "fake", "max_model_len": 64}]}).encode())

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == ROWS_PATH:
                    fake.hits += 1
                    mode = fake.modes.pop(0) if fake.modes else fake.default
                    return self._send(200, good_rows_answer(req, mode))
                if req.get("prompt") == [0]:  # vocab probe
                    return self._send(200, json.dumps(good_answer(req)).encode())
                fake.hits += 1
                mode = fake.modes.pop(0) if fake.modes else fake.default
                if mode == "500":
                    return self._send(500, b'{"error": {"message": "engine crashed"}}')
                if mode == "garbage":
                    return self._send(200, b'{"choices": [{"logprobs": ')
                if mode == "slow":
                    time.sleep(fake.delay)
                answer = good_answer(req)
                if mode == "short":
                    for row in answer["choices"][0]["logprobs"]["top_logprobs"]:
                        row.pop("token_id:1")
                if mode == "greedy":
                    answer = good_answer({**req, "vllm_xargs": None})
                self._send(200, json.dumps(answer).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def client(url: str, **kw) -> ServerTeacher:
    return ServerTeacher(url, "k", **{"timeout_s": 2.0, "max_retries": 3, "backoff_s": 0.01, **kw})


def test_fake_server_good_answers_decode_and_score():
    with FakeServer() as fake:
        t = client(fake.url)
        assert t.vocab_size == V and t.model == "fake" and t.max_model_len == 64
        rows = t.score([[1, 2, 3]], [1])[0]
        np.testing.assert_allclose(rows, np.tile(np.float32(LOGPROBS), (3, 1)))
        res = t.decode([[1, 2]], [3], temperature=0.7, seeds=[5], positions=[2], stop_token_ids=[])[0]
        assert len(res.token_ids) == 3 and res.logprobs.shape == (3, V)
        t.shutdown()


def test_fake_rows_endpoint_is_used_where_the_server_has_it():
    with FakeServer(rows_endpoint=True) as fake:
        t = client(fake.url)
        assert t.endpoint["vocab_size"] == V and t.vocab_size == V
        rows = t.score([[1, 2, 3]], [1])[0]
        np.testing.assert_allclose(rows, np.tile(np.float32(LOGPROBS), (3, 1)))
        res = t.decode([[1, 2]], [3], temperature=0.7, seeds=[5], positions=[2], stop_token_ids=[])[0]
        assert len(res.token_ids) == 3 and res.logprobs.shape == (3, V) and fake.hits == 2
        t.shutdown()


@pytest.mark.parametrize("mode", ["garbage", "pickle"])
def test_a_malformed_rows_answer_is_refused_never_unpickled(mode):
    with FakeServer(rows_endpoint=True, default=mode) as fake:
        t = client(fake.url)
        with pytest.raises(ServerError, match="malformed answer") as e:
            t.score([[1, 2, 3]], [1])
        assert fake.url + ROWS_PATH in str(e.value) and "gave up after 4 attempts" in str(e.value)
        t.shutdown()


def test_hidden_rows_need_the_rows_endpoint(tiny_models):
    with FakeServer() as fake:
        with pytest.raises(ServerError, match="VLLM_PLUGINS=switchkd_rows") as e:
            client(fake.url, rows="hidden", head=OutputHead(tiny_models["teacher"]))
        assert fake.url in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="head"):
        ServerTeacher("http://127.0.0.1:1", rows="hidden")


def test_an_endpoint_without_its_logits_processor_is_refused_at_connect():
    with FakeServer(rows_endpoint="unready") as fake:
        with pytest.raises(ServerError, match="--logits-processors switchkd.rollout.engines.switch_sampling"):
            client(fake.url)


def test_the_endpoint_refuses_requests_without_its_logits_processor():
    """The server side: without ROWS_LOGITS_PROCESSOR the engine core has neither SWITCH's sampler
    nor the numpy rows, so the endpoint describes no row kinds and answers 400 with the reason."""
    import asyncio

    from switchkd.rollout.engines.teacher_launcher import ROWS_LOGITS_PROCESSOR
    from switchkd.rollout.engines.teacher_plugin import RowsEndpoint

    def engine(processors):
        config = SimpleNamespace(logits_processors=processors, max_model_len=64, get_vocab_size=lambda: 8,
                                 get_hidden_size=lambda: 4)
        return SimpleNamespace(model_config=config)

    plugin = RowsEndpoint()
    for processors, kinds in (([], []), ([ROWS_LOGITS_PROCESSOR], ["logprobs", "hidden"])):
        asyncio.run(plugin.init_state(engine(processors), None, None))
        assert asyncio.run(plugin.describe())["rows"] == kinds
    asyncio.run(plugin.init_state(engine(None), None, None))
    answer = asyncio.run(plugin.rows({"prompt": [1, 2], "max_tokens": 1}))
    assert answer.status_code == 400 and ROWS_LOGITS_PROCESSOR in answer.body.decode()


def test_hidden_rows_from_another_model_are_refused(tiny_models):
    # The fake server's model has hidden size 2; the tiny teacher's output layer takes another.
    with FakeServer(rows_endpoint=True) as fake:
        with pytest.raises(ServerError, match="model.teacher must be the served model"):
            client(fake.url, rows="hidden", head=OutputHead(tiny_models["teacher"]))


def test_http_500_is_retried():
    with FakeServer(modes=["500", "500"]) as fake:
        t = client(fake.url)
        rows = t.score([[1, 2, 3]], [2])[0]
        assert rows.shape == (2, V) and fake.hits == 3
        t.shutdown()


def test_malformed_json_forever_fails_clearly():
    with FakeServer(default="garbage") as fake:
        t = client(fake.url)
        with pytest.raises(ServerError, match="malformed JSON") as e:
            t.score([[1, 2, 3]], [2])
        assert fake.url in str(e.value) and "gave up after 4 attempts" in str(e.value)
        assert fake.hits == 4 and "\n" not in str(e.value)
        t.shutdown()


def test_partial_vocabulary_rows_name_max_logprobs():
    with FakeServer(default="short") as fake:
        t = client(fake.url)
        with pytest.raises(ServerError, match="--max-logprobs -1"):
            t.decode([[1, 2]], [2], temperature=0.0, seeds=[0], positions=[0], stop_token_ids=[])
        t.shutdown()


def test_server_without_logits_processor_is_refused():
    with FakeServer(default="greedy") as fake:
        t = client(fake.url)
        # Pick a (seed, position) whose SWITCH draw is not the argmax, so greedy is visibly wrong.
        seed = next(s for s in range(100) if switch.sample_token(torch.tensor(LOGPROBS), 1.0, s, 0) != 3)
        with pytest.raises(ServerError, match="--logits-processors"):
            t.decode([[1, 2]], [1], temperature=1.0, seeds=[seed], positions=[0], stop_token_ids=[])
        t.shutdown()


def test_slow_answers_time_out():
    with FakeServer(default="slow", delay=1.5) as fake:
        t = client(fake.url, timeout_s=2.0)  # the probe and the model card are fast
        t.timeout_s, t.max_retries = 0.3, 1
        with pytest.raises(ServerError, match="no answer within the 0.3 s timeout") as e:
            t.score([[1, 2, 3]], [2])
        assert fake.url in str(e.value) and "gave up after 2 attempts" in str(e.value) and fake.hits == 2
        t.shutdown()


def test_server_killed_mid_run_fails_clearly_after_retries():
    fake = FakeServer().__enter__()
    t = client(fake.url, max_retries=2, backoff_s=0.01)
    assert t.score([[1, 2, 3]], [1])[0].shape == (3, V)
    fake.__exit__(None, None, None)  # the server dies between two calls of a rollout
    with pytest.raises(ServerError, match="cannot connect") as e:
        t.score([[1, 2, 3]], [1])
    assert fake.url in str(e.value) and "gave up after 3 attempts" in str(e.value) and "\n" not in str(e.value)
    t.shutdown()


def test_unreachable_server_fails_after_retries_with_growing_backoff(monkeypatch):
    slept = _record_sleeps(monkeypatch)
    url = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on
    with pytest.raises(ServerError, match="cannot connect") as e:
        client(url, max_retries=2, backoff_s=0.05)
    assert url in str(e.value) and "gave up after 3 attempts" in str(e.value)
    assert len(slept) == 2 and 0.05 <= slept[0] <= 0.0625 and 0.1 <= slept[1] <= 0.125, slept  # 25% jitter


def _record_sleeps(monkeypatch) -> list[float]:
    """The client's waits between attempts, recorded instead of slept."""
    from switchkd.rollout.engines import teacher_client

    slept: list[float] = []
    monkeypatch.setattr(teacher_client, "time", SimpleNamespace(sleep=slept.append))
    return slept


def test_teacher_from_config(monkeypatch):
    from switchkd.rollout.config import EngineConfig, ModelConfig, ServerConfig
    from switchkd.rollout.engines import teacher_client

    with FakeServer() as fake:
        engine = EngineConfig(server=ServerConfig(url=fake.url + "/v1", api_key="k", timeout_s=2.0, max_retries=1))
        t = teacher_client.teacher_from_config("unused", ModelConfig(), engine)
        assert t.url == fake.url and t.max_retries == 1 and t.vocab_size == V and t.process is None
        assert t.rows == "logprobs"  # teacher_rows=auto: no local output layer, a stock server: log-prob rows
        t.shutdown()
    seen = {}
    monkeypatch.setattr(teacher_client, "launch_teacher", lambda path, **kw: seen.update(path=path, **kw))
    monkeypatch.setenv(teacher_client.API_KEY_ENV, "from-env")
    teacher_client.teacher_from_config("models/t", ModelConfig(dtype="bfloat16"),
                                       EngineConfig(threads="1", server=ServerConfig(url="local")))
    assert seen["path"] == "models/t" and seen["dtype"] == "bfloat16" and seen["api_key"] == "from-env"
    assert seen["threads"] == "1" and "--block-size" in seen["extra_args"]


def test_arguments_are_checked_before_any_request():
    with FakeServer() as fake:
        t = client(fake.url)
        hits = fake.hits
        with pytest.raises(ValueError, match="starts"):
            t.score([[1, 2]], [0])
        with pytest.raises(ValueError, match="out of range"):
            t.score([[1, V]], [1])
        with pytest.raises(ValueError, match="max_model_len"):
            t.decode([[1] * 60], [10], temperature=0.0, seeds=[0], positions=[0], stop_token_ids=[])
        assert fake.hits == hits and not math.isnan(t.timeout_s)
        t.shutdown()


# ----------------------------------------------------------------------------- real server
# (last in the file: the server boots while the tests above run)


@pytest.fixture(scope="module")
def hf_teacher(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], torch_dtype=torch.float32).eval()


def hf_rows(model, seq: list[int], start: int) -> np.ndarray:
    """float32 log_softmax rows r = distribution after seq[:start + r], r = 0 .. len(seq) - start."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[start - 1:].numpy()


def test_score_matches_hf(hf_teacher, server):
    teacher = server[0]
    assert teacher.vocab_size == hf_teacher.config.vocab_size
    seqs = PROMPTS + [[1, 5]]
    starts = [2, 6, 2]
    rows = teacher.score(seqs, starts)
    for s, a, r in zip(seqs, starts, rows):
        assert r.dtype == np.float32 and r.shape == (len(s) - a + 1, teacher.vocab_size)
        np.testing.assert_allclose(r, hf_rows(hf_teacher, s, a), atol=1e-4, rtol=0)
    # start == len(s): only the distribution after the whole sequence.
    last = teacher.score([PROMPTS[0]], [len(PROMPTS[0])])[0]
    np.testing.assert_allclose(last, rows[0][-1:], atol=1e-6, rtol=0)


def test_decode_greedy_is_argmax_and_stops(hf_teacher, server):
    teacher = server[0]
    out = teacher.decode(PROMPTS, [6, 6], temperature=0.0, seeds=[1, 2], positions=[0, 3], stop_token_ids=[])
    for p, res in zip(PROMPTS, out):
        assert res.finish_reason == "length" and res.token_ids.dtype == np.int64
        assert res.logprobs.shape == (6, teacher.vocab_size) and res.logprobs.dtype == np.float32
        np.testing.assert_array_equal(res.token_ids, res.logprobs.argmax(axis=1))
        full = p + res.token_ids.tolist()
        np.testing.assert_allclose(res.logprobs, hf_rows(hf_teacher, full, len(p))[:-1], atol=1e-4, rtol=0)
    # A stop token ends the run and is included, last.
    stop = int(out[0].token_ids[2])
    first = out[0].token_ids.tolist().index(stop)
    again = teacher.decode([PROMPTS[0]], [6], temperature=0.0, seeds=[1], positions=[0], stop_token_ids=[stop])[0]
    assert again.finish_reason == "stop"
    assert again.token_ids.tolist() == out[0].token_ids[: first + 1].tolist()
    # max_tokens 0: nothing asked of the server.
    empty = teacher.decode([PROMPTS[0]], [0], temperature=0.5, seeds=[1], positions=[0], stop_token_ids=[])[0]
    assert empty.token_ids.shape == (0,) and empty.logprobs.shape == (0, teacher.vocab_size)


def test_decode_sampling_is_switch_sample_token(server):
    # Also checks that SEED_KEY / POSITION_KEY / TEMPERATURE_KEY are the keys the server's
    # logits processor reads: otherwise it would decode greedily and ServerTeacher refuse it.
    teacher = server[0]
    T, seeds, positions = 0.8, [11, 12], [0, 4]
    out = teacher.decode(PROMPTS, [8, 8], temperature=T, seeds=seeds, positions=positions, stop_token_ids=[])
    for res, seed, pos in zip(out, seeds, positions):
        drawn = [switch.sample_token(res.logprobs[j], T, seed, pos + j) for j in range(len(res.token_ids))]
        assert res.token_ids.tolist() == drawn
    assert any((r.token_ids != r.logprobs.argmax(axis=1)).any() for r in out), "T=0.8 drew only argmax tokens"
    # Block boundaries do not matter: continue after 3 tokens at position + 3.
    p, res = PROMPTS[1], out[1]
    rest = teacher.decode([p + res.token_ids[:3].tolist()], [5], temperature=T, seeds=[12], positions=[7],
                          stop_token_ids=[])[0]
    assert rest.token_ids.tolist() == res.token_ids[3:].tolist()
    # The async form used by EngineHandle.
    fut = teacher.decode_async([PROMPTS[0]], [8], temperature=T, seeds=[11], positions=[0], stop_token_ids=[])
    assert fut.result()[0].token_ids.tolist() == out[0].token_ids.tolist()


def test_wrong_api_key_is_refused(server, monkeypatch):
    url = server[1]
    slept = _record_sleeps(monkeypatch)
    with pytest.raises(ServerError, match="API key") as e:
        ServerTeacher(url, "not-the-key", timeout_s=10, max_retries=3, backoff_s=1.0)
    assert url in str(e.value) and "\n" not in str(e.value)
    assert slept == [], "a refused key must not be retried"


def test_the_local_server_has_the_rows_endpoint_and_json_gives_the_same_rows(server):
    teacher, url, key, _ = server
    assert teacher.endpoint is not None and teacher.endpoint["vocab_size"] == teacher.vocab_size
    json_teacher = ServerTeacher(url, key, timeout_s=60, max_retries=2, binary=False)
    try:
        assert json_teacher.endpoint is None
        starts = [2, 6]
        for a, b in zip(teacher.score(PROMPTS, starts), json_teacher.score(PROMPTS, starts)):
            np.testing.assert_array_equal(a, b)
        kw = dict(temperature=0.8, seeds=[11, 12], positions=[0, 4], stop_token_ids=[])
        teacher.bytes_received = json_teacher.bytes_received = 0
        for a, b in zip(teacher.decode(PROMPTS, [6, 6], **kw), json_teacher.decode(PROMPTS, [6, 6], **kw)):
            assert a.token_ids.tolist() == b.token_ids.tolist() and a.finish_reason == b.finish_reason
            np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert json_teacher.bytes_received > 5 * teacher.bytes_received
    finally:
        json_teacher.shutdown()


def test_auto_rows_are_hidden_where_the_endpoint_and_the_output_layer_are_there(server, tiny_models):
    _, url, key, _ = server
    head = OutputHead(tiny_models["teacher"])
    for kw, want in ((dict(head=head), "hidden"), ({}, "logprobs"), (dict(head=head, binary=False), "logprobs")):
        t = ServerTeacher(url, key, timeout_s=60, max_retries=2, rows="auto", **kw)
        assert t.rows == want, kw
        t.shutdown()
    with FakeServer() as fake:  # a stock server: log-prob rows, no error
        assert client(fake.url, rows="auto", head=head).rows == "logprobs"


def test_hidden_rows_rebuild_the_teachers_rows(server, tiny_models):
    teacher, url, key, _ = server
    hidden = ServerTeacher(url, key, timeout_s=60, max_retries=2, rows="hidden", head=OutputHead(tiny_models["teacher"]))
    try:
        starts = [2, 6]
        for a, b in zip(teacher.score(PROMPTS, starts), hidden.score(PROMPTS, starts)):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
        kw = dict(temperature=0.8, seeds=[11, 12], positions=[0, 4], stop_token_ids=[])
        teacher.bytes_received = hidden.bytes_received = 0
        for a, b in zip(teacher.decode(PROMPTS, [8, 8], **kw), hidden.decode(PROMPTS, [8, 8], **kw)):
            assert a.token_ids.tolist() == b.token_ids.tolist()
            np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
        # d_model (128) instead of V (512) float32 values per row, plus the same .npz framing
        assert hidden.bytes_received < teacher.bytes_received / 2
    finally:
        hidden.shutdown()


def test_the_rows_endpoint_requires_the_api_key(server):
    import requests

    url = server[1]
    for method in ("GET", "POST"):
        resp = requests.request(method, url + ROWS_PATH, json={"prompt": [1, 2], "max_tokens": 1}, timeout=10)
        assert resp.status_code == 401, (method, resp.status_code)


def test_a_bad_rows_request_is_refused_with_a_reason(server):
    import requests

    _, url, key, _ = server
    resp = requests.post(url + ROWS_PATH, json={"prompt": [], "max_tokens": 1}, timeout=10,
                         headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 400 and "prompt" in resp.json()["error"]["message"]


def test_rollouts_with_a_hidden_rows_server_teacher_equal_the_logprob_rows(server, tiny_models):
    """float32 block rollouts (SWITCH sampled at T = 1): a server teacher that sends hidden states
    makes the same tokens and owners, divergences and teacher top-k as one that sends log-prob rows."""
    from switchkd.rollout.config import ModelConfig, RolloutConfig, SwitchConfig
    from switchkd.rollout.data.sequences import Prompt
    from switchkd.rollout.engines.actors import EngineHandle, StudentEngine, engine_kwargs
    from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

    teacher, url, key, _ = server
    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    cfg = RolloutConfig(engine="vllm", mode="block", temperature=1.0, max_new_tokens=24, batch_size=8,
                        switch=SwitchConfig(tau0=0.42, decay=0.008))
    student = EngineHandle(engine=StudentEngine(**engine_kwargs(model.student, model, cfg.student, 0)))
    hidden = ServerTeacher(url, key, timeout_s=60, max_retries=2, rows="hidden", head=OutputHead(model.teacher))
    try:
        rng = np.random.default_rng(3)
        prompts = [Prompt(i, rng.integers(3, 500, size=rng.integers(3, 20)).tolist(), switch.prompt_seed(3, i))
                   for i in range(8)]
        want, got = (VLLMSwitchGenerator(model, cfg, {2}, engines=(EngineHandle(engine=t), student)).generate(prompts)
                     for t in (teacher, hidden))
    finally:
        hidden.shutdown()
        student.shutdown()
    owners = np.concatenate([s.owner for s in want])
    assert 0.05 < owners.mean() < 0.95, "both owners must appear for the test to mean anything"
    for w, g in zip(want, got):
        assert g.response_ids == w.response_ids and g.owner == w.owner
        np.testing.assert_allclose(g.jsd, w.jsd, atol=1e-5)
        np.testing.assert_allclose(np.stack(g.topk_lps), np.stack(w.topk_lps), atol=1e-5)
