"""Memory each role of a run needs, estimated before anything starts (`switchkd plan`,
`switchkd train --dry-run`), from the models' config.json (and their safetensors headers, when
the weights exist, for the exact parameter count), the dtypes and the config:

- vLLM engine: weights (parameters x model.dtype bytes, split over tensor_parallel_size), the KV
  cache (on the CPU the configured kv_cache_space_gb, allocated at start; on a GPU what
  gpu_memory_utilization leaves after the weights) and the process's runtime (torch, vLLM);
- trainer worker: DeepSpeed ZeRO's model states per worker (the ZeRO paper's accounting:
  parameters, gradients, AdamW's two moments, fp32 master weights under bf16; partitioned over
  the workers from stage 1 (moments and masters), 2 (+ gradients), 3 (+ parameters)), one
  micro-batch's activations (the full-vocabulary logits and their log-softmax dominate at these
  lengths), the teacher's weights when trainer.teacher_source=model, and the runtime;
- the driver: the runtime of the process that runs the loop;
- the weight sync (the student's weights in model.dtype, as the trainer sends them): with
  sync.transport=collective the student engine holds the broadcast state until it has reloaded
  from it; with shm (without sync.dir) the file on /dev/shm holds them, counted against the
  machine's memory like a process;
- Ray's own daemons (GCS, raylet, agents).

On a private Ray the sum must fit under Ray's memory monitor, which kills workers once the
machine's used memory passes RAY_memory_usage_threshold (0.95 by default) of the total.

The runtime constants are peaks measured on the CPU (benchmarks/memory.py, which also checks the
whole estimate against measured peaks).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from switchkd.cluster.placement import STUDENT, TEACHER, ClusterError, uses_private_ray
from switchkd.rollout.models.checks import safetensors_header

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2}

# Resident memory of a process beyond the weights, caches and optimizer state it holds: torch +
# vLLM for an engine, torch + DeepSpeed + a Ray worker for a trainer rank, the loop's process for
# the driver. Peaks measured on the CPU (benchmarks/memory.py; docs/cluster.md#memory). An
# engine's grows with the vocabulary (vocabulary-wide logits, log-prob rows and sampler buffers
# for up to max_num_seqs = 256 rows): beyond weights, KV cache and weight-sync buffer the engines
# held 0.66-0.74 GiB at a 512-token vocabulary, 1.1-1.6 GiB at 49,152 (SmolLM2) and, after
# decoding, 1.8-2.2 GiB at 151,936 (Qwen2.5); a line through the first and the last gives the
# two constants below. Trainer ranks 0.6 GiB; the driver 0.55-0.7 GiB.
ENGINE_RUNTIME_BASE = int(0.7 * GIB)
ENGINE_RUNTIME_PER_VOCAB = 10_600        # bytes per vocabulary entry
TRAINER_RUNTIME = int(0.6 * GIB)
DRIVER_RUNTIME = int(0.6 * GIB)
# GCS, raylet, dashboard and runtime-env agents, log monitor: 0.45 GiB resident together, measured.
RAY_DAEMONS = int(0.5 * GIB)
RAY_MEMORY_THRESHOLD = 0.95   # Ray's default RAY_memory_usage_threshold
# On a GPU: CUDA context, vLLM's profiling activations and buffers outside the KV cache (a rough figure).
ENGINE_RUNTIME_GPU = int(1.5 * GIB)
# Bytes per token per layer of the activations a decoder layer keeps for the backward pass, in
# units of hidden_size x precision bytes (attention + MLP without recomputation).
ACTIVATION_FACTOR = 18
LOGIT_COPIES = 4      # logits, log-softmax, their gradient, the loss's fp32 working copy


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int


def model_shape(model_dir: str | os.PathLike) -> ModelShape | None:
    """The shape of the model in ``model_dir`` (None when there is no config.json yet)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return None
    cfg = json.loads(config_path.read_text())
    cfg = cfg.get("text_config", cfg)
    hidden, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    params = (_safetensors_params(Path(model_dir))
              or _params_from_config(cfg, hidden, layers, heads, kv_heads, head_dim))
    return ModelShape(params, layers, hidden, kv_heads, head_dim, cfg["vocab_size"])


