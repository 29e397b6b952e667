"""Why pure SWITCH (trainer.sft_ratio=0) degrades the warmed-up student: one candidate cause at a time.

From one warm-up, each variant trains SWITCH (configs/baselines/switch-exp.yaml, no SFT term) for
--steps steps with one change, and is evaluated on the whole test split with every `switchkd eval`
metric; the paired 95% CI of each metric against the warm-up says whether the variant made the
student worse. The rollouts of every step are read back to show how the run drifted: teacher
fraction, answers ending with EOS, the student's log-prob of its own tokens (how flat it samples),
the JSD on student-owned tokens, and the share of newline tokens.

    python benchmarks/collapse.py --warmup-from RUN/warmup/export [--steps 20] [--variants NAME ...]

Writes benchmarks/results/collapse.json (a variant's evaluation is kept under --out and reused when
the script runs again, so an interrupted sweep continues). The variants:
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "baselines" / "switch-exp.yaml")
# The sweep's starting point: the shipped SWITCH config as it was when the collapse was found
# (rollouts and sampled evaluation at T = 1); each variant changes one thing from there.
SWEEP_BASE = ["rollout.temperature=1.0"]
VARIANTS = {
    "forward_kl": [],                                              # SWEEP_BASE alone
    "teacher_model": ["trainer.teacher_source=model"],             # full-vocabulary teacher in the trainer
    "reverse_kl": ["trainer.loss=reverse_kl"],                     # mode-seeking divergence
    "jsd_0.5": ["trainer.loss=jsd", "trainer.jsd_beta=0.5"],       # GKD's generalized JSD
    "lr_1e-5": ["trainer.lr=1e-5"],                                # a smaller step
    "temperature_0.7": ["rollout.temperature=0.7"],                # the student samples less far out
    "tau0_0.3": ["rollout.switch.tau0=0.3"],                       # the teacher takes over sooner
    "max_new_tokens_128": ["rollout.max_new_tokens=128"],          # fewer responses cut before EOS
    # SeqKD at T = 0.7 (compare temperature_0.7): the teacher writes every token, so nothing is on-policy
    "teacher_writes_0.7": ["rollout.temperature=0.7", "rollout.switch.rule=teacher"],
    # the threshold at the JSD of student-owned tokens (0.34-0.40), with T = 0.7 rollouts
    "tau0_0.3_T0.7": ["rollout.temperature=0.7", "rollout.switch.tau0=0.3"],
    # room for the teacher's answers to end (its greedy answers average 143 tokens at a 256 budget)
    "max_new_tokens_256_T0.7": ["rollout.temperature=0.7", "rollout.max_new_tokens=256"],
}
__doc__ += "".join(f"    {name:<20} {' '.join(o) or '(the configs as shipped)'}\n" for name, o in VARIANTS.items())
NEWLINE_TEXT = "\n"


def rollout_drift(run_dir: Path, newline_ids: set[int]) -> list[dict]:
    """Per training step, statistics of the rollout batch it trained on."""
    import pyarrow.parquet as pq

    steps = []
    for path in sorted((run_dir / "rollouts").glob("step_*.parquet")):
        t = pq.read_table(path, columns=["response_ids", "owner", "jsd", "student_logprob", "finish_reason"])
        rows = t.to_pylist()
        owner = np.concatenate([np.asarray(r["owner"]) for r in rows])
        jsd = np.concatenate([np.asarray(r["jsd"]) for r in rows])
        lp = np.concatenate([np.asarray(r["student_logprob"]) for r in rows])
        ids = np.concatenate([np.asarray(r["response_ids"]) for r in rows])
        student = owner == 0
        steps.append({
            "teacher_fraction": float(owner.mean()),
            "eos_rate": sum(r["finish_reason"] == "stop" for r in rows) / len(rows),
            "mean_response_tokens": float(np.mean([len(r["response_ids"]) for r in rows])),
            "student_logprob_own_tokens": float(lp[student].mean()) if student.any() else None,
            "jsd_student_tokens": float(jsd[student].mean()) if student.any() else None,
            "newline_fraction": float(np.isin(ids, list(newline_ids)).mean()),
        })
    return steps


def newline_token_ids(model_dir: str) -> set[int]:
    """Vocabulary ids whose text is only newlines (and spaces)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return {i for i, s in enumerate(texts) if s and NEWLINE_TEXT in s and not s.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-from", help="the warmed-up student's export (a pipeline's warmup/export)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-max-new-tokens", type=int, default=None,
                        help="the evaluation's length budget (default: the config's rollout.max_new_tokens)")
    parser.add_argument("--out", default="runs/collapse")
    parser.add_argument("--json", default="benchmarks/results/collapse.json")
    parser.add_argument("--table-only", action="store_true", help="print the table of --json and exit")
    args = parser.parse_args()
    if args.table_only:
        print(table(json.loads(Path(args.json).read_text())))
        return
    if not args.warmup_from:
        parser.error("--warmup-from is required (except with --table-only)")

    from switchkd.cluster.config import load_config
    from switchkd.cluster.pipeline import eval_stage, saved_rollouts, train_stage, training_overrides
    from switchkd.rollout.evaluation.stats import compare

    out = Path(args.out)
    eval_overrides = [*SWEEP_BASE, "data.split=test", f"rollout.seed={args.seed}"]
    eval_dir = out / "eval"
    if args.eval_max_new_tokens:
        eval_overrides.append(f"rollout.max_new_tokens={args.eval_max_new_tokens}")
        eval_dir = out / f"eval-{args.eval_max_new_tokens}"
    teacher_dir = load_config(CONFIG).model.teacher
    teacher = eval_stage(CONFIG, eval_overrides, teacher_dir, eval_dir / "teacher.json")
    warm = eval_stage(CONFIG, eval_overrides, args.warmup_from, eval_dir / "warm-up.json", teacher_report=teacher)
    newline_ids = newline_token_ids(args.warmup_from)
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    results = previous.get("variants", {})
    for name in args.variants:
        start = time.perf_counter()
        run_dir = out / name
        run = train_stage(CONFIG, [*SWEEP_BASE, *training_overrides(args.steps, args.seed, run_dir, args.warmup_from),
                                   "trainer.sft_ratio=0", *VARIANTS[name]], run_dir, progress=False)
        report = eval_stage(CONFIG, eval_overrides, run["export"], eval_dir / f"{name}.json",
                            saved_rollouts(run_dir), teacher_report=teacher)
        results[name] = {"overrides": VARIANTS[name], "wall_seconds": time.perf_counter() - start,
                         "scores": scores(report), "vs_warmup": compare([warm], [report], by_bucket=False),
                         "rollouts_by_step": rollout_drift(run_dir, newline_ids)}
        print(f"{name}: " + ", ".join(f"{m} {v:.3f}" for m, v in results[name]["scores"]["greedy"].items()), flush=True)
        write_json({"benchmark": "collapse", "machine": machine_info(), "steps": args.steps, "seed": args.seed,
                    "warmup_from": args.warmup_from,
                    "eval_max_new_tokens": args.eval_max_new_tokens, "teacher": scores(teacher), "warm-up": scores(warm),
                    "variants": results}, args.json, quiet=True)
    print(table(json.loads(Path(args.json).read_text())))


