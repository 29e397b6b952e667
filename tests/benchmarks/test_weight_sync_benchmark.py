"""The weight-sync benchmark's --quick mode runs both transports and reports every figure
(structure and sanity only: no timing assertions)."""
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAT_KEYS = ("min_s", "median_s", "max_s", "repeats")
PHASES = {"shm": ("write", "load", "prune"), "collective": ("broadcast_load",)}
RATIOS = ("shm_over_memcpy", "collective_over_memcpy", "shm_over_engine_reload", "collective_over_engine_reload",
          "shm_over_file", "collective_over_file", "shm_over_collective")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_stats(s: dict, repeats: int, what: str) -> None:
    assert set(STAT_KEYS) <= set(s), what
    assert s["repeats"] == repeats, what
    assert all(_positive(s[k]) for k in ("min_s", "median_s", "max_s")), (what, s)
    assert s["min_s"] <= s["median_s"] <= s["max_s"], (what, s)


def test_weight_sync_benchmark_quick(tmp_path):
    out = tmp_path / "weight_sync.json"
    res = subprocess.run([sys.executable, "benchmarks/weight_sync.py", "--quick", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "weight_sync" and result["machine"]["versions"]["torch"]
    assert result["config"]["sizes"] == ["tiny"] and result["config"]["quick"] is True
    repeats = result["config"]["repeats"]
    assert repeats == 2
    assert result["correct"] is True
    (size,) = result["sizes"]
    assert size["size"] == "tiny" and size["bytes"] > 0 and size["params"] > 0

    seen_versions = []
    for transport, phases in PHASES.items():
        t = size["transports"][transport]
        assert set(t["phases"]) == set(phases), transport
        for phase, s in t["phases"].items():
            _check_stats(s, repeats, f"{transport}.{phase}")
        _check_stats(t["total"], repeats, f"{transport}.total")
        assert _positive(t["gb_per_s"])
        # the phases add up to the total, sample by sample, so their medians bracket it
        assert t["total"]["max_s"] >= max(s["max_s"] for s in t["phases"].values())
        assert len(t["versions"]) == repeats and t["versions"] == sorted(t["versions"])
        seen_versions += t["versions"]
    _check_stats(size["transports"]["shm"]["detail"]["checksum"], repeats, "shm.checksum")
    _check_stats(size["transports"]["collective"]["detail"]["sender"], repeats, "collective.sender")
    assert size["transports"]["shm"]["file_bytes"] >= size["bytes"]
    # every timed sync was a new version, and the engine ends on the last one
    assert len(set(seen_versions)) == 2 * repeats and min(seen_versions) > 0
    assert size["final_version"] == max(seen_versions)

    for floor in ("memcpy", "engine_reload"):
        _check_stats({k: size["floors"][floor][k] for k in STAT_KEYS}, repeats, floor)
    _check_stats(size["floors"]["safetensors_file"]["total"], repeats, "safetensors_file")
    for key in ("ratios", "ratios_min"):
        assert set(RATIOS) <= set(size[key]) and all(_positive(size[key][r]) for r in RATIOS), key

    corr = size["correctness"]
    assert corr["ok"] is True
    for transport in PHASES:
        c = corr[transport]
        assert c["ok"] is True and c["engine_version"] == c["version"] == size["transports"][transport]["versions"][-1]
        assert c["max_abs_logprob_diff"] <= c["tolerance"] and c["changed_by"] > c["max_abs_logprob_diff"]
    assert size["tied_lm_head_repack"] is None  # the tiny model is untied

    (row,) = result["table"]
    assert row["size"] == "tiny" and row["correct"] is True
    assert all(_positive(row[k]) for k in ("shm_s", "collective_s", "memcpy_s", "engine_reload_s", "file_s"))
