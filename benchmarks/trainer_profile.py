"""Where a DeepSpeed step's time goes against the plain loop: ZeRO variants and torch.profiler.

trainer_throughput.py measures DeepSpeed ZeRO 1-3 against a plain PyTorch loop; this script
explains the gap. On the same model and batch (trainer_throughput's "gpu" size on a GPU, its
"quick" size on a CPU) it steps the plain loop, ZeRO-0 (DeepSpeed's engine without ZeRO), ZeRO-1,
ZeRO-1 without contiguous gradients, ZeRO-1 without comm overlap and with 5e8 buckets, and ZeRO-2
with comm overlap, in turn (3 warm-up + 10 timed steps each); then it profiles two steps of the
plain loop and of ZeRO-1 and prints the profiler's tables (self CPU time: host syncs and launches;
self CUDA time: the GPU's own work). Read it with trainer_throughput's figures (BENCHMARKS.md, GPU).

    python benchmarks/trainer_profile.py [fp32|bf16]
"""
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_throughput as tt  # noqa: E402

VARIANTS = {  # name: (zero stage, DeepSpeed JSON merged over the generated config)
    "z0": (0, None), "z1": (1, None),
    "z1_nocontig": (1, {"zero_optimization": {"contiguous_gradients": False}}),
    "z1_nooverlap_bucket": (1, {"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 5e8,
                                                      "allgather_bucket_size": 5e8}}),
    "z2_overlap": (2, {"zero_optimization": {"overlap_comm": True}}),
}


def main(precision: str = "fp32") -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = tt.SIZES["gpu" if device == "cuda" else "quick"]
    tmp = Path(tempfile.mkdtemp())
    student = tt.build_student(tmp / "student", size["layers"], size["hidden"])
    table = tt.synthetic_batch(size["rows"], size["prompt"], size["response"], size["topk"])

    def config(stage, ds_json, name):
        overrides = ()
        if ds_json:
            path = tmp / f"{name}.json"
            path.write_text(json.dumps(ds_json))
            overrides = (f"trainer.deepspeed_config={path}",)
        return tt.trainer_config(student, tmp / name, stage=stage, rows=size["rows"], micro=size["micro"],
                                 device=device, precision=precision, extra=overrides)

    steppers, trainers = {"plain": tt.PlainLoop(config(1, None, "plain")).step}, []
    try:
        for name, (stage, ds_json) in VARIANTS.items():
            trainers.append(tt.Trainer(config(stage, ds_json, name)))
            steppers[name] = tt._ds_step(trainers[-1])
        results = tt.interleaved(steppers, table, 3, 10)
        for name, r in results.items():
            print(f"{precision} {name:22s} median {statistics.median(r['step_seconds']):.4f} s  "
                  f"min {min(r['step_seconds']):.4f}  x plain {tt.ratio_vs_plain(r, results['plain'], True):.3f}")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        for name in ("plain", "z1"):
            with profile(activities=activities) as prof:
                steppers[name](table)
                steppers[name](table)
            for key in ("self_cpu_time_total",) + (("self_cuda_time_total",) if device == "cuda" else ()):
                print(f"==== {name}: by {key.replace('_total', '').replace('_', ' ')}")
                print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    finally:
        for trainer in trainers:
            trainer.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
