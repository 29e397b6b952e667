"""`switchkd eval`: ROUGE-L wiring, reference-length buckets, the report, rollout teacher
fractions, and the CLI end to end on the tiny student (in-process eager vLLM)."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from switchkd.cluster.config import load_config
from switchkd.rollout.data import schema
from switchkd.rollout.evaluation.evaluate import bucket_labels, length_bucket, rollout_teacher_fraction, rouge_l, run_eval

REPO = Path(__file__).resolve().parents[2]
SWITCHKD = [sys.executable, "-m", "switchkd.cluster.cli"]
MAX_NEW = 12
PROMPTS = [{"prompt": f"the man said {w}", "response": f"people {w} water"} for w in ("yes", "no", "water", "first")] \
    + [{"instruction": "name a sentence", "context": "one two", "response": " ".join(["word"] * 20)},
       {"prompt": "no reference here"}]


def run_cli(*args):
    return subprocess.run([*SWITCHKD, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tiny_models, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}",
        f"rollout.max_new_tokens={MAX_NEW}", "rollout.batch_size=4", *overrides])


def evaluate(cfg, prompts_path):
    data = dataclasses.replace(cfg.data, prompts=str(prompts_path), split="all")
    return run_eval(cfg.model, data, cfg.rollout, cfg.model.student)


def test_length_buckets():
    assert [length_bucket(n) for n in (0, 15, 16, 31, 32, 63, 64, 127, 128, 5000)] == [
        "0-15", "0-15", "16-31", "16-31", "32-63", "32-63", "64-127", "64-127", "128+", "128+"]
    assert bucket_labels() == ["0-15", "16-31", "32-63", "64-127", "128+"]


def test_rouge_l_is_f1_times_100_with_stemming():
    scores = rouge_l(["the cat sat", "running dogs", "alpha beta", ""], ["the cat sat", "run dog", "gamma", "x"])
    assert scores == [100.0, 100.0, 0.0, 0.0]
    assert rouge_l(["a b c d"], ["a b"])[0] == pytest.approx(100 * 2 * 1.0 * 0.5 / 1.5)


def test_eval_report_and_self_reference_scores_100(tiny_models, tmp_path):
    cfg = tiny_config(tiny_models, "rollout.temperature=1.0")
    report = evaluate(cfg, write_jsonl(tmp_path / "p.jsonl", PROMPTS))
    assert report["prompts"] == 5 and report["split"] == "all"
    assert report["skipped"] == {"no reference response": 1}
    assert report["reference_length_buckets"] == bucket_labels()
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        summary = report[mode]
        assert summary["temperature"] == temperature
        assert 0.0 <= summary["rougeL"] <= 100.0
        assert 0 < summary["mean_response_tokens"] <= MAX_NEW
        assert sum(summary["finish_reasons"].values()) == 5
        buckets = summary["by_reference_length"]
        assert {k: v["prompts"] for k, v in buckets.items()} == {"0-15": 4, "16-31": 1}
        scores = [row[mode]["rougeL"] for row in report["rows"]]
        assert summary["rougeL"] == pytest.approx(sum(scores) / 5)
        assert buckets["16-31"]["rougeL"] == pytest.approx(scores[4])
    assert [row["index"] for row in report["rows"]] == [0, 1, 2, 3, 4]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    assert [row["reference_tokens"] for row in report["rows"]] == [
        len(tokenizer(p["response"], add_special_tokens=False)["input_ids"]) for p in PROMPTS[:5]]
    assert report["rows"][4]["prompt"] == "name a sentence\n\none two"
    assert json.loads(json.dumps(report)) == report

    # The model's own greedy responses as references: greedy ROUGE-L is exactly 100.
    own = [{"prompt": row["prompt"], "response": row["greedy"]["response"]} for row in report["rows"]
           if re.search(r"[a-z0-9]", row["greedy"]["response"].lower())]
    assert len(own) >= 3
    again = evaluate(tiny_config(tiny_models, "rollout.temperature=0"), write_jsonl(tmp_path / "own.jsonl", own))
    assert again["greedy"]["rougeL"] == pytest.approx(100.0)
    assert "sampled" not in again
    assert [row["greedy"]["response"] for row in again["rows"]] == [row["response"] for row in own]


def hf_logprobs(model_dir, prompt_ids, response_ids):
    """log p(response token | prefix) under the HF model at ``model_dir`` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1:-1].double(), -1)
    return logp[torch.arange(len(response_ids)), torch.tensor(response_ids)].tolist()


def test_eval_teacher_metrics_match_hf_forwards(tiny_models, tmp_path):
    cfg = tiny_config(tiny_models, "rollout.temperature=1.0")
    report = evaluate(cfg, write_jsonl(tmp_path / "p.jsonl", PROMPTS))
    from switchkd.rollout.data.prompts import load_examples
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    data = dataclasses.replace(cfg.data, prompts=str(tmp_path / "p.jsonl"), split="all")
    prompt_ids = {e.prompt.index: e.prompt.token_ids for e in load_examples(data, tokenizer, cfg.rollout.seed)[0]}
    for row in report["rows"]:
        for mode in ("greedy", "sampled"):
            ids = row[mode]["token_ids"]
            teacher = hf_logprobs(tiny_models["teacher"], prompt_ids[row["index"]], ids)
            assert row[mode]["teacher_nll"] == pytest.approx(-sum(teacher) / len(ids), abs=2e-3)
        ids = row["sampled"]["token_ids"]
        student = hf_logprobs(tiny_models["student"], prompt_ids[row["index"]], ids)
        teacher = hf_logprobs(tiny_models["teacher"], prompt_ids[row["index"]], ids)
        expected = sum(s - t for s, t in zip(student, teacher)) / len(ids)
        assert row["sampled"]["reverse_kl"] == pytest.approx(expected, abs=2e-3)
        assert 0.0 <= row["greedy"]["fidelity"] <= 100.0
    assert "reverse_kl" not in report["greedy"] and report["sampled"]["reverse_kl"] > 0.01

    # The teacher evaluated against itself: its greedy answers are the teacher answers, and its
    # own samples have a reverse KL of 0 (up to decode vs prefill rounding).
    own = evaluate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, student=tiny_models["teacher"])),
                   tmp_path / "p.jsonl")
    assert own["greedy"]["fidelity"] == pytest.approx(100.0)
    assert own["sampled"]["reverse_kl"] == pytest.approx(0.0, abs=1e-3)


