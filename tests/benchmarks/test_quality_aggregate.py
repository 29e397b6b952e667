"""benchmarks/quality.py without models: run order, saved runs round-trip, and the aggregate
(means over seeds, paired CIs against SWITCH and the warm-up, the table) from saved files alone."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality  # noqa: E402


BUCKETS = ("0-15", "16-31", "128+")


def report(scores: list[float], shift: float = 0.0) -> dict:
    """A minimal eval report: per-prompt greedy ROUGE-L and sampled reverse KL, three buckets."""
    rows = [{"index": i, "bucket": BUCKETS[i % 3], "reference": "r", "teacher_answer": "t",
             "greedy": {"response": "x", "rougeL": s + shift, "finish_reason": "stop"},
             "sampled": {"response": "y", "reverse_kl": 2.0 - shift, "finish_reason": "length"}}
            for i, s in enumerate(scores)]

    def summary(mode, metric):
        values = [r[mode][metric] for r in rows]
        by = {b: {"prompts": 0, metric: sum(r[mode][metric] for r in rows if r["bucket"] == b)
                  / sum(r["bucket"] == b for r in rows)} for b in sorted(BUCKETS)}  # keys as JSON sorts them
        return {"temperature": 0.0 if mode == "greedy" else 0.7, metric: sum(values) / len(values),
                "mean_response_tokens": 5.0,
                "by_reference_length": by, "finish_reasons": {"stop" if mode == "greedy" else "length": len(rows)}}

    return {"prompts": len(rows), "greedy": summary("greedy", "rougeL"), "sampled": summary("sampled", "reverse_kl"),
            "rows": rows}


def test_run_order_puts_every_method_of_seed_0_first():
    order = quality.run_order({"switch-exp": 3, "gkd": 2, "seqkd": 1})
    assert order == [("switch-exp", 0), ("gkd", 0), ("seqkd", 0), ("switch-exp", 1), ("gkd", 1), ("switch-exp", 2)]


def test_saved_runs_round_trip_and_aggregate_from_files(tmp_path):
    results = tmp_path / "quality"
    scores = [float(i % 7) for i in range(40)]
    quality.save_run(results, "warm-up", report(scores), {"run": "warm-up"})
    for seed in range(2):
        quality.save_run(results, f"switch-exp-seed{seed}", report(scores, 1.0 + seed),
                         {"run": f"switch-exp-seed{seed}", "method": "switch-exp", "seed": seed, "wall_seconds": 60.0})
        quality.save_run(results, f"gkd-seed{seed}", report(scores, 0.5),
                         {"run": f"gkd-seed{seed}", "method": "gkd", "seed": seed, "wall_seconds": 120.0})
    loaded = quality.load_run(results, "gkd-seed1")
    assert loaded["rows"] == report(scores, 0.5)["rows"] and loaded["seed"] == 1
    assert quality.load_run(results, "skd-seed0") is None
    assert not list(results.rglob("*.tmp"))

    methods = quality.aggregate(results)
    switch, gkd = methods["switch-exp"], methods["gkd"]
    assert switch["seeds"] == [0, 1] and switch["wall_minutes"]["mean"] == 1.0
    assert switch["greedy"]["rougeL"]["mean"] == pytest.approx(sum(scores) / 40 + 1.5)
    assert switch["greedy"]["rougeL"]["std"] == pytest.approx(2 ** -0.5)
    assert switch["greedy"]["eos_rate"]["mean"] == 1.0 and switch["greedy"]["mean_response_tokens"]["mean"] == 5.0
    ci = gkd["vs_switch-exp"]["greedy"]["rougeL"]["all"]
    assert ci["n"] == 40 and ci["diff"] == pytest.approx(-1.0) and ci["lo"] <= -0.5 and ci["hi"] >= -1.5
    assert gkd["vs_warm-up"]["sampled"]["reverse_kl"]["all"]["diff"] == pytest.approx(-0.5)
    assert set(gkd["vs_switch-exp"]["greedy"]["rougeL"]) == {"all", *BUCKETS}
    assert "vs_switch-exp" not in switch
    text = quality.table({"methods": methods})
    assert "| gkd | 2 | 2 |" in text and "(-1.00 [" in text
    assert "| [128+] " in text       # the longest bucket by length, not the last key in text order


def test_a_rebuilt_warmup_is_refused_unless_asked_for_then_reported_beside_the_original(tmp_path):
    results = tmp_path / "quality"
    assert quality.warmup_run_name(results, "a" * 64, rebuilt_ok=False) == "warm-up"   # the first one
    quality.save_run(results, "warm-up", report([1.0, 2.0, 3.0, 4.0]), {"run": "warm-up", "weights_sha256": "a" * 64})
    assert quality.warmup_run_name(results, "a" * 64, rebuilt_ok=False) == "warm-up"
    with pytest.raises(SystemExit, match="--rebuilt-warmup"):
        quality.warmup_run_name(results, "b" * 64, rebuilt_ok=False)
    name = quality.warmup_run_name(results, "b" * 64, rebuilt_ok=True)
    assert name == "warm-up-" + "b" * 12
    quality.save_run(results, name, report([1.0, 2.0, 3.0, 4.0], 0.25), {"run": name, "weights_sha256": "b" * 64})
    rebuilt = quality.aggregate(results)[name]   # its own row, compared with the original warm-up
    assert rebuilt["vs_warm-up"]["greedy"]["rougeL"]["all"]["diff"] == pytest.approx(0.25)