def _safetensors_params(model_dir: Path) -> int:
    """Exact parameter count from the safetensors headers (only the headers are read)."""
    return sum(math.prod(tensor["shape"]) for path in model_dir.glob("*.safetensors")
               for name, tensor in safetensors_header(path, str(model_dir)).items() if name != "__metadata__")


def _params_from_config(cfg: dict, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """A LLaMA/Qwen-style decoder's parameter count (embeddings, attention, gated MLP, norms)."""
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * cfg.get("intermediate_size", 4 * hidden)
    embeddings = cfg["vocab_size"] * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden


@dataclass(frozen=True)
class RoleMemory:
    role: str
    device: str
    parts: dict            # name -> bytes, per process (per GPU for a cuda engine)
    budget: int | None = None   # what the role may use on its device (cuda), and where that comes from
    budget_source: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def line(self) -> str:
        parts = ", ".join(f"{name} {_gib(size)}" for name, size in self.parts.items() if size)
        return f"{self.role:<16} {self.device:<4} {_gib(self.total):>9}  ({parts})"


def _gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def engine_runtime(vocab: int) -> int:
    """Bytes a CPU engine process holds beyond its weights and KV cache, at this vocabulary size."""
    return ENGINE_RUNTIME_BASE + ENGINE_RUNTIME_PER_VOCAB * vocab


def engine_memory(role: str, shape: ModelShape, engine, dtype: str, gpu_bytes: int | None,
                  receives_broadcast: bool = False) -> RoleMemory:
    """One vLLM engine (rollout.teacher / rollout.student): per process on the CPU, per GPU on cuda.
    ``receives_broadcast``: the student engine under sync.transport=collective, which holds the
    broadcast state whole until it reloads from it (on a GPU that lies outside
    gpu_memory_utilization's share, which the plan checks per GPU)."""
    weights = shape.params * DTYPE_BYTES[dtype] // engine.tensor_parallel_size
    if engine.device == "cpu":
        parts = {"weights": weights, "kv_cache": int(engine.kv_cache_space_gb * GIB),
                 "runtime": engine_runtime(shape.vocab)}
        if receives_broadcast:
            parts["sync buffer"] = shape.params * DTYPE_BYTES[dtype]
        return RoleMemory(role, "cpu", parts)
    reserved = int(engine.gpu_memory_utilization * gpu_bytes) if gpu_bytes else None
    kv_cache = max(0, reserved - weights - ENGINE_RUNTIME_GPU) if reserved else 0
    key = "rollout.teacher" if role.startswith("teacher") else "rollout.student"
    return RoleMemory(role, "cuda", {"weights": weights, "kv_cache": kv_cache, "runtime": ENGINE_RUNTIME_GPU},
                      reserved, f"{key}.gpu_memory_utilization={engine.gpu_memory_utilization:g} of the GPU")


def trainer_precision(tc, device: str) -> str:
    """The precision trainer.precision=auto resolves to: bf16 on a GPU, fp32 on the CPU."""
    return tc.precision if tc.precision != "auto" else ("bf16" if device == "cuda" else "fp32")


def trainer_memory(role: str, student: ModelShape, teacher: ModelShape | None, cfg, device: str,
                   tokens_per_row: int | None = None, gpu_bytes: int | None = None) -> RoleMemory:
    """One DeepSpeed trainer worker (ZeRO model states per worker, activations, runtime).
    ``tokens_per_row``: the longest row (default: data.max_prompt_tokens + rollout.max_new_tokens)."""
    tc = cfg.trainer
    precision = trainer_precision(tc, device)
    n, workers, stage = student.params, tc.num_workers, tc.zero_stage
    weight_bytes = DTYPE_BYTES[precision]
    params = n * weight_bytes
    grads = n * weight_bytes
    # AdamW moments, plus the fp32 master copy that bf16 and ZeRO 1-3 keep (even of fp32 weights)
    optimizer = n * (8 + (4 if precision == "bf16" or stage >= 1 else 0))
    if stage >= 1:
        optimizer //= workers
    if stage >= 2:
        grads //= workers
    if stage >= 3:
        params //= workers
    row = tokens_per_row or cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    tokens = tc.micro_batch_size * row
    # Logits start at the micro-batch's first trained position: one rollout row alone gets them
    # over its response only; rows of several prompt lengths (or SFT rows) over up to the whole row.
    alone = tc.micro_batch_size == 1 and tc.sft_ratio == 0
    logit_tokens = min(row, cfg.rollout.max_new_tokens) if alone else tokens
    activations = (tokens * student.layers * student.hidden * ACTIVATION_FACTOR * weight_bytes
                   + logit_tokens * student.vocab * 4 * LOGIT_COPIES)
    parts = {"params": params, "grads": grads, "optimizer": optimizer, "activations": activations}
    if tc.teacher_source == "model" and teacher is not None:
        parts["teacher"] = teacher.params * DTYPE_BYTES[cfg.model.dtype]
    parts["runtime"] = 0 if device == "cuda" else TRAINER_RUNTIME
    return RoleMemory(role, device, parts, gpu_bytes if device == "cuda" else None, "the GPU")


def estimate_memory(cfg, plan, tokens_per_row: int | None = None, gpu_bytes: int | None = None) -> list[RoleMemory]:
    """Every placed role of ``plan`` (cluster.placement.PlacementPlan) and the driver; roles whose
    model has no config.json yet are left out."""
    teacher, student = model_shape(cfg.model.teacher), model_shape(cfg.model.student)
    out = []
    for bundle in plan.bundles:
        if bundle.role in (TEACHER, STUDENT):
            shape = teacher if bundle.role == TEACHER else student
            engine = cfg.rollout.teacher if bundle.role == TEACHER else cfg.rollout.student
            if shape is not None:
                out.append(engine_memory(bundle.role, shape, engine, cfg.model.dtype, gpu_bytes,
                                         bundle.role == STUDENT and cfg.sync.transport == "collective"))
        elif student is not None:
            out.append(trainer_memory(bundle.role, student, teacher, cfg, plan.trainer_device, tokens_per_row,
                                      gpu_bytes))
    out.append(RoleMemory("driver", "cpu", {"runtime": DRIVER_RUNTIME}))
    if cfg.sync.transport == "shm" and cfg.sync.dir is None and student is not None:
        out.append(RoleMemory("weight sync", "cpu", {"/dev/shm file": student.params * DTYPE_BYTES[cfg.model.dtype]}))
    out.append(RoleMemory("Ray daemons", "cpu", {"runtime": RAY_DAEMONS}))
    return out


def host_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_memory_in_use() -> int:
    """Bytes of this machine's memory in use now (total minus MemAvailable): what other processes
    hold, which Ray's memory monitor counts against a run too."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return max(0, host_memory() - int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 0


def gpu_memory() -> int | None:
    """The first visible GPU's memory in bytes (None without one)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def ray_memory_threshold() -> float:
    """The share of the machine's memory above which Ray's memory monitor kills workers (1.0 when
    the monitor is off: RAY_memory_monitor_refresh_ms=0)."""
    if os.environ.get("RAY_memory_monitor_refresh_ms") == "0":
        return 1.0
    return float(os.environ.get("RAY_memory_usage_threshold", RAY_MEMORY_THRESHOLD))


def usable_memory(host_bytes: int, threshold: float, in_use: int) -> int:
    """What a run may use of a host: Ray's share of it, less what other processes hold."""
    return int(host_bytes * threshold) - in_use


def check_fits(roles: list[RoleMemory], host_bytes: int, single_node: bool, threshold: float = 1.0,
               in_use: int = 0) -> list[str]:
    """Problems of the estimate against the capacity, one line each (empty: it fits). On a single
    node (a private Ray) the CPU roles share the host's memory, of which Ray lets everything on it
    use ``threshold`` and other processes already use ``in_use``; a cuda role must fit its budget."""
    problems = []
    cpu = [r for r in roles if r.device == "cpu"]
    need, usable = sum(r.total for r in cpu), usable_memory(host_bytes, threshold, in_use)
    if single_node and need > usable:
        biggest = max(cpu, key=lambda r: r.total)
        limit = f"this machine has {_gib(host_bytes)}"
        if threshold < 1 or in_use:
            limit += f", of which a run may use {_gib(usable)} ("
            limit += "; ".join(part for part in (
                f"Ray kills workers above RAY_memory_usage_threshold={threshold:g}" if threshold < 1 else "",
                f"{_gib(in_use)} in use by other processes" if in_use else "") if part) + ")"
        problems.append(f"the CPU roles need {_gib(need)} together, {limit} "
                        f"({_gib(need - usable)} short; the largest is the {biggest.role}, {_gib(biggest.total)})")
    for r in roles:
        if r.budget is not None and r.total > r.budget:
            problems.append(f"the {r.role} needs {_gib(r.total)} per GPU, {r.budget_source} gives {_gib(r.budget)} "
                            f"({_gib(r.total - r.budget)} short)")
    return problems


def plan_memory(cfg, plan) -> tuple[list[RoleMemory], list[str]]:
    """The estimate of every role for ``plan`` and the problems against this machine's memory (a
    private Ray) and GPU (when one is visible here)."""
    uses_gpu = plan.trainer_device == "cuda" or "cuda" in (cfg.rollout.teacher.device, cfg.rollout.student.device)
    roles = estimate_memory(cfg, plan, gpu_bytes=gpu_memory() if uses_gpu else None)
    return roles, check_fits(roles, host_memory(), uses_private_ray(cfg.cluster), ray_memory_threshold(),
                             host_memory_in_use())


def refuse_or_warn(problems: list[str], check: bool, subject: str) -> str | None:
    """Raise ClusterError naming ``subject`` when the estimate does not fit and cluster.check_memory
    is on; with it off, the warning to show instead (None when it fits)."""
    if not problems:
        return None
    if check:
        raise ClusterError(f"{subject}: does not fit (cluster.check_memory=false starts it anyway; "
                           f"`switchkd plan` shows the estimate): " + "; ".join(problems))
    return "does not fit, cluster.check_memory=false starts it anyway: " + "; ".join(problems)


def describe_memory(roles: list[RoleMemory]) -> str:
    """The estimate as the lines `switchkd plan` prints."""
    cpu = sum(r.total for r in roles if r.device == "cpu")
    host, threshold, in_use = host_memory(), ray_memory_threshold(), host_memory_in_use()
    lines = ["memory per process (estimate; cuda engines per GPU):"] + [f"  {r.line()}" for r in roles]
    usable = usable_memory(host, threshold, in_use)
    return "\n".join(lines + [f"  CPU roles together: {_gib(cpu)} of {_gib(usable)} a run may "
                              f"use ({_gib(host)} on this machine, {_gib(in_use)} of it in use now, "
                              f"RAY_memory_usage_threshold={threshold:g})"])


# What Ray's memory monitor writes into the errors of the workers it kills.
_RAY_OOM_MARKERS = ("running low on memory", "killed due to memory pressure")
_RAY_OOM_USAGE = re.compile(r"was ([\d.]+)GB used / ([\d.]+)GB limit")


def memory_killed_error(error: BaseException, step: int) -> str | None:
    """One line for a run that Ray's memory monitor stopped (None when ``error``, or an error it
    was raised from, is not such a kill)."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        text = str(error)
        if any(marker in text for marker in _RAY_OOM_MARKERS) or type(error).__name__ == "OutOfMemoryError":
            usage = _RAY_OOM_USAGE.search(text)
            break
        error = error.__cause__ or error.__context__
    else:
        return None
    at = f" (the machine at {usage[1]} of {usage[2]} GiB)" if usage else ""
    return (f"Ray's memory monitor killed a worker at step {step}{at}: the run needs more memory than the "
            f"{ray_memory_threshold():g} of this machine that RAY_memory_usage_threshold lets it use; "
            f"`switchkd plan` shows each role's estimate; lower rollout.*.kv_cache_space_gb, "
            f"trainer.micro_batch_size or rollout.max_new_tokens, then continue with --resume")
