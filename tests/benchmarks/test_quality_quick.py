"""benchmarks/quality.py --quick (make test-slow): every method trains and is evaluated on the
tiny pair; each run's files land as they finish, a second call runs nothing again, and the
aggregate (means, CIs against SWITCH, plots) comes from the saved files alone."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
METHODS = ["sft", "kd", "seqkd", "gkd", "skd", "switch-const", "switch-linear", "switch-exp"]


def quality(tmp_path, *args):
    return subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--out", str(tmp_path / "runs"),
                           "--results", str(tmp_path / "results" / "quality"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=3600)


@pytest.mark.slow
def test_quality_quick_covers_every_method(tmp_path):
    res = quality(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert sorted(result["methods"]) == sorted(["teacher", "warm-up", *METHODS])
    for method in METHODS:
        entry = result["methods"][method]
        assert entry["seeds"] == [0] and len(entry["greedy"]["rougeL"]["values"]) == 1, method
        assert ("teacher_fraction" in entry) == (method in ("seqkd", "gkd", "skd") or method.startswith("switch"))
        assert set(entry["sampled"]) >= {"rougeL", "teacher_nll", "reverse_kl", "eos_rate"}
        if method != "switch-exp":
            ci = entry["vs_switch-exp"]["sampled"]["reverse_kl"]["all"]
            assert ci["n"] == 8 and ci["lo"] <= ci["diff"] <= ci["hi"]
    assert result["methods"]["seqkd"]["teacher_fraction"]["mean"] == 1.0     # the teacher writes every token
    assert result["methods"]["gkd"]["teacher_fraction"]["mean"] == 0.0       # the student writes every token
    assert all(Path(p).is_file() for p in result["plots"]) and len(result["plots"]) == 5
    assert "| switch-exp |" in res.stdout
    with gzip.open(tmp_path / "results" / "quality" / "runs" / "gkd-seed0.rows.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 8 and {"index", "reference", "teacher_answer", "greedy", "sampled"} <= set(rows[0])

    again = quality(tmp_path)                       # everything saved: nothing trains or evaluates again
    assert again.returncode == 0 and "ROUGE-L greedy" not in again.stdout
    assert json.loads((tmp_path / "results" / "quality.json").read_text())["methods"] == result["methods"]
