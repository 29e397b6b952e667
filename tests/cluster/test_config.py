"""Config loading: YAML + dotted overrides, and one-line errors for every kind of mistake."""
from pathlib import Path

import pytest

from switchkd.cluster.config import Config, ConfigError, all_keys, load_config

REPO = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = [
    "model.teacher", "model.student", "model.dtype", "data.prompts", "data.max_prompts", "rollout.engine",
    "rollout.mode", "rollout.temperature", "rollout.max_new_tokens", "rollout.seed", "rollout.switch.tau0",
    "rollout.switch.decay", "rollout.switch.schedule", "trainer.output_dir",
]


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(all_keys())


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_overrides_are_typed_and_applied():
    cfg = load_config(REPO / "configs/tiny.yaml", ["rollout.switch.tau0=0.3", "rollout.engine=vllm",
                                                   "rollout.switch.schedule=linear", "data.max_prompts=null"])
    assert cfg.rollout.switch.tau0 == 0.3 and cfg.rollout.engine == "vllm"
    assert cfg.rollout.switch.schedule == "linear" and cfg.data.max_prompts is None
    assert load_config(None, ["rollout.temperature=1"]).rollout.temperature == 1.0  # int accepted for float


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.rollout.seed = 3


@pytest.mark.parametrize("override,message", [
    ("rollout.swtch.tau0=0.3", "unknown config key rollout.swtch; did you mean rollout.switch?"),
    ("rollout.temprature=0", "did you mean rollout.temperature?"),
    ("rollout.switch.tau0=-0.1", "rollout.switch.tau0=-0.1: must be >= 0.0"),
    ("rollout.switch.schedule=cosine", "rollout.switch.schedule='cosine': allowed values are exp, linear, const"),
    ("rollout.engine=trt", "rollout.engine='trt': allowed values are hf, vllm"),
    ("rollout.mode=fast", "rollout.mode='fast': allowed values are lockstep, block, stepwise"),
    ("rollout.max_new_tokens=1.5", "rollout.max_new_tokens=1.5: expected int, got float"),
    ("rollout.max_new_tokens=true", "expected int, got bool"),
    ("rollout.max_new_tokens=0", "must be >= 1"),
    ("model.dtype=float8", "model.dtype='float8': allowed values are float32, bfloat16, float16"),
    ("model.teacher=null", "model.teacher=null: a value is required"),
    ("rollout.draft_tokens=99", "rollout.draft_tokens=99: must be <= rollout.max_draft_tokens=64"),
    ("rollout.switch=3", "rollout.switch: expected a mapping"),
    ("rollout.seed.x=1", "rollout.seed is a value, not a section"),
    ("noequals", "must look like key.sub=value"),
])
def test_bad_overrides_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/tiny.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_exponent_floats_without_a_dot_are_numbers():
    assert load_config(None, ["rollout.switch.tau0=3e-1"]).rollout.switch.tau0 == 0.3
    assert load_config(None, ["model.teacher=1e5"]).model.teacher == "1e5"  # a string field stays a string


def test_base_configs_merge_and_fail_in_one_line(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("rollout:\n  temperature: 0.5\n  switch:\n    tau0: 0.2\n    decay: 0.1\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\nrollout:\n  switch:\n    tau0: 0.3\n")
    (tmp_path / "top.yaml").write_text("base: sub/mid.yaml\ntrainer:\n  lr: 0.001\n")
    cfg = load_config(tmp_path / "top.yaml", ["rollout.switch.decay=0.2"])
    assert (cfg.rollout.temperature, cfg.rollout.switch.tau0, cfg.rollout.switch.decay, cfg.trainer.lr) == \
        (0.5, 0.3, 0.2, 0.001)                         # nested keys merge; the nearer file and overrides win
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: base config 'nowhere.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base configs form a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")
    (tmp_path / "bad.yaml").write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="base must be a config file path"):
        load_config(tmp_path / "bad.yaml")
