"""`switchkd pipeline` (what `make run` runs): the default job from nothing to a report.

    prepare models + data  ->  warm-up (SFT) of the layer-dropped student  ->  SWITCH distillation
    from the warmed-up student (with an SFT term, DISTIL_SFT_RATIO)  ->  ROUGE-L on the held-out test split (teacher, student before and
    after distillation)  ->  table (stdout + summary.json) and plots

Both training stages are `switchkd train` runs of a config in configs/baselines/ (one code path:
the SFT stage is the reference-source loop with trainer.sft_ratio=1). An untrained layer-dropped
student is gibberish and the teacher would own ~every token, so the warm-up is not optional (the
SWITCH paper and DistiLLM also start from an SFT student).

Each stage writes its result to OUT/<stage>/result.json atomically when it is complete; running the
pipeline again with the same --out skips the complete stages (a crashed run continues where it
stopped). benchmarks/quality.py reuses these stages for every baseline.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from switchkd.cluster.config import ConfigError, load_config
from switchkd.rollout.evaluation.stats import METRICS, compare
from switchkd.rollout.evaluation.evaluate import write_report

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
WARMUP_CONFIG = str(REPO / "configs" / "baselines" / "sft.yaml")
DISTIL_CONFIG = str(REPO / "configs" / "baselines" / "switch-exp.yaml")
# The warm-up takes a layer-dropped student from gibberish to fluent: a higher LR than the baselines'.
WARMUP_LR = 3e-4
# Distillation keeps an SFT term on the references: loss = (1 - r) SWITCH + r NLL(reference).
# Pure SWITCH (r = 0) turns this student's greedy answers into newline loops that never stop
# (docs/quality.md, benchmarks/collapse.py); the term keeps them ending with EOS.
DISTIL_SFT_RATIO = 0.5
# The summary's primary metric: the reverse KL from the student to the teacher on the student's own
# samples, the quantity on-policy distillation minimises (ROUGE-L against the default data's
# references has little headroom: docs/quality.md).
PRIMARY = ("sampled", "reverse_kl")


def prepare_defaults(models_dir: str = "models", data_path: str = "data/default.jsonl") -> None:
    """The default teacher/student pair and data set (both cached: seconds when already there)."""
    from switchkd.rollout.data.prompts import prepare_default_data
    from switchkd.rollout.models.real import prepare_default_models

    prepare_default_models(models_dir)
    prepare_default_data(data_path)


def training_overrides(steps: int, seed: int, out_dir: Path, student: str | None = None) -> list[str]:
    """Config overrides shared by every training stage: budget, seeds, output, starting student."""
    overrides = [f"trainer.max_steps={steps}", f"trainer.warmup_steps={max(1, steps // 10)}",
                 f"trainer.seed={seed}", f"rollout.seed={seed}", f"trainer.output_dir={out_dir}"]
    return overrides + ([f"model.student={student}"] if student else [])


def train_stage(config: str, overrides: list[str], out_dir: Path, progress: bool = True) -> dict:
    """One closed-loop training run: skipped when OUT_DIR/result.json says it is complete, resumed
    from its last checkpoint when it was interrupted."""
    done = _load_result(out_dir)
    if done is not None:
        if (done.get("config"), done.get("overrides")) != (config, overrides):
            raise ConfigError(f"{out_dir}: holds a complete run of {done.get('config')} with other settings "
                              f"({done.get('overrides')}); use another output directory")
        log.info("%s: complete, skipped (%s)", out_dir, done.get("export"))
        return done
    from switchkd.cluster.driver import train
    from switchkd.trainer.checkpoint import latest_checkpoint

    cfg = load_config(config, overrides)
    resume = latest_checkpoint(cfg.trainer.output_dir) is not None   # an interrupted stage continues
    result = {"config": config, "overrides": overrides, **train(cfg, resume=resume, progress=progress)}
    _save_result(out_dir, result)
    return result


def eval_stage(config: str, overrides: list[str], model_dir: str, out_json: Path, rollouts: list[str] = (),
               max_prompts: int | None = None, teacher_report: dict | None = None) -> dict:
    """`switchkd eval` of ``model_dir`` on the config's data split (skipped when OUT_JSON exists);
    ``teacher_report``, an eval of the same prompts, lends its teacher answers."""
    if out_json.is_file():
        return json.loads(out_json.read_text())
    from switchkd.rollout.evaluation.evaluate import rollout_teacher_fraction, run_eval, teacher_answers_of

    cfg = load_config(config, overrides)
    report = run_eval(cfg.model, cfg.data, cfg.rollout, model_dir, max_prompts=max_prompts,
                      teacher_answers=teacher_answers_of(teacher_report) if teacher_report else None)
    if rollouts:
        report["rollouts"] = rollout_teacher_fraction(list(rollouts))
    write_report(report, out_json)
    return report


def run_pipeline(out: Path, warmup_steps: int, distil_steps: int, eval_prompts: int, seed: int = 0,
                 distil_config: str | None = None, overrides: list[str] = (), prepare: bool = True,
                 progress: bool = True, sft_ratio: float = DISTIL_SFT_RATIO) -> dict:
    """Run every stage into ``out``; returns the summary (also written to OUT/summary.json).
    ``overrides`` apply to every stage (e.g. other models or data); ``prepare`` builds the default
    models and data first; ``sft_ratio`` is the distillation stage's trainer.sft_ratio (0 = pure SWITCH)."""
    from switchkd.cluster.plots import plot_by_bucket, plot_loss, plot_teacher_fraction, plot_timeline

    out, distil_config, overrides = Path(out), distil_config or DISTIL_CONFIG, list(overrides)
    teacher = load_config(distil_config, overrides).model.teacher   # a bad config fails before any training
    if prepare:
        prepare_defaults()
    log.info("stage 1/3: SFT warm-up of the student, %d steps -> %s", warmup_steps, out / "warmup")
    warm = train_stage(WARMUP_CONFIG, [*overrides, *training_overrides(warmup_steps, seed, out / "warmup"),
                                       f"trainer.lr={WARMUP_LR}"], out / "warmup", progress)
    log.info("stage 2/3: distillation (%s, SFT term %g), %d steps -> %s", Path(distil_config).stem, sft_ratio,
             distil_steps, out / "distil")
    distil = train_stage(distil_config, [*overrides, *training_overrides(distil_steps, seed, out / "distil",
                                                                         warm["export"]),
                                         f"trainer.sft_ratio={sft_ratio}"], out / "distil", progress)
    eval_overrides = [*overrides, "data.split=test", f"rollout.seed={seed}"]
    rollouts = saved_rollouts(out / "distil")
    models = {"teacher": teacher, "student before (warm-up)": warm["export"],
              "student after (SWITCH)": distil["export"]}
    reports: dict[str, dict] = {}
    log.info("stage 3/3: evaluation of the teacher and the student before and after, %d test prompts -> %s",
             eval_prompts, out / "eval")
    for name, path in models.items():
        reports[name] = eval_stage(distil_config, eval_overrides, path, out / "eval" / f"{_slug(name)}.json",
                                   rollouts if "after" in name else (), eval_prompts, reports.get("teacher"))
    plots = out / "plots"
    plot_loss({"warm-up (SFT)": out / "warmup" / "metrics.jsonl", "SWITCH": out / "distil" / "metrics.jsonl"},
              plots / "loss.png")
    plot_teacher_fraction({"SWITCH rollouts": reports["student after (SWITCH)"]["rollouts"]},
                          plots / "teacher_fraction_by_position.png")
    plot_timeline(out / "distil" / "metrics.jsonl", plots / "timeline.png")
    students = {k: v for k, v in reports.items() if k != "teacher"}
    plot_by_bucket(reports, plots / "rouge_l_before_after.png")
    plot_by_bucket(students, plots / "reverse_kl_before_after.png", mode="sampled", metric="reverse_kl")
    before, after = reports["student before (warm-up)"], reports["student after (SWITCH)"]
    summary = {"out": str(out), "seed": seed, "warmup_steps": warmup_steps, "distil_steps": distil_steps,
               "distil_config": distil_config, "sft_ratio": sft_ratio, "eval_prompts": after["prompts"],
               "teacher_fraction": after["rollouts"]["teacher_fraction"],
               "scores": {name: {mode: {m: r[mode][m] for m in METRICS if m in r[mode]}
                                 for mode in ("greedy", "sampled") if mode in r} for name, r in reports.items()},
               "eos_rate": {name: {mode: r[mode]["finish_reasons"].get("stop", 0) / r["prompts"]
                                   for mode in ("greedy", "sampled") if mode in r} for name, r in reports.items()},
               "after_vs_before": compare([before], [after], by_bucket=False),
               "plots": sorted(str(p) for p in plots.glob("*.png"))}
    mode, metric = PRIMARY
    ci, higher = summary["after_vs_before"][mode][metric]["all"], METRICS[metric][1]
    summary["primary"] = {"mode": mode, "metric": metric, "before": before[mode][metric], "after": after[mode][metric],
                          "diff": ci["diff"], "lo": ci["lo"], "hi": ci["hi"],
                          "improved": bool(ci["lo"] > 0 if higher else ci["hi"] < 0)}
    write_report(summary, out / "summary.json")
    return summary


