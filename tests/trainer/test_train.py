"""The DeepSpeed trainer on the CPU: ZeRO stages x Ray workers, exact resume, export, the CLI."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from switchkd.cluster.cli import main
from switchkd.rollout.local_ray import init_ray
from switchkd.trainer.batch import collate
from switchkd.trainer.group import Trainer
from switchkd.trainer.losses import distill_loss, owner_weights
from switchkd.trainer.offline import batch_rows, load_rollouts, train_offline

TINY_YAML = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def _steps(trainer, table, steps):
    """Losses of ``steps`` seeded full batches, then of a 1-row batch: ranks and micro-batches
    left without rows run dummy passes (ZeRO-3 must not hang on them)."""
    bs = trainer.tc.batch_size
    losses = [trainer.train_step(table.take(batch_rows(table.num_rows, bs, 0, s)), checked=True)["loss"]
              for s in range(steps)]
    return losses + [trainer.train_step(table.slice(0, 1), checked=True)["loss"]]


def _train(cfg, table, steps):
    """Losses of ``_steps`` and the final full weights."""
    with Trainer(cfg) as trainer:
        return _steps(trainer, table, steps), trainer.state_dict_for_sync()


def _hf_logits(model_dir, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_two_workers_train_alike_on_every_zero_stage(make_cfg, rollout_file, tiny_models, tmp_path):
    import ray

    table, _ = load_rollouts([str(rollout_file)], str(tiny_models["student"]))
    ids = torch.tensor([table.column("prompt_ids").to_pylist()[0] + table.column("response_ids").to_pylist()[0]])
    runs = {"1 worker, ZeRO-1": _train(make_cfg(output_dir=tmp_path / "single", batch_size=8, zero_stage=1),
                                               table, 4)}
    init_ray(num_cpus=2)
    try:
        for stage in (0, 1, 2, 3):
            cfg = make_cfg(output_dir=tmp_path / f"zero{stage}", zero_stage=stage, num_workers=2, batch_size=8)
            with Trainer(cfg) as trainer:
                runs[f"2 workers, ZeRO-{stage}"] = _steps(trainer, table, 4), trainer.state_dict_for_sync()
                if stage == 3:  # export gathers the shards: the HF model computes what the engine computes
                    out = trainer.export(tmp_path / "export3")
                    torch.testing.assert_close(_hf_logits(out, ids), trainer.logits(ids), rtol=0, atol=1e-5)
    finally:
        ray.shutdown()
    ref_losses, ref_weights = runs["1 worker, ZeRO-1"]
    for name, (losses, weights) in runs.items():
        assert losses[3] < 0.8 * losses[0], f"{name}: loss did not fall: {losses}"
        assert losses == pytest.approx(ref_losses, rel=1e-4), name
        assert weights.keys() == ref_weights.keys()
        for key in weights:  # measured: max |diff| 3e-5 (Adam on float rounding), 100x below lr
            torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-4, atol=1e-4, msg=f"{name} {key}")


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_resume_reproduces_an_uninterrupted_run(make_cfg, rollout_file, tmp_path, stage):
    common = dict(zero_stage=stage, max_steps=5, save_every=2, warmup_steps=2, lr_schedule="linear")
    whole = make_cfg(output_dir=tmp_path / "whole", **common)
    train_offline(whole, [str(rollout_file)], progress=False)

    cut = make_cfg(output_dir=tmp_path / "cut", **common)
    assert train_offline(cut, [str(rollout_file)], stop_after=3, progress=False)["stopped"]
    ckpts = tmp_path / "cut" / "checkpoints"
    (ckpts / "tmp_step_4" / "deepspeed").mkdir(parents=True)   # a save that crashed half-way
    (ckpts / "step_6").mkdir()                                   # a directory without its state file
    result = train_offline(cut, [str(rollout_file)], resume=True, progress=False)
    assert result["steps"] == 5 and Path(result["checkpoint"]).name == "step_5"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_4", "step_5", "step_6"]  # keep_last=2, tmp swept

    a = load_file(tmp_path / "whole" / "checkpoints" / "step_5" / "hf" / "model.safetensors")
    b = load_file(ckpts / "step_5" / "hf" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    whole_lines = [json.loads(ln) for ln in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in lines] == [m["loss"] for m in whole_lines]
    assert [m["lr"] for m in lines] == [m["lr"] for m in whole_lines]


def test_cli_trains_resumes_and_exports(rollout_file, tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    options = ["train-offline", "--config", TINY_YAML, "--rollouts", str(rollout_file)]
    overrides = [f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}",
            f"trainer.output_dir={run}", "trainer.zero_stage=2", "trainer.lr=0.003", "trainer.batch_size=4",
            "trainer.micro_batch_size=2", "trainer.max_steps=3"]
    assert main(options + overrides) == 0
    assert "trained to step 3" in capsys.readouterr().out
    assert main(options + overrides) == 2 and "pass --resume" in capsys.readouterr().err
    assert main([*options, "--resume", *overrides, "trainer.max_steps=4"]) == 0
    assert main([*options, "--resume", *overrides, "trainer.max_steps=4"]) == 2
    assert "the checkpoint is at step 4, the run ends at step 4" in capsys.readouterr().err
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"loss", "loss_student_tokens", "loss_teacher_tokens", "tokens", "tokens_per_s", "lr", "grad_norm",
            "teacher_fraction", "policy_version", "staleness"} <= metrics[0].keys()
    assert metrics[-1]["policy_version"] == 4 and metrics[-1]["staleness"] == 3 and metrics[0]["grad_norm"] > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "model")]) == 0
    assert "step_4" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "model").iterdir()}
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    trained = load_file(run / "checkpoints" / "step_4" / "hf" / "model.safetensors")
    assert torch.equal(load_file(tmp_path / "model" / "model.safetensors")["lm_head.weight"], trained["lm_head.weight"])
    assert not torch.equal(_hf_logits(tmp_path / "model", ids), _hf_logits(tiny_models["student"], ids))
    (run / "checkpoints" / "tmp_step_9").mkdir()
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "tmp_step_9"), "--out", str(tmp_path / "m2")]) == 2
    assert "a half-written checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m2")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "model")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_teacher_model_source_trains_on_full_logits(make_cfg, rollout_file, tiny_models):
    table, _ = load_rollouts([str(rollout_file)], str(tiny_models["student"]))
    losses, _ = _train(make_cfg(teacher_source="model", batch_size=8, loss="jsd"), table, 3)
    assert losses[2] < losses[0]


def test_teacher_model_source_loss_is_the_full_vocabulary_divergence(make_cfg, rollout_file, tiny_models):
    from transformers import AutoModelForCausalLM

    table, _ = load_rollouts([str(rollout_file)], str(tiny_models["student"]))
    table = table.slice(0, 4)
    cfg = make_cfg(teacher_source="model", batch_size=4, micro_batch_size=2, loss="jsd")
    tc, b = cfg.trainer, collate(table, pad_id=0)
    with torch.no_grad():
        logits = {role: AutoModelForCausalLM.from_pretrained(tiny_models[role], dtype=torch.float64).eval()(
            input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1] for role in ("student", "teacher")}
        expected = distill_loss(tc.loss, logits["student"], teacher_logits=logits["teacher"], loss_mask=b.loss_mask,
                                token_weights=owner_weights(b.owner, b.loss_mask, tc.student_token_weight,
                                                            tc.teacher_token_weight), **tc.loss_params())
    with Trainer(cfg) as trainer:
        assert trainer.train_step(table)["loss"] == pytest.approx(float(expected), rel=1e-5)
