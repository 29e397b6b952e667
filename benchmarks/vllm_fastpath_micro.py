"""Micro-benchmark: full-vocab log-probs out of vLLM, stock vs switchkd's fast path.

One in-process engine; the fast path's patches are removed for the stock runs and put back
after (same engine, same process, same requests). Three workloads:
  decode   N prompts, T tokens each, full-vocab sample log-probs (the student's draft)
  score    N sequences of P prompt + D draft tokens, full-vocab prompt log-probs
           (the teacher's verification), prefix cache not read
  score_hot  the same with the prompt part already cached (fast path only)
plus a decode floor without log-probs. Stock times include turning vLLM's FlatLogprobs into
numpy arrays (what a caller needs); fast times include everything ``VLLMEngine`` returns.
Decodes are greedy (T=0) on both sides; ``decode_fast_switch_sampled_T1`` adds SWITCH's
Gumbel sampling (switch.gumbel_noise over the full vocab per token) on top.
Wall and process CPU seconds are both reported (the CPU time is robust to a loaded machine).

    python benchmarks/vllm_fastpath_micro.py --model tiny|smol|DIR [--n 8 --tokens 32 ...] [--out F.json]

``smol`` builds (once, cached) a random llama with SmolLM2-135M's shapes except depth:
vocab 49152, hidden 576, 9 heads of 64, 4 layers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def build_smol_like(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peakier than init, like a trained model
    model.save_pretrained(out)
    return out


def resolve_model(name: str) -> str:
    if name == "tiny":
        from switchkd.rollout.models.tiny import build_tiny_models

        root = Path("/tmp/switchkd_bench/tiny")
        if not (root / "student" / "config.json").exists():
            build_tiny_models(root, 0)
        return str(root / "student")
    if name == "smol":
        return str(build_smol_like(Path("/tmp/switchkd_bench/smol_like")))
    return name


def flat_to_dense(flat, vocab: int) -> np.ndarray:
    rows = []
    for i in range(len(flat)):
        s, e = flat.start_indices[i], flat.end_indices[i]
        if s == e:
            continue
        row = np.empty(vocab, np.float32)
        row[np.asarray(flat.token_ids[s + 1:e])] = np.asarray(flat.logprobs[s + 1:e], np.float32)
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, vocab), np.float32)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - w, 3), "cpu_s": round(time.process_time() - c, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=8, help="prompts / sequences per call")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per prompt")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--draft-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best kept)")
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from vllm import SamplingParams

    from switchkd.rollout.engines import fast_logprobs as fp
    from switchkd.rollout.engines.vllm_engine import VLLMEngine

    model = resolve_model(args.model)
    eng = VLLMEngine(model, block_size=32, kv_cache_space_gb=1, max_model_len=1024)
    V = eng.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, V, size=args.prompt_len).tolist() for _ in range(args.n)]
    drafts = [rng.integers(3, V, size=args.draft_len).tolist() for _ in range(args.n)]
    seqs = [p + d for p, d in zip(prompts, drafts)]
    starts = [len(p) for p in prompts]
    N, T = args.n, args.tokens

    def fast_decode(temperature=0.0):
        return eng.decode(prompts, [T] * N, temperature=temperature, seeds=list(range(N)), positions=[0] * N,
                          stop_token_ids=[])

    def floor_decode():
        sp = SamplingParams(max_tokens=T, temperature=0.0, detokenize=False, ignore_eos=True)
        return eng.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)

    def stock_decode():
        sp = SamplingParams(max_tokens=T, temperature=0.0, logprobs=-1, flat_logprobs=True,
                            detokenize=False, ignore_eos=True)
        outs = eng.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [flat_to_dense(o.outputs[0].logprobs, V) for o in outs]

    def fast_score():
        return eng.score(seqs, starts, read_prefix_cache=False)

    def fast_score_hot():
        eng.score(prompts, starts)  # warm the prompt part (untimed below: done in setup)
        return None

    def stock_score():
        sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, prompt_logprobs=-1, flat_logprobs=True,
                            detokenize=False, ignore_eos=True)
        outs = eng.llm.generate([{"prompt_token_ids": s} for s in seqs], sp, use_tqdm=False)
        return [np.concatenate([flat_to_dense(o.prompt_logprobs, V)[a - 1:], flat_to_dense(o.outputs[0].logprobs, V)])
                for o, a in zip(outs, starts)]

    def best(fn, setup=None):
        runs = []
        for _ in range(args.repeats):
            if setup:
                setup()
            runs.append(timed(fn))
        return runs[-1][0], min((r[1] for r in runs), key=lambda t: t["cpu_s"])

    fast_decode(), fast_score()  # warm-up (the first large call is slower)
    res: dict = {"model": args.model, "vocab": V, "n": N, "decode_tokens": T, "prompt_len": args.prompt_len,
                 "draft_len": args.draft_len, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                 "note": "best of --repeats by CPU time; stock includes FlatLogprobs -> numpy"}
    _, res["decode_floor_no_logprobs"] = best(floor_decode)
    fast_dec, res["decode_fast"] = best(fast_decode)
    _, res["decode_fast_switch_sampled_T1"] = best(lambda: fast_decode(1.0))
    fast_sc, res["score_fast"] = best(fast_score)
    eng.reset_prefix_cache()
    _, res["score_fast_prefix_cached"] = best(lambda: eng.score(seqs, starts), setup=fast_score_hot)
    if not args.skip_stock:
        fp.uninstall()
        try:
            stock_dec, res["decode_stock"] = best(stock_decode)
            stock_sc, res["score_stock"] = best(stock_score)
        finally:
            fp.install()
        res["decode_max_abs_diff_fast_vs_stock"] = float(
            max(np.abs(a.logprobs - b).max() for a, b in zip(fast_dec, stock_dec)))
        res["score_max_abs_diff_fast_vs_stock"] = float(max(np.abs(a - b).max() for a, b in zip(fast_sc, stock_sc)))
        for k in ("decode", "score"):
            res[f"{k}_speedup_cpu"] = round(res[f"{k}_stock"]["cpu_s"] / max(res[f"{k}_fast"]["cpu_s"], 1e-9), 1)
            res[f"{k}_speedup_wall"] = round(res[f"{k}_stock"]["wall_s"] / max(res[f"{k}_fast"]["wall_s"], 1e-9), 1)
    eng.shutdown()
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
