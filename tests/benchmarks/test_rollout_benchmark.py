"""The rollout benchmark's --quick mode runs and reports every figure (no timing assertions)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = ("tokens", "block_tokens_per_s", "stepwise_tokens_per_s", "hf_tokens_per_s", "floor_tokens_per_s",
        "block_over_stepwise", "floor_over_block", "block_over_hf",
        "lockstep_tokens_per_s", "floor_over_lockstep", "lockstep_over_block", "floor_teacher_drafts_over_lockstep")


def test_rollout_benchmark_quick(tmp_path):
    out = tmp_path / "rollout.json"
    res = subprocess.run([sys.executable, "benchmarks/rollout_throughput.py", "--quick", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in KEYS:
        assert result[key] > 0, key
    assert result["tokens"] == result["block"]["tokens"] > 0
    assert result["lockstep"]["tokens"] > 0 and result["lockstep"]["median_s"] > 0
    assert result["machine"]["versions"]["torch"]


@pytest.mark.parametrize("teacher", ["actor", "server"])
def test_teacher_rows_benchmark_quick(tmp_path, teacher):
    """Both kinds of teacher rows, from a Ray actor engine or a local teacher server: the same
    rollouts (tiny pair, float32), and fewer bytes with hidden states: exactly V / d_model times
    (512 / 128 on the tiny teacher) between actors; over HTTP each answer's .npz framing adds to
    both, and the JSON path costs the most."""
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "benchmarks/teacher_rows.py", "--quick", "--teacher", teacher,
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_rollouts"] is True
    if teacher == "actor":
        assert result["logprobs_over_hidden_bytes"] == 4.0
    else:
        assert result["logprobs_over_hidden_bytes"] > 2.0
        assert result["json_logprobs"]["same_rollouts_as_logprobs"] is True
        assert result["json_logprobs"]["teacher_row_bytes_per_token"] > 5 * result["logprobs"]["teacher_row_bytes_per_token"]
    for kind in ("logprobs", "hidden"):
        assert result[kind]["tokens"] > 0 and result[kind]["tokens_per_s"] > 0
