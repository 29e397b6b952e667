"""The benchmark suite: rollout, trainer, weight sync, end to end vs TRL, scaling; JSON + PNG plots.

    python benchmarks/run.py                      # everything (make bench; ~25 min on 2 CPU cores)
    python benchmarks/run.py --quick              # every part on tiny sizes, seconds-to-minutes, no targets
    python benchmarks/run.py --only rollout --models default --json out.json

Each part runs as its own subprocess (a vLLM CPU engine pins the torch threads of its process,
so parts must not share one), writing benchmarks/results/<name>.json:

    rollout   rollout_throughput.py  -> rollout_<pair>.json     lockstep / block / stepwise / HF / floor
    trainer   trainer_throughput.py  -> trainer.json            DeepSpeed ZeRO 1-3 vs a plain loop
              trainer_throughput.py --size smollm2 -> trainer_smollm2.json   the default student, phases
    sync      weight_sync.py         -> weight_sync.json        shm / collective vs model size
    e2e       e2e.py                 -> e2e_<pair>.json         closed loop SWITCH + GKD vs TRL GKDTrainer
    trl       e2e.py --methods trl   -> trl_gkd_<pair>.json     TRL alone (e2e already includes it)
    scaling   scaling.py             -> scaling_rollout.json, scaling_trainer.json
    gpu       trainer_throughput.py --device cuda (fp32, bf16), scaling.py trainer --device cuda
              -> trainer_gpu_fp32.json, trainer_gpu_bf16.json, scaling_trainer_gpu.json

`gpu` runs only when asked for (`--only gpu`, on a machine with a CUDA GPU: nccl + DeepSpeed
ZeRO on the device). Its figures are reported in a section of their own and never enter the
CPU targets; a CPU `make bench` keeps the GPU result files it finds.

then draws every plot it has data for into <results>/plots/ (from the JSON files present, so
`--only` refreshes its own plots and keeps the others) and writes <results>/suite.json: the
machine, each part's command, exit status and wall seconds, the headline figures and whether
each target is met. --json also writes suite.json's content there. A full run into
benchmarks/results (and --report-only) also rewrites the tables of BENCHMARKS.md and the headline
table of README.md.

--models: tiny = the tiny random pair everywhere; smollm2 = the SmolLM2-135M pair for the
parts that take a pair (rollout, e2e); default = tiny everywhere plus SmolLM2 for the rollout.
Weight-sync and scaling runs use their own fixed model sizes, the trainer too (plus the SmolLM2
student unless --models tiny). --quick forces tiny,
writes to a fresh temporary directory unless --results-dir is given, and checks no target.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from common import machine_info, write_json  # noqa: E402

PARTS = ("rollout", "trainer", "sync", "e2e", "scaling", "trl", "gpu")
GPU_RESULTS = ("trainer_gpu_fp32", "trainer_gpu_bf16", "scaling_trainer_gpu")
# The rollout target is judged on rollout.mode's default, lockstep (block is shown beside it).
# The end-to-end targets are judged on each pair that has a result (the SmolLM2 one only after
# `run.py --only e2e --models smollm2`); keys without a pair suffix are the tiny pair's.
E2E_TARGETS = {"e2e_switch_over_trl_distill": (">=", 2.0), "e2e_switch_over_trl_gkd": (">=", 4.0),
               "e2e_training_over_trl": (">=", 1.2)}
TARGETS = {**E2E_TARGETS, **{f"{k}_smollm2": v for k, v in E2E_TARGETS.items()},
           "rollout_floor_over_lockstep_every_length": ("<=", 1.5), "trainer_zero1_over_plain": (">=", 0.9),
           "trainer_zero0_over_plain_smollm2": (">=", 0.95)}


@dataclass
class Job:
    part: str
    name: str                      # the result file's stem
    argv: list[str]
    outputs: list[str] = field(default_factory=list)


def pairs(models: str, part: str) -> list[str]:
    if models == "default":
        return ["tiny", "smollm2"] if part == "rollout" else ["tiny"]
    return [models]


def plan(args, out: Path) -> list[Job]:
    py, quick = sys.executable, ["--quick"] if args.quick else []
    jobs = []
    for part in args.only:
        if part == "rollout":
            for pair in pairs(args.models, part):
                # SmolLM2 (vocab 49,152) at 16 x 64: the stepwise baseline alone is ~30 s a call here.
                size = ["--prompts", "16", "--max-new-tokens", "64", "--repeats", "2"] if pair == "smollm2" else []
                jobs.append(Job(part, f"rollout_{pair}", [py, str(HERE / "rollout_throughput.py"), "--models", pair,
                                                          *(quick or size), "--json", str(out / f"rollout_{pair}.json")]))
        elif part == "trainer":
            jobs.append(Job(part, "trainer", [py, str(HERE / "trainer_throughput.py"), *quick,
                                              "--json", str(out / "trainer.json")]))
            if not args.quick and args.models != "tiny":   # the default pair's student, rows like its rollouts
                jobs.append(Job(part, "trainer_smollm2", [py, str(HERE / "trainer_throughput.py"), "--size", "smollm2",
                                                          "--json", str(out / "trainer_smollm2.json")]))
        elif part == "sync":
            jobs.append(Job(part, "weight_sync", [py, str(HERE / "weight_sync.py"), *(quick or ["--repeats", "3"]),
                                                  "--json", str(out / "weight_sync.json")]))
        elif part in ("e2e", "trl"):
            for pair in pairs(args.models, part):
                name = f"e2e_{pair}" if part == "e2e" else f"trl_gkd_{pair}"
                methods = ["--methods", "trl"] if part == "trl" else []
                jobs.append(Job(part, name, [py, str(HERE / "e2e.py"), "--models", pair, *quick, *methods,
                                             "--json", str(out / f"{name}.json")]))
        elif part == "scaling":
            for sweep in ("rollout", "trainer"):
                jobs.append(Job(part, f"scaling_{sweep}", [py, str(HERE / "scaling.py"), sweep, *quick,
                                                           "--json", str(out / f"scaling_{sweep}.json")]))
        elif part == "gpu":
            for precision in ("fp32", "bf16"):
                name = f"trainer_gpu_{precision}"
                jobs.append(Job(part, name, [py, str(HERE / "trainer_throughput.py"), *quick, "--device", "cuda",
                                             "--precision", precision, "--json", str(out / f"{name}.json")]))
            jobs.append(Job(part, "scaling_trainer_gpu", [py, str(HERE / "scaling.py"), "trainer", *quick, "--device",
                                                          "cuda", "--precision", "bf16",
                                                          "--json", str(out / "scaling_trainer_gpu.json")]))
    return jobs


def run_jobs(jobs: list[Job], parallel: int, logs: Path) -> dict:
    """Run the jobs, ``parallel`` at a time; {name: {command, returncode, seconds, log_tail?}}."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))}
    pending, running, status = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            log = open(logs / f"{job.name}.log", "w")
            print(f"bench: {job.name}: {' '.join(Path(a).name if a.startswith('/') else a for a in job.argv[1:])}",
                  flush=True)
            running[job.name] = (job, subprocess.Popen(job.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                                       env=env), log, time.perf_counter())
        time.sleep(0.2)
        for name, (job, proc, log, start) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            seconds = time.perf_counter() - start
            entry = {"command": " ".join([Path(job.argv[0]).name, *[os.path.relpath(a, REPO) if a.startswith("/")
                                                                      else a for a in job.argv[1:]]]),
                     "returncode": proc.returncode, "seconds": round(seconds, 1)}
            if proc.returncode != 0:
                entry["log_tail"] = (logs / f"{name}.log").read_text()[-4000:]
                print(f"bench: {name} FAILED (exit {proc.returncode}) after {seconds:.0f} s:\n{entry['log_tail']}",
                      file=sys.stderr, flush=True)
            else:
                print(f"bench: {name} done in {seconds:.0f} s", flush=True)
            status[name] = entry
            del running[name]
    return status


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _rates(e2e: dict, method: str) -> dict:
    """samples/s of one e2e method over the timed window, at its median step and at its fastest step."""
    res, batch = e2e["methods"][method], e2e["config"]["batch_size"]
    return {"window": res["samples_per_s"], "median_step": batch / res["step_s"]["median_s"],
            "fastest_step": batch / res["step_s"]["min_s"]}


