"""A local vLLM OpenAI-compatible server for the teacher, on 127.0.0.1.

``start_local_server`` launches ``python -m vllm.entrypoints.openai.api_server`` with a
generated API key (passed in the environment) and switchkd's binary rows endpoint
(``teacher_plugin.RowsEndpoint``), and waits for ``/health``;
``stop_local_server`` stops its process group. Servers still running at exit are stopped.
"""
from __future__ import annotations

import atexit
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Sequence

import requests

from switchkd.rollout.local_ray import free_port

# vLLM's --logits-processors takes "<module>:<qualname>". A stock server (JSON rows only) loads
# the first; switchkd's server, with the binary rows endpoint (teacher_plugin.RowsEndpoint, the
# entry point ENDPOINT_PLUGIN, allowlisted in VLLM_PLUGINS), the second, which installs the fast
# log-prob path in the engine core.
LOGITS_PROCESSOR_FQCN = "switchkd.rollout.engines.teacher_plugin:ServerSamplingLogitsProcessor"
ROWS_LOGITS_PROCESSOR = "switchkd.rollout.engines.switch_sampling:SwitchSamplingLogitsProcessor"
ENDPOINT_PLUGIN = "switchkd_rows"


class ServerError(ValueError):
    """The teacher server cannot be used: the message names the URL and the problem."""


_STARTED: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()


def _log_tail(path: str | None, lines: int = 25) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(tail)


def server_command(model_dir: str, *, dtype: str, port: int, extra_args: Sequence[str] = (),
                   enforce_eager: bool = True, skip_tokenizer_init: bool = True) -> list[str]:
    """The vLLM OpenAI server command line (the API key travels in VLLM_API_KEY, not here; the
    rows endpoint needs ``VLLM_PLUGINS=switchkd_rows`` in its environment).

    ``--skip-tokenizer-init``: requests are token ids and answers are read by id, so the
    server need not detokenize every full-vocabulary log-prob entry (``decoded_token`` null)."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, *(["--enforce-eager"] if enforce_eager else []), "--max-logprobs", "-1",
        *(["--skip-tokenizer-init"] if skip_tokenizer_init else []),
        "--logits-processors", ROWS_LOGITS_PROCESSOR,
        *map(str, extra_args),
    ]


def start_local_server(
    model_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    port: int | None = None,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    kv_cache_space_gb: float = 1,
    threads: str | None = None,
    enforce_eager: bool = True,
    skip_tokenizer_init: bool = True,
    env: dict[str, str] | None = None,
    startup_timeout_s: float = 600.0,
    log_path: str | os.PathLike | None = None,
    wait: bool = True,
) -> tuple[str, str, subprocess.Popen]:
    """Start a vLLM OpenAI server for ``model_dir`` on 127.0.0.1; returns (url, api_key, process).

    The key (generated with ``secrets`` unless given) reaches the server through the
    ``VLLM_API_KEY`` environment variable, so it does not show in the process list. Server
    output goes to ``log_path`` (a temporary file by default; ``process.log_path``). Waits for
    ``/health`` (unless ``wait=False``: then call :func:`wait_for_server`); raises ServerError
    with the log tail if the server dies or is not ready in ``startup_timeout_s``. Stop it
    with :func:`stop_local_server` (which deletes the temporary log after a clean stop).
    """
    from switchkd.rollout.models.checks import read_model_config

    read_model_config(model_dir, "rollout.teacher.server (local)")
    port = port or free_port()
    api_key = api_key or secrets.token_urlsafe(32)
    url = f"http://127.0.0.1:{port}"
    proc_env = dict(os.environ)
    extra_args = list(extra_args)
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    proc_env.update({"VLLM_API_KEY": api_key, "TOKENIZERS_PARALLELISM": "false",
                     "VLLM_PLUGINS": ",".join(dict.fromkeys([*plugins, ENDPOINT_PLUGIN]))})
    if float(kv_cache_space_gb).is_integer():
        proc_env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_space_gb))
    else:  # the env var takes whole GiB only (and would override the flag)
        proc_env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        extra_args += ["--kv-cache-memory-bytes", str(int(kv_cache_space_gb * (1 << 30)))]
    proc_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's own default (engine core process)
    if threads:
        proc_env["VLLM_CPU_OMP_THREADS_BIND"] = str(threads)
    proc_env.update(env or {})
    own_log = log_path is None
    if own_log:
        fd, log_path = tempfile.mkstemp(prefix=f"switchkd-teacher-server-{port}-", suffix=".log")
        os.close(fd)
    log_path = str(log_path)
    cmd = server_command(str(model_dir), dtype=dtype, port=port, extra_args=extra_args, enforce_eager=enforce_eager,
                         skip_tokenizer_init=skip_tokenizer_init)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=proc_env, start_new_session=True)
    proc.log_path, proc.url, proc.model_dir = log_path, url, str(model_dir)  # type: ignore[attr-defined]
    proc.own_log = own_log  # type: ignore[attr-defined]
    _STARTED.add(proc)
    if wait:
        wait_for_server(proc, startup_timeout_s)
    return url, api_key, proc


def wait_for_server(process: subprocess.Popen, timeout_s: float = 600.0) -> None:
    """Wait until a server from ``start_local_server(..., wait=False)`` answers /health.

    Raises ServerError with the server's log tail (and stops it) if it exits or times out."""
    url, log_path = process.url, process.log_path  # type: ignore[attr-defined]
    what = f"vLLM server for {process.model_dir} at {url}"  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    health = requests.Session()
    health.trust_env = False  # 127.0.0.1: never through a proxy
    try:
        while True:
            rc = process.poll()
            if rc is not None:
                raise ServerError(
                    f"{what} exited with code {rc} during start-up "
                    f"(log {log_path}); last lines:\n{_log_tail(log_path)}")
            try:
                if health.get(url + "/health", timeout=2.0).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{what} not healthy after {timeout_s:g} s "
                    f"(log {log_path}); last lines:\n{_log_tail(log_path)}")
            time.sleep(0.5)
    except BaseException:
        stop_local_server(process)
        raise
    finally:
        health.close()


def stop_local_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Stop a server from start_local_server: SIGTERM, wait, then SIGKILL its process group."""
    pgid = process.pid  # start_new_session: the server leads its own process group
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The engine core is a child in the same group; give it a moment, then kill what is left.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            break
        time.sleep(0.1)
    if process.poll() is None:
        process.wait(10)
    _STARTED.discard(process)
    if getattr(process, "own_log", False) and process.returncode in (0, -signal.SIGTERM):
        try:  # a temporary log of a cleanly stopped server; kept after a crash
            os.unlink(process.log_path)  # type: ignore[attr-defined]
        except OSError:
            pass


@atexit.register
def _stop_leftover_servers() -> None:
    for proc in list(_STARTED):
        try:
            stop_local_server(proc, timeout_s=10.0)
        except Exception:  # pragma: no cover - best effort at exit
            pass
