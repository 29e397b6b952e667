"""Teacher rows across processes: full-vocabulary log-prob rows vs final hidden states.

Block-speculative SWITCH, once with rollout.teacher_rows=logprobs (the teacher engine returns V
float32 log-probs per row) and once with =hidden (d_model float32 values per row, turned into
the same log-probs by the teacher's output layer on the receiving side). Same prompts, seeds and
sampling: the two must make the same rollouts (checked, reported as ``same_rollouts``). Reports
tokens/s of each and the bytes of teacher rows received per response token.

--teacher actor (default): both engines in Ray actors (rollout.use_ray; each engine in its own
process, as on a cluster). --teacher server: the teacher behind a local vLLM OpenAI-compatible
server (rollout.teacher.server.url=local), the student in this process; besides the rows
endpoint's two kinds it times the stock JSON path (/v1/completions) on the first --json-prompts
prompts only, as it costs about a second per row at a real vocabulary.

    python benchmarks/teacher_rows.py [--quick] [--models tiny|smollm2|qwen-coder] [--teacher actor|server] [--json out.json]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, stats, timed, write_json  # noqa: E402
from rollout_throughput import _models, _prompts, _teacher_fraction, rollout_args  # noqa: E402


def _row_bytes(result) -> int:
    """Bytes of the teacher rows in one engine result (decode, score or advance)."""
    if isinstance(result, tuple):  # advance: ({key: DecodeResult}, {key: rows})
        return sum(r.logprobs.nbytes for r in result[0].values()) + sum(b.nbytes for b in result[1].values())
    return sum(getattr(r, "logprobs", r).nbytes for r in result)


def _count_row_bytes(handle, counter: dict) -> None:
    """Count what the teacher engine sends, before the receiving side turns hidden states into log-probs."""
    from switchkd.rollout.engines.actors import _Mapped

    convert = handle._logprobs

    def counted(pending, kind):
        def count(result):
            counter["bytes"] += _row_bytes(result)
            return result
        return convert(_Mapped(pending, count), kind)

    handle._logprobs = counted


def _timed_rollouts(model, cfg, engines, prompts, warm, eos, repeats: int, received) -> tuple[dict, list]:
    """One untimed call on ``warm``, then ``repeats`` timed calls on ``prompts``; ``received()``
    is the count of teacher-row bytes so far."""
    from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

    gen = VLLMSwitchGenerator(model, cfg, {eos}, engines=engines)
    gen.generate(warm)
    before = received()
    times, seqs = timed(lambda: gen.generate(prompts), repeats)
    tokens = sum(len(s.response_ids) for s in seqs)
    result = {"prompts": len(prompts), "tokens": tokens, **stats(times), "teacher_fraction": _teacher_fraction(seqs)}
    result["tokens_per_s"] = tokens / result["median_s"]
    result["teacher_row_bytes_per_token"] = (received() - before) / (tokens * repeats)
    return result, seqs


def _actors(model, cfg, prompts, warm, eos, repeats: int) -> tuple[dict, list]:
    """Both engines as fresh Ray actors."""
    from switchkd.rollout.engines.actors import start_engines

    teacher, student = start_engines(model, cfg)
    counter = {"bytes": 0}
    try:
        _count_row_bytes(teacher, counter)
        return _timed_rollouts(model, cfg, (teacher, student), prompts, warm, eos, repeats, lambda: counter["bytes"])
    finally:
        teacher.shutdown()
        student.shutdown()


def _server(model, base, prompts, warm, eos, args) -> tuple[dict, dict]:
    """One local teacher server; the rows endpoint's logprobs and hidden rows, and the JSON path
    on the first ``args.json_prompts`` prompts. Bytes are the HTTP answers' bodies."""
    from switchkd.rollout.engines.actors import EngineHandle, StudentEngine, engine_kwargs
    from switchkd.rollout.engines.output_head import OutputHead
    from switchkd.rollout.engines.teacher_client import ServerTeacher
    from switchkd.rollout.engines.teacher_launcher import start_local_server, stop_local_server

    url, key, proc = start_local_server(model.teacher, dtype=model.dtype)
    student = EngineHandle(engine=StudentEngine(**engine_kwargs(model.student, model, base.student, base.seed)))
    clients = {"logprobs": dict(rows="logprobs"), "hidden": dict(rows="hidden", head=OutputHead(model.teacher)),
               "json": dict(binary=False)}
    results, rollouts = {}, {}
    try:
        for kind, kw in clients.items():
            teacher = ServerTeacher(url, key, timeout_s=3600, **kw)
            cfg = dataclasses.replace(base, teacher_rows=kw.get("rows", "logprobs"))
            todo = prompts[: args.json_prompts] if kind == "json" else prompts
            try:
                results[kind], seqs = _timed_rollouts(model, cfg, (EngineHandle(engine=teacher), student), todo,
                                                      warm[:1] if kind == "json" else warm, eos,
                                                      1 if kind == "json" else args.repeats,
                                                      lambda: teacher.bytes_received)
            finally:
                teacher.shutdown()
            rollouts[kind] = [(s.response_ids, s.owner) for s in seqs]
    finally:
        student.shutdown()
        stop_local_server(proc)
    return results, rollouts


