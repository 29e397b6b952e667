"""Where output goes during a run.

The console shows switchkd's own lines (stage lines, its warnings, progress bars) and everyone's
errors. The libraries' expected chatter (vLLM's weight-reload notices, Ray's start-up banners,
DeepSpeed's accelerator detection, C++ prints) goes to log files under the run's output
directory: ``LOG_DIR/driver.log`` for the process that runs the loop and
``LOG_DIR/worker-<pid>.log`` for each Ray worker (engines, trainer workers). Verbose mode
(`switchkd -v`) leaves every stream on the console, as the libraries print it.

Redirection is at the file-descriptor level, so output from C++ and from handlers the libraries
created at import time is caught too. Ray workers get it from ``worker_runtime_env()``, which
the one place that starts Ray (``local_ray.init_ray``) passes as the job's runtime_env.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

LOG_DIR_ENV = "SWITCHKD_LOG_DIR"    # set while library output goes to files: the Ray workers' target
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)
_console = None   # the terminal while this process's fds 1 and 2 go to a log file


def console():
    """The stream for switchkd's console output (progress bars, log lines): the terminal, even
    while the process's own stdout and stderr go to a log file."""
    return _console or sys.stderr


class _ConsoleStream:
    """A stream that writes to whatever ``console()`` is at the time of the write."""

    def write(self, text: str) -> int:
        return console().write(text)

    def flush(self) -> None:
        console().flush()


class _OwnLinesAndErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("switchkd") or record.levelno >= logging.ERROR


def setup_logging(verbose: bool = False) -> None:
    """The command line's logging: switchkd's INFO lines and every library's errors on the
    console; with ``verbose``, every INFO line."""
    handler = logging.StreamHandler(_ConsoleStream())
    handler.setFormatter(logging.Formatter(FORMAT))
    if not verbose:
        handler.addFilter(_OwnLinesAndErrors())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)


@contextmanager
def library_output_to(log_dir: str | os.PathLike, verbose: bool = False):
    """Inside the block, this process's stdout and stderr (fds 1 and 2) append to
    LOG_DIR/driver.log and Ray workers started inside it write to LOG_DIR/worker-<pid>.log;
    switchkd's lines still reach the terminal through ``console()``. Every Python log record
    goes to driver.log too. ``verbose``: nothing is redirected (driver.log still gets the records)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    records = logging.FileHandler(log_dir / "driver.log")
    records.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(records)
    try:
        if verbose or _console is not None:   # verbose, or an enclosing block already redirects
            yield
        else:
            with _stdio_to(log_dir):
                yield
    finally:
        root.removeHandler(records)
        records.close()


@contextmanager
def _stdio_to(log_dir: Path):
    """fds 1 and 2 to LOG_DIR/driver.log, ``console()`` to the terminal, LOG_DIR for new Ray workers."""
    global _console
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _console = os.fdopen(os.dup(2), "w", buffering=1)
    _point_stdio_at(log_dir / "driver.log")
    os.environ[LOG_DIR_ENV] = str(log_dir.resolve())
    log.info("library output (vLLM, Ray, DeepSpeed) goes to %s/ (-v shows it here)", log_dir)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _console.close()
        _console = None
        os.environ.pop(LOG_DIR_ENV, None)


def _point_stdio_at(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def worker_runtime_env() -> dict:
    """The runtime_env for a Ray job started while library output goes to files: each worker
    process sends its stdout and stderr to LOG_DIR/worker-<pid>.log from its start ({} otherwise)."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return {}
    return {"env_vars": {LOG_DIR_ENV: log_dir}, "worker_process_setup_hook": f"{__name__}.route_worker_output"}


def route_worker_output() -> None:
    """Ray's worker_process_setup_hook: this worker's stdout and stderr to LOG_DIR/worker-<pid>.log."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        _point_stdio_at(Path(log_dir) / f"worker-{os.getpid()}.log")
