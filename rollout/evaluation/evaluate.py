"""`switchkd eval`: a model's responses to held-out prompts, scored against the references and
by the teacher, and the teacher-token fraction by position of SWITCH rollout files.

Responses come from the model in a vLLM engine, greedy and sampled at ``rollout.temperature``
(per-prompt seeds as in rollouts), at most ``rollout.max_new_tokens`` tokens, stopping at EOS,
on the whole split or a seeded sample of it. Per prompt (see ``score_responses``):

- ``rougeL``: ROUGE-L F1 x100 against the reference (the DistiLLM protocol: rouge-score, Porter
  stemming), what the SWITCH paper reports;
- ``fidelity``: ROUGE-L F1 x100 of the greedy answer against the teacher's greedy answer;
- ``teacher_nll``: the teacher's NLL per token of the model's answer;
- ``reverse_kl``: for sampled answers, log q(y_t) - log p_T(y_t) per token, an estimate of the
  reverse KL from the model to the teacher on the model's own samples.

Every metric is reported overall and per reference-length bucket (reference tokens, EOS
excluded), since SWITCH's gains are expected to grow with response length; the per-prompt rows
let ``switchkd.rollout.evaluation.stats`` compare two reports with paired bootstrap CIs.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from switchkd.rollout.config import DataConfig, ModelConfig, RolloutConfig
from switchkd.rollout.data.prompts import Example, PromptError, load_examples
from switchkd.rollout.evaluation.stats import METRICS, seeded_sample
from switchkd.rollout.generate import summarize
from switchkd.rollout.logs import console
from switchkd.rollout.io import atomic_write_bytes
from switchkd.rollout.models.checks import CPU_HEAD_SIZES, ModelError, head_size, read_model_config
from switchkd.rollout.data.schema import SchemaError, read_rollouts
from switchkd.rollout.data.sequences import Prompt, SequenceBuilder

REFERENCE_LENGTH_BUCKETS = (0, 16, 32, 64, 128)   # -> 0-15, 16-31, 32-63, 64-127, 128+


@dataclass
class Decoded:
    token_ids: list[int]                 # the response, a stop token included (last)
    finish_reason: str
    drawn_logprobs: list[float] | None   # log-prob of each token under its sampling distribution


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
               stop_token_ids: list[int], batch_size: int, desc: str) -> list[Decoded]:
    """Every prompt's response, in batches of ``batch_size`` (the engine returns full-vocab
    log-probs per token, so batches bound the memory), with the log-prob of each drawn token
    under the distribution it was drawn from (softmax(log p / T); none when greedy)."""
    out = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False, file=console()) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            results = engine.decode(
                [p.token_ids for p in batch], [min(max_new_tokens, max_model_len - len(p.token_ids)) for p in batch],
                temperature=temperature, seeds=[p.seed for p in batch], positions=[0] * len(batch),
                stop_token_ids=stop_token_ids)
            out.extend(Decoded(r.token_ids.tolist(), r.finish_reason,
                               drawn_logprobs(r.logprobs, r.token_ids, temperature) if temperature > 0 else None)
                       for r in results)
            bar.update(len(batch))
    return out


def drawn_logprobs(raw: np.ndarray, tokens: np.ndarray, temperature: float) -> list[float]:
    """log softmax(raw / T) at each drawn token: the sampling distribution's log-prob of the draw."""
    rows = torch.from_numpy(np.asarray(raw, dtype=np.float32)) / temperature
    picked = torch.log_softmax(rows, dim=-1).gather(1, torch.as_tensor(tokens, dtype=torch.long)[:, None])
    return picked[:, 0].tolist()


def teacher_logprobs(engine, prompts: list[Prompt], responses: list[list[int]], batch_size: int,
                     desc: str) -> list[list[float]]:
    """The teacher's log-prob of every response token (EOS included), prompt by prompt: one
    prefill of prompt + response per prompt (``VLLMEngine.score``)."""
    out = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False, file=console()) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = list(zip(prompts[start:start + batch_size], responses[start:start + batch_size]))
            rows = engine.score([p.token_ids + r for p, r in batch], [len(p.token_ids) for p, _ in batch])
            for (_, response), row in zip(batch, rows):
                idx = np.asarray(response, dtype=np.int64)
                out.append(row[np.arange(len(response)), idx].astype(np.float64).tolist())
            bar.update(len(batch))
    return out