def _best_floor_over(row: dict, mode: str = "block") -> float | None:
    """floor tokens/s over ``mode``'s tokens/s, each from its fastest call; None when the row has no ``mode``
    (a result file from before lockstep was measured)."""
    if mode not in row:
        return None
    return (row["floor"]["tokens"] / row["floor"]["min_s"]) / (row[mode]["tokens"] / row[mode]["min_s"])


def _growth(row: dict, prev: dict | None, mode: str, key: str) -> float | None:
    """How much ``mode``'s median time grew from ``prev`` over how much the work (``key``) grew."""
    if prev is None or mode not in row or mode not in prev:
        return None
    return (row[mode]["median_s"] / prev[mode]["median_s"]) / (row[key] / prev[key])


def headline(out: Path) -> dict:
    """The figures BENCHMARKS.md quotes, from the result files present, and the targets."""
    h, targets = {}, {}
    for pair in ("tiny", "smollm2"):
        if r := load(out, f"rollout_{pair}"):
            h[f"rollout_{pair}"] = {k: r[k] for k in ("lockstep_tokens_per_s", "lockstep_inline_tokens_per_s",
                                                      "lockstep_over_lockstep_inline", "block_tokens_per_s",
                                                      "stepwise_tokens_per_s", "hf_tokens_per_s", "floor_tokens_per_s",
                                                      "floor_over_lockstep", "lockstep_over_block", "floor_over_block",
                                                      "block_over_stepwise", "block_over_hf") if k in r}
            h[f"rollout_{pair}"]["teacher_fraction"] = r["block"]["teacher_fraction"]
    if r := load(out, "scaling_rollout"):
        h["scaling_rollout"] = {f"{name}_by_{sweep}": {row[sweep]: row.get(name) for row in r[sweep]}
                                for name in ("floor_over_lockstep", "floor_over_block") for sweep in ("length", "batch")}
        for mode in ("lockstep", "block"):
            h["scaling_rollout"][f"best_floor_over_{mode}_by_length"] = {row["length"]: _best_floor_over(row, mode)
                                                                         for row in r["length"]}
        h["scaling_rollout"]["tau0"] = [{"tau0": row["tau0"], "teacher_fraction": row["block"]["teacher_fraction"],
                                         **{k: row.get(k) for k in ("block_over_stepwise", "lockstep_over_block",
                                                                    "floor_over_lockstep", "floor_over_block")}}
                                        for row in r["tau0"]]
        # Fastest calls: on a shared machine other people's load only ever slows a call down. A result file
        # from before lockstep was measured has no lockstep rows: the target is listed, unmeasured (None).
        best = [_best_floor_over(row, "lockstep") for row in r["length"]]
        targets["rollout_floor_over_lockstep_every_length"] = None if None in best else max(best)
    for name in ("trainer", "trainer_smollm2", "trainer_gpu_fp32", "trainer_gpu_bf16"):
        if r := load(out, name):
            h[name] = {"plain_tokens_per_s": r["plain"]["tokens_per_s"],
                       **{k: {"tokens_per_s": v["tokens_per_s"], "ratio_vs_plain": v["ratio_vs_plain"]}
                          for k, v in r["deepspeed"].items()}}
            if "phase_seconds" in r["plain"]:
                h[name]["plain_phase_seconds"] = r["plain"]["phase_seconds"]
            if name.startswith("trainer_gpu"):  # GPU figures: named by their card; no CPU target reads them
                h[name]["gpu"] = r["machine"].get("gpu", {}).get("name")
    if (r := load(out, "trainer")) and "deepspeed_zero1_workers1" in r["deepspeed"]:
        targets["trainer_zero1_over_plain"] = r["deepspeed"]["deepspeed_zero1_workers1"]["ratio_vs_plain"]
    if (r := load(out, "trainer_smollm2")) and "deepspeed_zero0_workers1" in r["deepspeed"]:
        targets["trainer_zero0_over_plain_smollm2"] = r["deepspeed"]["deepspeed_zero0_workers1"]["ratio_vs_plain"]
    for name in ("scaling_trainer", "scaling_trainer_gpu"):
        if r := load(out, name):
            h[name] = {row["length"]: {"plain": row["plain"]["tokens_per_s"],
                                       "zero1": row["deepspeed_zero1"]["tokens_per_s"],
                                       "ratio": row["ratio_vs_plain"]} for row in r["lengths"]}
    if r := load(out, "weight_sync"):
        h["weight_sync"] = {row["size"]: {k: row[k] for k in ("bytes", "shm_s", "collective_s", "engine_reload_s",
                                                              "memcpy_s")} for row in r["table"]}
    for pair in ("tiny", "smollm2"):
        if r := load(out, f"e2e_{pair}"):
            h[f"e2e_{pair}"] = {name: {"samples_per_s": m["samples_per_s"], "tokens_per_s": m["tokens_per_s"],
                                       "training_tokens_per_s": m["phases"]["training_tokens_per_s"]}
                                for name, m in r["methods"].items()}
            h[f"e2e_{pair}"]["dtype"] = r["config"]["dtype"]
            h[f"e2e_{pair}"]["ratios"] = r.get("ratios", {})
            # e2e.py judges its own run (e2e.targets); the suite names each by its pair.
            suffix = "" if pair == "tiny" else f"_{pair}"
            targets.update({f"e2e_{k}{suffix}": t["value"] for k, t in r.get("targets", {}).items()})
            if peers := [m["phases"]["training_tokens_per_s"] for p, m in r["methods"].items()
                         if p in ("trl_gkd", "trl_distill")]:
                h[f"e2e_{pair}"]["trl_training_tokens_per_s"] = max(peers)
    checked = {}
    for key, value in targets.items():
        op, bound = TARGETS[key]
        checked[key] = {"value": value, "required": f"{op} {bound}",
                        "met": None if value is None else value >= bound if op == ">=" else value <= bound}
    return {"figures": h, "targets": checked}


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _bars(ax, labels, values, title, ylabel, log=False):
    bars = ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)


