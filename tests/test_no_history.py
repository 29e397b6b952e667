"""Tracked text files state facts, not development history: no numbered work periods, no notes
about a day's machine, no commit hashes as narrative, no pointers to planning notes outside the repo."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Built from pieces so that this file does not match itself.
PATTERNS = [re.compile(p, re.I) for p in (
    "sess" + r"ion [0-9]",
    "(DESIGN|ENVIRONMENT|STYLE)" + r"\.md",
    r"\.\./" + "shared",
    "slow" + " machine",
    "machine" + " recovered",
    "earlier the" + " same day",
    "com" + "mit [0-9a-f]{7}",
)]


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    files = []
    for name in names.decode().split("\0"):
        path = REPO / name
        if not name or name.startswith("benchmarks/results/") or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" not in data[:8192]:
            files.append(path)
    return files


def test_no_development_history_in_tracked_files():
    hits = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if any(p.search(line) for p in PATTERNS):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not hits, "development history in tracked files:\n" + "\n".join(hits)
