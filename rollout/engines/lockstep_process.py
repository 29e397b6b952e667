"""The teacher engine of a lockstep pair in a child process (rollout.lockstep_teacher=process).

Inline, a lockstep token costs the student's step plus the teacher's: one process runs them
one after the other. Here the teacher engine runs in a child process that the parent tells
to step right before the student steps, so both forward passes (and both engines' Python
scheduling) run at the same time:

    parent (student engine)                    child (teacher engine)
    "step" ----------------------------------> step(): forward pass
    step(): forward pass                       processor: rows -> shared memory, "rows"
    processor: waits for "rows", decides,  <-- waits
               sends "tokens", forces them --> processor forces the tokens
    sampling, outputs                          sampling, outputs, "stepped"
    waits for "stepped" <----------------------

The full-vocab rows go through one shared-memory buffer (a memfd the child creates and
hands over a Unix socket; nothing is left in /dev/shm, whatever dies); only keys,
positions and tokens are pickled, over a private socketpair. The child exits when the
parent goes away (end of file on the socket) and reports every error back with its traceback.
"""
from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

import torch

from switchkd.rollout.engines.lockstep import LOCKSTEP_KEY, LockstepError

START_TIMEOUT_S = 600.0   # engine start-up in the child
REPLY_TIMEOUT_S = 600.0   # one teacher step or command


class TeacherProcess:
    """Parent side: starts the child, then offers the lockstep teacher-side calls of run_lockstep."""

    def __init__(self, teacher_kwargs: dict, teacher_threads: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The teacher's own threads setting applies in the child, not the student's binding.
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
        env["OMP_NUM_THREADS"] = str(teacher_threads)
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(child.fileno())],
                                     pass_fds=(child.fileno(),), env=env)
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send(teacher_kwargs)
        self.rows: torch.Tensor | None = None
        self._stepping = self._owes_tokens = False
        self._closed = False

    def wait_ready(self) -> None:
        """Wait for the child's engine; raise with the child's error if it did not start."""
        info = self._reply("ready", START_TIMEOUT_S)
        self.max_model_len, self.block_size = info["max_model_len"], info["block_size"]
        self.num_blocks, self.vocab_size = info["num_blocks"], info["vocab_size"]
        fd = recv_handle(self.conn)
        try:
            self._map = mmap.mmap(fd, info["max_rows"] * self.vocab_size * 4)
        finally:
            os.close(fd)
        self.rows = torch.frombuffer(self._map, dtype=torch.float32).view(info["max_rows"], self.vocab_size)

    def _send(self, op: str, arg=None) -> None:
        try:
            self.conn.send((op, arg))
        except OSError as e:
            raise self._exited() from e

    def _exited(self) -> LockstepError:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return LockstepError(f"the lockstep teacher process exited (exit code {code})")

    def _reply(self, want: str, timeout: float = REPLY_TIMEOUT_S):
        """The child's next message, which must be ``want``; its error or death as LockstepError."""
        try:
            if not self.conn.poll(timeout):
                raise LockstepError(f"the lockstep teacher process sent nothing for {timeout:.0f} s")
            kind, value = self.conn.recv()
        except (EOFError, OSError) as e:
            raise self._exited() from e
        if kind == "error":
            raise LockstepError(f"lockstep teacher process failed:\n{value}")
        if kind != want:
            raise LockstepError(f"lockstep teacher process sent {kind!r}, expected {want!r}: the engines are out of step")
        return value

    # -- run_lockstep's teacher side ---------------------------------------------------------------
    def add(self, request_id: str, token_ids: list[int], params) -> None:
        self._send("add", (request_id, token_ids, params))

    def begin_step(self) -> None:
        self._send("step")
        self._stepping = True

    def exchange(self, exchange, keys: list[int], positions: list[int], rows: torch.Tensor) -> list[int]:
        """The student's rows of one step: take the teacher's from the child, decide, send the tokens."""
        noise = exchange.noise(keys, positions, rows.shape[-1])  # while the teacher's step runs
        got_keys, got_positions = self._reply("rows")
        self._owes_tokens = True
        if got_keys != keys or got_positions != positions:
            raise LockstepError(f"the engines are out of step: the student has sequences {keys[:8]} at positions "
                                f"{positions[:8]}, the teacher {got_keys[:8]} at {got_positions[:8]}")
        tokens = exchange.decide(keys, positions, self.rows[: len(keys)], rows, noise)
        self._send("tokens", tokens)
        self._owes_tokens = False
        exchange.record()  # while the teacher finishes its step (it writes no rows before the next one)
        return tokens

    def end_step(self) -> None:
        rows_sent = self._reply("stepped")
        self._stepping = False
        if rows_sent != 1:
            raise LockstepError(f"the teacher engine's step offered rows {rows_sent} times, the student's once")

    def abort(self, request_ids: list[str]) -> None:
        """Abort after a failed step: let the child's step end, then drop the requests."""
        if self._owes_tokens:  # the child's processor waits for tokens: make it fail its step
            self._send("tokens", None)
            self._owes_tokens = False
        while self._stepping:
            try:
                self._reply("stepped")
            except LockstepError:  # the child's failed step is expected here; its death is not
                if self.proc.poll() is not None:
                    raise
            self._stepping = False
        self._send("abort", request_ids)
        self._reply("done")

    def has_unfinished(self) -> bool:
        self._send("unfinished")
        return self._reply("done")

    def shutdown(self) -> None:
        """Stop the child (it shuts its engine down); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.conn.send(("stop", None))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        self.rows = self._map = None  # unmapped once the last view is gone


class _ChildTeacher:
    """Child side of the exchange: the teacher processor's rows go to the parent, the tokens come back."""

    def __init__(self, conn: Connection, rows: torch.Tensor) -> None:
        self.conn, self.rows, self.offers = conn, rows, 0

    def teacher_rows(self, keys: list[int], positions: list[int], rows: torch.Tensor) -> list[int]:
        self.offers += 1
        self.rows[: len(keys)].copy_(rows)
        self.conn.send(("rows", (keys, positions)))
        kind, tokens = self.conn.recv()
        if kind != "tokens" or tokens is None:
            raise LockstepError("the parent cancelled this step")
        return tokens