def _rollout_row(index, owners):
    n = len(owners)
    return {"prompt_index": index, "prompt_ids": [5, 6], "response_ids": [7] * n, "owner": owners,
            "jsd": [0.1] * n, "tau": [0.4] * n, "student_logprob": [-1.0] * n, "teacher_topk_ids": [[7]] * n,
            "teacher_topk_logprobs": [[-0.1]] * n, "policy_version": 0, "seed": 1, "finish_reason": "length",
            "reference_ids": []}


def test_rollout_teacher_fraction_by_position(tmp_path):
    path = tmp_path / "r.parquet"
    schema.write_parquet(schema.to_table([_rollout_row(0, [1] * 16 + [0] * 4), _rollout_row(1, [0] * 4)]), path)
    result = rollout_teacher_fraction([str(path)])
    assert result["sequences"] == 2 and result["tokens"] == 24
    assert result["teacher_fraction"] == pytest.approx(16 / 24)
    assert result["teacher_fraction_by_position"] == {"0-15": pytest.approx(16 / 20), "16-31": 0.0}


def test_eval_cli_end_to_end(tiny_models, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    rollouts = tmp_path / "r.parquet"
    schema.write_parquet(schema.to_table([_rollout_row(0, [1, 0, 1, 1])]), rollouts)
    out = tmp_path / "eval" / "eval.json"
    common = ["--split", "all", f"data.prompts={prompts}", "rollout.max_new_tokens=8",
              f"model.teacher={tiny_models['teacher']}"]
    res = run_cli("eval", "--config", "configs/tiny.yaml", "--model", tiny_models["student"], "--out", out,
                  "--rollouts", rollouts, "--max-prompts", 4, *common)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["prompts"] == 4 and {"greedy", "sampled", "rows", "rollouts"} <= set(report)
    assert report["sample"] == {"max_prompts": 4, "seed": 0}
    assert report["rollouts"]["teacher_fraction"] == pytest.approx(0.75)
    for text in ("ROUGE-L vs reference (higher is better)", "teacher NLL per token (lower is better)",
                 "reverse KL estimate per token", "ROUGE-L vs teacher's greedy answer", "end with EOS",
                 "rollouts: teacher-token fraction 0.750"):
        assert text in res.stdout
    assert not list(out.parent.glob(".*tmp"))

    # The teacher on the same prompts, its answers reused; then the two reports compared.
    teacher_out = tmp_path / "eval" / "teacher.json"
    res = run_cli("eval", "--config", "configs/tiny.yaml", "--model", tiny_models["teacher"], "--out", teacher_out,
                  "--teacher-report", out, "--max-prompts", 4, *common)
    assert res.returncode == 0, res.stderr
    teacher = json.loads(teacher_out.read_text())
    assert [r["teacher_answer"] for r in teacher["rows"]] == [r["teacher_answer"] for r in report["rows"]]
    assert teacher["greedy"]["fidelity"] == pytest.approx(100.0)
    res = run_cli("eval", "--compare", out, teacher_out)
    assert res.returncode == 0, res.stderr
    fidelity = next(line for line in res.stdout.splitlines() if "vs teacher's greedy answer" in line and " all " in line)
    assert f"{report['greedy']['fidelity']:.3f}" in fidelity and "100.000" in fidelity
    res = run_cli("eval", "--compare", out, tmp_path / "missing.json")
    assert res.returncode == 2 and "missing.json: no such eval report" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "--model=/nonexistent/model: directory does not exist"),
    (["--model", "configs"], "--model=configs: not a model directory (no config.json)"),
    (["--rollouts", "/nonexistent.parquet"], "/nonexistent.parquet: rollout file does not exist"),
    (["data.prompts=/nonexistent.jsonl"], "data.prompts=/nonexistent.jsonl: file does not exist"),
])
def test_eval_cli_user_errors_are_one_line(tiny_models, tmp_path, args, message):
    args = args if "--model" in args else ["--model", tiny_models["student"], *args]
    res = run_cli("eval", "--config", "configs/tiny.yaml", "--out", tmp_path / "e.json", *args,
                  f"model.teacher={tiny_models['teacher']}")
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "e.json").exists()


def test_eval_without_references_is_a_one_line_error(tiny_models, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the man said yes"}])
    res = run_cli("eval", "--config", "configs/tiny.yaml", "--model", tiny_models["student"], "--split", "all",
                  f"data.prompts={prompts}", f"model.teacher={tiny_models['teacher']}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no usable prompts with a reference response in split all (skipped: {'no reference response': 1})" \
        in res.stderr


def test_data_prepare_cli(tmp_path):
    out = tmp_path / "default.jsonl"
    first, second = run_cli("data", "prepare", "--out", out), run_cli("data", "prepare", "--out", out)
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    assert "(already up to date)" not in first.stdout and "(already up to date)" in second.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > 2000 and all(isinstance(r["prompt"], str) and isinstance(r["response"], str) for r in rows)
