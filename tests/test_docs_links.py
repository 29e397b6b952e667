"""Every relative link of the docs (README.md, BENCHMARKS.md, docs/*.md) points at a file in the repo."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    missing = []
    for doc in [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not path or re.match(r"[a-z]+:", path):   # an anchor in the page, or http(s): / mailto:
                continue
            if not (doc.parent / path).exists():
                missing.append(f"{doc.relative_to(REPO)}: {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)
