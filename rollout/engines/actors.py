"""Teacher and student engines, in this process or as Ray actors, behind one handle.

``TeacherEngine`` and ``StudentEngine`` are the vLLM engine class with a role; the
generator never cares where they run: an ``EngineHandle`` returns pending results
whose ``result()`` is immediate in-process and ``ray.get`` (with a timeout) for
actors, so with Ray the two engines work in parallel within a round.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time

import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from switchkd.rollout.config import EngineConfig, ModelConfig, RolloutConfig
from switchkd.rollout.local_ray import init_ray
from switchkd.rollout.engines.vllm_engine import VLLMEngine

ACTOR_CALL_TIMEOUT_S = 3600.0

# What a call to a dead (or restarting) engine actor raises.
ENGINE_DIED = (RayActorError,)


class TeacherEngine(VLLMEngine):
    """The teacher's vLLM engine (scores student drafts, drafts its own runs)."""


class StudentEngine(VLLMEngine):
    """The student's vLLM engine; the trainer syncs new weights into it."""


class PairEngine(StudentEngine):
    """The two engines of rollout.mode=lockstep (lockstep): this is the student engine, which
    the trainer syncs, and it hosts the teacher engine in a child process it starts
    (``teacher_process``, lockstep_process) or beside it in this process (inline)."""

    def __init__(self, teacher_kwargs: dict, teacher_process: bool = True, **student_kwargs) -> None:
        from switchkd.rollout.engines.lockstep_process import TeacherProcess
        from switchkd.rollout.engines.lockstep import InlineTeacher

        self.teacher, self._threads = None, torch.get_num_threads()
        if teacher_process:  # starts while the student loads; the two processes share the cores
            cores = len(os.sched_getaffinity(0))
            self.teacher = TeacherProcess(teacher_kwargs, teacher_threads=max(1, cores // 2))
            torch._C.set_num_threads(max(1, cores - cores // 2))  # vLLM's worker blocks torch.set_num_threads
        try:
            super().__init__(**student_kwargs, lockstep=True)
            if teacher_process:
                self.teacher.wait_ready()
            else:
                self.teacher = InlineTeacher(TeacherEngine(**teacher_kwargs, lockstep=True))
        except BaseException:
            self.shutdown()
            raise

    def lockstep(self, prompts, rule, eos_ids, max_new_tokens: int, topk: int):
        """SWITCH rollouts of ``prompts`` (lockstep.run_lockstep); returns (builders, top-k
        decision counts (agreed, decided)) so a caller's OwnerRule can add them up."""
        from switchkd.rollout.engines.lockstep import run_lockstep

        agreed, decided = rule.agreed, rule.decided
        seqs = run_lockstep(self.teacher, self, prompts, rule, set(eos_ids), max_new_tokens, topk)
        return seqs, (rule.agreed - agreed, rule.decided - decided)

    def shutdown(self) -> None:
        try:
            if self.teacher is not None:
                self.teacher.shutdown()
        finally:
            super().shutdown()
            torch._C.set_num_threads(self._threads)


class _Done:
    def __init__(self, value):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


class _Both:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def done(self) -> bool:
        return self.first.done() and self.second.done()

    def result(self):
        return self.first.result(), self.second.result()


class _Keyed:
    def __init__(self, both, decode_keys, score_keys):
        self.both, self.keys = both, (decode_keys, score_keys)

    def done(self) -> bool:
        return self.both.done()

    def result(self):
        drafts, rows = self.both.result()
        return dict(zip(self.keys[0], drafts)), dict(zip(self.keys[1], rows))


class _Mapped:
    """A pending result passed through ``fn`` when collected."""

    def __init__(self, pending, fn):
        self.pending, self.fn = pending, fn

    def done(self) -> bool:
        return self.pending.done()

    def result(self, *args):
        return self.fn(self.pending.result(*args))


class _RayPending:
    def __init__(self, ref):
        self.ref = ref

    def done(self) -> bool:
        import ray

        return bool(ray.wait([self.ref], timeout=0)[0])

    def result(self, timeout: float | None = ACTOR_CALL_TIMEOUT_S):
        import ray

        try:
            return ray.get(self.ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(self.ref)
            raise TimeoutError(f"engine call did not finish within {timeout:.0f} s") from None


class InBackground:
    """``fn(*args)`` on a daemon thread (a Ctrl-C'd run never waits for it); ``result`` joins."""

    def __init__(self, fn, *args):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._value = fn(*args)
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"background call did not finish within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self._value


class EngineHandle:
    """Uniform async-style access to an engine object or a Ray actor of one. With ``head`` (an
    output_head.OutputHead; the engine started with rows="hidden") the hidden-state rows of its
    decode, score and advance results become full-vocabulary log-prob rows here, on the
    receiving side, so callers see the same results either way."""

    def __init__(self, engine=None, actor=None, head=None):
        self.engine, self.actor, self.head = engine, actor, head

    def _logprobs(self, pending, kind: str):
        if self.head is None:
            return pending
        draft = lambda r: dataclasses.replace(r, logprobs=self.head(r.logprobs))
        convert = {
            "decode": lambda results: [draft(r) for r in results],
            "score": lambda blocks: [self.head(b) for b in blocks],
            "advance": lambda out: ({k: draft(r) for k, r in out[0].items()},
                                    {k: self.head(b) for k, b in out[1].items()}),
        }[kind]
        return _Mapped(pending, convert)

    def _call(self, method: str, *args, **kwargs):
        if self.actor is not None:
            return _RayPending(getattr(self.actor, method).remote(*args, **kwargs))
        submit = getattr(self.engine, method + "_async", None)  # ServerTeacher: HTTP on a thread
        if submit is not None:
            return submit(*args, **kwargs)
        return _Done(getattr(self.engine, method)(*args, **kwargs))

    def decode_async(self, *args, **kwargs):
        return self._logprobs(self._call("decode", *args, **kwargs), "decode")

    def score_async(self, *args, **kwargs):
        return self._logprobs(self._call("score", *args, **kwargs), "score")

    def submit(self, method: str, *args):
        """Call ``method`` without blocking this thread: a Ray actor call, or, for an engine in
        this process, a background thread (so a blocking peer call can run meanwhile)."""
        if self.actor is not None:
            return _RayPending(getattr(self.actor, method).remote(*args))
        return InBackground(getattr(self.engine, method), *args)

    def call(self, method: str, *args, timeout: float | None = None):
        """Call ``method`` and wait for its result; TimeoutError after ``timeout`` seconds (default:
        ACTOR_CALL_TIMEOUT_S for an actor, no limit and no extra thread for an engine in this process)."""
        if self.actor is not None:
            return self.submit(method, *args).result(timeout or ACTOR_CALL_TIMEOUT_S)
        if timeout is None:
            return getattr(self.engine, method)(*args)
        return self.submit(method, *args).result(timeout)

    def wait_until_ready(self, timeout_s: float) -> None:
        """Block until the engine answers (after an actor restart it first reloads its model).
        An actor that is dead for good (no restarts left: ActorDiedError) fails at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.call("version", timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorUnavailableError as e:  # restarting
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine did not come back within {timeout_s:.0f} s: {e}") from None
                time.sleep(1.0)

    def advance_async(self, decode: dict | None, score: dict | None):
        """One continuous-batching call (VLLMEngine.advance). An engine without one (a server
        teacher) runs both batches to completion, concurrently, with the same result shape."""
        if self.actor is not None or hasattr(self.engine, "advance"):
            return self._logprobs(self._call("advance", decode, score), "advance")
        strip = lambda request: {k: v for k, v in request.items() if k != "keys"}
        pending = (self.decode_async(**strip(decode)) if decode else _Done([]),
                   self.score_async(**strip(score)) if score else _Done([]))
        return _Keyed(_Both(*pending), decode["keys"] if decode else [], score["keys"] if score else [])

    def abort_all(self) -> None:
        """Drop the requests a stopped rollout left running in the engine (none for a server)."""
        if self.actor is not None or hasattr(self.engine, "abort_all"):
            self.call("abort_all")

    def shutdown(self) -> None:
        """Stop the engine (idempotent: lockstep hands out one handle as teacher and student)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self.actor is not None:
            import ray

            ray.get(self.actor.shutdown.remote(), timeout=120)
            ray.kill(self.actor)
        else:
            self.engine.shutdown()


def engine_kwargs(path: str, model: ModelConfig, engine: EngineConfig, seed: int) -> dict:
    """Constructor arguments of a VLLMEngine from the config (plain values: picklable for Ray)."""
    return dict(
        model=path, dtype=model.dtype, device=engine.device, block_size=engine.block_size,
        kv_cache_space_gb=engine.kv_cache_space_gb, threads=engine.threads, enforce_eager=engine.enforce_eager,
        max_model_len=engine.max_model_len, gpu_memory_utilization=engine.gpu_memory_utilization,
        tensor_parallel_size=engine.tensor_parallel_size, seed=seed, trust_remote_code=model.trust_remote_code,
    )


def start_engines(model: ModelConfig, rollout: RolloutConfig, placement: dict | None = None,
                  max_restarts: int = 0) -> tuple[EngineHandle, EngineHandle]:
    """Start the teacher and student engines as configured: in-process, or Ray actors (with
    ``placement``, {"teacher"/"student": Ray scheduling strategy}, they always are actors, and
    Ray restarts a dead one up to ``max_restarts`` times, with its constructor arguments).
    rollout.mode=lockstep (sampled rollouts) starts one PairEngine, in the student's place, and
    returns its handle twice."""
    if rollout.mode == "lockstep" and rollout.source == "generate":
        kwargs = engine_kwargs(model.student, model, rollout.student, rollout.seed)
        kwargs["teacher_kwargs"] = engine_kwargs(model.teacher, model, rollout.teacher, rollout.seed)
        kwargs["teacher_process"] = rollout.lockstep_teacher == "process"
        pair = _start(PairEngine, "student", rollout.student, kwargs, rollout, placement, max_restarts)
        return pair, pair
    specs = ((TeacherEngine, model.teacher, rollout.teacher), (StudentEngine, model.student, rollout.student))
    handles = []
    for cls, path, engine in specs:
        if cls is TeacherEngine and engine.server.url is not None:
            from switchkd.rollout.engines.teacher_client import teacher_from_config

            handles.append(EngineHandle(engine=teacher_from_config(path, model, engine, rollout.teacher_rows)))
            continue
        role = "teacher" if cls is TeacherEngine else "student"
        kwargs = engine_kwargs(path, model, engine, rollout.seed)
        head = None
        if cls is TeacherEngine and rollout.teacher_rows == "hidden":
            from switchkd.rollout.engines.output_head import OutputHead

            kwargs["rows"], head = "hidden", OutputHead(path)
        handles.append(_start(cls, role, engine, kwargs, rollout, placement, max_restarts))
        handles[-1].head = head
    return handles[0], handles[1]


def _start(cls, role: str, engine: EngineConfig, kwargs: dict, rollout: RolloutConfig, placement: dict | None,
           max_restarts: int) -> EngineHandle:
    """One engine of class ``cls`` in ``role``'s place: a Ray actor (rollout.use_ray or a placement), else
    in this process."""
    if rollout.use_ray or placement is not None:
        strategy = (placement or {}).get(role)
        return EngineHandle(actor=_start_actor(cls, engine, kwargs, strategy, max_restarts))
    return EngineHandle(engine=cls(**kwargs))


def _start_actor(cls, engine: EngineConfig, kwargs: dict, scheduling_strategy=None, max_restarts: int = 0):
    import ray

    if not ray.is_initialized():
        init_ray(log_to_driver=False)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    actor_cls = ray.remote(num_cpus=engine.num_cpus, num_gpus=engine.num_gpus)(cls)
    # In-flight calls of a dead actor fail (max_task_retries=0): the caller decides what to redo.
    options = {"runtime_env": {"env_vars": env}, "max_restarts": max_restarts, "max_task_retries": 0}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return actor_cls.options(**options).remote(**kwargs)
