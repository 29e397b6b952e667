"""run.py's report (headline, tables, plots) still renders result files from before lockstep was measured."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import run  # noqa: E402


def _timing(tokens, seconds, **extra):
    return {"tokens": tokens, "min_s": seconds, "median_s": seconds, "max_s": seconds, "repeats": 1,
            "tokens_per_s": tokens / seconds, **extra}


def _old_scaling_row(batch, length, tau0=0.4, stepwise=False):
    block = _timing(batch * length, 0.02 * length, teacher_fraction=0.5, engine_calls_per_generate=4)
    row = {"batch": batch, "length": length, "tau0": tau0, "block": block, "floor": _timing(batch * length, 0.01 * length)}
    row["floor_over_block"] = row["floor"]["tokens_per_s"] / block["tokens_per_s"]
    if stepwise:
        row["stepwise"] = _timing(batch * length, 0.1 * length)
        row["block_over_stepwise"] = block["tokens_per_s"] / row["stepwise"]["tokens_per_s"]
    return row


def test_report_renders_results_without_lockstep(tmp_path):
    rollout = {"config": {"prompts": 4, "max_new_tokens": 16}, "block": {"teacher_fraction": 0.5},
               **{f"{m}_tokens_per_s": 100.0 for m in ("block", "stepwise", "hf", "floor")},
               "floor_over_block": 1.0, "block_over_stepwise": 2.0, "block_over_hf": 3.0}
    scaling = {"config": {"repeats": 1, "sweeps": {"tau0": {"batch": 2, "length": 8}}},
               "length": [_old_scaling_row(2, 8), _old_scaling_row(2, 16)],
               "batch": [_old_scaling_row(1, 8), _old_scaling_row(2, 8)],
               "tau0": [_old_scaling_row(2, 8, t, stepwise=True) for t in (0.0, 0.7)]}
    (tmp_path / "rollout_tiny.json").write_text(json.dumps(rollout))
    (tmp_path / "scaling_rollout.json").write_text(json.dumps(scaling))

    head = run.headline(tmp_path)
    target = head["targets"]["rollout_floor_over_lockstep_every_length"]
    assert target["value"] is None and target["met"] is None          # listed, unmeasured
    assert "lockstep_tokens_per_s" not in head["figures"]["rollout_tiny"]
    assert head["figures"]["scaling_rollout"]["floor_over_lockstep_by_length"] == {8: None, 16: None}

    plots = run.draw_all(tmp_path)
    assert {p.name for p in plots} >= {"rollout_methods.png", "scaling_rollout_length.png", "scaling_rollout_tau0.png"}
    summary = {"machine": {"platform": "test", "cpus": 1, "python": "3", "versions": {}}, "jobs": {},
               "plots": [], **head}
    text = run.render_tables(tmp_path, summary)
    assert "| rollout_floor_over_lockstep_every_length |" in text and "lockstep tok/s" in text
    assert "| tiny | 4 x 16 | - | - | - | 100 |" in text   # no tau0 recorded, no lockstep, no lockstep inline
