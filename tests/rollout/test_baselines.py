"""Baselines as configs on the SWITCH path: the shipped configs are one base plus the method's
lines, the generator factory picks the right generator, the reference source skips prompts without
a reference, and one `switchkd train` run on the tiny pair trains on reference responses end to end.
Generator exactness (SKD, on-policy, SeqKD, reference scores) is in test_vllm_generator.py, the
owner rules' math in test_switch.py."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchkd.cluster.config import ConfigError, load_config, to_dict
from switchkd.rollout import switch
from switchkd.rollout.config import ModelConfig, RolloutConfig
from switchkd.rollout.data.prompts import PromptError
from switchkd.rollout.generate import build_generator
from switchkd.rollout.data.reference import HFScorer, ReferenceGenerator, VLLMScorer, reference_response
from switchkd.rollout.data.sequences import Prompt

REPO = Path(__file__).resolve().parents[2]
BASELINES = REPO / "configs" / "baselines"
EOS = 2

# method -> (rollout.source, rollout.switch.rule, rollout.switch.schedule, trainer.sft_ratio)
METHODS = {
    "sft": ("reference", "jsd", "exp", 1.0),
    "kd": ("reference", "jsd", "exp", 0.0),
    "seqkd": ("generate", "teacher", "exp", 0.0),
    "gkd": ("generate", "student", "exp", 0.0),
    "skd": ("generate", "skd", "exp", 0.0),
    "switch-exp": ("generate", "jsd", "exp", 0.0),
    "switch-linear": ("generate", "jsd", "linear", 0.0),
    "switch-const": ("generate", "jsd", "const", 0.0),
}


# The only lines a method's overlay may set: everything else comes from configs/baselines/base.yaml.
METHOD_KEYS = {("rollout", "source"), ("rollout", "switch"), ("trainer", "output_dir"), ("trainer", "sft_ratio")}


def test_every_method_is_the_shared_base_plus_its_method_lines():
    import yaml

    assert sorted(p.stem for p in BASELINES.glob("*.yaml")) == sorted([*METHODS, "base"])
    base = to_dict(load_config(BASELINES / "base.yaml"))
    assert base["trainer"]["max_steps"] and base["rollout"]["max_new_tokens"] == 64
    for name, (source, rule, schedule, sft_ratio) in METHODS.items():
        overlay = yaml.safe_load((BASELINES / f"{name}.yaml").read_text())
        assert overlay.pop("base") == "base.yaml", name
        assert {(section, key) for section, keys in overlay.items() for key in keys} <= METHOD_KEYS, name
        cfg = load_config(BASELINES / f"{name}.yaml")
        assert (cfg.rollout.source, cfg.rollout.switch.rule, cfg.rollout.switch.schedule, cfg.trainer.sft_ratio) == \
            (source, rule, schedule, sft_ratio), name
        assert cfg.trainer.output_dir == f"runs/baselines/{name}"
        assert cfg.data.prompts == "data/default.jsonl" and cfg.rollout.engine == "vllm"


def test_rule_and_source_are_checked_config_keys():
    with pytest.raises(ConfigError, match="rollout.switch.rule='kl': allowed values are jsd, student, teacher, skd"):
        load_config(None, ["rollout.switch.rule=kl"])
    with pytest.raises(ConfigError, match="rollout.source='teacher': allowed values are generate, reference"):
        load_config(None, ["rollout.source=teacher"])
    with pytest.raises(ConfigError, match="rollout.switch.skd_topk=0: must be >= 1"):
        load_config(None, ["rollout.switch.skd_topk=0"])


class _FakeEngine:
    def shutdown(self):
        pass


@pytest.mark.parametrize("source", ["generate", "reference"])
def test_one_factory_builds_every_method(tiny_models, source):
    from switchkd.rollout.models.hf_reference import HFSwitchGenerator
    from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    engines = (_FakeEngine(), _FakeEngine())
    hf = build_generator(model, RolloutConfig(engine="hf", source=source), {EOS})
    vllm = build_generator(model, RolloutConfig(engine="vllm", source=source), {EOS}, engines=engines)
    if source == "generate":
        assert isinstance(hf, HFSwitchGenerator) and isinstance(vllm, VLLMSwitchGenerator)
        assert (vllm.teacher, vllm.student) == engines
    else:
        assert isinstance(hf, ReferenceGenerator) and isinstance(hf.scorer, HFScorer)
        assert isinstance(vllm, ReferenceGenerator) and isinstance(vllm.scorer, VLLMScorer)
        assert (vllm.scorer.teacher, vllm.scorer.student) == engines


def test_reference_response_is_cut_at_eos_and_budget():
    p = Prompt(0, [5, 6], 1, reference_ids=[7, 8, 9, EOS])
    assert reference_response(p, {EOS}, 10) == ([7, 8, 9, EOS], "stop")
    assert reference_response(p, {EOS}, 4) == ([7, 8, 9, EOS], "stop")
    assert reference_response(p, {EOS}, 3) == ([7, 8, 9], "length")
    assert reference_response(dataclasses.replace(p, reference_ids=[7, EOS, 9, EOS]), {EOS}, 10) == ([7, EOS], "stop")
    assert reference_response(dataclasses.replace(p, reference_ids=[7, 8]), {EOS}, 10) == ([7, 8], "length")


class _NoScorer:
    def score(self, sequences, starts):
        raise AssertionError("nothing should be scored")


def test_reference_source_without_any_reference_is_one_clear_error():
    gen = ReferenceGenerator(_NoScorer(), RolloutConfig(source="reference"), {EOS})
    with pytest.raises(PromptError, match="rollout.source=reference: none of the 3 prompts has a reference response"):
        gen.generate([Prompt(i, [5, 6], switch.prompt_seed(0, i)) for i in range(3)])
    assert gen.skipped == {"no reference response": 3}


# --- one closed-loop run on reference responses (KD on ground truth + SFT term) ------------------------

def test_train_on_reference_responses_end_to_end(tiny_models, tmp_path):
    words = "the a one two cat dog runs sleeps very much good bad".split()
    rows = [{"prompt": " ".join(words[i % 7: i % 7 + 4]), "response": " ".join(words[(i * 3) % 9:(i * 3) % 9 + 2 + i % 4])}
            for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "switchkd.cluster.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
         f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}",
         f"data.prompts={data}", "data.split=all", "rollout.source=reference", "rollout.max_new_tokens=6",
         "trainer.sft_ratio=0.5", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.micro_batch_size=2",
         "trainer.tensorboard=false", f"trainer.output_dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained to step 2 (policy version 2)" in res.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["policy_version"] for m in metrics] == [1, 2]
    assert all(m["teacher_fraction"] == 1.0 and m["sft_loss"] > 0 for m in metrics)
    from switchkd.rollout.data.schema import read_rollouts

    for step in range(2):
        table = read_rollouts(run / "rollouts" / f"step_{step:06d}.parquet").to_pylist()
        assert len(table) == 4
        for row in table:
            assert row["reference_ids"] and row["response_ids"] == row["reference_ids"][:6]
            assert row["owner"] == [switch.TEACHER] * len(row["response_ids"])
            assert row["finish_reason"] == ("stop" if len(row["reference_ids"]) <= 6 else "length")
