"""Rollout throughput: lockstep vs block-speculative vs stepwise vLLM SWITCH vs the HF reference vs the floor.

Same prompts, same models, one run; each method is warmed up, then timed over --repeats.

    python benchmarks/rollout_throughput.py [--quick] [--models tiny|smollm2|qwen-coder] [--json out.json]

lockstep (rollout.mode's default) runs on its own PairEngine (prefix caching off; the teacher
engine in a child process stepping at the same time as the student, rollout.lockstep_teacher's
default), lockstep_inline on another with both engines in this process, one step after the
other; block, stepwise and the floors on a separate teacher and student engine.
One set of engines at a time: the teacher + student engines are shut down before the
PairEngine starts.

floor = the student decoding every response token with full-vocab log-probs plus ONE
teacher prefill scoring the same tokens (both on the fast path): what any exact SWITCH
rollout must at least do when the student owns its tokens. floor_teacher_drafts is its
mirror (the teacher decodes, the student scores): the least work when the teacher owns
them, as with an untrained student. --student runs another student (e.g. a warmed-up
one, whose ownership is mixed) against the pair's teacher. The HF reference runs in a separate process, because a vLLM
CPU engine pins the torch threads of its own process.

Ratios: floor_over_lockstep (floor tokens/s over lockstep tokens/s; target <= 1.5, judged
on the default mode), lockstep_over_block, block_over_stepwise (target >= 5), block_over_hf
(target > 1); floor_over_block is kept for comparison.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, stats, timed, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EOS_DEFAULT = 2
MODELS = ("tiny", "smollm2", "qwen-coder")


def _models(which: str) -> tuple[str, str, str]:
    """(teacher dir, student dir, dtype) for the chosen pair, built if needed."""
    if which == "tiny":
        from switchkd.rollout.models.tiny import build_tiny_models

        out = Path(tempfile.mkdtemp(prefix="switchkd_bench_"))
        paths = build_tiny_models(out, seed=0)
        return str(paths["teacher"]), str(paths["student"]), "float32"
    if which == "qwen-coder":  # prepared by `make models-qwen` (its packages are not in the default install)
        from switchkd.rollout.models.qwen import prepare_qwen_models

        paths = prepare_qwen_models(REPO / "models")
        return str(paths["teacher"]), str(paths["student"]), "bfloat16"
    from switchkd.rollout.models.real import prepare_default_models

    paths = prepare_default_models(REPO / "models")
    return str(paths["teacher"]), str(paths["student"]), "bfloat16"


def _prompts(teacher: str, n: int, seed: int):
    from transformers import AutoTokenizer

    from switchkd.rollout.config import DataConfig
    from switchkd.rollout.generate import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompts, _ = load_prompts(DataConfig(prompts=str(REPO / "configs/prompts/tiny.jsonl"), max_prompts=n), tokenizer, seed)
    return prompts, tokenizer.eos_token_id


def _hf_worker(args, queue):
    """Runs in its own process: time the HF reference on the same prompts."""
    import torch

    from switchkd.rollout.models.hf_reference import HFSwitchGenerator, load_hf_model

    teacher_dir, student_dir, dtype, cfg, prompts, eos, repeats = args
    torch.set_num_threads(os.cpu_count() or 1)
    gen = HFSwitchGenerator(load_hf_model(teacher_dir, dtype), load_hf_model(student_dir, dtype), cfg, {eos}, pad_id=0)
    gen.generate(prompts[: max(1, len(prompts) // 4)])  # warm-up
    times, seqs = timed(lambda: gen.generate(prompts), repeats)
    queue.put((times, sum(len(s.response_ids) for s in seqs)))


def run(args) -> dict:
    from switchkd.rollout.config import ModelConfig, RolloutConfig

    teacher_dir, student_dir, dtype = _models(args.models)
    student_dir = args.student or student_dir
    prompts, eos = _prompts(teacher_dir, args.prompts, seed=0)
    cfg = RolloutConfig(engine="vllm", temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                        batch_size=len(prompts))
    if args.tau0 is not None:
        cfg = dataclasses.replace(cfg, switch=dataclasses.replace(cfg.switch, tau0=args.tau0))
    # HF first, in its own process, before any engine pins this process's threads.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_hf_worker, args=((teacher_dir, student_dir, dtype, cfg, prompts, eos, args.repeats), queue))
    proc.start()
    hf_times, hf_tokens = queue.get()
    proc.join()

    model = ModelConfig(teacher=teacher_dir, student=student_dir, dtype=dtype)
    warm = prompts[: max(1, len(prompts) // 4)]
    # One set of engines at a time: teacher + student (block, stepwise, floors), then lockstep's PairEngine.
    results, floors = _split_engines(model, cfg, prompts, warm, eos, args.repeats)
    gc.collect()
    results["lockstep"] = _lockstep(model, dataclasses.replace(cfg, mode="lockstep"), prompts, warm, eos, args.repeats)
    gc.collect()
    inline = dataclasses.replace(cfg, mode="lockstep", lockstep_teacher="inline")
    results["lockstep_inline"] = _lockstep(model, inline, prompts, warm, eos, args.repeats)

    tps = lambda tokens, s: tokens / s["median_s"]
    block_tps = tps(results["block"]["tokens"], results["block"])
    step_tps = tps(results["stepwise"]["tokens"], results["stepwise"])
    lock_tps = tps(results["lockstep"]["tokens"], results["lockstep"])
    inline_tps = tps(results["lockstep_inline"]["tokens"], results["lockstep_inline"])
    hf_stats = stats(hf_times)
    hf_tps, floor_tps = tps(hf_tokens, hf_stats), tps(floors["floor"]["tokens"], floors["floor"])
    mirror_tps = tps(floors["floor_teacher_drafts"]["tokens"], floors["floor_teacher_drafts"])
    return {
        "benchmark": "rollout_throughput", "machine": machine_info(),
        "config": {"models": args.models, "student": student_dir, "dtype": dtype, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                   "temperature": args.temperature, "tau0": cfg.switch.tau0, "decay": cfg.switch.decay,
                   "schedule": cfg.switch.schedule, "repeats": args.repeats},
        "tokens": results["block"]["tokens"],
        "block": results["block"], "stepwise": results["stepwise"], "lockstep": results["lockstep"],
        "lockstep_inline": results["lockstep_inline"], "lockstep_inline_tokens_per_s": inline_tps,
        "lockstep_over_lockstep_inline": lock_tps / inline_tps,
        "hf": {"tokens": hf_tokens, **hf_stats}, **floors,
        "block_tokens_per_s": block_tps, "stepwise_tokens_per_s": step_tps, "lockstep_tokens_per_s": lock_tps,
        "hf_tokens_per_s": hf_tps, "floor_tokens_per_s": floor_tps, "floor_teacher_drafts_tokens_per_s": mirror_tps,
        "block_over_stepwise": block_tps / step_tps, "floor_over_block": floor_tps / block_tps,
        "floor_teacher_drafts_over_block": mirror_tps / block_tps,
        "block_over_hf": block_tps / hf_tps,
        "floor_over_lockstep": floor_tps / lock_tps, "floor_teacher_drafts_over_lockstep": mirror_tps / lock_tps,
        "lockstep_over_block": lock_tps / block_tps, "lockstep_over_stepwise": lock_tps / step_tps,
        "lockstep_over_hf": lock_tps / hf_tps,
    }


def _split_engines(model, cfg, prompts, warm, eos, repeats: int) -> tuple[dict, dict]:
    """Block and stepwise SWITCH, and both floors, on a teacher and a student engine, shut down after:
    ({mode: result}, {floor name: result})."""
    from switchkd.rollout.engines.actors import EngineHandle, StudentEngine, TeacherEngine, engine_kwargs
    from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

    teacher = EngineHandle(engine=TeacherEngine(**engine_kwargs(model.teacher, model, cfg.teacher, 0)))
    student = EngineHandle(engine=StudentEngine(**engine_kwargs(model.student, model, cfg.student, 0)))
    try:
        results = {}
        lengths = None
        for mode in ("block", "stepwise"):
            gen = VLLMSwitchGenerator(model, dataclasses.replace(cfg, mode=mode), {eos}, engines=(teacher, student))
            results[mode], seqs = _time_generator(gen, prompts, warm, repeats)
            lengths = lengths or [len(s.response_ids) for s in seqs]

        def floor(drafter, scorer):
            ids = [p.token_ids for p in prompts]
            drafts = drafter.decode_async(ids, lengths, temperature=cfg.temperature, seeds=[p.seed for p in prompts],
                                          positions=[0] * len(prompts), stop_token_ids=[]).result()
            seqs = [i + d.token_ids.tolist() for i, d in zip(ids, drafts)]
            scorer.score_async(seqs, [len(i) for i in ids]).result()
            return sum(len(d.token_ids) for d in drafts)

        floors = {}
        for name, pair in (("floor", (student, teacher)), ("floor_teacher_drafts", (teacher, student))):
            floor(*pair)
            times, tokens = timed(lambda: floor(*pair), repeats)
            floors[name] = {"tokens": tokens, **stats(times)}
    finally:
        teacher.shutdown()
        student.shutdown()
    return results, floors


def _time_generator(gen, prompts, warm, repeats: int) -> tuple[dict, list]:
    """One untimed call on ``warm``, then ``repeats`` timed calls on ``prompts``: (result entry, last sequences)."""
    gen.generate(warm)
    times, seqs = timed(lambda: gen.generate(prompts), repeats)
    tokens = sum(len(s.response_ids) for s in seqs)
    return {"tokens": tokens, **stats(times), "teacher_fraction": _teacher_fraction(seqs)}, seqs


def _lockstep(model, cfg, prompts, warm, eos, repeats: int) -> dict:
    """Lockstep SWITCH on its own PairEngine (prefix caching off: not the block engines), shut down after."""
    from switchkd.rollout.engines.actors import start_engines
    from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

    engines = start_engines(model, cfg)   # (pair, pair): one PairEngine's handle twice
    try:
        return _time_generator(VLLMSwitchGenerator(model, cfg, {eos}, engines=engines), prompts, warm, repeats)[0]
    finally:
        engines[0].shutdown()


def _teacher_fraction(seqs) -> float:
    owners = [o for s in seqs for o in s.owner]
    return sum(owners) / max(1, len(owners))


def rollout_args(description: str, *extra) -> argparse.Namespace:
    """The command line of a rollout benchmark (``extra``: (flag, kwargs) pairs of its own);
    --quick forces the tiny pair, 4 prompts of 16 tokens, one call."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny models, few prompts (seconds; no targets)")
    parser.add_argument("--models", choices=MODELS, default="tiny")
    parser.add_argument("--student", help="another student (HF dir, e.g. a run's warmup/export) with the pair's teacher")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the result here")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args()
    if args.quick:
        args.models, args.prompts, args.max_new_tokens, args.repeats = "tiny", 4, 16, 1
    return args


def main() -> None:
    args = rollout_args(__doc__.splitlines()[0], ("--tau0", dict(
        type=float, help="SWITCH threshold at t = 0 (default: rollout.switch.tau0's default)")))
    write_json(run(args), args.json)


if __name__ == "__main__":
    main()
