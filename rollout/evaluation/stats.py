"""Statistics over per-prompt evaluation scores: seeded prompt samples, paired bootstrap CIs,
and the comparison of two `switchkd eval` reports (``switchkd eval --compare A.json B.json``).

Every metric of an eval report is a per-prompt value, so two models evaluated on the same
prompts are compared *paired*: the difference is taken prompt by prompt and the prompts are
resampled together. With several seeds per model (several trained students), each bootstrap
resample also redraws the seeds of each model, so the interval covers training noise as well
as the choice of prompts.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

# name -> (label, higher is better). The order is the report's.
METRICS = {
    "rougeL": ("ROUGE-L vs reference", True),
    "fidelity": ("ROUGE-L vs teacher's greedy answer", True),
    "teacher_nll": ("teacher NLL per token", False),
    "reverse_kl": ("reverse KL estimate per token", False),
}
BOOTSTRAP_RESAMPLES = 10_000


def seeded_sample(items: Sequence, n: int | None, seed: int) -> list:
    """``n`` items drawn without replacement by ``seed`` (all when n is None or >= len), in their
    original order: the same seed and items give the same sample on every machine."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def paired_bootstrap(a, b, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Mean of b - a and its percentile bootstrap CI, for scores of the same N prompts.

    ``a`` and ``b`` are [N] (one run each) or [S, N] (S seeds; the seed counts may differ).
    Each resample draws N prompt indices with replacement (shared by a and b) and, for each
    side, S seed indices with replacement; the statistic is mean(b) - mean(a) over them.
    Prompts whose score is NaN in any run of either side are dropped first (counted in ``n``).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores need the same prompts: {a.shape[1]} vs {b.shape[1]}")
    keep = ~(np.isnan(a).any(0) | np.isnan(b).any(0))
    a, b = a[:, keep], b[:, keep]
    n = a.shape[1]
    if n == 0:
        return {"n": 0, "mean_a": math.nan, "mean_b": math.nan, "diff": math.nan, "lo": math.nan, "hi": math.nan,
                "n_to_decide": None}
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, n, size=(resamples, n))
    stats = _resampled_means(b, prompts, rng) - _resampled_means(a, prompts, rng)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    diff = float(b.mean() - a.mean())
    return {"n": int(n), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "diff": diff,
            "lo": float(lo), "hi": float(hi), "n_to_decide": prompts_to_decide(n, diff, (hi - lo) / 2)}


def prompts_to_decide(n: int, diff: float, half_width: float) -> int | None:
    """Prompts at which an interval of this kind would just exclude 0 for a difference of ``diff``:
    the half-width shrinks as 1/sqrt(prompts), so n (half_width / |diff|)^2. It assumes the
    per-prompt spread stays as measured; seed-to-seed noise does not shrink with more prompts, so
    with several seeds it is a lower bound. None when the difference is 0."""
    if diff == 0 or not math.isfinite(diff) or not math.isfinite(half_width):
        return None
    return max(1, math.ceil(n * (half_width / abs(diff)) ** 2 - 1e-9))


def _resampled_means(x: np.ndarray, prompts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mean over (resampled seeds, resampled prompts) of x [S, N], one per resample."""
    per_seed_prompt = x[:, prompts]                                   # [S, R, N]
    per_seed = per_seed_prompt.mean(-1)                               # [S, R]
    if x.shape[0] == 1:
        return per_seed[0]
    seeds = rng.integers(0, x.shape[0], size=(prompts.shape[0], x.shape[0]))   # [R, S]
    return np.take_along_axis(per_seed.T, seeds, axis=1).mean(1)


def prompt_scores(reports: Sequence[dict], mode: str, metric: str) -> tuple[list[int], np.ndarray]:
    """(prompt indices, scores [S, N]) of ``metric`` in ``mode`` over the runs ``reports``,
    restricted to the prompts every run evaluated (matched by prompt index)."""
    maps = [{row["index"]: row[mode].get(metric, math.nan) for row in r["rows"] if mode in row} for r in reports]
    common = sorted(set.intersection(*(set(m) for m in maps)))
    return common, np.array([[m[i] if m[i] is not None else math.nan for i in common] for m in maps], dtype=np.float64)


def compare(a: Sequence[dict], b: Sequence[dict], *, by_bucket: bool = True) -> dict:
    """Paired comparison of runs ``b`` against runs ``a`` (eval reports, one per seed): per mode,
    per metric, overall and by reference-length bucket: {"n", "mean_a", "mean_b", "diff", "lo", "hi"}."""
    out: dict = {}
    for mode in ("greedy", "sampled"):
        if not all(mode in r["rows"][0] for r in (*a, *b)):
            continue
        out[mode] = {}
        for metric in METRICS:
            if not all(metric in r["rows"][0][mode] for r in (*a, *b)):
                continue
            index_a, sa = prompt_scores(a, mode, metric)
            index_b, sb = prompt_scores(b, mode, metric)
            common = sorted(set(index_a) & set(index_b))
            sa, sb = sa[:, [index_a.index(i) for i in common]], sb[:, [index_b.index(i) for i in common]]
            entry = {"all": paired_bootstrap(sa, sb)}
            if by_bucket:
                bucket_of = {row["index"]: row["bucket"] for row in a[0]["rows"]}
                for bucket in dict.fromkeys(bucket_of[i] for i in common):
                    cols = [j for j, i in enumerate(common) if bucket_of[i] == bucket]
                    entry[bucket] = paired_bootstrap(sa[:, cols], sb[:, cols])
            out[mode][metric] = entry
    return out


def compare_lines(result: dict, name_a: str, name_b: str) -> list[str]:
    """The comparison as a table: one line per mode, metric and bucket; * marks a CI without 0."""
    lines = [f"B = {name_b} vs A = {name_a}: paired bootstrap 95% CI of mean(B) - mean(A) over the same prompts",
             f"{'mode':<8} {'metric':<36} {'bucket':<8} {'n':>4} {'A':>8} {'B':>8} {'B - A':>8}  95% CI  "
             "(prompts for a CI that excludes 0 at this difference)"]
    for mode, metrics in result.items():
        for metric, entries in metrics.items():
            label, higher = METRICS[metric]
            for bucket, e in entries.items():
                mark = "*" if e["n"] and (e["lo"] > 0 or e["hi"] < 0) else " "
                better = "" if not mark.strip() else (" (B better)" if (e["diff"] > 0) == higher else " (A better)")
                need = "" if mark.strip() or e.get("n_to_decide") is None else f" (~{e['n_to_decide']} prompts)"
                lines.append(f"{mode:<8} {label:<36} {bucket:<8} {e['n']:>4} {e['mean_a']:>8.3f} {e['mean_b']:>8.3f} "
                             f"{e['diff']:>+8.3f}  [{e['lo']:+.3f}, {e['hi']:+.3f}]{mark}{better}{need}")
    return lines
