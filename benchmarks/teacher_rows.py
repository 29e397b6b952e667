"""Teacher rows across processes: full-vocabulary log-prob rows vs final hidden states.

Block-speculative SWITCH with both engines in Ray actors (rollout.use_ray; each engine in its
own process, as on a cluster), once with rollout.teacher_rows=logprobs (the teacher engine
returns V float32 log-probs per row) and once with =hidden (d_model float32 values per row,
turned into the same log-probs by the teacher's output layer on the driver). Same prompts,
seeds and sampling: the two must make the same rollouts (checked, reported as
``same_rollouts``). Reports tokens/s of each and the bytes of teacher rows the driver received
per response token.

    python benchmarks/teacher_rows.py [--quick] [--models tiny|smollm2|qwen-coder] [--json out.json]
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


def _one(model, cfg, prompts, warm, eos, repeats: int) -> tuple[dict, list]:
    """One untimed call on ``warm``, then ``repeats`` timed calls on ``prompts``, on fresh actor engines."""
    from switchkd.rollout.engines.actors import start_engines
    from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

    teacher, student = start_engines(model, cfg)
    counter = {"bytes": 0}
    try:
        _count_row_bytes(teacher, counter)
        gen = VLLMSwitchGenerator(model, cfg, {eos}, engines=(teacher, student))
        gen.generate(warm)
        counter["bytes"] = 0
        times, seqs = timed(lambda: gen.generate(prompts), repeats)
    finally:
        teacher.shutdown()
        student.shutdown()
    tokens = sum(len(s.response_ids) for s in seqs)
    result = {"tokens": tokens, **stats(times), "teacher_fraction": _teacher_fraction(seqs)}
    result["tokens_per_s"] = tokens / result["median_s"]
    result["teacher_row_bytes_per_token"] = counter["bytes"] / (tokens * repeats)
    return result, seqs


def run(args) -> dict:
    from switchkd.rollout.config import ModelConfig, RolloutConfig
    from switchkd.rollout.local_ray import init_ray

    teacher_dir, student_dir, dtype = _models(args.models)
    student_dir = args.student or student_dir
    prompts, eos = _prompts(teacher_dir, args.prompts, seed=0)
    model = ModelConfig(teacher=teacher_dir, student=student_dir, dtype=dtype)
    base = RolloutConfig(engine="vllm", mode="block", use_ray=True, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, batch_size=len(prompts))
    init_ray(log_to_driver=False)
    warm = prompts[: max(1, len(prompts) // 4)]
    results, rollouts = {}, {}
    for kind in ("logprobs", "hidden"):
        results[kind], seqs = _one(model, dataclasses.replace(base, teacher_rows=kind), prompts, warm, eos, args.repeats)
        rollouts[kind] = [(s.response_ids, s.owner) for s in seqs]
    return {
        "benchmark": "teacher_rows", "machine": machine_info(),
        "config": {"models": args.models, "student": student_dir, "dtype": dtype, "prompts": len(prompts),
                   "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "repeats": args.repeats,
                   "mode": "block", "engines": "two Ray actors"},
        **results,
        "same_rollouts": rollouts["logprobs"] == rollouts["hidden"],
        "hidden_over_logprobs_tokens_per_s": results["hidden"]["tokens_per_s"] / results["logprobs"]["tokens_per_s"],
        "logprobs_over_hidden_bytes": (results["logprobs"]["teacher_row_bytes_per_token"]
                                       / results["hidden"]["teacher_row_bytes_per_token"]),
    }


def main() -> None:
    args = rollout_args(__doc__.split("\n")[0])
    write_json(run(args), args.json)


if __name__ == "__main__":
    main()