def score_responses(examples: list[Example], generated: list[Decoded], tokenizer, stop_token_ids: list[int],
                    temperature: float, teacher_answers: list[str] | None = None,
                    teacher_lps: list[list[float]] | None = None) -> tuple[dict, list[dict]]:
    """(summary of one decoding mode, per-prompt records) for ``generated`` responses.

    Per prompt: ``rougeL`` against the reference; ``fidelity``, ROUGE-L against the teacher's
    greedy answer (``teacher_answers``); ``teacher_nll``, the teacher's mean NLL per response
    token (``teacher_lps``, EOS included); ``reverse_kl``, for sampled responses, the mean per
    token of log q(y_t) - log p_T(y_t), q the distribution the token was drawn from: averaged over
    prompts, an estimate of the per-token reverse KL from the student's sampling distribution to
    the teacher (the quantity on-policy distillation minimises)."""
    token_ids = [[t for t in g.token_ids if t not in stop_token_ids] for g in generated]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    per_prompt = {"rougeL": rouge_l(texts, [e.response for e in examples])}
    if teacher_answers is not None:
        per_prompt["fidelity"] = rouge_l(texts, teacher_answers)
    if teacher_lps is not None:
        per_prompt["teacher_nll"] = [-_mean(lps) for lps in teacher_lps]
        if temperature > 0:
            per_prompt["reverse_kl"] = [_mean(np.subtract(g.drawn_logprobs, lps)) for g, lps in zip(generated, teacher_lps)]
    buckets = [length_bucket(_reference_tokens(e, stop_token_ids)) for e in examples]
    summary = {"temperature": temperature, **{m: _mean(v) for m, v in per_prompt.items()}}
    summary["by_reference_length"] = {
        label: {"prompts": buckets.count(label),
                **{m: _mean([x for x, b in zip(v, buckets) if b == label]) for m, v in per_prompt.items()}}
        for label in bucket_labels() if label in buckets}
    summary["mean_response_tokens"] = _mean([len(ids) for ids in token_ids])
    summary["finish_reasons"] = dict(Counter(g.finish_reason for g in generated))
    records = [{"response": text, "token_ids": g.token_ids, "tokens": len(ids), "finish_reason": g.finish_reason,
                **{m: v[i] for m, v in per_prompt.items()}}
               for i, (text, ids, g) in enumerate(zip(texts, token_ids, generated))]
    return summary, records


def select_examples(data: DataConfig, tokenizer, seed: int, max_model_len: int,
                    max_prompts: int | None) -> tuple[list[Example], Counter]:
    """The split's examples that have a reference and room to answer; with ``max_prompts``, a
    sample of them seeded by ``data.split_seed`` (never the first N in file order)."""
    loaded, skipped = load_examples(data, tokenizer, seed)
    examples = []
    for example in loaded:
        if example.response is None:
            skipped["no reference response"] += 1
        elif len(example.prompt.token_ids) >= max_model_len:
            skipped["no room under rollout.student.max_model_len"] += 1
        else:
            examples.append(example)
    if not examples:
        raise PromptError(f"data.prompts={data.prompts}: no usable prompts with a reference response in split "
                          f"{data.split} (skipped: {dict(skipped) or 'none'})")
    return seeded_sample(examples, max_prompts, data.split_seed), skipped