def run(args) -> dict:
    from switchkd.rollout.config import ModelConfig, RolloutConfig
    from switchkd.rollout.local_ray import init_ray

    teacher_dir, student_dir, dtype = _models(args.models)
    student_dir = args.student or student_dir
    prompts, eos = _prompts(teacher_dir, args.prompts, seed=0)
    model = ModelConfig(teacher=teacher_dir, student=student_dir, dtype=dtype)
    base = RolloutConfig(engine="vllm", mode="block", use_ray=args.teacher == "actor", temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, batch_size=len(prompts))
    warm = prompts[: max(1, len(prompts) // 4)]
    results, rollouts = {}, {}
    if args.teacher == "server":
        results, rollouts = _server(model, base, prompts, warm, eos, args)
        json_kind = results.pop("json")
        n = args.json_prompts
        results["json_logprobs"] = {**json_kind, "same_rollouts_as_logprobs": rollouts["json"] == rollouts["logprobs"][:n]}
        engines = "teacher behind a local vLLM server (rows endpoint; JSON path on the first json_prompts), student in-process"
    else:
        init_ray(log_to_driver=False)
        for kind in ("logprobs", "hidden"):
            cfg = dataclasses.replace(base, teacher_rows=kind)
            results[kind], seqs = _actors(model, cfg, prompts, warm, eos, args.repeats)
            rollouts[kind] = [(s.response_ids, s.owner) for s in seqs]
        engines = "two Ray actors"
    return {
        "benchmark": "teacher_rows", "machine": machine_info(),
        "config": {"models": args.models, "student": student_dir, "dtype": dtype, "prompts": len(prompts),
                   "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "repeats": args.repeats,
                   "mode": "block", "teacher": args.teacher, "engines": engines,
                   **({"json_prompts": args.json_prompts} if args.teacher == "server" else {})},
        **results,
        "same_rollouts": rollouts["logprobs"] == rollouts["hidden"],
        "hidden_over_logprobs_tokens_per_s": results["hidden"]["tokens_per_s"] / results["logprobs"]["tokens_per_s"],
        "logprobs_over_hidden_bytes": (results["logprobs"]["teacher_row_bytes_per_token"]
                                       / results["hidden"]["teacher_row_bytes_per_token"]),
    }


def main() -> None:
    args = rollout_args(__doc__.split("\n")[0],
                        ("--teacher", dict(choices=("actor", "server"), default="actor",
                                           help="the teacher engine in a Ray actor, or behind a local vLLM server")),
                        ("--json-prompts", dict(type=int, default=2, help="server: prompts of the timed JSON path")))
    write_json(run(args), args.json)


if __name__ == "__main__":
    main()
