"""`switchkd eval`: a model's responses to held-out prompts scored with ROUGE-L, and the
teacher-token fraction by position of SWITCH rollout files.

ROUGE-L follows the DistiLLM protocol: the F1 of each response against its reference
(rouge-score, Porter stemming), averaged over prompts, x100. Responses come from the model in
a vLLM engine, greedy and sampled at ``rollout.temperature`` (per-prompt seeds as in
rollouts), at most ``rollout.max_new_tokens`` tokens, stopping at EOS. Scores are also
reported per reference-length bucket (reference tokens, EOS excluded), since SWITCH's gains
are expected to grow with response length.
"""
from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

from tqdm import tqdm

from switchkd.rollout.config import DataConfig, ModelConfig, RolloutConfig
from switchkd.rollout.data import Example, PromptError, load_examples
from switchkd.rollout.schema import write_atomic
from switchkd.rollout.generate import summarize
from switchkd.rollout.models import CPU_HEAD_SIZES, ModelError, head_size, read_model_config
from switchkd.rollout.schema import read_rollouts
from switchkd.rollout.sequences import Prompt, SequenceBuilder

REFERENCE_LENGTH_BUCKETS = (0, 16, 32, 64, 128)   # -> 0-15, 16-31, 32-63, 64-127, 128+


def length_bucket(tokens: int) -> str:
    """The REFERENCE_LENGTH_BUCKETS label of a reference of ``tokens`` tokens."""
    for lo, hi in pairwise(REFERENCE_LENGTH_BUCKETS):
        if lo <= tokens < hi:
            return f"{lo}-{hi - 1}"
    return f"{REFERENCE_LENGTH_BUCKETS[-1]}+"


def bucket_labels() -> list[str]:
    """Every bucket label, shortest references first."""
    return [length_bucket(lo) for lo in REFERENCE_LENGTH_BUCKETS]


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 x100 of each prediction against its reference."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return [100.0 * scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def check_eval_model(model_dir: str, device: str) -> None:
    """ModelError (one line, naming --model) for a directory vLLM cannot evaluate."""
    config = read_model_config(model_dir, "--model")
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise ModelError(f"--model={model_dir}: no tokenizer.json (a fast tokenizer is required)")
    if device == "cpu" and head_size(config) not in CPU_HEAD_SIZES:
        raise ModelError(f"--model={model_dir}: head size {head_size(config)} is not supported by vLLM on the CPU")


def decode_all(engine, prompts: list[Prompt], *, temperature: float, max_new_tokens: int, max_model_len: int,
               stop_token_ids: list[int], batch_size: int, desc: str) -> list[tuple[list[int], str]]:
    """(generated ids, finish reason) per prompt, in batches of ``batch_size`` (the engine
    returns full-vocab log-probs per token, so batches bound the memory)."""
    out = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            results = engine.decode(
                [p.token_ids for p in batch], [min(max_new_tokens, max_model_len - len(p.token_ids)) for p in batch],
                temperature=temperature, seeds=[p.seed for p in batch], positions=[0] * len(batch),
                stop_token_ids=stop_token_ids)
            out.extend((r.token_ids.tolist(), r.finish_reason) for r in results)
            bar.update(len(batch))
    return out


def score_responses(examples: list[Example], generated: list[tuple[list[int], str]], tokenizer,
                    stop_token_ids: list[int], temperature: float) -> tuple[dict, list[dict]]:
    """(summary of one decoding mode, per-prompt records) for ``generated`` responses."""
    token_ids = [[t for t in ids if t not in stop_token_ids] for ids, _ in generated]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    scores = rouge_l(texts, [e.response for e in examples])
    by_bucket: dict[str, list[float]] = {label: [] for label in bucket_labels()}
    for example, score in zip(examples, scores):
        by_bucket[length_bucket(_reference_tokens(example, stop_token_ids))].append(score)
    summary = {
        "temperature": temperature,
        "rougeL": _mean(scores),
        "rougeL_by_reference_length": {label: {"prompts": len(s), "rougeL": _mean(s)}
                                       for label, s in by_bucket.items() if s},
        "mean_response_tokens": _mean([len(ids) for ids in token_ids]),
        "finish_reasons": dict(Counter(reason for _, reason in generated)),
    }
    records = [{"response": text, "tokens": len(ids), "rougeL": score}
               for text, ids, score in zip(texts, token_ids, scores)]
    return summary, records