def draw_all(out: Path) -> list[Path]:
    """Every plot the result files in ``out`` allow, as PNGs in out/plots/."""
    plt, plots = _pyplot(), out / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    rollouts = {pair: r for pair in ("tiny", "smollm2") if (r := load(out, f"rollout_{pair}"))}
    if rollouts:
        fig, axes = plt.subplots(1, len(rollouts), figsize=(5 * len(rollouts), 4), squeeze=False)
        for ax, (pair, r) in zip(axes[0], rollouts.items()):
            c = r["config"]
            methods = [m for m in ("lockstep", "lockstep_inline", "block", "stepwise", "hf", "floor")
                       if f"{m}_tokens_per_s" in r]
            _bars(ax, [{"hf": "HF reference", "lockstep_inline": "lockstep\ninline"}.get(m, m) for m in methods], [r[f"{m}_tokens_per_s"] for m in methods],
                  f"rollout, {pair}: {c['prompts']} x {c['max_new_tokens']} tokens", "tokens/s (median)")
        made.append(_save(fig, plots / "rollout_methods.png"))
    for name in ("trainer", "trainer_gpu_fp32", "trainer_gpu_bf16"):
        if r := load(out, name):
            names = ["plain"] + list(r["deepspeed"])
            values = [r["plain"]["tokens_per_s"]] + [v["tokens_per_s"] for v in r["deepspeed"].values()]
            fig, ax = plt.subplots(figsize=(7, 4))
            _bars(ax, [n.replace("deepspeed_", "").replace("_workers", " w") for n in names], values,
                  f"trainer: plain PyTorch loop vs DeepSpeed{_where(r)}", "response tokens/s (median step)")
            made.append(_save(fig, plots / f"{name}.png"))
    if r := load(out, "weight_sync"):
        rows = r["table"]
        x = [row["bytes"] / 2**20 for row in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("shm_s", "shm transport"), ("collective_s", "collective (gloo)"),
                           ("engine_reload_s", "floor: engine reload"), ("file_s", "floor: safetensors file"),
                           ("memcpy_s", "floor: memcpy")):
            ax.plot(x, [row[key] for row in rows], marker="o", label=label, linestyle="-" if "floor" not in label else ":")
        for xi, row in zip(x, rows):
            ax.annotate(row["size"], (xi, row["shm_s"]), fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="student weights (MiB)", ylabel="seconds per sync (median)",
               title="weight sync latency vs model size")
        ax.legend(fontsize=8)
        made.append(_save(fig, plots / "weight_sync_size.png"))
    for pair in ("tiny", "smollm2"):
        r = load(out, f"e2e_{pair}")
        if not r or not r["methods"]:
            continue
        names = list(r["methods"])
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        _bars(axes[0], names, [r["methods"][n]["samples_per_s"] for n in names],
              f"end to end, {pair}: samples/s", "samples/s (excl. start-up)")
        _bars(axes[1], names, [r["methods"][n]["phases"]["generation_tokens_per_s"] for n in names],
              "generation phase", "tokens/s", log=True)
        _bars(axes[2], names, [r["methods"][n]["phases"]["training_tokens_per_s"] for n in names],
              "training phase", "tokens/s", log=True)
        made.append(_save(fig, plots / f"e2e_{pair}.png"))
        if "t_train_start" in r["methods"].get("switchkd_switch", {}).get("metrics", [{}])[0]:
            from switchkd.cluster.plots import plot_timeline

            made.append(plot_timeline(r["methods"]["switchkd_switch"]["metrics"], plots / f"e2e_timeline_{pair}.png",
                                      title=f"SWITCH closed loop, {pair} pair"))
    if r := load(out, "scaling_rollout"):
        for sweep, key, label in (("length", "length", "response length (tokens)"),
                                  ("batch", "batch", "batch (prompts)")):
            rows = r[sweep]
            x = [row[key] for row in rows]
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            lockstep = all("lockstep" in row for row in rows)
            if lockstep:
                axes[0].plot(x, [row["lockstep"]["tokens_per_s"] for row in rows], marker="D", label="lockstep SWITCH")
            axes[0].plot(x, [row["block"]["tokens_per_s"] for row in rows], marker="o", label="block SWITCH")
            axes[0].plot(x, [row["floor"]["tokens_per_s"] for row in rows], marker="s", label="floor")
            axes[0].set(xscale="log", xlabel=label, ylabel="tokens/s (median)", title=f"rollout tokens/s vs {sweep}")
            axes[0].set_xticks(x, [str(v) for v in x])
            axes[0].legend()
            if lockstep:
                axes[1].plot(x, [row["floor_over_lockstep"] for row in rows], marker="D", color="C0",
                             label="floor / lockstep, median calls")
                axes[1].plot(x, [_best_floor_over(row, "lockstep") for row in rows], marker="d", color="C2",
                             label="floor / lockstep, fastest calls")
            axes[1].plot(x, [row["floor_over_block"] for row in rows], marker="o", color="C3",
                         label="floor / block, median calls")
            axes[1].plot(x, [_best_floor_over(row) for row in rows], marker="v", color="C4",
                         label="floor / block, fastest calls")
            axes[1].axhline(1.5, linestyle=":", color="grey", label="target 1.5")
            axes[1].set(xscale="log", xlabel=label, ylabel="floor tokens/s / SWITCH tokens/s", title="gap to the floor")
            axes[1].set_xticks(x, [str(v) for v in x])
            axes[1].legend()
            made.append(_save(fig, plots / f"scaling_rollout_{sweep}.png"))
        rows = sorted(r["tau0"], key=lambda row: row["block"]["teacher_fraction"])
        frac = [row["block"]["teacher_fraction"] for row in rows]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for mode, marker in (("lockstep", "D"), ("block", "o"), ("stepwise", "^"), ("floor", "s")):
            if all(mode in row for row in rows):
                axes[0].plot(frac, [row[mode]["tokens_per_s"] for row in rows], marker=marker, label=mode)
        for f, row in zip(frac, rows):
            axes[0].annotate(f"tau0={row['tau0']:g}", (f, row["block"]["tokens_per_s"]), fontsize=7)
        axes[0].set(xlabel="teacher-token fraction", ylabel="tokens/s (median)", title="rollout vs teacher fraction")
        axes[0].legend()
        axes[1].plot(frac, [row["block_over_stepwise"] for row in rows], marker="o", label="block / stepwise")
        axes[1].plot(frac, [row["floor_over_block"] for row in rows], marker="s", label="floor / block")
        if all("lockstep" in row for row in rows):
            axes[1].plot(frac, [row["floor_over_lockstep"] for row in rows], marker="D", label="floor / lockstep")
            axes[1].plot(frac, [row["lockstep_over_block"] for row in rows], marker="d", label="lockstep / block")
        axes[1].set(xlabel="teacher-token fraction", ylabel="ratio", title="speed-up and gap vs teacher fraction")
        axes[1].legend()
        made.append(_save(fig, plots / "scaling_rollout_tau0.png"))
    for name, png in (("scaling_trainer", "scaling_trainer_length"), ("scaling_trainer_gpu", "scaling_trainer_gpu")):
        if r := load(out, name):
            rows = r["lengths"]
            x = [row["length"] for row in rows]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(x, [row["plain"]["tokens_per_s"] for row in rows], marker="o", label="plain PyTorch loop")
            ax.plot(x, [row["deepspeed_zero1"]["tokens_per_s"] for row in rows], marker="s", label="DeepSpeed ZeRO-1")
            ax.set(xscale="log", xlabel="response length (tokens)", ylabel="response tokens/s (median step)",
                   title=f"trainer tokens/s vs sequence length{_where(r)}")
            ax.set_xticks(x, [str(v) for v in x])
            ax.legend()
            made.append(_save(fig, plots / f"{png}.png"))
    return made


