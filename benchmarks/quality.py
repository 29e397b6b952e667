"""The quality study: every method at an equal budget from one warm-up, scored on the whole test
split with every `switchkd eval` metric, over seeds, with paired bootstrap CIs against SWITCH.

One SFT warm-up of the layer-dropped student (as `switchkd pipeline`, or --warmup-from an
existing one) is the common starting point. Each (method, seed) run trains configs/baselines/
METHOD.yaml for --steps steps of 8 prompts from it (the baseline configs differ only in their
"method" lines) and is evaluated with the same evaluation seed as every other model, so sampled
answers share their noise and every comparison is paired prompt by prompt.

    python benchmarks/quality.py --warmup-from RUN/warmup/export [--steps 100] [--commit]
    python benchmarks/quality.py --aggregate-only          # tables, CIs and plots from the committed files

Resumable run by run: each finished run writes RESULTS/runs/METHOD-seedN.json (scores, wall time,
load) and METHOD-seedN.rows.jsonl.gz (every prompt: index, reference, teacher answer, the model's
greedy and sampled answers and their scores); a run whose files exist is not run again, and a run
that was interrupted resumes from its last checkpoint (trainer.save_every). --commit commits each
run's files as they land, in the repository that holds --results (so a study running from a
worktree at a fixed commit can land its results in the main checkout). The warm-up's weights
are recorded by checksum, so a study continued on another machine can check that it starts from
the same student (a rebuild on another CPU rounds differently: --rebuilt-warmup goes on from it,
evaluates it as warm-up-SHA12 beside the original and records in each run which warm-up it
started from). The aggregate (RESULTS/../quality.json and plots/quality_*.png) is recomputed
from those files alone. --quick: the tiny random pair, 2 steps, one seed (checks the
machinery; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

from switchkd.rollout.io import atomic_write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("switch-exp", "gkd", "skd", "sft", "seqkd", "switch-linear", "switch-const", "kd")
ROLLOUT_METHODS = ("seqkd", "gkd", "skd", "switch-const", "switch-linear", "switch-exp")
REFERENCE = "switch-exp"          # every method's CIs are against it
DEFAULT_SEEDS = {"switch-exp": 3, "gkd": 3, "skd": 3, "sft": 3, "seqkd": 1, "switch-linear": 1, "switch-const": 1,
                 "kd": 1}
EVAL_SEED = 0                     # one evaluation seed for every model: sampled answers are paired too
SAVE_EVERY = 10                   # checkpoint interval of a run (an interrupted run resumes from it)


def run_order(seeds: dict[str, int]) -> list[tuple[str, int]]:
    """(method, seed) in the order they run: seed 0 of every method first, then seed 1, ..."""
    return [(m, s) for s in range(max(seeds.values(), default=0)) for m in METHODS if s < seeds.get(m, 0)]


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def save_run(results: Path, name: str, report: dict, meta: dict) -> list[Path]:
    """RESULTS/runs/NAME.json (the report without its rows, plus ``meta``) and NAME.rows.jsonl.gz,
    both atomically; returns the two paths."""
    runs = results / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    summary = {**meta, **{k: v for k, v in report.items() if k != "rows"}}
    rows_path, json_path = runs / f"{name}.rows.jsonl.gz", runs / f"{name}.json"

    def write_rows(f) -> None:
        with gzip.open(f, "wt", encoding="utf-8") as text:
            for row in report["rows"]:
                text.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(rows_path, write_rows)
    write_json(summary, str(json_path), quiet=True)
    return [json_path, rows_path]


def load_run(results: Path, name: str) -> dict | None:
    """A saved run as an eval report (summary + rows), or None when it has not finished."""
    json_path, rows_path = results / "runs" / f"{name}.json", results / "runs" / f"{name}.rows.jsonl.gz"
    if not (json_path.is_file() and rows_path.is_file()):
        return None
    with gzip.open(rows_path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {**json.loads(json_path.read_text()), "rows": rows}


def weights_sha256(model_dir: str) -> str:
    """sha256 over the model's safetensors files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_runs(results: Path) -> dict[str, list[dict]]:
    """Every saved run, grouped by method (the teacher and the warm-up under their own names)."""
    runs: dict[str, list[dict]] = {}
    for path in sorted((results / "runs").glob("*.json")):
        report = load_run(results, path.stem)
        if report is not None:
            runs.setdefault(report.get("method", report["run"]), []).append(report)
    return runs


