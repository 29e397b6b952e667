"""Weight-sync latency, trainer -> student engine: shm vs collective vs model size, against floors.

    python benchmarks/weight_sync.py [--quick] [--sizes tiny,small,medium,smollm2] [--repeats N]
                                     [--dtype float32|bfloat16] [--json out.json]

For each size a random-weight Llama model is written to a temp dir and served by one
in-process StudentEngine. After one warm-up sync per transport, ``--repeats`` rounds each
sync a NEW version (the base weights moved by seeded noise) once per transport, interleaved
so that load from elsewhere on the machine hits both alike:

* shm: ``write`` (trainer side: write_weights = safetensors save + CRC-32 + fsync + rename),
  ``load`` (engine.update_weights: manifest/size/CRC-32 check + reload_weights + prefix-cache
  reset) and ``prune`` (the older version directories, as cluster/sync.py does); total = sum.
  ``detail.checksum`` is one checksum pass over the file (a sync does two: write and verify).
* collective: ``broadcast_load``, the wall time from starting the sender thread
  (send_weights over gloo, default buckets) to the engine's update_weights having loaded it;
  ``detail.sender`` is how long the sending side (the trainer) was blocked.

Floors, measured in the same rounds (on the version the engine already serves):
* ``memcpy``: a plain torch copy of the full state into preallocated tensors of the same
  shapes and dtype (the bytes any transport must at least move once);
* ``engine_reload``: vLLM's own in-place ``reload_weights`` from tensors already in the
  engine's memory, plus the prefix-cache reset: what both transports must at least do in the
  engine (on the CPU this includes re-packing every linear weight for the CPU kernels);
* ``safetensors_file``: save the state to the same tmpfs root and load it back (no checksum,
  no fsync, no engine).
Ratios are median totals over median floors.

Correctness, once per size and transport (after the last timed sync): the engine must report
the new version, its log-probs along a fixed sequence must equal an HF forward of the synced
weights (max |diff| <= 1e-3 in float32; total variation <= 5e-2 in bfloat16, as
cluster/sync.py's check) and differ from those of the weights it served before. A failure is
reported (``correct: false``, exit status 1, the JSON still written); for a tied-embedding
model the report also compares against the synced body with the lm_head the engine started
with (``max_abs_logprob_diff_vs_stale_tied_lm_head``), and ``tied_lm_head_repack`` times the
CPU re-packing of that head, after all syncs, for information.

Everything runs in this one process (vLLM's CPU worker pins torch's threads process-wide, so
the floors and the sender share the engine's thread setting). Bytes = what the trainer sends
(its named_parameters, tied embeddings once).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, stats, write_json  # noqa: E402

from switchkd.rollout.local_ray import free_port  # noqa: E402

SMOLLM2_VOCAB = 49152
# name -> LlamaConfig fields. Head dim 64 throughout (vLLM CPU attention).
SIZES: dict[str, dict] = {
    # the repo's tiny student (rollout/models/tiny.py): vocab 512, hidden 128, 2 layers, untied
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False),
    # ~19M: SmolLM2 vocab, narrow
    "small": dict(vocab_size=SMOLLM2_VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # ~64M: SmolLM2-135M shape with 10 layers (the default layer-dropped student)
    "medium": dict(vocab_size=SMOLLM2_VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=10,
                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # ~135M: SmolLM2-135M
    "smollm2": dict(vocab_size=SMOLLM2_VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
TOLERANCE = {"float32": ("max_abs_logprob_diff", 1e-3), "bfloat16": ("max_tv", 5e-2)}
PROBE_LEN = 16
TIMEOUT_S = 300.0


def _build_model(name: str, out: Path, seed: int):
    """Random-weight LlamaForCausalLM of size ``name`` saved (float32 safetensors) to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[name], head_dim=64, max_position_embeddings=2048, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    return model