def table(result: dict) -> str:
    """Markdown: per variant, the greedy and sampled metrics with the paired 95% CI against the
    warm-up, the EOS rates, and how the rollouts drifted from the first to the last step."""
    rows = [("teacher", result["teacher"], None, None), ("warm-up", result["warm-up"], None, None)]
    rows += [(name, v["scores"], v["vs_warmup"], v["rollouts_by_step"]) for name, v in result["variants"].items()]
    head = ["run", "greedy ROUGE-L", "greedy fidelity", "sampled teacher NLL", "sampled reverse KL", "EOS greedy / sampled",
            "rollouts: teacher fraction, EOS, newline share (first -> last step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, sc, ci, drift in rows:
        cells = [name]
        for mode, metric in (("greedy", "rougeL"), ("greedy", "fidelity"), ("sampled", "teacher_nll"),
                             ("sampled", "reverse_kl")):
            cell = f"{sc[mode][metric]:.2f}"
            if ci:
                e = ci[mode][metric]["all"]
                cell += f" ({e['diff']:+.2f} [{e['lo']:+.2f}, {e['hi']:+.2f}])"
            cells.append(cell)
        cells.append(f"{sc['greedy']['eos_rate']:.2f} / {sc['sampled']['eos_rate']:.2f}")
        cells.append("-" if not drift else ", ".join(
            f"{drift[0][k]:.2f} -> {drift[-1][k]:.2f}" for k in ("teacher_fraction", "eos_rate", "newline_fraction")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores(report: dict) -> dict:
    """Every metric of both decoding modes, and the share of answers that end with EOS."""
    return {mode: {**{k: v for k, v in report[mode].items() if isinstance(v, float) and k != "temperature"},
                   "eos_rate": report[mode]["finish_reasons"].get("stop", 0) / report["prompts"]}
            for mode in ("greedy", "sampled") if mode in report}


if __name__ == "__main__":
    main()