def commit(paths: list[Path], message: str, attempts: int = 5) -> None:
    """Commit ``paths`` (only them) in the repository that holds them: the study can run from a
    worktree at a fixed commit and land each result in the main checkout. A failure (another
    commit holding the index lock) is retried, then logged: it never stops the study."""
    repo = ["git", "-C", str(paths[0].resolve().parent)]
    for attempt in range(attempts):
        add = subprocess.run([*repo, "add", "--", *map(str, (p.resolve() for p in paths))], capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            [*repo, "commit", "-q", "-m", message, "--", *map(str, (p.resolve() for p in paths))],
            capture_output=True, text=True).returncode == 0
        if done:
            return
        time.sleep(2 ** attempt)
    print(f"warning: could not commit {', '.join(map(str, paths))}; commit them by hand", file=sys.stderr, flush=True)


def warmup_run_name(results: Path, sha: str, rebuilt_ok: bool) -> str:
    """The run name of the warm-up with weights ``sha``: "warm-up" for the one the saved runs
    started from (or the first). Another one is refused (its paired comparisons would compare
    students with different starting points) unless ``rebuilt_ok``: the same recipe rebuilt on
    another CPU, whose floating-point rounding gives other bits; it is then evaluated as
    "warm-up-SHA12", next to the original, so the study shows how far the rebuild moved it."""
    saved = load_run(results, "warm-up")
    if saved is None or saved.get("weights_sha256") == sha:
        return "warm-up"
    if not rebuilt_ok:
        raise SystemExit(f"quality: the warm-up has weights sha256 {sha[:12]}, the runs in {results} started from "
                         f"{saved.get('weights_sha256', '?')[:12]}; pass --warmup-from with that student, "
                         "--rebuilt-warmup to go on from this one (the same recipe built on another CPU), "
                         "or --results with a new directory")
    return f"warm-up-{sha[:12]}"


def run_study(args, base: list[str]) -> None:
    """Warm-up, teacher and warm-up evaluations, then every (method, seed) not saved yet."""
    from switchkd.cluster.config import load_config
    from switchkd.cluster.pipeline import (WARMUP_CONFIG, WARMUP_LR, eval_stage, prepare_defaults, saved_rollouts,
                                           train_stage, training_overrides)

    results, out = Path(args.results), Path(args.out)
    config = lambda method: str(REPO / "configs" / "baselines" / f"{method}.yaml")  # noqa: E731
    eval_overrides = [*base, "data.split=test", f"rollout.seed={EVAL_SEED}"]
    prepare_defaults()
    student = args.warmup_from or train_stage(
        WARMUP_CONFIG, [*base, *training_overrides(args.warmup_steps, 0, out / "warmup"), f"trainer.lr={WARMUP_LR}"],
        out / "warmup", progress=False)["export"]
    warmup_sha = weights_sha256(student)
    warmup = warmup_run_name(results, warmup_sha, args.rebuilt_warmup)
    code = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    fixed = [("teacher", load_config(config(REFERENCE), base).model.teacher), (warmup, student)]
    teacher = None
    for name, model_dir in fixed:
        if load_run(results, name) is None:
            start = time.perf_counter()
            report = eval_stage(config(REFERENCE), eval_overrides, model_dir, out / "eval" / f"{name}.json",
                                max_prompts=args.eval_prompts, teacher_report=teacher)
            paths = save_run(results, name, report, {"run": name, "eval_seconds": time.perf_counter() - start,
                                                     "code": code, "weights_sha256": weights_sha256(model_dir)})
            if args.commit:
                commit(paths, f"Quality study: {name} evaluated ({report['prompts']} test prompts)")
        teacher = teacher or load_run(results, "teacher")
    for method, seed in run_order(args.seeds):
        name = run_name(method, seed)
        if load_run(results, name) is not None:
            continue
        start, load_start = time.perf_counter(), os.getloadavg()[1]
        run_dir = out / name
        run = train_stage(config(method), [*base, *training_overrides(args.steps, seed, run_dir, student),
                                           f"trainer.save_every={SAVE_EVERY}"], run_dir, progress=False)
        train_seconds = time.perf_counter() - start
        report = eval_stage(config(method), eval_overrides, run["export"], out / "eval" / f"{name}.json",
                            saved_rollouts(run_dir) if method in ROLLOUT_METHODS else (),
                            max_prompts=args.eval_prompts, teacher_report=teacher)
        meta = {"run": name, "method": method, "seed": seed, "steps": args.steps, "config": config(method),
                "overrides": base, "code": code, "warmup_sha256": warmup_sha, "train_seconds": train_seconds,
                "wall_seconds": time.perf_counter() - start, "loadavg_5min": [load_start, os.getloadavg()[1]]}
        paths = save_run(results, name, report, meta)
        print(f"{name}: {report['greedy']['rougeL']:.2f} ROUGE-L greedy, {meta['wall_seconds'] / 60:.1f} min",
              flush=True)
        if args.commit:
            commit(paths, f"Quality study: {name}, {args.steps} steps ({meta['wall_seconds'] / 60:.0f} min)")


