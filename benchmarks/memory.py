"""Peak memory of each role of a real `switchkd train` run against the estimate of `switchkd plan`.

    python benchmarks/memory.py [--config configs/tiny.yaml] [--steps 6] [--json out.json] [overrides ...]

Runs `switchkd train` for --steps steps and samples, every 0.2 s, the peak resident set (VmHWM)
of every process of the run (and what they held at once: their anonymous memory summed, and the
machine's used memory): the driver, each trainer rank (ray::TrainWorker), the student
engine (ray::StudentEngine, or ray::PairEngine in lockstep mode) and the teacher engine
(ray::TeacherEngine, or lockstep's teacher process). Ray's own daemons are not counted. The
estimate (cluster/memory.py) is computed for the run's longest row (prompt + response, read from
its saved rollouts) instead of the config's worst case, so that the two are comparable; the
ratio estimate / measured is printed per role, and --tolerance (default 0.25) is the bound the
estimate is held to. Exit status 1 when a role is outside it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROLES = (("ray::TrainWorker", "trainer rank 0"), ("ray::PairEngine", "student engine"),
         ("ray::StudentEngine", "student engine"), ("ray::TeacherEngine", "teacher engine"),
         ("lockstep_process", "teacher engine"))


def role_of(cmdline: str) -> str | None:
    return next((role for marker, role in ROLES if marker in cmdline), None)


def status_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and RssAnon (anonymous memory now) of ``pid`` in KiB (0 when it is gone)."""
    out = {"VmHWM": 0, "RssAnon": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def run_and_sample(cmd: list[str], interval: float = 0.2) -> tuple[dict[str, int], dict[str, int]]:
    """Run ``cmd`` (exit when it fails): (the peak resident bytes per role over its process tree
    (the highest process of a role when several hold it), what the roles held at once: the peak
    of their anonymous memory summed at each sample and the peak growth of the machine's used
    memory (total - available) over its level before the run)."""
    def used() -> int:
        memory = psutil.virtual_memory()
        return memory.total - memory.available

    before = used()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peaks, together = psutil.Process(proc.pid), {}, {"anonymous_sum": 0, "machine_used_growth": 0}
    while proc.poll() is None:
        try:
            members = [(root, "driver")] + [(p, role_of(" ".join(p.cmdline()))) for p in root.children(recursive=True)]
        except psutil.Error:
            members = [(root, "driver")]
        anonymous = 0
        for process, role in members:
            if role is not None:
                status = status_kib(process.pid)
                peaks[role] = max(peaks.get(role, 0), status["VmHWM"] * 1024)
                anonymous += status["RssAnon"] * 1024
        together["anonymous_sum"] = max(together["anonymous_sum"], anonymous)
        together["machine_used_growth"] = max(together["machine_used_growth"], used() - before)
        time.sleep(interval)
    if proc.returncode != 0:
        sys.exit(f"memory: {' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return peaks, together


def longest_row(run_dir: Path) -> int:
    lengths = [len(p) + len(r) for f in sorted((run_dir / "rollouts").glob("step_*.parquet"))
               for p, r in zip(*pq.read_table(f, columns=["prompt_ids", "response_ids"]).to_pydict().values())]
    return max(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tolerance", type=float, default=0.25)
    parser.add_argument("--json", default=None)
    parser.add_argument("--out", help="the run's output directory, kept (default: a temporary one)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from switchkd.cluster.config import load_config
    from switchkd.cluster.memory import GIB, estimate_memory
    from switchkd.cluster.placement import plan_placement

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.out) if args.out else Path(tmp) / "run"
        overrides = [*args.overrides, f"trainer.max_steps={args.steps}", f"trainer.output_dir={run_dir}",
                     "loop.save_rollouts=true", "trainer.tensorboard=false"]
        measured, together = run_and_sample([sys.executable, "-m", "switchkd.cluster.cli", "train", "--config", args.config,
                                      *overrides])
        tokens = longest_row(run_dir)
    cfg = load_config(args.config, overrides)
    estimates = {r.role: r for r in estimate_memory(cfg, plan_placement(cfg), tokens_per_row=tokens)}
    roles = {}
    for role, peak in sorted(measured.items()):
        estimate = estimates[role].total
        roles[role] = {"measured_gib": peak / GIB, "estimate_gib": estimate / GIB, "ratio": estimate / peak,
                       "parts_gib": {k: v / GIB for k, v in estimates[role].parts.items()}}
    within = all(abs(r["ratio"] - 1) <= args.tolerance for r in roles.values())
    # The plan's sum against what the run held at once: per-role peaks need not coincide.
    together = {"plan_total_gib": sum(r.total for r in estimates.values()) / GIB,
                "sum_of_role_peaks_gib": sum(measured.values()) / GIB,
                **{f"{k}_peak_gib": v / GIB for k, v in together.items()}}
    write_json({"benchmark": "memory", "machine": machine_info(), "config": args.config, "overrides": overrides,
                "longest_row_tokens": tokens, "tolerance": args.tolerance, "within_tolerance": within,
                "roles": roles, "together": together}, args.json)
    for role, r in roles.items():
        print(f"{role:<16} measured {r['measured_gib']:.2f} GiB, estimate {r['estimate_gib']:.2f} GiB "
              f"(x{r['ratio']:.2f})", file=sys.stderr)
    print("together: " + ", ".join(f"{k} {v:.2f}" for k, v in together.items()), file=sys.stderr)
    sys.exit(0 if within else 1)


if __name__ == "__main__":
    main()
