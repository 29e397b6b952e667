"""End to end: switchkd's closed loop (SWITCH, on-policy GKD) vs TRL's GKDTrainer and DistillationTrainer.

    python benchmarks/e2e.py [--quick] [--models tiny|smollm2] [--steps N] [--warmup W]
                             [--methods switch gkd trl trl_distill] [--trl-distill-generation vllm|hf]
                             [--json out.json]

Every method trains the same student against the same teacher, from the same prompt tokens
(the config's data.prompts, tokenized once here and handed to TRL as token ids), with the same
batch per optimizer update, max_new_tokens, learning rate and number of updates (--steps):

* switch: ``switchkd train --config configs/<models>.yaml`` (SWITCH, block-speculative vLLM
  rollout, DeepSpeed trainer, weight sync every step, the shipped loop defaults);
* gkd: the same with ``rollout.switch.rule=student`` (the student generates every token, the
  teacher only scores it: on-policy distillation, configs/baselines/gkd.yaml's method);
* trl: benchmarks/trl_gkd.py in .venv-trl (``make trl-venv``): TRL's GKDTrainer with lmbda=1
  (on-policy), beta=0 (forward KL, switchkd's default loss), HF generate;
* trl_distill: benchmarks/trl_distill.py: TRL's stable DistillationTrainer (on-policy), beta=0,
  full-vocabulary teacher scoring, generating with TRL's colocated vLLM engine: run by this
  interpreter (it has the CPU vLLM) with .venv-trl's trl package on its path (trl_on_path), or
  with HF generate in .venv-trl (--trl-distill-generation hf).

switchkd's figures come from the run itself: this script watches OUTPUT_DIR/metrics.jsonl and
stamps the arrival of each step's line, so a step's wall time is everything the loop did
between two steps (rollout, which overlaps the previous training step when
loop.max_staleness=1, training, weight sync, logging, saving the rollouts). Start-up (Ray,
engines, trainer, the first --warmup steps) is excluded. With loop.max_staleness=1 (the
default) step k's line arrives once training step k and the rollout of step k+1 are done, and
the last step has no rollout ahead of it, so the timed window runs from line W to line N-1:
N-1-W full steps (one rollout + one training step + one weight sync each); samples/s = batch x
those steps / the window's wall seconds, tokens/s counts the response tokens of the rollouts in
it. TRL (sequential: generate, then train, per step) is timed from the end of step W to the end of
step N. Phases are
reported too: generation (switchkd: the rollout incl. teacher scoring; TRL: student generate
only; trl_distill: vLLM generate, its weight sync apart as sync_s) and training (switchkd:
trainer step on teacher top-k from the batch; TRL: teacher forward + student forward/backward +
optimizer). Ratios: every method over trl_gkd (``<method>_over_trl``) and switchkd's over
trl_distill (``<method>_over_trl_distill``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import machine_info, stats, write_json  # noqa: E402

from switchkd.cluster.plots import timeline_summary  # noqa: E402

TRL_PYTHON = REPO / ".venv-trl" / "bin" / "python"
CONFIGS = {"tiny": REPO / "configs" / "tiny.yaml", "smollm2": REPO / "configs" / "smollm2.yaml"}
METHOD_OVERRIDES = {"switch": [], "gkd": ["rollout.switch.rule=student"]}
RUN_TIMEOUT_S = 1800


def settings(args) -> list[str]:
    """The overrides every switchkd run gets: the shared budget."""
    return [f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch_size}",
            f"trainer.micro_batch_size={min(4, args.batch_size)}", f"rollout.max_new_tokens={args.max_new_tokens}",
            f"trainer.lr={args.lr}", "trainer.lr_schedule=constant", "trainer.warmup_steps=0", "trainer.loss=forward_kl",
            f"data.prompts={args.prompts}", f"data.max_prompts={args.max_prompts}", "loop.export=false",
            f"trainer.precision={precision(args)}", *args.set]


def precision(args) -> str:
    """The trainer's precision: the pair's dtype (--set included), as TRL's (trl_common.py: bf16=True
    for bfloat16)."""
    from switchkd.cluster.config import load_config

    return "bf16" if load_config(CONFIGS[args.models], args.set).model.dtype == "bfloat16" else "fp32"


def write_prompt_ids(args, path: Path) -> dict:
    """The prompt tokens switchkd's driver loads, as a JSON list of id lists (TRL's dataset)."""
    from transformers import AutoTokenizer

    from switchkd.cluster.config import load_config
    from switchkd.rollout.generate import load_prompts

    cfg = load_config(CONFIGS[args.models], settings(args))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.teacher)
    prompts, _ = load_prompts(cfg.data, tokenizer, cfg.rollout.seed)
    path.write_text(json.dumps([p.token_ids for p in prompts]))
    return {"teacher": cfg.model.teacher, "student": cfg.model.student, "dtype": cfg.model.dtype,
            "prompts": len(prompts), "prompt_tokens": sum(len(p.token_ids) for p in prompts)}


def run_switchkd(method: str, args, work: Path) -> dict:
    """One closed-loop run; per-step wall times from the arrival of each metrics line."""
    out = work / method
    cmd = [str(Path(sys.executable).parent / "switchkd"), "train", "--config", str(CONFIGS[args.models]),
           *settings(args), f"trainer.output_dir={out}", *METHOD_OVERRIDES[method]]
    metrics_path, log_path = out / "metrics.jsonl", work / f"{method}.log"
    lines, arrivals, offset, buffer = [], [], 0, ""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while True:
            done = proc.poll() is not None
            if metrics_path.exists():
                with open(metrics_path) as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                now = time.perf_counter()
                buffer += chunk
                *complete, buffer = buffer.split("\n")
                for line in complete:
                    if line.strip():
                        lines.append(json.loads(line))
                        arrivals.append(now)
            if done:
                break
            if time.perf_counter() - start > RUN_TIMEOUT_S:
                proc.kill()
                raise RuntimeError(f"{method}: switchkd train ran over {RUN_TIMEOUT_S} s; log {log_path}")
            time.sleep(0.05)
    total = time.perf_counter() - start
    if proc.returncode != 0 or len(lines) != args.steps:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{method}: switchkd train exited {proc.returncode} with {len(lines)} of {args.steps} "
                           f"steps logged:\n{tail}")
    # Line k arrives once train step k AND rollout k+1 (run ahead, loop.max_staleness=1) are done,
    # the last line right after its training step. The window from line W to line N-1 therefore
    # holds exactly N-1-W rollouts (steps W+2..N) and N-1-W training steps (W+1..N-1).
    w, n = args.warmup, args.steps
    rolled, trained = lines[w + 1:n], lines[w:n - 1]
    wall = arrivals[n - 2] - arrivals[w - 1]
    step_s = [b - a for a, b in zip(arrivals, arrivals[1:])]
    tokens = sum(m["tokens"] for m in rolled)
    rollout_s = sum(m["rollout_seconds"] for m in rolled)
    train_s = sum(m["seconds"] for m in trained)
    return {
        "command": " ".join(cmd[1:]), "startup_s": arrivals[w - 1] - start, "process_s": total,
        "timed_steps": len(rolled), "wall_s": wall, "samples_per_s": args.batch_size * len(rolled) / wall,
        "tokens_per_s": tokens / wall, "tokens": tokens, "step_seconds": step_s,
        "step_s": stats(step_s[w - 1:n - 2]),
        "teacher_fraction": sum(m["rollout_teacher_fraction"] * m["tokens"] for m in rolled) / max(1, tokens),
        "phases": {"generation_s": rollout_s, "training_s": train_s,
                   # the sync's work (trainer write + engine load), overlapped with the above
                   "sync_s": sum(m.get("sync_write_seconds", 0.0) + m.get("sync_load_seconds", 0.0)
                                 for m in trained),
                   "generation_tokens_per_s": tokens / rollout_s,
                   "training_tokens_per_s": sum(m["tokens"] for m in trained) / train_s},
        "timeline": timeline_summary(lines),
        "metrics": lines,
    }


# TRL peers: e2e method -> (result name, script). Both take the same command line (trl_common.py).
TRL_PEERS = {"trl": ("trl_gkd", "trl_gkd.py"), "trl_distill": ("trl_distill", "trl_distill.py")}
SHARED_PINS = ("torch", "transformers", "accelerate", "datasets")


def trl_on_path(work: Path) -> dict:
    """Environment that puts .venv-trl's trl package, and nothing else of .venv-trl, on this
    interpreter's path. TRL's colocated vLLM generation needs vLLM importable next to TRL: this
    interpreter has the CPU vLLM build, .venv-trl has none. Refused unless both environments hold
    the same torch/transformers/accelerate/datasets, so TRL runs on the model code it runs on in
    .venv-trl."""
    from importlib import metadata

    sites = sorted((REPO / ".venv-trl" / "lib").glob("python*/site-packages"))
    if not sites or not (sites[0] / "trl").is_dir():
        raise RuntimeError(f"no trl package under {REPO / '.venv-trl'}: build TRL's own venv with `make trl-venv`")
    site = sites[0]
    for pkg in SHARED_PINS:
        theirs = sorted(d.version for d in metadata.distributions(name=pkg, path=[str(site)]))
        if theirs != [metadata.version(pkg)]:
            raise RuntimeError(f"{pkg}: {metadata.version(pkg)} here, {theirs} in .venv-trl; the TRL peers must run "
                               "on the same pins (Makefile TRL_PINS)")
    overlay = work / "trl_on_path"
    overlay.mkdir(exist_ok=True)
    for path in (site / "trl", *site.glob("trl-*.dist-info")):
        if not (overlay / path.name).exists():
            (overlay / path.name).symlink_to(path)
    return {"PYTHONPATH": str(overlay)}


def run_trl(method: str, args, ids_path: Path, pair: dict, work: Path) -> dict:
    """One TRL peer in its own process; its figures come from the JSON it writes."""
    name, script = TRL_PEERS[method]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    extra = ["--generation", args.trl_distill_generation] if method == "trl_distill" else []
    if method == "trl_distill" and args.trl_distill_generation == "vllm":
        python = Path(sys.executable)
        env.update(trl_on_path(work))
    else:
        if not TRL_PYTHON.exists():
            raise RuntimeError(f"{TRL_PYTHON} missing: build TRL's own venv with `make trl-venv`")
        python = TRL_PYTHON
    out = work / f"{name}.json"
    cmd = [str(python), str(HERE / script), "--teacher", str(REPO / pair["teacher"]),
           "--student", str(REPO / pair["student"]), "--dtype", pair["dtype"], "--prompts", str(ids_path),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), *extra, "--json", str(out)]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"{method}: exited {res.returncode}:\n{(res.stdout + res.stderr)[-3000:]}")
    result = json.loads(out.read_text())
    result["command"] = " ".join(cmd[1:])
    result["process_s"] = time.perf_counter() - start
    return result


def ratios_over(methods: dict, reference: str, suffix: str) -> dict:
    """Every other method's rates over ``reference``'s, as ``<method>_over_<suffix>``."""
    ref = methods[reference]
    return {
        f"{name}_over_{suffix}": {
            "samples_per_s": res["samples_per_s"] / ref["samples_per_s"],
            "median_step_samples_per_s": res["median_step_samples_per_s"] / ref["median_step_samples_per_s"],
            "best_step_samples_per_s": res["best_step_samples_per_s"] / ref["best_step_samples_per_s"],
            "tokens_per_s": res["tokens_per_s"] / ref["tokens_per_s"],
            "generation_tokens_per_s": res["phases"]["generation_tokens_per_s"]
            / ref["phases"]["generation_tokens_per_s"],
            "training_tokens_per_s": res["phases"]["training_tokens_per_s"] / ref["phases"]["training_tokens_per_s"],
        } for name, res in methods.items() if name != reference}


def run(args) -> dict:
    report = {"benchmark": "e2e", "machine": {**machine_info(), "load_avg_1m_at_start": os.getloadavg()[0]},
              "config": {"models": args.models, "steps": args.steps, "warmup_steps": args.warmup,
                         "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
                         "loss": "forward KL (switchkd forward_kl on teacher top-64; TRL generalized JSD beta=0)",
                         "methods": args.methods},
              "methods": {}, "errors": {}}
    with tempfile.TemporaryDirectory(prefix="switchkd_e2e_") as tmp:
        work = Path(tmp)
        ids_path = work / "prompt_ids.json"
        report["config"].update(write_prompt_ids(args, ids_path))
        for method in args.methods:
            print(f"e2e: {method} ...", flush=True)
            load_before = os.getloadavg()[0]
            try:
                if method in TRL_PEERS:
                    name, res = TRL_PEERS[method][0], run_trl(method, args, ids_path, report["config"], work)
                else:
                    name, res = f"switchkd_{method}", run_switchkd(method, args, work)
                res["load_avg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
                # Per-step rates too: on a shared machine the window rate swallows other people's load
                # spikes, the fastest step is the least disturbed one.
                res["median_step_samples_per_s"] = args.batch_size / res["step_s"]["median_s"]
                res["best_step_samples_per_s"] = args.batch_size / res["step_s"]["min_s"]
                report["methods"][name] = res
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                report["errors"][method] = str(e)
                print(f"e2e: {method} failed: {str(e)[-2000:]}", file=sys.stderr, flush=True)
    report["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    m = report["methods"]
    for name, res in m.items():
        print(f"e2e: {name}: {res['samples_per_s']:.3f} samples/s, {res['tokens_per_s']:.1f} tokens/s "
              f"over {res['timed_steps']} steps", flush=True)
    if "trl_gkd" in m or "trl_distill" in m:
        report["ratios"] = {}
    if "trl_gkd" in m:
        report["ratios"].update(ratios_over(m, "trl_gkd", "trl"))
    if "trl_distill" in m:   # switchkd's methods over TRL's DistillationTrainer too (trl_gkd over it is above)
        report["ratios"].update(ratios_over({k: v for k, v in m.items() if k != "trl_gkd"}, "trl_distill",
                                            "trl_distill"))
    if "switchkd_switch" in m:
        report["targets"] = targets(report["ratios"] if "ratios" in report else {}, m)
    return report


# Issue targets on SWITCH end to end (each met only if it holds however the rate is taken: window,
# median step, fastest step) and on its training phase against the faster of TRL's.
TARGETS = {"switch_over_trl_distill": 2.0, "switch_over_trl_gkd": 4.0, "training_over_trl": 1.2}


def targets(ratios: dict, m: dict) -> dict:
    """The targets this run can check: {name: {value, required, met}}."""
    keys = ("samples_per_s", "median_step_samples_per_s", "best_step_samples_per_s")
    values = {}
    for peer, ratio in (("trl_distill", "switchkd_switch_over_trl_distill"), ("trl_gkd", "switchkd_switch_over_trl")):
        if ratio in ratios:
            values[f"switch_over_{peer}"] = min(ratios[ratio][k] for k in keys)
    peers = [m[p]["phases"]["training_tokens_per_s"] for p in ("trl_gkd", "trl_distill") if p in m]
    if peers:
        values["training_over_trl"] = m["switchkd_switch"]["phases"]["training_tokens_per_s"] / max(peers)
    return {k: {"value": v, "required": TARGETS[k], "met": v >= TARGETS[k]} for k, v in values.items()}


def ensure_models(models: str) -> None:
    """Build the pair the config names when it is missing (what `make tiny-models` or
    `switchkd models prepare` would do), so the benchmark runs on a fresh clone."""
    if (REPO / "models" / ("tiny" if models == "tiny" else "smollm2-135m-instruct")).is_dir():
        return
    if models == "tiny":
        from switchkd.rollout.models.tiny import build_tiny_models

        build_tiny_models(REPO / "models" / "tiny", seed=0)
    else:
        from switchkd.rollout.models.real import prepare_default_models

        prepare_default_models(REPO / "models")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny pair, 4 steps, switch + trl + trl_distill (no targets)")
    parser.add_argument("--models", choices=tuple(CONFIGS), default="tiny")
    parser.add_argument("--methods", nargs="+", choices=("switch", "gkd", *TRL_PEERS), default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer updates per method (default 12)")
    parser.add_argument("--warmup", type=int, default=None, help="updates excluded from the rate (default 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--prompts", default="configs/prompts/tiny.jsonl")
    parser.add_argument("--max-prompts", type=int, default=32)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra switchkd config overrides for every switchkd method (recorded in the commands)")
    parser.add_argument("--trl-distill-generation", choices=("vllm", "hf"), default="vllm",
                        help="trl_distill's generation: TRL's colocated vLLM engine (default) or HF generate")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = "tiny"
        args.methods = args.methods or ["switch", "trl", "trl_distill"]
        args.steps, args.warmup = args.steps or 4, args.warmup or 1
        args.max_new_tokens = min(args.max_new_tokens, 16)
    args.methods = args.methods or ["switch", "gkd", "trl", "trl_distill"]
    args.steps, args.warmup = args.steps or 12, args.warmup or 2
    if not 1 <= args.warmup <= args.steps - 2:
        parser.error("need 1 <= --warmup <= --steps - 2 (the last step has no rollout ahead of it)")
    ensure_models(args.models)
    report = run(args)
    write_json(report, args.json)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