class _Versions:
    """Weight version v = base + c(v) * noise: a new, deterministic 'policy' per version."""

    def __init__(self, model, dtype, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.base = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.noise = {n: 0.1 * max(float(p.std()) if p.numel() > 1 else 0.0, 0.02) * torch.randn(p.shape, generator=g)
                      for n, p in self.base.items()}

    def state(self, version: int) -> dict:
        import torch

        c = float(version % 7 + 1)
        return {n: torch.add(b, self.noise[n], alpha=c).to(self.dtype) for n, b in self.base.items()}


def _reload_in_memory(worker, items) -> None:
    """The engine-side floor: vLLM's own in-place reload from tensors already in memory."""
    worker.reload_weights(weights_iterator=iter(items))


def _repack_lm_head(worker) -> None:
    """Rebuild the lm_head's kernel weights from its (tied) parameter: the step a tied-embedding
    sync skips on the CPU (see _stale_head_logprobs). Timed for information only, after all syncs."""
    model = worker.model_runner.get_model()
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def _hf_logprobs(model, state, ids):
    import torch

    model.load_state_dict({n: t.float() for n, t in state.items()}, strict=False)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()


def _engine_logprobs(engine, ids):
    import numpy as np

    return engine.score([ids], [1])[0].astype(np.float64)


def _stale_head_logprobs(model, state, initial_embed, ids):
    """HF log-probs of ``state`` but with the output head the engine started with (untied):
    what an engine serves if a sync updates the tied embedding but not its lm_head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    untied = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": False})).eval()
    untied.load_state_dict({**{n: t.float() for n, t in state.items()}, "lm_head.weight": initial_embed.float()})
    with torch.no_grad():
        out = torch.log_softmax(untied(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
    del untied
    return out


def _check(engine, model, state, ids, version, previous, dtype: str, initial_embed) -> tuple[dict, object]:
    """Correctness of the engine after syncing ``state`` as ``version``; returns (report, log-probs)."""
    import numpy as np

    got = _engine_logprobs(engine, ids)
    want = _hf_logprobs(model, state, ids)
    diff = float(np.abs(got - want).max())
    tv = float(0.5 * np.abs(np.exp(got) - np.exp(want)).sum(-1).max())
    changed = float(np.abs(got - previous).max())
    metric, tol = TOLERANCE[dtype]
    value = {"max_abs_logprob_diff": diff, "max_tv": tv}[metric]
    ok = engine.version() == version and value <= tol and changed > 10 * value and changed > 0
    report = {"version": version, "engine_version": engine.version(), "max_abs_logprob_diff": diff, "max_tv": tv,
              "changed_by": changed, "metric": metric, "tolerance": tol, "ok": bool(ok)}
    if not ok and model.config.tie_word_embeddings:  # diagnosis: is it the tied lm_head left stale?
        stale = _stale_head_logprobs(model, state, initial_embed, ids)
        report["max_abs_logprob_diff_vs_stale_tied_lm_head"] = float(np.abs(got - stale).max())
    return report, got


def bench_size(name: str, args, work: Path) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from switchkd.rollout.engines.actors import StudentEngine
    from switchkd.rollout.weight_sync import SyncTicket
    from switchkd.rollout.weight_sync.collective import new_group, send_weights
    from switchkd.rollout.weight_sync.shm import WEIGHTS_FILE, checksum_file, default_root, prune, write_weights

    model_dir = work / name
    model = _build_model(name, model_dir, seed=args.seed)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(args.seed).integers(3, vocab, PROBE_LEN).tolist()
    versions = _Versions(model, getattr(torch, args.dtype), seed=args.seed + 1)
    initial_embed = versions.base["model.embed_tokens.weight"].to(versions.dtype)
    nbytes = sum(t.numel() * versions.dtype.itemsize for t in versions.base.values())
    params = sum(t.numel() for t in versions.base.values())
    root = default_root()  # tmpfs (/dev/shm) where there is one, as the trainer uses
    engine = None
    try:
        start = time.perf_counter()
        engine = StudentEngine(model=str(model_dir), dtype=args.dtype, kv_cache_space_gb=1.0, max_model_len=256,
                               seed=args.seed)
        engine_start_s = time.perf_counter() - start
        initial = _engine_logprobs(engine, ids)

        host, port = "127.0.0.1", free_port()
        joined: dict = {}
        start = time.perf_counter()
        t = threading.Thread(target=lambda: joined.update(g=new_group("gloo", host, port, 0, 2, TIMEOUT_S)))
        t.start()
        try:
            engine.init_weight_group(host, port, 2, "gloo", TIMEOUT_S)
        finally:
            t.join()
        sender = joined["g"]
        group_init_s = time.perf_counter() - start

        def sync_shm(version: int, state: dict) -> dict:
            t0 = time.perf_counter()
            path = write_weights(root, version, state)
            t1 = time.perf_counter()
            got = engine.update_weights(SyncTicket(version, "shm", str(path)).to_dict())
            t2 = time.perf_counter()
            prune(root, older_than=version)
            t3 = time.perf_counter()
            if got != version or engine.version() != version:
                raise RuntimeError(f"shm sync of version {version}: engine reports {got}/{engine.version()}")
            t4 = time.perf_counter()
            checksum_file(path / WEIGHTS_FILE)
            checksum = time.perf_counter() - t4
            return {"write": t1 - t0, "load": t2 - t1, "prune": t3 - t2, "total": t3 - t0, "checksum": checksum,
                    "file_bytes": (path / WEIGHTS_FILE).stat().st_size}

        def sync_collective(version: int, state: dict) -> dict:
            out: dict = {}

            def send():
                try:
                    send_weights(sender, state, version, torch.device("cpu"), TIMEOUT_S)
                except BaseException as e:  # reported below, after the engine side returned
                    out["error"] = e
                out["sent"] = time.perf_counter()

            t0 = time.perf_counter()
            th = threading.Thread(target=send)
            th.start()
            try:
                got = engine.update_weights(SyncTicket(version, "collective").to_dict())
            finally:
                th.join()
            t1 = time.perf_counter()
            if "error" in out:
                raise out["error"]
            if got != version or engine.version() != version:
                raise RuntimeError(f"collective sync of version {version}: engine reports {got}/{engine.version()}")
            return {"broadcast_load": t1 - t0, "total": t1 - t0, "sender": out["sent"] - t0}

        dest: dict = {}

        def floors(state: dict) -> dict:
            """``state`` is the version the engine serves already: reloading it changes nothing."""
            if not dest:
                dest.update({n: torch.empty_like(t) for n, t in state.items()})
            t0 = time.perf_counter()
            for n, t in state.items():
                dest[n].copy_(t)
            t1 = time.perf_counter()
            items = list(state.items())
            t2 = time.perf_counter()
            engine.llm.collective_rpc(_reload_in_memory, args=(items,))
            engine.reset_prefix_cache()
            t3 = time.perf_counter()
            del items
            path = Path(tempfile.mkdtemp(prefix="floor-", dir=root)) / WEIGHTS_FILE
            try:
                t4 = time.perf_counter()
                save_file({n: t.contiguous() for n, t in state.items()}, str(path))
                t5 = time.perf_counter()
                loaded = load_file(str(path))
                t6 = time.perf_counter()
                del loaded
            finally:
                shutil.rmtree(path.parent, ignore_errors=True)
            return {"memcpy": t1 - t0, "engine_reload": t3 - t2, "save": t5 - t4, "load": t6 - t5, "file": t6 - t4}

        version = engine.version()
        # warm-up: one sync per transport, one floor pass
        version += 1
        sync_shm(version, versions.state(version))
        version += 1
        sync_collective(version, versions.state(version))
        floors(versions.state(version))

        rec: dict = {"shm": [], "collective": [], "floors": []}
        seen: dict = {"shm": [], "collective": []}
        correctness: dict = {}
        previous = initial
        for r in range(args.repeats):
            last = r == args.repeats - 1
            for transport, sync in (("shm", sync_shm), ("collective", sync_collective)):
                version += 1
                state = versions.state(version)
                gc.collect()
                rec[transport].append(sync(version, state))
                seen[transport].append(version)
                if last:  # untimed: the engine serves exactly what was sent
                    correctness[transport], previous = _check(engine, model, state, ids, version, previous, args.dtype,
                                                                initial_embed)
                del state
            rec["floors"].append(floors(versions.state(version)))
            gc.collect()
        correctness["ok"] = all(correctness[t]["ok"] for t in ("shm", "collective"))
        repack = []
        if model.config.tie_word_embeddings:  # after all checks: it changes what the engine serves
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                engine.llm.collective_rpc(_repack_lm_head)
                repack.append(time.perf_counter() - t0)
        final_version = engine.version()
    finally:
        if engine is not None:
            engine.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(model_dir, ignore_errors=True)

    col = lambda rows, key: [row[key] for row in rows]
    shm_total, coll_total = stats(col(rec["shm"], "total")), stats(col(rec["collective"], "total"))
    memcpy, file_floor = stats(col(rec["floors"], "memcpy")), stats(col(rec["floors"], "file"))
    reload = stats(col(rec["floors"], "engine_reload"))
    gbps = lambda s: nbytes / s["median_s"] / 1e9
    return {
        "size": name, "params": params, "bytes": nbytes, "tensors": len(versions.base), "dtype": args.dtype,
        "config": SIZES[name], "engine_start_s": engine_start_s, "final_version": final_version,
        "transports": {
            "shm": {"phases": {k: stats(col(rec["shm"], k)) for k in ("write", "load", "prune")},
                    "detail": {"checksum": stats(col(rec["shm"], "checksum"))},
                    "total": shm_total, "gb_per_s": gbps(shm_total), "versions": seen["shm"],
                    "file_bytes": rec["shm"][-1]["file_bytes"]},
            "collective": {"phases": {"broadcast_load": stats(col(rec["collective"], "broadcast_load"))},
                           "detail": {"sender": stats(col(rec["collective"], "sender"))},
                           "total": coll_total, "gb_per_s": gbps(coll_total), "versions": seen["collective"],
                           "group_init_s": group_init_s, "backend": "gloo"},
        },
        "floors": {
            "memcpy": {**memcpy, "gb_per_s": gbps(memcpy)},
            "engine_reload": {**reload, "gb_per_s": gbps(reload)},
            "safetensors_file": {"phases": {"save": stats(col(rec["floors"], "save")),
                                            "load": stats(col(rec["floors"], "load"))},
                                 "total": file_floor, "gb_per_s": gbps(file_floor)},
        },
        "ratios": _ratios(shm_total, coll_total, memcpy, reload, file_floor, "median_s"),
        # the same on the fastest repeat of each (less sensitive to load from other processes)
        "ratios_min": _ratios(shm_total, coll_total, memcpy, reload, file_floor, "min_s"),
        "correctness": correctness,
        # the CPU re-packing of a tied lm_head that the syncs above skip (None: untied model)
        "tied_lm_head_repack": stats(repack) if repack else None,
    }


def _ratios(shm, coll, memcpy, reload, file_floor, key: str) -> dict:
    return {
        "shm_over_memcpy": shm[key] / memcpy[key], "collective_over_memcpy": coll[key] / memcpy[key],
        "shm_over_engine_reload": shm[key] / reload[key], "collective_over_engine_reload": coll[key] / reload[key],
        "shm_over_file": shm[key] / file_floor[key], "collective_over_file": coll[key] / file_floor[key],
        "shm_over_collective": shm[key] / coll[key],
    }


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="switchkd_wsync_bench_"))
    results = []
    try:
        for name in args.sizes:
            print(f"[weight_sync] {name} ...", file=sys.stderr, flush=True)
            results.append(bench_size(name, args, work))
            r = results[-1]
            print(f"[weight_sync] {name}: {r['bytes'] / 1e6:.1f} MB shm {r['transports']['shm']['total']['median_s']:.3f} s "
                  f"collective {r['transports']['collective']['total']['median_s']:.3f} s "
                  f"memcpy {r['floors']['memcpy']['median_s']:.4f} s ok={r['correctness']['ok']}",
                  file=sys.stderr, flush=True)
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [{"size": r["size"], "params": r["params"], "bytes": r["bytes"],
              "shm_s": r["transports"]["shm"]["total"]["median_s"],
              "collective_s": r["transports"]["collective"]["total"]["median_s"],
              "memcpy_s": r["floors"]["memcpy"]["median_s"],
              "engine_reload_s": r["floors"]["engine_reload"]["median_s"],
              "file_s": r["floors"]["safetensors_file"]["total"]["median_s"],
              **r["ratios"], "correct": r["correctness"]["ok"]} for r in results]
    return {"benchmark": "weight_sync", "machine": machine_info(),
            "config": {"sizes": list(args.sizes), "repeats": args.repeats, "dtype": args.dtype, "seed": args.seed,
                       "quick": args.quick, "backend": "gloo", "statistic": "median"},
            "sizes": results, "table": table, "correct": all(r["correctness"]["ok"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny size only, 2 repeats (seconds; for tests)")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=tuple(TOLERANCE), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = "tiny", 2
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    result = run(args)
    write_json(result, args.json)
    if not result["correct"]:
        sys.exit("weight_sync benchmark: a synced engine did not serve the synced weights (see 'correctness')")


if __name__ == "__main__":
    main()
