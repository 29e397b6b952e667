"""benchmarks/quality.py --quick (make test-slow): every method trains and is evaluated on the
tiny pair; the JSON aggregates each method over seeds and the plots are written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quality_quick_covers_every_method(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--out", str(tmp_path / "runs"),
                          "--json", str(tmp_path / "quality.json")], cwd=REPO, capture_output=True, text=True,
                         timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    assert sorted(result["methods"]) == sorted(["warm-up", "sft", "kd", "seqkd", "gkd", "skd", "switch-const",
                                                "switch-linear", "switch-exp"])
    for method, entry in result["methods"].items():
        assert entry["seeds"] == [0] and len(entry["greedy"]["rougeL"]["values"]) == 1, method
        assert ("teacher_fraction" in entry) == (method in ("seqkd", "gkd", "skd") or method.startswith("switch"))
    assert result["methods"]["seqkd"]["teacher_fraction"]["mean"] == 1.0     # the teacher writes every token
    assert result["methods"]["gkd"]["teacher_fraction"]["mean"] == 0.0       # the student writes every token
    assert all(Path(p).is_file() for p in result["plots"]) and len(result["plots"]) == 3
    assert "| switch-exp |" in res.stdout
