"""README's headline table is what benchmarks/run.py renders from the committed suite.json."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import run  # noqa: E402


def test_readme_headline_matches_the_committed_results():
    summary = json.loads((REPO / "benchmarks" / "results" / "suite.json").read_text())
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert run.HEADLINE_BEGIN in readme and run.HEADLINE_END in readme
    block = readme.split(run.HEADLINE_BEGIN, 1)[1].split(run.HEADLINE_END, 1)[0]
    assert block == "\n" + run.render_headline(summary) + "\n", (
        "README.md's headline table differs from benchmarks/results/suite.json: regenerate it with "
        "`python benchmarks/run.py --report-only`")
