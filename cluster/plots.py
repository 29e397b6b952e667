"""PNG plots of runs and evaluations (matplotlib, no display needed): loss curves, the
teacher-token fraction by response position, ROUGE-L by reference-length bucket, the step timeline."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from switchkd.rollout.io import atomic_write


def plot_loss(metrics: dict[str, Path], out: Path) -> Path:
    """Training loss per step of each run's metrics.jsonl, one curve per label."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, path in metrics.items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    return _save(fig, ax, out)


def plot_teacher_fraction(by_label: dict[str, dict], out: Path) -> Path:
    """Teacher-token fraction by response-position bucket; values are rollout_teacher_fraction dicts
    (or lists of them: mean and spread over seeds)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, value in by_label.items():
        runs = value if isinstance(value, list) else [value]
        buckets = list(runs[0]["teacher_fraction_by_position"])
        mean, err = _mean_err([[r["teacher_fraction_by_position"].get(b, float("nan")) for b in buckets] for r in runs])
        ax.errorbar(range(len(buckets)), mean, yerr=err if len(runs) > 1 else None, marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(buckets)), buckets, rotation=30)
    ax.set(xlabel="response position (tokens)", ylabel="teacher-token fraction", ylim=(0, 1),
           title="teacher interventions by position")
    return _save(fig, ax, out)


def plot_by_bucket(reports: dict[str, dict | list[dict]], out: Path, mode: str = "greedy",
                   metric: str = "rougeL") -> Path:
    """Grouped bars: ``metric`` per reference-length bucket (and overall) for each label's eval
    report(s); several reports per label (seeds) give mean and standard-deviation error bars."""
    from switchkd.rollout.evaluation.stats import METRICS
    from switchkd.rollout.evaluation.evaluate import bucket_labels

    labels = list(reports)
    present = {b for runs in reports.values() for r in (runs if isinstance(runs, list) else [runs])
               for b in r[mode]["by_reference_length"]}
    buckets = ["all", *(b for b in bucket_labels() if b in present)]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.25 * len(buckets) * len(labels))), 3.8))
    for i, label in enumerate(labels):
        runs = reports[label] if isinstance(reports[label], list) else [reports[label]]
        values = [[r[mode].get(metric, float("nan")),
                   *(r[mode]["by_reference_length"].get(b, {}).get(metric, float("nan")) for b in buckets[1:])]
                  for r in runs]
        mean, err = _mean_err(values)
        ax.bar([x + i * width for x in range(len(buckets))], mean, width, yerr=err if len(runs) > 1 else None,
               capsize=2, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(buckets))], buckets)
    label, higher = METRICS[metric]
    ax.set(xlabel="reference length (tokens)", ylabel=f"{label} ({mode})",
           title=f"{label}, {mode}, test split ({'higher' if higher else 'lower'} is better)")
    return _save(fig, ax, out)


def plot_rouge_by_method(reports: dict[str, list[dict]], out: Path) -> Path:
    """ROUGE-L per label, greedy and sampled, mean over its reports (seeds) with std error bars."""
    labels, modes = list(reports), ("greedy", "sampled")
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 3.8))
    for i, mode in enumerate(modes):
        stats = [_mean_err([[r[mode]["rougeL"]] for r in reports[label] if mode in r]) for label in labels]
        ax.bar([x + i * 0.4 for x in range(len(labels))], [m[0] for m, _ in stats], 0.4,
               yerr=[e[0] for _, e in stats], capsize=3, label=mode)
    ax.set_xticks([x + 0.2 for x in range(len(labels))], labels, rotation=30)
    ax.set(ylabel="ROUGE-L", title="ROUGE-L on the test split (mean, std over seeds)")
    return _save(fig, ax, out)


def _mean_err(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    import numpy as np

    values = np.asarray(rows, dtype=float)
    return list(np.nanmean(values, 0)), list(np.nanstd(values, 0))


def _save(fig, ax, out: Path) -> Path:
    """Write the figure atomically (a crash never leaves half a PNG)."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return out


TIMELINE_PHASES = ("rollout", "train", "sync_write", "sync_load")


def timeline_summary(rows: list[dict]) -> dict:
    """From metrics.jsonl rows with t_PHASE_start / t_PHASE_end: seconds per phase, the wall time,
    and how much of the rollout time ran while the trainer trained (hidden by the overlap)."""
    spans = {p: [(r[f"t_{p}_start"], r[f"t_{p}_end"]) for r in rows if f"t_{p}_start" in r] for p in TIMELINE_PHASES}
    hidden = sum(max(0.0, min(e, te) - max(s, ts)) for s, e in spans["rollout"] for ts, te in spans["train"])
    rollout = sum(e - s for s, e in spans["rollout"])
    ends = [e for phase in spans.values() for _, e in phase]
    starts = [s for phase in spans.values() for s, _ in phase]
    return {"steps": len(rows), "wall_seconds": max(ends) - min(starts) if ends else 0.0,
            **{f"{p}_seconds": sum(e - s for s, e in spans[p]) for p in TIMELINE_PHASES},
            "rollout_hidden_seconds": hidden, "rollout_hidden_fraction": hidden / rollout if rollout else 0.0}


def plot_timeline(metrics: Path | list[dict], out: Path, max_steps: int = 30, title: str = "step timeline") -> Path:
    """One lane per phase (rollout, train, sync write, sync load) over wall time for the first
    ``max_steps`` steps of a run's metrics.jsonl (or its rows): where the phases overlap and what
    is on the critical path."""
    if not isinstance(metrics, list):
        metrics = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    rows = metrics[:max_steps]
    summary = timeline_summary(rows)
    fig, ax = plt.subplots(figsize=(10, 2.8))
    for lane, phase in enumerate(TIMELINE_PHASES):
        bars = [(r[f"t_{phase}_start"], r[f"t_{phase}_end"] - r[f"t_{phase}_start"]) for r in rows
                if f"t_{phase}_start" in r]
        ax.broken_barh(bars, (lane - 0.4, 0.8), color=f"C{lane}", edgecolor="white", linewidth=0.5,
                       label=phase.replace("_", " "))
    ax.set_yticks(range(len(TIMELINE_PHASES)), [p.replace("_", " ") for p in TIMELINE_PHASES])
    ax.invert_yaxis()
    ax.set(xlabel="seconds since the loop started",
           title=f"{title}, {len(rows)} steps: {summary['rollout_hidden_fraction']:.0%} of the rollout time "
                 f"overlaps training")
    return _save(fig, ax, out)