def _serve(conn: Connection) -> None:
    """The child's loop: start the teacher engine, then run the parent's commands until "stop" or EOF."""
    from switchkd.rollout.engines import lockstep
    from switchkd.rollout.engines.actors import TeacherEngine

    try:
        engine = TeacherEngine(**conn.recv(), lockstep=True)
        core = engine.llm.llm_engine
        max_rows = core.vllm_config.scheduler_config.max_num_seqs
        fd = os.memfd_create("switchkd-lockstep-rows")
        os.ftruncate(fd, max_rows * engine.vocab_size * 4)
        buffer = mmap.mmap(fd, max_rows * engine.vocab_size * 4)
        table = torch.frombuffer(buffer, dtype=torch.float32).view(max_rows, engine.vocab_size)
        conn.send(("ready", dict(max_model_len=engine.max_model_len, block_size=engine.block_size,
                                 num_blocks=core.vllm_config.cache_config.num_gpu_blocks,
                                 vocab_size=engine.vocab_size, max_rows=max_rows)))
        send_handle(conn, fd, os.getppid())
        os.close(fd)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    side = _ChildTeacher(conn, table)
    from vllm.inputs import tokens_input

    try:
        while True:
            try:
                op, arg = conn.recv()
            except EOFError:
                return
            try:
                if op == "add":
                    request_id, token_ids, params = arg
                    lockstep.serve_exchange(params.extra_args[LOCKSTEP_KEY][0], side)
                    core.add_request(request_id, tokens_input(token_ids), params)
                elif op == "step":
                    side.offers = 0
                    core.step()
                    conn.send(("stepped", side.offers))
                elif op == "abort":
                    lockstep.forget_exchanges()
                    core.abort_request(arg)
                    conn.send(("done", None))
                elif op == "unfinished":
                    lockstep.forget_exchanges()
                    conn.send(("done", core.has_unfinished_requests()))
                elif op == "stop":
                    return
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
