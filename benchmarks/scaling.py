"""Scaling sweeps: rollout tokens/s vs response length, batch size and tau0; trainer tokens/s vs length.

    python benchmarks/scaling.py rollout [--quick] [--repeats N] [--json out.json]
    python benchmarks/scaling.py trainer [--quick] [--device cuda [--precision bf16]] [--json out.json]

rollout: the tiny pair, in-process, one set of engines at a time: a teacher and a student vLLM
engine serve every point for block-speculative SWITCH (and stepwise on the tau0 sweep) and for
the floor of rollout_throughput.py (student decode with full-vocab log-probs + ONE teacher
prefill over the same tokens); then they are shut down and one PairEngine serves every point
again for lockstep SWITCH (rollout.mode's default, the headline; block is kept for
comparison). Each point is timed over --repeats calls after one untimed call of the same
point (warm-up). EOS is ignored, so every response is exactly max_new_tokens long and a
point's work is batch x length tokens. The points are chosen so that the whole sweep takes
~5 min on 2 idle cores. Three sweeps:
  * length: batch 4, response length 64 .. 1024;
  * batch:  length 64, batch 1 .. 64;
  * tau0:   batch 8, length 64, tau0 from 0 (the teacher owns every token) to 0.7 >= ln 2
            (the student owns every token), lockstep vs block vs stepwise vs floor: how the
            teacher fraction moves the block-speculative speed-up (block over stepwise) and
            the gap to the floor.

trainer: the model of trainer_throughput.py (4 layers, hidden 256, vocab 512), 8 rows, micro
batch 4, prompt 16, response length 64 .. 1024; the plain PyTorch loop and DeepSpeed ZeRO-1
(one worker) stepped in turn (1 warm-up step + 3 timed steps each, per length), both with
--threads torch threads. ``--device cuda``: a ~100M-parameter model (trainer_throughput's "gpu"
size), 16 rows, micro batch 8, response length 128 .. 1,984, on the GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, stats, timed, write_json  # noqa: E402

ROLLOUT_SWEEPS = {
    "full": {"length": dict(batch=4, lengths=[64, 128, 256, 512, 1024]),
             "batch": dict(length=64, batches=[1, 4, 16, 64]),
             "tau0": dict(batch=8, length=64, tau0s=[0.0, 0.35, 0.45, 0.55, 0.7])},
    "quick": {"length": dict(batch=2, lengths=[8, 16]),
              "batch": dict(length=8, batches=[1, 2]),
              "tau0": dict(batch=2, length=8, tau0s=[0.0, 0.7])},
}
TRAINER_SWEEP = {
    "full": dict(layers=4, hidden=256, rows=8, micro=4, prompt=16, topk=16, lengths=[64, 128, 256, 512, 1024],
                 warmup=1, steps=3),
    "quick": dict(layers=2, hidden=128, rows=2, micro=2, prompt=8, topk=8, lengths=[8, 16], warmup=1, steps=1),
    # --device cuda: trainer_throughput's "gpu" model, lengths up to its 2,048 positions
    "gpu": dict(layers=8, hidden=1024, rows=16, micro=8, prompt=64, topk=16, lengths=[128, 256, 512, 1024, 1984],
                warmup=2, steps=4),
}


def _machine() -> dict:
    return {**machine_info(), "load_avg_1m_at_end": os.getloadavg()[0]}


# ---------------------------------------------------------------- rollout

class RolloutBench:
    """The tiny pair, one set of engines at a time (``start``), and timers for SWITCH (any mode) and the
    floor at one point."""

    def __init__(self, repeats: int):
        import rollout_throughput as rt

        from switchkd.rollout.config import ModelConfig

        self.repeats = repeats
        teacher_dir, student_dir, dtype = rt._models("tiny")
        prompts, _ = rt._prompts(teacher_dir, 64, seed=0)
        # The prompt file yields fewer than the largest batch: repeat prompts, each copy with its own seed.
        self.prompts = [dataclasses.replace(prompts[i % len(prompts)], index=i,
                                            seed=prompts[i % len(prompts)].seed + 7919 * (i // len(prompts)))
                        for i in range(max(64, len(prompts)))]
        self.model = ModelConfig(teacher=teacher_dir, student=student_dir, dtype=dtype)
        self.engines = None
        self.engine_start_s = {}

    def start(self, mode: str) -> None:
        """Shut the current engines down, then start the ones ``mode`` runs on: "block" = a teacher and a
        student engine (block, stepwise, floor); "lockstep" = one PairEngine (prefix caching off)."""
        from switchkd.rollout.config import RolloutConfig
        from switchkd.rollout.engines.actors import start_engines

        self.shutdown()
        start = time.perf_counter()
        self.engines = start_engines(self.model, RolloutConfig(engine="vllm", mode=mode, temperature=1.0))
        self.engine_start_s[mode] = time.perf_counter() - start

    def shutdown(self) -> None:
        if self.engines is not None:
            for handle in self.engines:  # idempotent: lockstep's handle is both
                handle.shutdown()
            self.engines = None
            gc.collect()

    def _generator(self, batch: int, length: int, mode: str, tau0: float):
        from switchkd.rollout.config import RolloutConfig, SwitchConfig
        from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

        cfg = RolloutConfig(engine="vllm", mode=mode, temperature=1.0, max_new_tokens=length, batch_size=batch,
                            switch=SwitchConfig(tau0=tau0))
        # No EOS: every response runs to max_new_tokens, so a point's work is exactly batch x length.
        return VLLMSwitchGenerator(self.model, cfg, set(), engines=self.engines)

    def switch(self, batch: int, length: int, mode: str = "block", tau0: float = 0.4) -> dict:
        gen, prompts = self._generator(batch, length, mode, tau0), self.prompts[:batch]
        gen.generate(prompts)  # warm-up at this point
        calls_before = gen.engine_calls
        times, seqs = timed(lambda: gen.generate(prompts), self.repeats)
        tokens = sum(len(s.response_ids) for s in seqs)
        owners = [o for s in seqs for o in s.owner]
        return {"tokens": tokens, **stats(times), "tokens_per_s": tokens / stats(times)["median_s"],
                "teacher_fraction": sum(owners) / max(1, len(owners)),
                "engine_calls_per_generate": (gen.engine_calls - calls_before) / self.repeats}

    def floor(self, batch: int, length: int) -> dict:
        prompts = self.prompts[:batch]
        ids = [p.token_ids for p in prompts]
        teacher, student = self.engines

        def run():
            drafts = student.decode_async(ids, [length] * batch, temperature=1.0, seeds=[p.seed for p in prompts],
                                          positions=[0] * batch, stop_token_ids=[]).result()
            teacher.score_async([i + d.token_ids.tolist() for i, d in zip(ids, drafts)],
                                [len(i) for i in ids]).result()
            return sum(len(d.token_ids) for d in drafts)

        run()
        times, tokens = timed(run, self.repeats)
        return {"tokens": tokens, **stats(times), "tokens_per_s": tokens / stats(times)["median_s"]}


def rollout_sweeps(args) -> dict:
    sweeps = ROLLOUT_SWEEPS["quick" if args.quick else "full"]
    bench = RolloutBench(args.repeats)
    out = {"benchmark": "scaling_rollout", "config": {"models": "tiny", "dtype": "float32", "temperature": 1.0,
                                                       "decay": 0.005, "schedule": "exp", "eos": "ignored",
                                                       "repeats": args.repeats, "sweeps": sweeps}}
    s = sweeps
    points = {"length": [(s["length"]["batch"], n, 0.4) for n in s["length"]["lengths"]],
              "batch": [(b, s["batch"]["length"], 0.4) for b in s["batch"]["batches"]],
              "tau0": [(s["tau0"]["batch"], s["tau0"]["length"], t) for t in s["tau0"]["tau0s"]]}
    start = time.perf_counter()
    try:
        def point(batch, length, tau0, stepwise):
            row = {"batch": batch, "length": length, "tau0": tau0,
                   "block": bench.switch(batch, length, "block", tau0), "floor": bench.floor(batch, length)}
            if stepwise:
                row["stepwise"] = bench.switch(batch, length, "stepwise", tau0)
                row["block_over_stepwise"] = row["block"]["tokens_per_s"] / row["stepwise"]["tokens_per_s"]
            row["floor_over_block"] = row["floor"]["tokens_per_s"] / row["block"]["tokens_per_s"]
            print(f"batch {batch:3d} length {length:5d} tau0 {tau0:.2f}: block {row['block']['tokens_per_s']:8.1f} "
                  f"tok/s, floor {row['floor']['tokens_per_s']:8.1f} tok/s, floor/block {row['floor_over_block']:.2f}, "
                  f"teacher {row['block']['teacher_fraction']:.2f}", flush=True)
            return row

        def lockstep(row):
            row["lockstep"] = lock = bench.switch(row["batch"], row["length"], "lockstep", row["tau0"])
            row["floor_over_lockstep"] = row["floor"]["tokens_per_s"] / lock["tokens_per_s"]
            row["lockstep_over_block"] = lock["tokens_per_s"] / row["block"]["tokens_per_s"]
            if "stepwise" in row:
                row["lockstep_over_stepwise"] = lock["tokens_per_s"] / row["stepwise"]["tokens_per_s"]
            print(f"batch {row['batch']:3d} length {row['length']:5d} tau0 {row['tau0']:.2f}: lockstep "
                  f"{lock['tokens_per_s']:8.1f} tok/s, floor/lockstep {row['floor_over_lockstep']:.2f}, "
                  f"lockstep/block {row['lockstep_over_block']:.2f}, teacher {lock['teacher_fraction']:.2f}", flush=True)

        # One set of engines at a time: every point on the teacher + student engines, then on the PairEngine.
        bench.start("block")
        for sweep, pts in points.items():
            out[sweep] = [point(*pt, stepwise=sweep == "tau0") for pt in pts]
        bench.start("lockstep")
        for sweep in points:
            for row in out[sweep]:
                lockstep(row)
    finally:
        bench.shutdown()
    out["seconds"] = time.perf_counter() - start - sum(bench.engine_start_s.values())  # the points alone
    out["engine_start_s"] = bench.engine_start_s["block"]
    out["lockstep_engine_start_s"] = bench.engine_start_s["lockstep"]
    out["machine"] = _machine()
    out["superlinear"] = superlinearity(out["length"], "length", lambda r: r["block"]["median_s"])
    out["superlinear_lockstep"] = superlinearity(out["length"], "length", lambda r: r["lockstep"]["median_s"])
    out["superlinear_floor"] = superlinearity(out["length"], "length", lambda r: r["floor"]["median_s"])
    return out


def superlinearity(rows: list[dict], key: str, seconds) -> list[dict]:
    """For each doubling (or step) of ``key``: how much the time grew over how much the work grew.
    1 = linear; > 1 = the per-token cost rises with the length (e.g. attention over a longer context)."""
    out = []
    for a, b in zip(rows, rows[1:]):
        work, time_ = b[key] / a[key], seconds(b) / seconds(a)
        out.append({"from": a[key], "to": b[key], "work_ratio": work, "time_ratio": time_,
                    "time_over_work": time_ / work})
    return out


# ---------------------------------------------------------------- trainer

def trainer_sweep(args) -> dict:
    import tempfile

    import torch

    import trainer_throughput as tt

    size = TRAINER_SWEEP["quick" if args.quick else "gpu" if args.device == "cuda" else "full"]
    torch.set_num_threads(args.threads)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        student = tt.build_student(Path(tmp) / "student", size["layers"], size["hidden"])
        max_len = size["prompt"] + max(size["lengths"])
        cfg = tt.trainer_config(student, Path(tmp) / "run", stage=1, rows=size["rows"], micro=size["micro"],
                                device=args.device, precision=args.precision, extra=(
            f"trainer.cpus_per_worker={args.threads}",
            f"rollout.max_new_tokens={max(size['lengths'])}", f"data.max_prompt_tokens={size['prompt']}",
            f"rollout.teacher.max_model_len={max(max_len, 16)}", f"rollout.student.max_model_len={max(max_len, 16)}"))
        plain = tt.PlainLoop(cfg)
        trainer = tt.Trainer(cfg)
        try:
            for length in size["lengths"]:
                table = tt.synthetic_batch(size["rows"], size["prompt"], length, size["topk"])
                res = tt.interleaved({"plain": plain.step, "deepspeed_zero1": tt._ds_step(trainer)}, table,
                                     size["warmup"], size["steps"])
                row = {"length": length, "tokens": size["rows"] * length, **res,
                       "ratio_vs_plain": tt.ratio_vs_plain(res["deepspeed_zero1"], res["plain"], paired=True)}
                for name in ("plain", "deepspeed_zero1"):
                    row[name].update(stats(row[name]["step_seconds"]))
                print(f"length {length:5d}: plain {res['plain']['tokens_per_s']:8.1f} tok/s, zero1 "
                      f"{res['deepspeed_zero1']['tokens_per_s']:8.1f} tok/s, ratio {row['ratio_vs_plain']:.3f}",
                      flush=True)
                rows.append(row)
        finally:
            trainer.shutdown()
    return {"benchmark": "scaling_trainer", "config": size, "device": args.device, "precision": args.precision,
            "lengths": rows, "seconds": time.perf_counter() - start,
            "superlinear": superlinearity(rows, "length", lambda r: r["plain"]["median_s"]),
            "machine": {**_machine(), "threads": args.threads}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("rollout", "trainer"))
    parser.add_argument("--quick", action="store_true", help="two tiny points per sweep (seconds; no targets)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per rollout point (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="trainer: torch threads (1 avoids OpenMP spin-waits on an oversubscribed machine)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="trainer: where both sides train")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="trainer: both sides")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    write_json(rollout_sweeps(args) if args.part == "rollout" else trainer_sweep(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
