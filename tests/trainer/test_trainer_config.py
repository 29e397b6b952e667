"""Trainer config errors: one line naming the key, before any model or worker starts."""
import json

import pytest

from switchkd.cluster.config import ConfigError, load_config
from switchkd.trainer.config import TrainerConfig
from switchkd.trainer.ds_config import TrainerError, build_ds_config, lr_factor


@pytest.mark.parametrize("override,message", [
    ("trainer.zero_stage=4", "trainer.zero_stage=4: allowed values are 0, 1, 2, 3"),
    ("trainer.batch_size=6", "trainer.batch_size=6: must be a multiple of trainer.micro_batch_size"),
    ("trainer.loss=kl", "trainer.loss='kl': allowed values are forward_kl"),
    ("trainer.teacher_source=server", "trainer.teacher_source='server': allowed values are batch, model"),
    ("trainer.lr=0", "trainer.lr=0.0: must be > 0.0"),
    ("trainer.warmup_step=3", "did you mean trainer.warmup_steps?"),
    ("trainer.num_workers=0", "trainer.num_workers=0: must be >= 1"),
    ("trainer.sft_ratio=1.5", "trainer.sft_ratio=1.5: must be <= 1"),
    ("trainer.sft_ratio=-0.1", "trainer.sft_ratio=-0.1: must be >= 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer.micro_batch_size=4", override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="trainer.skew_alpha=1.0: must be < 1"):
        load_config(None, ["trainer.loss=skew_kl", "trainer.skew_alpha=1.0"])
    with pytest.raises(ConfigError, match="trainer.warmup_steps=5: must be <= trainer.max_steps=2"):
        load_config(None, ["trainer.warmup_steps=5", "trainer.max_steps=2"])
    assert TrainerConfig(batch_size=8, micro_batch_size=2, num_workers=2).grad_accum_steps == 2


def test_deepspeed_json_is_built_from_config_and_user_json_merges(tmp_path):
    cfg = TrainerConfig(zero_stage=2, batch_size=8, micro_batch_size=2, num_workers=2, grad_clip=0.5)
    ds = build_ds_config(cfg, "cpu")
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"] == {"stage": 2, "contiguous_gradients": False}
    assert ds["optimizer"]["params"]["torch_adam"] and ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "train_batch_size": "auto"}))
    merged = build_ds_config(TrainerConfig(deepspeed_config=str(user), zero_stage=2), "cpu")
    assert merged["zero_optimization"] == {"stage": 2, "contiguous_gradients": False, "overlap_comm": False} and merged["train_batch_size"] == 8
    user.write_text(json.dumps({"train_batch_size": 32}))
    with pytest.raises(TrainerError, match="train_batch_size=32 disagrees"):
        build_ds_config(TrainerConfig(deepspeed_config=str(user)), "cpu")
    with pytest.raises(TrainerError, match="does not exist"):
        build_ds_config(TrainerConfig(deepspeed_config=str(tmp_path / "nope.json")), "cpu")


def test_lr_schedule_warms_up_and_decays():
    f = lr_factor(TrainerConfig(warmup_steps=2, lr_schedule="linear"), total_steps=6)
    assert [round(f(s), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cos = lr_factor(TrainerConfig(lr_schedule="cosine"), total_steps=4)
    assert cos(0) == 1.0 and cos(2) == pytest.approx(0.5)
    with pytest.raises(TrainerError, match="trainer.lr_schedule=cosine: needs the run length"):
        lr_factor(TrainerConfig(lr_schedule="cosine"), total_steps=None)
