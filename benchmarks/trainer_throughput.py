"""Trainer tokens/s: the DeepSpeed trainer per ZeRO stage vs a plain PyTorch loop, in one run.

Both sides train the same model (same initial weights) on the same synthetic rollout batch
with the same loss (sparse top-k forward KL), optimizer (torch AdamW, fused), micro-batches, gradient
accumulation, clipping and LR schedule; tokens are response tokens per second of wall time per
optimizer step (median over steps after warm-up; the fastest step is reported too). The plain
loop and the single-worker variants are stepped in turn, round after round, so load drift on a
shared machine hits them alike; their ratio is the median of per-round time ratios.
Multi-worker runs follow, each alone, compared by median tokens/s.

On a GPU (``--device cuda``: nccl, one worker per GPU) both sides run on the device, in fp32 or
bf16 (``--precision``): DeepSpeed's bf16 mode keeps bf16 weights with fp32 master weights, the
plain loop runs under ``torch.autocast(bfloat16)``, as a hand-written loop would. GPU figures
are GPU figures: run.py reports them apart from the CPU ratios.

    python benchmarks/trainer_throughput.py [--quick] [--json out.json] [--workers 1 2]
    python benchmarks/trainer_throughput.py --size smollm2 [--json out.json]

``--size smollm2`` trains the default pair's prepared 10-layer student on rows shaped like its
rollouts (prompts of 33-48 tokens, responses of 14-64, the teacher's top-64 over its 49,152-token
vocabulary): ZeRO-1 against the plain loop, and the same ZeRO-1 step with the output layer run
over every position instead of from the first trained one. On the CPU the plain loop's step is
also split into phases (``phase_seconds``: collate, forward, loss, backward, optimizer; medians).
    python benchmarks/trainer_throughput.py --device cuda [--precision bf16] [--json out.json]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

from switchkd.cluster.config import load_config  # noqa: E402
from switchkd.rollout.data import schema  # noqa: E402
from switchkd.trainer.batch import collate, first_trained_position, shifted_logits  # noqa: E402
from switchkd.trainer.ds_config import lr_factor, resolve_device, use_bf16  # noqa: E402
from switchkd.trainer.group import Trainer  # noqa: E402
from switchkd.trainer.losses import owner_weights, per_token_divergence  # noqa: E402

SIZES = {  # model and batch per mode
    "full": dict(layers=4, hidden=256, rows=8, micro=4, prompt=16, response=96, topk=16, warmup=2, steps=16),
    "quick": dict(layers=2, hidden=128, rows=4, micro=2, prompt=8, response=24, topk=8, warmup=1, steps=3),
    # ~100M parameters, 15k response tokens a step; on an H100 still near launch-bound (BENCHMARKS.md, GPU).
    "gpu": dict(layers=8, hidden=1024, rows=16, micro=8, prompt=64, response=960, topk=16, warmup=3, steps=16),
    # The default pair's student as `make run` trains it: the step's rows with the lengths of its rollouts.
    # ZeRO-0 and -1 (one worker: ZeRO-1 partitions nothing, only copies), and ZeRO-1 with the output
    # layer over every position (the ablation).
    "smollm2": dict(pair="smollm2", rows=8, micro=4, prompt=(33, 48), response=(14, 64),
                    topk=64, warmup=2, steps=8, stages=(0, 1), full_logits_too=True),
}
PHASES = ("collate", "forward", "loss", "backward", "optimizer")  # the plain loop's step, timed on the CPU


def build_student(out: Path, layers: int, hidden: int) -> Path:
    """A random llama student with the tiny tokenizer (vocab 512), saved as an HF dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from switchkd.rollout.models.tiny import VOCAB_SIZE, build_tokenizer

    tok = build_tokenizer(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def synthetic_batch(rows: int, prompt: int | tuple[int, int], response: int | tuple[int, int], topk: int,
                    vocab: int = 512):
    """A valid rollout table: random tokens, owners, and top-k of random teacher distributions;
    a (low, high) length draws each row's length from that range."""
    rng = np.random.default_rng(0)

    def length(spec):
        return int(rng.integers(spec[0], spec[1] + 1)) if isinstance(spec, tuple) else spec

    out = []
    for i in range(rows):
        p, r = length(prompt), length(response)
        logits = rng.normal(size=(r, vocab)).astype(np.float32) * 3
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        ids = np.argsort(-logp, axis=-1)[:, :topk]
        out.append({
            "prompt_index": i, "prompt_ids": rng.integers(3, vocab, p).tolist(),
            "response_ids": rng.integers(3, vocab, r).tolist(), "owner": rng.integers(0, 2, r).tolist(),
            "jsd": [0.1] * r, "tau": [0.4] * r, "student_logprob": [-1.0] * r,
            "teacher_topk_ids": ids.tolist(), "teacher_topk_logprobs": np.take_along_axis(logp, ids, -1).tolist(),
            "policy_version": 0, "seed": i, "finish_reason": "length", "reference_ids": []})
    return schema.to_table(out)


def trainer_config(student: Path, output_dir: Path, *, stage: int, rows: int, micro: int, workers: int = 1,
                   device: str = "cpu", precision: str = "fp32", extra: tuple[str, ...] = ()):
    """The config the trainer benchmarks train with: ``student`` (also named as the teacher), ZeRO
    ``stage``, ``rows`` per step in micro-batches of ``micro`` per worker, lr 1e-4, no TensorBoard;
    the ``extra`` overrides come last and win."""
    return load_config(None, [
        f"model.student={student}", f"model.teacher={student}", f"trainer.output_dir={output_dir}",
        f"trainer.zero_stage={stage}", f"trainer.num_workers={workers}", "trainer.tensorboard=false",
        f"trainer.batch_size={rows}", f"trainer.micro_batch_size={micro}", "trainer.lr=0.0001",
        f"trainer.device={device}", f"trainer.precision={precision}", *extra])


class PlainLoop:
    """A hand-written loop doing what one DeepSpeed worker does; step() returns its seconds and
    keeps the step's loss and pre-clip gradient norm (``loss``, ``grad_norm``) for parity checks."""

    def __init__(self, cfg):
        from transformers import AutoModelForCausalLM

        self.tc = tc = cfg.trainer
        self.device = torch.device(resolve_device(tc))
        self.bf16 = use_bf16(tc, self.device.type)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model.student, dtype=torch.float32).to(self.device)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=tc.weight_decay, fused=True)  # as the trainer's
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(tc, None))
        self.phase_seconds: list[dict[str, float]] = []

    def step(self, table) -> float:
        """One optimizer step; on the CPU, where every op is done when it returns, the seconds of
        each phase (PHASES) are appended to ``phase_seconds``."""
        tc, start = self.tc, time.perf_counter()
        spent, mark = dict.fromkeys(PHASES, 0.0), [start]

        def lap(phase: str) -> None:
            now = time.perf_counter()
            spent[phase] += now - mark[0]
            mark[0] = now

        tokens = sum(table.column("response_ids").combine_chunks().value_lengths().to_pylist())
        loss = torch.zeros((), device=self.device)
        for j in range(tc.grad_accum_steps):
            b = collate(table.slice(j * tc.micro_batch_size, tc.micro_batch_size), pad_id=0).to(self.device)
            lap("collate")
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                first = first_trained_position(b.loss_mask)
                logits = shifted_logits(self.model, b.input_ids, b.attention_mask, first)
                lap("forward")
                t = b.from_position(first)
                keep = t.loss_mask
                div = per_token_divergence(tc.loss, logits[keep], teacher_topk_ids=t.topk_ids[keep],
                                           teacher_topk_logprobs=t.topk_logprobs[keep])
                weights = owner_weights(t.owner, keep, tc.student_token_weight, tc.teacher_token_weight)[keep]
            micro = (div * weights).sum() / tokens
            lap("loss")
            micro.backward()
            loss += micro.detach()
            lap("backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the step is done when the GPU is, as DeepSpeed's (its all_reduce waits)
        lap("optimizer")
        seconds = time.perf_counter() - start
        if self.device.type == "cpu":
            self.phase_seconds.append(spent)
        self.loss, self.grad_norm = loss, grad_norm  # tensors: reading them would sync inside the timing
        return seconds


def interleaved(steppers: dict, table, warmup: int, steps: int) -> dict[str, dict]:
    """tokens/s (median and fastest step) and step times per stepper; one step of each in turn."""
    times = {name: [] for name in steppers}
    for _ in range(warmup + steps):
        for name, step in steppers.items():
            times[name].append(step(table))
    tokens = sum(table.column("response_ids").combine_chunks().value_lengths().to_pylist())
    return {name: {"tokens_per_s": tokens / statistics.median(t[warmup:]),
                   "best_tokens_per_s": tokens / min(t[warmup:]), "step_seconds": t[warmup:]}
            for name, t in times.items()}


def ratio_vs_plain(variant: dict, plain: dict, paired: bool) -> float:
    """Median over rounds of plain/variant step time when both ran in the same rounds (drift
    cancels pairwise); otherwise the ratio of median tokens/s."""
    if paired:
        return statistics.median(p / v for p, v in zip(plain["step_seconds"], variant["step_seconds"]))
    return variant["tokens_per_s"] / plain["tokens_per_s"]


def _ds_step(trainer):
    return lambda table: trainer.train_step(table, checked=True)["seconds"]


def _ds_step_full_logits(trainer):
    """A step of the in-process worker with the output layer over every position (the ablation)."""
    import switchkd.trainer.worker as worker

    def step(table):
        kept = worker.shifted_logits
        worker.shifted_logits = functools.partial(kept, project_all=True)
        try:
            return trainer.train_step(table, checked=True)["seconds"]
        finally:
            worker.shifted_logits = kept
    return step


def _student(size: dict, tmp: str) -> tuple[Path, int]:
    """(student dir, vocabulary size): the default pair's student (prepared and cached under
    models/, as `make run` does), or a random llama with the tiny vocabulary."""
    if size.get("pair") != "smollm2":
        from switchkd.rollout.models.tiny import VOCAB_SIZE

        return build_student(Path(tmp) / "student", size["layers"], size["hidden"]), VOCAB_SIZE
    from transformers import AutoConfig

    from switchkd.rollout.models.real import prepare_default_models

    student = prepare_default_models(Path(__file__).resolve().parents[1] / "models")["student"]
    return student, AutoConfig.from_pretrained(student).vocab_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few steps (make test)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 1 2; quick: 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for each side in total")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: nccl, one worker per GPU")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both sides (bf16: GPU)")
    parser.add_argument("--size", choices=tuple(SIZES), help="model and batch (default: quick, gpu or full)")
    args = parser.parse_args(argv)
    size_name = args.size or ("quick" if args.quick else "gpu" if args.device == "cuda" else "full")
    size = SIZES[size_name]
    workers = args.workers or ([1] if args.quick or args.device == "cuda" or "pair" in size else [1, 2])
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.device == "cuda" and max(workers) > torch.cuda.device_count():
        parser.error(f"--workers {max(workers)}: only {torch.cuda.device_count()} GPU(s) visible (one per worker)")
    torch.set_num_threads(args.threads)
    stages = size.get("stages", (1, 2, 3))
    with tempfile.TemporaryDirectory() as tmp:
        student, vocab = _student(size, tmp)
        table = synthetic_batch(size["rows"], size["prompt"], size["response"], size["topk"], vocab)

        def config(stage, n_workers):
            return trainer_config(student, Path(tmp) / "run", stage=stage, rows=size["rows"],
                                  micro=size["micro"] // n_workers, workers=n_workers, device=args.device,
                                  precision=args.precision,
                                  extra=(f"trainer.cpus_per_worker={max(1, args.threads // n_workers)}",))

        results = {}
        trainers = []
        try:
            plain_loop = PlainLoop(config(1, 1))
            steppers = {"plain": plain_loop.step}
            if 1 in workers:  # all single-worker variants alive at once, stepped in turn
                for stage in stages:
                    trainers.append(Trainer(config(stage, 1)))
                    steppers[f"deepspeed_zero{stage}_workers1"] = _ds_step(trainers[-1])
                if size.get("full_logits_too"):
                    trainers.append(Trainer(config(1, 1)))
                    steppers["deepspeed_zero1_workers1_full_logits"] = _ds_step_full_logits(trainers[-1])
            results.update(interleaved(steppers, table, size["warmup"], size["steps"]))
            if plain_loop.phase_seconds:
                results["plain"]["phase_seconds"] = {
                    phase: statistics.median(s[phase] for s in plain_loop.phase_seconds[size["warmup"]:])
                    for phase in PHASES}
            for n in (w for w in workers if w > 1):
                for stage in stages:
                    with Trainer(config(stage, n)) as trainer:
                        name = f"deepspeed_zero{stage}_workers{n}"
                        results[name] = interleaved({name: _ds_step(trainer)}, table, size["warmup"],
                                                    size["steps"])[name]
        finally:
            for trainer in trainers:
                trainer.shutdown()
    plain = results.pop("plain")
    report = {
        "benchmark": "trainer_throughput", "mode": size_name, "size": size,
        "device": args.device, "precision": args.precision,
        "machine": {**machine_info(), "threads": args.threads, "load_avg_1m": os.getloadavg()[0]},
        "plain": plain,
        "deepspeed": {k: {**v, "ratio_vs_plain": ratio_vs_plain(v, plain, paired="_workers1" in k)}
                      for k, v in results.items()},
    }
    if "deepspeed_zero1_workers1" in results and args.device == "cpu":  # the target is a CPU one
        ratio = report["deepspeed"]["deepspeed_zero1_workers1"]["ratio_vs_plain"]
        report["target"] = {"zero1_workers1_ratio": ratio, "required": 0.9, "met": ratio >= 0.9}
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