def aggregate(results: Path) -> dict:
    """Per method: seeds, mean and std over seeds of every metric (overall and per length bucket),
    wall time, teacher fraction, and paired bootstrap CIs of (method - SWITCH) and (method - warm-up)."""
    from switchkd.rollout.evaluation.stats import METRICS, compare

    runs = load_runs(results)
    out = {}
    for method, reports in runs.items():
        entry: dict = {"seeds": [r.get("seed") for r in reports]}
        if "wall_seconds" in reports[0]:
            entry["wall_minutes"] = _spread([r["wall_seconds"] / 60 for r in reports])
        for mode in ("greedy", "sampled"):
            if mode not in reports[0]:
                continue
            metrics = [m for m in METRICS if m in reports[0][mode]]
            entry[mode] = {m: _spread([r[mode][m] for r in reports]) for m in [*metrics, "mean_response_tokens"]}
            entry[mode]["eos_rate"] = _spread([r[mode]["finish_reasons"].get("stop", 0) / r["prompts"]
                                               for r in reports])
            entry[mode]["by_reference_length"] = {
                b: {m: _spread([r[mode]["by_reference_length"][b][m] for r in reports]) for m in metrics}
                for b in reports[0][mode]["by_reference_length"]}
        if "rollouts" in reports[0]:
            entry["teacher_fraction"] = _spread([r["rollouts"]["teacher_fraction"] for r in reports])
        for other in (REFERENCE, "warm-up"):
            if other in runs and other != method and method != "teacher":
                entry[f"vs_{other}"] = compare(runs[other], reports)
        out[method] = entry
    return out


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def plot(results: Path, out_dir: Path) -> list[str]:
    """Every metric per method by reference-length bucket (std over seeds), and the teacher
    fraction by position of the SWITCH runs."""
    from switchkd.cluster.plots import plot_by_bucket, plot_teacher_fraction

    reports = load_runs(results)
    order = [m for m in ("teacher", "warm-up", *METHODS) if m in reports]
    reports = {m: reports[m] for m in order}
    students = {m: v for m, v in reports.items() if m != "teacher"}
    paths = [plot_by_bucket(reports, out_dir / "quality_rouge_l_by_bucket.png"),
             plot_by_bucket(students, out_dir / "quality_fidelity_by_bucket.png", metric="fidelity"),
             plot_by_bucket(students, out_dir / "quality_reverse_kl_by_bucket.png", mode="sampled",
                            metric="reverse_kl"),
             plot_by_bucket(students, out_dir / "quality_teacher_nll_by_bucket.png", mode="sampled",
                            metric="teacher_nll")]
    switch = {m: [r["rollouts"] for r in reports[m]] for m in reports if m.startswith("switch")}
    if switch:
        paths.append(plot_teacher_fraction(switch, out_dir / "quality_teacher_fraction_by_position.png"))
    return [str(p) for p in paths]


TABLE_METRICS = (("greedy", "rougeL"), ("greedy", "fidelity"), ("sampled", "reverse_kl"), ("sampled", "teacher_nll"))