def run_eval(model: ModelConfig, data: DataConfig, rollout: RolloutConfig, model_dir: str) -> dict:
    """Generate with the model at ``model_dir`` for the references of ``data.split`` and score
    them: greedy, and sampled at ``rollout.temperature`` when it is above 0."""
    from transformers import AutoTokenizer

    from switchkd.rollout.engines import engine_kwargs
    from switchkd.rollout.vllm_engine import VLLMEngine

    check_eval_model(model_dir, rollout.student.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loaded, skipped = load_examples(data, tokenizer, rollout.seed)
    examples = []
    for example in loaded:
        if example.response is None:
            skipped["no reference response"] += 1
        elif len(example.prompt.token_ids) >= rollout.student.max_model_len:
            skipped["no room under rollout.student.max_model_len"] += 1
        else:
            examples.append(example)
    if not examples:
        raise PromptError(f"data.prompts={data.prompts}: no usable prompts with a reference response in split "
                          f"{data.split} (skipped: {dict(skipped) or 'none'})")
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    modes = {"greedy": 0.0, **({"sampled": rollout.temperature} if rollout.temperature > 0 else {})}
    prompts = [e.prompt for e in examples]
    engine = VLLMEngine(**engine_kwargs(model_dir, model, rollout.student, rollout.seed))
    try:
        generated = {name: decode_all(engine, prompts, temperature=t, max_new_tokens=rollout.max_new_tokens,
                                      max_model_len=rollout.student.max_model_len, stop_token_ids=stop,
                                      batch_size=rollout.batch_size, desc=f"eval {name}")
                     for name, t in modes.items()}
    finally:
        engine.shutdown()
    report = {"model": str(model_dir), "data": str(data.prompts), "split": data.split, "prompts": len(examples),
              "skipped": dict(skipped), "reference_length_buckets": bucket_labels()}
    rows = [{"index": e.prompt.index, "prompt": e.text, "reference": e.response,
             "reference_tokens": _reference_tokens(e, stop)} for e in examples]
    for name, temperature in modes.items():
        report[name], records = score_responses(examples, generated[name], tokenizer, stop, temperature)
        for row, record in zip(rows, records):
            row[name] = record
    report["rows"] = rows
    return report


def rollout_teacher_fraction(paths: list[str]) -> dict:
    """Teacher-token fraction, overall and by response position, of SWITCH rollout Parquet files."""
    seqs = []
    for path in paths:
        table = read_rollouts(path)
        for row in table.select(["prompt_index", "prompt_ids", "seed", "owner", "finish_reason"]).to_pylist():
            prompt = Prompt(row["prompt_index"], row["prompt_ids"], row["seed"])
            seqs.append(SequenceBuilder(prompt, topk=0, owner=row["owner"], finish_reason=row["finish_reason"]))
    summary = summarize(seqs, Counter(), seconds=0.0)
    return {"files": [str(p) for p in paths], "sequences": summary.prompts, "tokens": summary.tokens,
            "teacher_fraction": summary.teacher_fraction,
            "teacher_fraction_by_position": summary.teacher_fraction_by_position}


def report_lines(report: dict) -> list[str]:
    """Human-readable summary of an eval report."""
    skipped = ", ".join(f"{n} {why}" for why, n in report["skipped"].items()) or "none"
    lines = [f"model {report['model']}, split {report['split']}: {report['prompts']} prompts (skipped: {skipped})"]
    for name in ("greedy", "sampled"):
        if name in report:
            mode = report[name]
            buckets = "  ".join(f"[{k}] {v['rougeL']:.1f} (n={v['prompts']})"
                                for k, v in mode["rougeL_by_reference_length"].items())
            lines.append(f"{name} (T={mode['temperature']:g}): ROUGE-L {mode['rougeL']:.2f}, "
                         f"mean response {mode['mean_response_tokens']:.1f} tokens; by reference length: {buckets}")
    if "rollouts" in report:
        r = report["rollouts"]
        by_position = "  ".join(f"[{k}] {v:.2f}" for k, v in r["teacher_fraction_by_position"].items())
        lines.append(f"rollouts: teacher-token fraction {r['teacher_fraction']:.3f}; by position: {by_position}")
    return lines


def write_report(report: dict, out: str | Path) -> None:
    """Write the report as indented JSON, atomically."""
    content = (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomic(out, lambda f: f.write(content))


def _reference_tokens(example: Example, stop_token_ids: list[int]) -> int:
    ids = example.prompt.reference_ids
    return len(ids) - 1 if ids and ids[-1] in stop_token_ids else len(ids)


def _mean(values) -> float:
    return float(sum(values) / len(values)) if len(values) else 0.0