def _where(r: dict) -> str:
    """A title suffix for a GPU result: its card and precision (CPU results get none)."""
    gpu = r["machine"].get("gpu")
    return f"\n{gpu['name']}, {r.get('precision', 'fp32')}" if r.get("device") == "cuda" and gpu else ""


# ---------------------------------------------------------------- tables (BENCHMARKS.md)

BEGIN, END = "<!-- bench:tables:begin -->", "<!-- bench:tables:end -->"
HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
# Rollout runs made by hand (see BENCHMARKS.md) that the rollout table shows beside make bench's.
ROLLOUT_EXTRAS = {"rollout_smollm2_warm": "smollm2, warmed-up student", "rollout_smollm2_32x128": "smollm2",
                  "rollout_qwen_coder": "qwen-coder"}
# End-to-end runs made by hand (see BENCHMARKS.md), tabled after make bench's.
E2E_EXTRAS = {"e2e_smollm2_bf16": "smollm2 pair", "e2e_smollm2_untrained": "smollm2 pair"}


def _f(x, digits=3) -> str:
    """A table cell: numbers to ``digits`` significant digits, "-" for a value the result file lacks."""
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) else str(x)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_f(c) for c in row) + " |" for row in rows), ""]


def render_tables(out: Path, summary: dict) -> str:
    """The generated part of BENCHMARKS.md: every table, from the result files in ``out``."""
    m = summary["machine"]
    lines = [f"Generated by `benchmarks/run.py` on {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "; "
             + ("wall time per part: " + ", ".join(f"{name} {job['seconds']:.0f} s" for name, job in summary["jobs"].items())
                + "." if summary["jobs"] else
                "redrawn with `--report-only` from the result files present (each records its machine, "
                "configuration and load)."),
             "", "**Targets**:", ""]
    lowest = "the lowest of the window, median-step and fastest-step ratios"
    training = "SWITCH's training-phase tokens/s over the faster TRL trainer's"
    how = {"e2e_switch_over_trl_gkd": f"tiny pair, SWITCH vs TRL GKDTrainer; {lowest}",
           "e2e_switch_over_trl_distill": f"tiny pair, SWITCH vs TRL DistillationTrainer; {lowest}",
           "e2e_training_over_trl": f"tiny pair; {training}",
           "e2e_switch_over_trl_gkd_smollm2": f"SmolLM2 pair, SWITCH vs TRL GKDTrainer; {lowest}",
           "e2e_switch_over_trl_distill_smollm2": f"SmolLM2 pair, SWITCH vs TRL DistillationTrainer; {lowest}",
           "e2e_training_over_trl_smollm2": f"SmolLM2 pair; {training}",
           "trainer_zero0_over_plain_smollm2": "ZeRO-0 (the default), 1 worker, the SmolLM2 student; median of "
                                               "per-round time ratios",
           "rollout_floor_over_lockstep_every_length": "scaling sweep, lockstep (the default mode); the worst "
                                                       "length, fastest calls",
           "trainer_zero1_over_plain": "ZeRO-1, 1 worker; median of per-round time ratios"}
    lines += _table(["target", "taken as", "required", "measured", "met"],
                    [[k, how.get(k, ""), t["required"], t["value"], {True: "yes", False: "**no**"}.get(t["met"], "-")]
                     for k, t in summary["targets"].items()])
    for result, label in (("e2e_tiny", "tiny pair"), ("e2e_smollm2", "smollm2 pair"), *E2E_EXTRAS.items()):
        r = load(out, result)
        if not r or not r["methods"]:
            continue
        c = r["config"]
        student = "warmed-up student" if c.get("student") and "warmup" in c["student"] else "prepared student"
        label += f", {student}, {c['dtype']}" if c["models"] != "tiny" else ""
        lines += [f"**End to end, {label}** ({c['steps']} updates of {c['batch_size']} prompts, max_new_tokens "
                  f"{c['max_new_tokens']}, {c['warmup_steps']} warm-up updates excluded; load average "
                  f"{r['machine']['load_avg_1m_at_start']:.1f} at start, {r['machine']['load_avg_1m_at_end']:.1f} "
                  "at end):", ""]
        rows = []
        order = ("switchkd_switch", "switchkd_gkd", "trl_distill", "trl_gkd")

        def over(name, peer, rates):
            if peer not in r["methods"] or name == peer:
                return "-"
            return " / ".join(_f(a / b) for a, b in zip(rates.values(), _rates(r, peer).values()))

        for name, res in sorted(r["methods"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9):
            ph = res["phases"]
            rates = _rates(r, name)
            rows.append([name, rates["window"], rates["median_step"], rates["fastest_step"], res["tokens_per_s"],
                         res["tokens_per_s"] / res["samples_per_s"], res["step_s"]["median_s"],
                         f"{_f(res['step_s']['min_s'])} / {_f(res['step_s']['max_s'])}",
                         ph["generation_tokens_per_s"], ph["training_tokens_per_s"],
                         res.get("teacher_fraction", "-"), res.get("startup_s", "-"),
                         over(name, "trl_distill", rates), over(name, "trl_gkd", rates),
                         "{:.1f} / {:.1f}".format(*res["load_avg_1m"].values()) if "load_avg_1m" in res else "-"])
        lines += _table(["method", "samples/s (window)", "samples/s (median step)", "samples/s (fastest step)",
                         "tokens/s (window)", "tokens per sample", "step s (median)", "step s (min / max)",
                         "generation tok/s", "training tok/s", "teacher fraction", "start-up s",
                         "x DistillationTrainer (window / median / fastest)",
                         "x GKDTrainer (window / median / fastest)",
                         "load avg before / after"],
                        rows)
    rollouts = [(pair, r) for pair in ("tiny", "smollm2") if (r := load(out, f"rollout_{pair}"))]
    rollouts += [(label, r) for name, label in ROLLOUT_EXTRAS.items() if (r := load(out, name))]
    if rollouts:
        lines += ["**Rollout** (`rollout_throughput.py`; tokens/s of the median call):", ""]
        lines += _table(["pair", "prompts x tokens", "tau0", "lockstep", "lockstep, teacher inline", "block",
                         "stepwise", "HF reference", "floor", "floor / lockstep", "mirror floor / lockstep",
                         "floor / block", "lockstep / block", "block / stepwise", "block / HF", "teacher fraction"],
                        [[pair, f"{r['config']['prompts']} x {r['config']['max_new_tokens']}", r["config"].get("tau0"),
                          r.get("lockstep_tokens_per_s"), r.get("lockstep_inline_tokens_per_s"),
                          r["block_tokens_per_s"], r["stepwise_tokens_per_s"],
                          r["hf_tokens_per_s"], r["floor_tokens_per_s"], r.get("floor_over_lockstep"),
                          r.get("floor_teacher_drafts_over_lockstep"),
                          r["floor_over_block"], r.get("lockstep_over_block"), r["block_over_stepwise"],
                          r["block_over_hf"], r["block"]["teacher_fraction"]] for pair, r in rollouts])
    if r := load(out, "scaling_rollout"):
        for sweep, key in (("length", "length"), ("batch", "batch")):
            lines += [f"**Rollout vs {sweep}** (tiny pair, EOS ignored, tau0 0.4, {r['config']['repeats']} timed calls "
                      "per point after one warm-up call):", ""]
            rows, prev = [], None
            for row in r[sweep]:
                rows.append([row["batch"], row["length"], row.get("lockstep", {}).get("tokens_per_s"),
                             row["block"]["tokens_per_s"], row["floor"]["tokens_per_s"], row.get("floor_over_lockstep"),
                             _best_floor_over(row, "lockstep"), row["floor_over_block"], _best_floor_over(row),
                             row["block"]["teacher_fraction"], row["block"]["engine_calls_per_generate"],
                             _growth(row, prev, "lockstep", key), _growth(row, prev, "block", key)])
                prev = row
            lines += _table(["batch", "length", "lockstep tok/s", "block tok/s", "floor tok/s", "floor / lockstep",
                             "floor / lockstep (fastest calls)", "floor / block", "floor / block (fastest calls)",
                             "teacher fraction", "engine calls (block)", "time growth / work growth (lockstep)",
                             "time growth / work growth (block)"], rows)
        t = r["config"]["sweeps"]["tau0"]
        lines += [f"**Teacher fraction and the block-speculative speed-up** (tiny pair, batch {t['batch']} x "
                  f"{t['length']} tokens):", ""]
        lines += _table(["tau0", "teacher fraction", "lockstep tok/s", "block tok/s", "stepwise tok/s", "floor tok/s",
                         "lockstep / block", "block / stepwise", "floor / lockstep", "floor / block",
                         "engine calls (block)"],
                        [[row["tau0"], row["block"]["teacher_fraction"], row.get("lockstep", {}).get("tokens_per_s"),
                          row["block"]["tokens_per_s"], row["stepwise"]["tokens_per_s"], row["floor"]["tokens_per_s"],
                          row.get("lockstep_over_block"), row["block_over_stepwise"], row.get("floor_over_lockstep"),
                          row["floor_over_block"], row["block"]["engine_calls_per_generate"]] for row in r["tau0"]])
    if r := load(out, "trainer"):
        lines += _trainer_table(r, "**Trainer** (`trainer_throughput.py`; response tokens/s, median step):")
    if r := load(out, "trainer_smollm2"):
        lines += _trainer_table(r, "**Trainer on the SmolLM2 student** (`trainer_throughput.py --size smollm2`; "
                                   "8 rows like its rollouts, micro-batches of 4; response tokens/s, median step):")
        phases = r["plain"].get("phase_seconds")
        if phases:
            total = sum(phases.values())
            lines += ["The plain loop's step by phase (median seconds):", ""] + _table(
                ["phase", "seconds", "share"], [[k, v, v / total] for k, v in phases.items()])
    if r := load(out, "scaling_trainer"):
        lines += _scaling_trainer_table(r, "**Trainer vs sequence length**")
    if r := load(out, "weight_sync"):
        lines += ["**Weight sync vs model size** (`weight_sync.py`, float32, median of the repeats):", ""]
        lines += _table(["size", "params", "MiB", "shm s", "collective s", "floor: engine reload s",
                         "floor: safetensors file s", "floor: memcpy s", "shm / engine reload"],
                        [[row["size"], row["params"], row["bytes"] / 2**20, row["shm_s"], row["collective_s"],
                          row["engine_reload_s"], row["file_s"], row["memcpy_s"], row["shm_over_engine_reload"]]
                         for row in r["table"]])
    lines += _gpu_tables(out)
    lines += ["Plots: " + ", ".join(f"[{Path(p).stem}](benchmarks/results/{p})" for p in summary["plots"]), ""]
    return "\n".join(lines)


def _trainer_table(r: dict, title: str) -> list[str]:
    return [title, ""] + _table(
        ["variant", "tokens/s", "best step tokens/s", "x plain"],
        [["plain PyTorch loop", r["plain"]["tokens_per_s"], r["plain"]["best_tokens_per_s"], 1.0]]
        + [[k, v["tokens_per_s"], v["best_tokens_per_s"], v["ratio_vs_plain"]] for k, v in r["deepspeed"].items()])


def _scaling_trainer_table(r: dict, title: str) -> list[str]:
    c = r["config"]
    rows, prev = [], None
    for row in r["lengths"]:
        growth = "-" if prev is None else _f((row["plain"]["median_s"] / prev["plain"]["median_s"])
                                             / (row["length"] / prev["length"]))
        rows.append([row["length"], row["plain"]["tokens_per_s"], row["deepspeed_zero1"]["tokens_per_s"],
                     row["ratio_vs_plain"], growth])
        prev = row
    return [f"{title} ({c['layers']} layers, hidden {c['hidden']}, {c['rows']} rows, micro batch {c['micro']}, "
            f"prompt {c['prompt']}):", ""] + _table(
        ["response length", "plain tok/s", "ZeRO-1 tok/s", "ZeRO-1 / plain", "time growth / work growth"], rows)


def _gpu_tables(out: Path) -> list[str]:
    """The GPU section: its own machine line, never mixed into the CPU tables or targets."""
    results = {name: r for name in GPU_RESULTS if (r := load(out, name))}
    if not results:
        return []
    m = next(iter(results.values()))["machine"]
    gpu = m.get("gpu", {})
    lines = [f"**GPU** (`run.py --only gpu`; {gpu.get('name', '?')}, torch {gpu.get('torch', '?')}, CUDA "
             f"{gpu.get('cuda', '?')}, deepspeed {m['versions'].get('deepspeed', '?')}, transformers "
             f"{m['versions'].get('transformers', '?')}, {m['cpus']} CPUs; nccl, one worker; GPU figures only, not "
             "comparable with the CPU ones above):", ""]
    for name, r in results.items():
        if name.startswith("trainer_gpu"):
            s = r["size"]
            lines += _trainer_table(r, f"Trainer on the GPU, {r['precision']} ({s['layers']} layers, hidden "
                                       f"{s['hidden']}, {s['rows']} rows x {s['response']} response tokens, micro batch "
                                       f"{s['micro']}; response tokens/s, median step):")
        else:
            lines += _scaling_trainer_table(r, f"Trainer vs sequence length on the GPU, {r['precision']}")
    return lines


def render_headline(summary: dict) -> str:
    """README's headline table, from a suite.json summary: end to end vs TRL, trainer and rollout ratios."""
    fig, targets = summary["figures"], summary["targets"]

    def target(key):
        t = targets.get(key)
        return f"{t['required']}: {'met' if t['met'] else 'not met'}" if t and t["met"] is not None else "-"

    rows = []
    for pair, label in (("smollm2", "SmolLM2-135M pair"), ("tiny", "tiny random pair")):
        if not (e := fig.get(f"e2e_{pair}")):
            continue
        suffix, label = "" if pair == "tiny" else f"_{pair}", f"{label}, {e.get('dtype', 'float32')}"
        for peer, name in (("trl_distill", "DistillationTrainer"), ("trl_gkd", "GKDTrainer")):
            if (key := f"e2e_switch_over_{peer}{suffix}") in targets:
                rows.append([f"end to end, {label}: samples/s, SWITCH vs TRL {name}",
                             e["switchkd_switch"]["samples_per_s"], e[peer]["samples_per_s"],
                             f"{_f(targets[key]['value'])}x (lowest of window, median and fastest step)", target(key)])
        if (key := f"e2e_training_over_trl{suffix}") in targets:
            rows.append([f"training phase, {label}: tokens/s, SWITCH vs the faster TRL trainer",
                         e["switchkd_switch"]["training_tokens_per_s"], e["trl_training_tokens_per_s"],
                         f"{_f(targets[key]['value'])}x", target(key)])
    if (tr := fig.get("trainer_smollm2")) and "deepspeed_zero0_workers1" in tr:
        z0 = tr["deepspeed_zero0_workers1"]
        rows.append(["trainer, SmolLM2 student: tokens/s, DeepSpeed ZeRO-0 (the default) vs a plain PyTorch loop",
                     z0["tokens_per_s"], tr["plain_tokens_per_s"], f"{_f(z0['ratio_vs_plain'])}x",
                     target("trainer_zero0_over_plain_smollm2")])
    if (tr := fig.get("trainer")) and "deepspeed_zero1_workers1" in tr:
        z1 = tr["deepspeed_zero1_workers1"]
        rows.append(["trainer: tokens/s, DeepSpeed ZeRO-1 vs a plain PyTorch loop", z1["tokens_per_s"],
                     tr["plain_tokens_per_s"], f"{_f(z1['ratio_vs_plain'])}x", target("trainer_zero1_over_plain")])
    if (r := fig.get("rollout_tiny")) and "lockstep_tokens_per_s" in r:
        rows.append(["rollout, tiny pair: tokens/s, lockstep SWITCH vs the floor",
                     r["lockstep_tokens_per_s"], r["floor_tokens_per_s"], f"floor / lockstep {_f(r['floor_over_lockstep'])}",
                     "-"])
    if (t := targets.get("rollout_floor_over_lockstep_every_length")) and t["value"] is not None:
        rows.append(["rollout, tiny pair: floor / lockstep at the worst length of the sweep", None,
                     None, _f(t["value"]), target("rollout_floor_over_lockstep_every_length")])
    return "\n".join(_table(["measure", "switchkd", "reference", "ratio", "target"],
                            [[m, _n(a), _n(b), ratio, tgt] for m, a, b, ratio, tgt in rows])).rstrip("\n")


def _n(x) -> str:
    """A readable figure: thousands separated, three significant digits below 100."""
    return "-" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def replace_block(path: Path, begin: str, end: str, text: str) -> bool:
    """Replace what lies between the ``begin`` and ``end`` markers of ``path``; False when either is missing."""
    if not path.exists():
        return False
    doc = path.read_text()
    if begin not in doc or end not in doc:
        return False
    head, rest = doc.split(begin, 1)
    path.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every part on tiny sizes (no targets; for make test)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=None,
                        help="parts to run (default: rollout trainer sync e2e scaling; e2e includes TRL)")
    parser.add_argument("--models", choices=("tiny", "smollm2", "default"), default="default")
    parser.add_argument("--results-dir", help="where the JSON and plots go (default benchmarks/results; "
                                              "--quick: a new temporary directory)")
    parser.add_argument("--jobs", type=int, default=None, help="parts run at once (default 1; --quick 2). Timings "
                                                               "are only meaningful with 1")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: redraw the plots, suite.json and tables from the result files present")
    parser.add_argument("--json", help="also write the suite summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = "tiny"
    args.only = args.only or ["rollout", "trainer", "sync", "e2e", "scaling"]
    args.jobs = args.jobs or (2 if args.quick else 1)
    out = Path(args.results_dir) if args.results_dir else (
        Path(tempfile.mkdtemp(prefix="switchkd_bench_quick_")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="switchkd_bench_logs_") as logs:
        status = {} if args.report_only else run_jobs(plan(args, out), args.jobs, Path(logs))
    failed = any(s["returncode"] != 0 for s in status.values())
    # A partial run (--only) keeps the records of the parts it did not rerun.
    earlier = json.loads((out / "suite.json").read_text()).get("jobs", {}) if (out / "suite.json").is_file() else {}
    status = {**earlier, **status}
    plots = []
    if not args.no_plots:
        plots = [str(p.relative_to(out)) for p in draw_all(out)]
    summary = {"benchmark": "suite", "quick": args.quick, "models": args.models,
               "parts": [] if args.report_only else args.only,
               "machine": {**machine_info(), "load_avg_1m_at_end": os.getloadavg()[0]},
               "seconds": round(time.perf_counter() - start, 1), "jobs": status, "plots": plots, **headline(out)}
    if args.quick:
        summary["targets"] = {k: {**v, "met": None, "note": "--quick: not checked"}
                              for k, v in summary["targets"].items()}
    write_json(summary, str(out / "suite.json"))
    if not args.quick and out.resolve() == RESULTS.resolve() and not args.no_plots:
        if replace_block(REPO / "BENCHMARKS.md", BEGIN, END, render_tables(out, summary)):
            print("bench: BENCHMARKS.md tables refreshed", flush=True)
        if replace_block(REPO / "README.md", HEADLINE_BEGIN, HEADLINE_END, render_headline(summary)):
            print("bench: README.md headline refreshed", flush=True)
    if args.json:
        write_json(summary, args.json)
    print(f"bench: results in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