def table(result: dict) -> str:
    """Markdown: every metric's mean +- std over seeds per method, its difference to SWITCH with the
    paired 95% CI, and greedy ROUGE-L in the longest bucket."""
    from switchkd.rollout.evaluation.evaluate import bucket_labels

    head = ["method", "seeds", "min/run"] + [f"{mode} {metric}" for mode, metric in TABLE_METRICS] + [
        "longest bucket ROUGE-L", "EOS (greedy)", "teacher fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, e in result["methods"].items():
        cells = [method, str(len(e["seeds"])),
                 f"{e['wall_minutes']['mean']:.0f}" if "wall_minutes" in e else "-"]
        for mode, metric in TABLE_METRICS:
            s = e.get(mode, {}).get(metric)
            if s is None:
                cells.append("-")
                continue
            cell = f"{s['mean']:.3f} ± {s['std']:.3f}" if len(e["seeds"]) > 1 else f"{s['mean']:.3f}"
            ci = e.get(f"vs_{REFERENCE}", {}).get(mode, {}).get(metric, {}).get("all")
            if ci:
                mark = "*" if ci["lo"] > 0 or ci["hi"] < 0 else ""
                cell += f" ({ci['diff']:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}]{mark})"
            cells.append(cell)
        buckets = e["greedy"]["by_reference_length"]
        longest = [b for b in bucket_labels() if b in buckets][-1]   # the JSON's keys are sorted as text
        cells += [f"[{longest}] {buckets[longest]['rougeL']['mean']:.2f}", f"{e['greedy']['eos_rate']['mean']:.2f}",
                  f"{e['teacher_fraction']['mean']:.3f}" if "teacher_fraction" in e else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_seeds(items: list[str]) -> dict[str, int]:
    seeds = dict(DEFAULT_SEEDS)
    for item in items:
        method, _, n = item.partition("=")
        if method not in METHODS or not n.isdigit():
            raise SystemExit(f"--seeds {item}: expected METHOD=N with METHOD one of {', '.join(METHODS)}")
        seeds[method] = int(n)
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random pair, 2 steps, 1 seed (machinery check)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of every method (8 prompts each)")
    parser.add_argument("--seeds", nargs="*", default=[], metavar="METHOD=N",
                        help=f"seeds per method (default: {' '.join(f'{m}={n}' for m, n in DEFAULT_SEEDS.items())})")
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--warmup-from", default=None, help="an existing warmed-up student export (skips the warm-up)")
    parser.add_argument("--rebuilt-warmup", action="store_true",
                        help="go on from a warm-up whose bits differ from the saved runs' (the same recipe built on "
                             "another CPU); it is evaluated and reported beside the original")
    parser.add_argument("--eval-prompts", type=int, default=None,
                        help="a seeded sample of the test split (default: all of it)")
    parser.add_argument("--aggregate-only", action="store_true", help="train nothing: summarise the saved runs")
    parser.add_argument("--commit", action="store_true", help="git-commit each run's result files as it lands")
    parser.add_argument("--out", default="runs/quality", help="run directories (checkpoints, exports)")
    parser.add_argument("--results", default="benchmarks/results/quality",
                        help="per-run result files; the aggregate goes next to this folder")
    args = parser.parse_args()
    args.seeds = parse_seeds(args.seeds)
    base: list[str] = []
    if args.quick:
        from switchkd.rollout.models.tiny import build_tiny_models

        tiny = build_tiny_models(Path(args.out) / "tiny-models", seed=0)
        base = [f"model.teacher={tiny['teacher']}", f"model.student={tiny['student']}", "model.dtype=float32",
                "rollout.max_new_tokens=16", "trainer.batch_size=4", "trainer.micro_batch_size=2"]
        args.seeds, args.steps, args.warmup_steps, args.eval_prompts = {m: 1 for m in METHODS}, 2, 2, 8
    results = Path(args.results)
    if not args.aggregate_only:
        run_study(args, base)
    result = {"benchmark": "quality", "machine": machine_info(), "reference": REFERENCE,
              "config": {"steps": args.steps, "seeds": args.seeds, "warmup_from": args.warmup_from,
                         "eval_seed": EVAL_SEED, "eval_prompts": args.eval_prompts, "overrides": base},
              "methods": aggregate(results), "plots": plot(results, results.parent / "plots")}
    write_json(result, str(results.parent / f"{results.name}.json"), quiet=True)
    print(table(result))


if __name__ == "__main__":
    main()
