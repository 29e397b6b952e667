"""`switchkd pipeline` (make run) end to end on the tiny pair with the default data: warm-up,
SWITCH distillation from the warmed-up student, evaluation, summary and plots; a second call
continues after the complete stages instead of training again."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_driver import clean_machine  # noqa: F401  (fixture: no Ray process or /dev/shm entry left)

from switchkd.cluster.config import ConfigError
from switchkd.cluster.pipeline import DISTIL_SFT_RATIO, run_pipeline, summary_lines
from switchkd.rollout.data.prompts import prepare_default_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_overrides(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "default.jsonl"
    prepare_default_data(data)
    return [f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}",
            "model.dtype=float32", f"data.prompts={data}", "rollout.max_new_tokens=16", "trainer.batch_size=4",
            "trainer.micro_batch_size=2", "trainer.tensorboard=false"]


def test_pipeline_runs_every_stage_and_continues_after_complete_ones(tiny_overrides, tmp_path, clean_machine):
    out = tmp_path / "run"
    summary = run_pipeline(out, warmup_steps=2, distil_steps=2, eval_prompts=6, overrides=tiny_overrides,
                           prepare=False, progress=False)
    assert json.loads((out / "summary.json").read_text()) == summary
    warm, distil = (json.loads((out / s / "result.json").read_text()) for s in ("warmup", "distil"))
    assert warm["steps"] == distil["steps"] == 2
    assert f"model.student={warm['export']}" in distil["overrides"]       # distillation starts from the warm-up
    assert f"trainer.sft_ratio={DISTIL_SFT_RATIO}" in distil["overrides"] and summary["sft_ratio"] == DISTIL_SFT_RATIO
    assert json.loads((out / "distil" / "metrics.jsonl").read_text().splitlines()[-1])["sft_loss"] is not None
    assert set(summary["scores"]) == {"teacher", "student before (warm-up)", "student after (SWITCH)"}
    for scores in summary["scores"].values():
        assert set(scores["greedy"]) == {"rougeL", "fidelity", "teacher_nll"}
        assert set(scores["sampled"]) == {"rougeL", "teacher_nll", "reverse_kl"}
        assert all(0 <= scores[mode]["rougeL"] <= 100 for mode in scores)
    assert summary["eval_prompts"] == 6
    ci = summary["after_vs_before"]["greedy"]["rougeL"]["all"]
    assert ci["n"] == 6 and ci["lo"] - 1e-9 <= ci["diff"] <= ci["hi"] + 1e-9
    assert ci["diff"] == pytest.approx(summary["scores"]["student after (SWITCH)"]["greedy"]["rougeL"]
                                       - summary["scores"]["student before (warm-up)"]["greedy"]["rougeL"])
    assert 0 <= summary["teacher_fraction"] <= 1
    rollouts = json.loads((out / "eval" / "student_after__SWITCH.json").read_text())["rollouts"]
    assert rollouts["sequences"] == 2 * 4                                 # every distillation rollout counted
    assert sorted(Path(p).name for p in summary["plots"]) == [
        "loss.png", "reverse_kl_before_after.png", "rouge_l_before_after.png", "teacher_fraction_by_position.png",
        "timeline.png"]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in summary["plots"])
    lines = summary_lines(summary)
    assert any(line.startswith("greedy   ROUGE-L vs reference") and "[" in line for line in lines)
    assert any("answers ending with EOS" in line for line in lines)
    primary = summary["primary"]                                          # sampled reverse KL, lower is better
    entry = summary["after_vs_before"]["sampled"]["reverse_kl"]["all"]
    assert (primary["diff"], primary["lo"], primary["hi"]) == (entry["diff"], entry["lo"], entry["hi"])
    assert primary["improved"] == (entry["hi"] < 0)
    assert any(line.startswith("primary metric, sampled reverse KL") for line in lines)

    metrics = (out / "distil" / "metrics.jsonl").read_text()
    again = run_pipeline(out, warmup_steps=2, distil_steps=2, eval_prompts=6, overrides=tiny_overrides,
                         prepare=False, progress=False)
    assert again == summary and (out / "distil" / "metrics.jsonl").read_text() == metrics   # nothing retrained
    with pytest.raises(ConfigError, match="other settings"):
        run_pipeline(out, warmup_steps=3, distil_steps=2, eval_prompts=6, overrides=tiny_overrides, prepare=False,
                     progress=False)


@pytest.mark.parametrize("args,error", [(["--distil-steps", "0"], "--distil-steps: '0': must be a positive integer"),
                                        (["--sft-ratio", "1.5"], "--sft-ratio: '1.5': must be a number in [0, 1]"),
                                        (["--sft-ratio", "half"], "--sft-ratio: 'half': must be a number in [0, 1]")])
def test_pipeline_cli_rejects_bad_arguments(args, error):
    res = subprocess.run([sys.executable, "-m", "switchkd.cluster.cli", "pipeline", "--out", "x", *args],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and error in res.stderr


def test_pipeline_checks_its_config_before_training(tmp_path):
    res = subprocess.run([sys.executable, "-m", "switchkd.cluster.cli", "pipeline", "--out", str(tmp_path / "run"),
                          "--distil-config", str(tmp_path / "missing.yaml")], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip().endswith(f"config file {tmp_path / 'missing.yaml'} does not exist")
    assert not (tmp_path / "run").exists()                                # nothing prepared or trained


@pytest.mark.slow
def test_make_run_pipeline_on_the_default_real_pair(tmp_path):
    """What `make run` runs (default SmolLM2 pair and data), with a few steps per stage."""
    res = subprocess.run([sys.executable, "-m", "switchkd.cluster.cli", "pipeline", "--out", str(tmp_path / "run"),
                          "--warmup-steps", "2", "--distil-steps", "2", "--eval-prompts", "8"],
                         capture_output=True, text=True, cwd=REPO, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["scores"]["teacher"]["greedy"]["rougeL"] > 0   # the real teacher answers in words of the references
    assert "student after (SWITCH)" in res.stdout and len(summary["plots"]) == 5