def run_eval(model: ModelConfig, data: DataConfig, rollout: RolloutConfig, model_dir: str, *,
             max_prompts: int | None = None, teacher_answers: dict[int, str] | None = None) -> dict:
    """Generate with the model at ``model_dir`` for the references of ``data.split`` (all of them,
    or a seeded sample of ``max_prompts``) and score them: greedy, and sampled at
    ``rollout.temperature`` when it is above 0. The teacher (``model.teacher``) scores every
    response and gives the greedy answers fidelity is measured against: ``teacher_answers``
    ({prompt index: text}, e.g. from the teacher's own report) saves generating them again."""
    from transformers import AutoTokenizer

    from switchkd.rollout.engines.actors import engine_kwargs
    from switchkd.rollout.engines.vllm_engine import VLLMEngine

    check_eval_model(model_dir, rollout.student.device)
    check_eval_model(model.teacher, rollout.teacher.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_len = min(rollout.student.max_model_len, rollout.teacher.max_model_len)
    examples, skipped = select_examples(data, tokenizer, rollout.seed, max_len, max_prompts)
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    modes = {"greedy": 0.0, **({"sampled": rollout.temperature} if rollout.temperature > 0 else {})}
    prompts = [e.prompt for e in examples]
    decode = dict(max_new_tokens=rollout.max_new_tokens, max_model_len=max_len, stop_token_ids=stop,
                  batch_size=rollout.batch_size)
    engine = VLLMEngine(**engine_kwargs(model_dir, model, rollout.student, rollout.seed))
    try:
        generated = {name: decode_all(engine, prompts, temperature=t, desc=f"eval {name}", **decode)
                     for name, t in modes.items()}
    finally:
        engine.shutdown()
    teacher = VLLMEngine(**engine_kwargs(model.teacher, model, rollout.teacher, rollout.seed))
    try:
        if teacher_answers is None or any(p.index not in teacher_answers for p in prompts):
            answers = decode_all(teacher, prompts, temperature=0.0, desc="teacher greedy", **decode)
            teacher_answers = dict(zip((p.index for p in prompts), tokenizer.batch_decode(
                [[t for t in a.token_ids if t not in stop] for a in answers], skip_special_tokens=True)))
        scored = {name: teacher_logprobs(teacher, prompts, [g.token_ids for g in generated[name]], rollout.batch_size,
                                         f"teacher scores {name}") for name in modes}
    finally:
        teacher.shutdown()
    report = {"model": str(model_dir), "teacher": str(model.teacher), "data": str(data.prompts), "split": data.split,
              "prompts": len(examples), "sample": {"max_prompts": max_prompts, "seed": data.split_seed},
              "skipped": dict(skipped), "reference_length_buckets": bucket_labels()}
    rows = [{"index": e.prompt.index, "prompt": e.text, "reference": e.response,
             "reference_tokens": _reference_tokens(e, stop), "bucket": length_bucket(_reference_tokens(e, stop)),
             "teacher_answer": teacher_answers[e.prompt.index]} for e in examples]
    answers = [row["teacher_answer"] for row in rows]
    for name, temperature in modes.items():
        report[name], records = score_responses(examples, generated[name], tokenizer, stop, temperature,
                                                answers if name == "greedy" else None, scored[name])
        for row, record in zip(rows, records):
            row[name] = record
    report["rows"] = rows
    return report


def teacher_answers_of(report: dict) -> dict[int, str]:
    """{prompt index: teacher's greedy answer} of an eval report (to pass to the next run_eval)."""
    return {row["index"]: row["teacher_answer"] for row in report["rows"]}


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
            finished = mode["finish_reasons"].get("stop", 0)
            lines.append(f"{name} (T={mode['temperature']:g}): mean response {mode['mean_response_tokens']:.1f} tokens, "
                         f"{finished} of {report['prompts']} end with EOS")
            for metric, (label, higher) in METRICS.items():
                if metric in mode:
                    buckets = "  ".join(f"[{k}] {v[metric]:.2f}" for k, v in mode["by_reference_length"].items())
                    lines.append(f"  {label} ({'higher' if higher else 'lower'} is better): {mode[metric]:.3f}; "
                                 f"by reference length: {buckets}")
    if "rollouts" in report:
        r = report["rollouts"]
        by_position = "  ".join(f"[{k}] {v:.2f}" for k, v in r["teacher_fraction_by_position"].items())
        lines.append(f"rollouts: teacher-token fraction {r['teacher_fraction']:.3f}; by position: {by_position}")
    return lines


def load_report(path: str | Path) -> dict:
    """An eval report written by ``write_report``; SchemaError (one line, naming the file) otherwise."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such eval report") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: not a JSON eval report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list) or not report["rows"]:
        raise SchemaError(f"{path}: not an eval report with per-prompt rows (written by switchkd eval --out)")
    return report


def write_report(report: dict, out: str | Path) -> None:
    """Write the report as indented JSON, atomically."""
    content = (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write_bytes(out, content)


def _reference_tokens(example: Example, stop_token_ids: list[int]) -> int:
    ids = example.prompt.reference_ids
    return len(ids) - 1 if ids and ids[-1] in stop_token_ids else len(ids)


def _mean(values) -> float:
    return float(sum(values) / len(values)) if len(values) else 0.0