def saved_rollouts(run_dir: Path) -> list[str]:
    """The rollout Parquet files a training stage saved (RUN_DIR/rollouts/step_N.parquet), in order."""
    return sorted(str(p) for p in (Path(run_dir) / "rollouts").glob("step_*.parquet"))


def summary_lines(summary: dict) -> list[str]:
    """The table of a pipeline summary: every metric for teacher / before / after, and the paired
    95% CI of after - before."""
    names = list(summary["scores"])
    lines = [f"{'mode':<8} {'metric':<36} " + " ".join(f"{n[:24]:>24}" for n in names) + "  after - before [95% CI]"]
    for mode, metrics in summary["after_vs_before"].items():
        for metric, entry in metrics.items():
            label, higher = METRICS[metric]
            e = entry["all"]
            mark = " *" if e["lo"] > 0 or e["hi"] < 0 else ""
            values = " ".join(f"{summary['scores'][n][mode].get(metric, float('nan')):>24.3f}" for n in names)
            lines.append(f"{mode:<8} {label:<36} {values}  {e['diff']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]{mark}")
        eos = " ".join(f"{summary['eos_rate'][n][mode]:>24.2f}" for n in names)
        lines.append(f"{mode:<8} {'answers ending with EOS':<36} {eos}")
    lines.append(f"{summary['eval_prompts']} test prompts; * = the CI excludes 0 "
                 f"(higher is better for ROUGE-L and fidelity, lower for the teacher NLL and reverse KL)")
    p = summary["primary"]
    verdict = "better, the CI excludes 0" if p["improved"] else "not shown better (the CI includes 0 or is worse)"
    lines.append(f"primary metric, {p['mode']} {METRICS[p['metric']][0]}: warm-up {p['before']:.3f} -> "
                 f"SWITCH {p['after']:.3f}, {p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]: {verdict}")
    lines.append(f"teacher-token fraction of the SWITCH rollouts: {summary['teacher_fraction']:.3f}")
    lines.append("plots: " + ", ".join(summary["plots"]))
    return lines


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _load_result(out_dir: Path) -> dict | None:
    path = Path(out_dir) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _save_result(out_dir: Path, result: dict) -> None:
    write_report(result, Path(out_dir) / "result.json")
