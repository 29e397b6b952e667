"""Quality of every method at an equal budget: ROUGE-L on the held-out test split, over seeds.

One SFT warm-up of the layer-dropped student (as `switchkd pipeline`; or --warmup-from an existing
one) is the common starting point; for each seed, every configs/baselines/*.yaml method trains
--steps steps from it (same steps, prompts per step, LR, loss, max_new_tokens: the baseline
configs differ only in their "method" lines), and each result is evaluated (greedy and sampled) on
--eval-prompts test prompts. The warmed-up student itself is evaluated too ("warm-up").

    python benchmarks/quality.py [--quick] [--seeds 3] [--steps 12] [--warmup-from DIR] [--json benchmarks/results/quality.json]

Writes the JSON (per method: mean and standard deviation over seeds, overall and per
reference-length bucket; the teacher-token fraction by position of the rollout methods) and PNG
plots next to it (plots/quality_*.png). Runs go to --out; a run directory that already holds a
complete stage reuses it (an interrupted benchmark continues). --quick: the tiny random pair, 2 steps,
one seed (checks the machinery; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sft", "kd", "seqkd", "gkd", "skd", "switch-const", "switch-linear", "switch-exp")
ROLLOUT_METHODS = ("seqkd", "gkd", "skd", "switch-const", "switch-linear", "switch-exp")


def warm_up(args, base: list[str]) -> str:
    """The common starting point of every method: an SFT warm-up of the layer-dropped student
    (seed 0, as `switchkd pipeline`), or the export given with --warmup-from."""
    if args.warmup_from:
        return args.warmup_from
    from switchkd.cluster.pipeline import WARMUP_CONFIG, WARMUP_LR, train_stage, training_overrides

    out = Path(args.out) / "warmup"
    return train_stage(WARMUP_CONFIG, [*base, *training_overrides(args.warmup_steps, 0, out), f"trainer.lr={WARMUP_LR}"],
                       out, progress=False)["export"]


def run_seed(seed: int, student: str, methods: list[str], args, base: list[str]) -> dict[str, dict]:
    """Every method for ``seed`` from the warmed-up ``student``; {method: eval report}."""
    from switchkd.cluster.pipeline import eval_stage, saved_rollouts, train_stage, training_overrides

    out = Path(args.out) / f"seed{seed}"
    eval_overrides = [*base, "data.split=test", f"data.max_prompts={args.eval_prompts}", f"rollout.seed={seed}"]
    config = lambda method: str(REPO / "configs" / "baselines" / f"{method}.yaml")  # noqa: E731
    reports = {"warm-up": eval_stage(config("sft"), eval_overrides, student, out / "eval" / "warm-up.json")}
    for method in methods:
        start = time.perf_counter()
        run = train_stage(config(method), [*base, *training_overrides(args.steps, seed, out / method, student)],
                          out / method, progress=False)
        rollouts = saved_rollouts(out / method)
        reports[method] = eval_stage(config(method), eval_overrides, run["export"], out / "eval" / f"{method}.json",
                                     rollouts if method in ROLLOUT_METHODS else ())
        print(f"seed {seed} {method}: ROUGE-L greedy {reports[method]['greedy']['rougeL']:.2f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return reports


def seeds_of(method: str, args) -> int:
    """How many seeds ``method`` runs: --seeds, or fewer where --method-seeds says so."""
    limits = dict(item.split("=", 1) for item in args.method_seeds)
    return min(args.seeds, int(limits.get(method, args.seeds)))


def load_reports(out: Path) -> dict[int, dict[str, dict]]:
    """Every complete evaluation under OUT/seed*/eval/ (what --aggregate-only summarises)."""
    import json

    per_seed = {}
    for seed_dir in sorted(Path(out).glob("seed*"), key=lambda p: int(p.name[4:])):
        found = {p.stem: json.loads(p.read_text()) for p in (seed_dir / "eval").glob("*.json")}
        per_seed[int(seed_dir.name[4:])] = {m: found[m] for m in ("warm-up", *METHODS) if m in found}
    return per_seed


def aggregate(per_seed: dict[int, dict[str, dict]]) -> dict:
    """Per method: mean / std over the seeds that ran it of ROUGE-L (overall, per bucket) and
    teacher fractions; ``seeds`` lists them."""
    result = {}
    for method in _methods(per_seed):
        seeds = [s for s in per_seed if method in per_seed[s]]
        reports = [per_seed[s][method] for s in seeds]
        entry = {"seeds": seeds}
        for mode in ("greedy", "sampled"):
            if mode not in reports[0]:
                continue
            buckets = sorted({b for r in reports for b in r[mode]["rougeL_by_reference_length"]},
                             key=lambda b: int(b.split("-")[0].rstrip("+")))
            entry[mode] = {"rougeL": _spread([r[mode]["rougeL"] for r in reports]),
                           "mean_response_tokens": _spread([r[mode]["mean_response_tokens"] for r in reports]),
                           "rougeL_by_reference_length": {
                               b: _spread([r[mode]["rougeL_by_reference_length"][b]["rougeL"] for r in reports
                                           if b in r[mode]["rougeL_by_reference_length"]]) for b in buckets}}
        if "rollouts" in reports[0]:
            entry["teacher_fraction"] = _spread([r["rollouts"]["teacher_fraction"] for r in reports])
        result[method] = entry
    return result


def _methods(per_seed: dict[int, dict[str, dict]]) -> list[str]:
    return [m for m in ("warm-up", *METHODS) if any(m in reports for reports in per_seed.values())]


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def plot(per_seed: dict[int, dict[str, dict]], out_dir: Path) -> list[str]:
    """ROUGE-L per method (error bars over seeds), by reference-length bucket, and the teacher
    fraction by position of the SWITCH runs."""
    from switchkd.cluster.plots import plot_rouge_by_bucket, plot_rouge_by_method, plot_teacher_fraction

    methods = _methods(per_seed)
    reports = {m: [per_seed[s][m] for s in per_seed if m in per_seed[s]] for m in methods}
    paths = [plot_rouge_by_method(reports, out_dir / "quality_rouge_l_by_method.png"),
             plot_rouge_by_bucket(reports, out_dir / "quality_rouge_l_by_bucket.png")]
    switch = {m: [r["rollouts"] for r in reports[m]] for m in methods if m.startswith("switch")}
    if switch:
        paths.append(plot_teacher_fraction(switch, out_dir / "quality_teacher_fraction_by_position.png"))
    return [str(p) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random pair, 2 steps, 1 seed (machinery check)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="training steps of every method")
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--warmup-from", default=None, help="an existing warmed-up student export (skips the warm-up)")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--method-seeds", nargs="*", default=[], metavar="METHOD=N",
                        help="run METHOD on the first N seeds only (e.g. skd=1: its rollouts are slow here)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="train nothing: summarise the complete evaluations already under --out")
    parser.add_argument("--out", default="runs/quality", help="run directories (complete stages are reused)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/quality.json (quick: not written)")
    args = parser.parse_args()
    base: list[str] = []
    if args.quick:
        from switchkd.rollout.tiny_models import build_tiny_models

        tiny = build_tiny_models(Path(args.out) / "tiny-models", seed=0)
        base = [f"model.teacher={tiny['teacher']}", f"model.student={tiny['student']}", "model.dtype=float32",
                "rollout.max_new_tokens=16", "trainer.batch_size=4", "trainer.micro_batch_size=2"]
        args.seeds, args.steps, args.warmup_steps, args.eval_prompts = 1, 2, 2, 8
    for item in args.method_seeds:
        if item.count("=") != 1 or item.split("=")[0] not in METHODS or not item.split("=")[1].isdigit():
            parser.error(f"--method-seeds {item}: expected METHOD=N with METHOD one of {', '.join(METHODS)}")
    start, student = time.perf_counter(), args.warmup_from
    if not args.aggregate_only:
        from switchkd.cluster.pipeline import prepare_defaults

        prepare_defaults()
        student = warm_up(args, base)
        for seed in range(args.seeds):
            run_seed(seed, student, [m for m in args.methods if seed < seeds_of(m, args)], args, base)
    per_seed = load_reports(Path(args.out))
    json_path = Path(args.json or ("benchmarks/results/quality.json" if not args.quick else Path(args.out) / "quality.json"))
    result = {"benchmark": "quality", "machine": machine_info(), "wall_seconds": time.perf_counter() - start,
              "config": {"seeds": args.seeds, "steps": args.steps, "warmup_steps": args.warmup_steps,
                         "warmup_from": student,
                         "eval_prompts": args.eval_prompts, "methods": args.methods, "quick": args.quick,
                         "method_seeds": args.method_seeds, "overrides": base},
              "methods": aggregate(per_seed), "plots": plot(per_seed, json_path.parent / "plots")}
    write_json(result, str(json_path))
    print(table(result))


def table(result: dict) -> str:
    """Markdown table: ROUGE-L mean +- std over seeds per method, longest bucket, teacher fraction."""
    lines = ["| method | seeds | ROUGE-L greedy | ROUGE-L sampled | longest bucket (greedy) | teacher fraction |",
             "|---|---|---|---|---|---|"]
    for method, entry in result["methods"].items():
        greedy, sampled = entry["greedy"], entry.get("sampled")
        bucket, longest = list(greedy["rougeL_by_reference_length"].items())[-1]
        cells = [str(len(entry["seeds"])), f"{greedy['rougeL']['mean']:.2f} ± {greedy['rougeL']['std']:.2f}",
                 f"{sampled['rougeL']['mean']:.2f} ± {sampled['rougeL']['std']:.2f}" if sampled else "-",
                 f"[{bucket}] {longest['mean']:.2f} ± {longest['std']:.2f}",
                 f"{entry['teacher_fraction']['mean']:.3f}" if "teacher_fraction" in entry else "-"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
