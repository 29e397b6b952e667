"""The memory estimate of `switchkd plan`: its arithmetic against hand-computed values, and the
refusal of a run that cannot fit."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchkd.cluster.config import load_config
from switchkd.cluster.memory import (ENGINE_RUNTIME_GPU, GIB, TRAINER_RUNTIME, ModelShape,
                                     _params_from_config, check_fits, engine_memory, engine_runtime, estimate_memory, model_shape,
                                     memory_killed_error, ray_memory_threshold, refuse_or_warn, RoleMemory,
                                     trainer_memory)
from switchkd.cluster.placement import ClusterError, plan_placement

REPO = Path(__file__).resolve().parents[2]
SHAPE = ModelShape(params=1_000_000, layers=2, hidden=128, kv_heads=2, head_dim=64, vocab=512)


def _cfg(tiny_models, *overrides):
    return load_config(str(REPO / "configs" / "tiny.yaml"), [f"model.teacher={tiny_models['teacher']}",
                                                           f"model.student={tiny_models['student']}", *overrides])


def test_the_parameter_count_from_the_config_matches_the_weights(tiny_models):
    for path in tiny_models.values():
        cfg = json.loads((Path(path) / "config.json").read_text())
        exact = model_shape(path).params
        heads = cfg["num_attention_heads"]
        assert _params_from_config(cfg, cfg["hidden_size"], cfg["num_hidden_layers"], heads,
                                   cfg.get("num_key_value_heads") or heads, cfg["head_dim"]) == exact


def test_a_missing_model_has_no_shape(tmp_path):
    assert model_shape(tmp_path) is None


@pytest.mark.parametrize("stage,precision,expected", [
    # fp32: params 4 + grads 4 + AdamW moments 8 bytes per parameter; ZeRO-1 adds its fp32 master
    # copy (4) and splits moments and copy over the 4 workers, ZeRO-2 the gradients too, ZeRO-3 the
    # parameters too
    (0, "fp32", (4_000_000, 4_000_000, 8_000_000)),
    (1, "fp32", (4_000_000, 4_000_000, 3_000_000)),
    (2, "fp32", (4_000_000, 1_000_000, 3_000_000)),
    (3, "fp32", (1_000_000, 1_000_000, 3_000_000)),
    # bf16: params 2 + grads 2 + (fp32 masters + moments) 12
    (1, "bf16", (2_000_000, 2_000_000, 3_000_000)),
    (3, "bf16", (500_000, 500_000, 3_000_000)),
])
def test_zero_stages_partition_the_model_states(tiny_models, stage, precision, expected):
    cfg = _cfg(tiny_models, f"trainer.zero_stage={stage}", f"trainer.precision={precision}", "trainer.num_workers=4",
               "trainer.batch_size=16", "trainer.micro_batch_size=2", "rollout.max_new_tokens=10",
               "data.max_prompt_tokens=6")
    role = trainer_memory("trainer rank 0", SHAPE, None, cfg, "cpu")
    assert (role.parts["params"], role.parts["grads"], role.parts["optimizer"]) == expected
    bytes_ = 4 if precision == "fp32" else 2
    # one micro-batch of 2 rows x 16 tokens: layers x hidden x 18 x bytes, plus 4 fp32 copies of the logits
    assert role.parts["activations"] == 2 * 16 * (2 * 128 * 18 * bytes_ + 512 * 4 * 4)
    assert role.parts["runtime"] == TRAINER_RUNTIME and "teacher" not in role.parts


@pytest.mark.parametrize("micro,sft_ratio,logit_tokens", [
    (1, 0.0, 10),      # one row: logits over its response only (rollout.max_new_tokens)
    (1, 0.5, 16),      # its reference row is stacked under it: the whole row
    (2, 0.0, 32),      # rows of other prompt lengths: up to every position of both
])
def test_logits_are_counted_from_the_first_trained_position(tiny_models, micro, sft_ratio, logit_tokens):
    cfg = _cfg(tiny_models, f"trainer.micro_batch_size={micro}", f"trainer.sft_ratio={sft_ratio}",
               "trainer.batch_size=4", "rollout.max_new_tokens=10", "data.max_prompt_tokens=6")
    role = trainer_memory("trainer rank 0", SHAPE, None, cfg, "cpu")
    assert role.parts["activations"] == micro * 16 * 2 * 128 * 18 * 4 + logit_tokens * 512 * 4 * 4


def test_a_teacher_forward_in_the_trainer_adds_the_teachers_weights(tiny_models):
    cfg = _cfg(tiny_models, "trainer.teacher_source=model", "model.dtype=bfloat16")
    teacher = dataclasses.replace(SHAPE, params=3_000_000)
    assert trainer_memory("trainer rank 0", SHAPE, teacher, cfg, "cpu").parts["teacher"] == 6_000_000


def test_engine_memory_on_the_cpu_and_per_gpu(tiny_models):
    cfg = _cfg(tiny_models, "rollout.teacher.kv_cache_space_gb=2")
    cpu = engine_memory("teacher engine", SHAPE, cfg.rollout.teacher, "float32", None)
    assert cpu.parts == {"weights": 4_000_000, "kv_cache": 2 * GIB, "runtime": engine_runtime(512)}
    gpu_engine = dataclasses.replace(cfg.rollout.teacher, device="cuda", num_gpus=2, tensor_parallel_size=2,
                                     gpu_memory_utilization=0.5)
    gpu = engine_memory("teacher engine", SHAPE, gpu_engine, "bfloat16", 80 * GIB)
    assert gpu.parts["weights"] == 1_000_000                  # 2 bytes x 1M, split over 2 GPUs
    assert gpu.parts["kv_cache"] == 40 * GIB - 1_000_000 - ENGINE_RUNTIME_GPU   # what the share leaves
    assert gpu.total == gpu.budget == 40 * GIB and check_fits([gpu], 100 * GIB, True) == []


def test_a_cpu_engines_runtime_grows_with_the_vocabulary():
    """The measured peaks beyond weights, KV cache and sync buffer (docs/cluster.md): 0.7 GiB at a
    512-token vocabulary, 1.8-2.2 GiB at Qwen2.5's 151,936, 1.1-1.6 GiB at SmolLM2's 49,152."""
    assert 0.68 * GIB < engine_runtime(512) < 0.72 * GIB
    assert 1.8 * GIB < engine_runtime(151_936) < 2.3 * GIB
    assert 1.1 * GIB < engine_runtime(49_152) < 1.6 * GIB


def test_a_gpu_share_too_small_for_the_weights_is_a_problem(tiny_models):
    cfg = _cfg(tiny_models)
    engine = dataclasses.replace(cfg.rollout.student, device="cuda", num_gpus=1, gpu_memory_utilization=0.1)
    big = dataclasses.replace(SHAPE, params=4_000_000_000)
    role = engine_memory("student engine", big, engine, "bfloat16", 40 * GIB)
    [problem] = check_fits([role], 100 * GIB, True)
    assert problem.startswith("the student engine needs 8.95 GiB per GPU, "
                              "rollout.student.gpu_memory_utilization=0.1 of the GPU gives 4.00 GiB")


def test_cpu_roles_share_the_host_on_one_node_only():
    roles = [RoleMemory("teacher engine", "cpu", {"kv_cache": 10 * GIB}),
             RoleMemory("trainer rank 0", "cpu", {"optimizer": 5 * GIB})]
    assert check_fits(roles, 16 * GIB, single_node=True) == []
    [problem] = check_fits(roles, 12 * GIB, single_node=True)
    assert problem == ("the CPU roles need 15.00 GiB together, this machine has 12.00 GiB (3.00 GiB short; the "
                       "largest is the teacher engine, 10.00 GiB)")
    assert check_fits(roles, 12 * GIB, single_node=False) == []
    # Ray's memory monitor kills workers above a share of the machine: that share is the capacity.
    [problem] = check_fits(roles, 16 * GIB, single_node=True, threshold=0.9)
    assert problem == ("the CPU roles need 15.00 GiB together, this machine has 16.00 GiB, of which a run may use "
                       "14.40 GiB (Ray kills workers above RAY_memory_usage_threshold=0.9) (0.60 GiB short; the "
                       "largest is the teacher engine, 10.00 GiB)")
    # What other processes hold counts too.
    [problem] = check_fits(roles, 16 * GIB, single_node=True, threshold=0.95, in_use=1 * GIB)
    assert problem.startswith("the CPU roles need 15.00 GiB together, this machine has 16.00 GiB, of which a run may "
                              "use 14.20 GiB (Ray kills workers above RAY_memory_usage_threshold=0.95; 1.00 GiB in "
                              "use by other processes) (0.80 GiB short;")


def test_ray_memory_threshold_follows_rays_environment(monkeypatch):
    monkeypatch.delenv("RAY_memory_usage_threshold", raising=False)
    monkeypatch.delenv("RAY_memory_monitor_refresh_ms", raising=False)
    assert ray_memory_threshold() == 0.95
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.8")
    assert ray_memory_threshold() == 0.8
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")   # the monitor is off
    assert ray_memory_threshold() == 1.0


def test_the_estimate_covers_every_placed_role(tiny_models):
    cfg = _cfg(tiny_models, "trainer.num_workers=2", "trainer.batch_size=8", "trainer.micro_batch_size=2")
    roles = {r.role: r for r in estimate_memory(cfg, plan_placement(cfg))}
    assert list(roles) == ["teacher engine", "student engine", "trainer rank 0", "trainer rank 1", "driver",
                           "weight sync", "Ray daemons"]
    # the shm sync's file holds the student's weights as the trainer sends them: in model.dtype
    params = model_shape(cfg.model.student).params
    assert roles["weight sync"].total == params * 4 and "sync buffer" not in roles["student engine"].parts
    bf16 = _cfg(tiny_models, "model.dtype=bfloat16", "trainer.precision=fp32")
    assert {r.role: r for r in estimate_memory(bf16, plan_placement(bf16))}["weight sync"].total == params * 2
    # collective: no file; the student engine holds the broadcast weights until it reloads
    elsewhere = _cfg(tiny_models, "sync.transport=collective", "model.dtype=bfloat16")
    roles = {r.role: r for r in estimate_memory(elsewhere, plan_placement(elsewhere))}
    assert "weight sync" not in roles and roles["student engine"].parts["sync buffer"] == params * 2
    assert "sync buffer" not in roles["teacher engine"].parts


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "switchkd.cluster.cli", "plan", "--config",
                           str(REPO / "configs" / "tiny.yaml"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_plan_prints_the_memory_and_refuses_what_cannot_fit(tiny_models):
    models = [f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}"]
    res = _plan(*models)
    assert res.returncode == 0, res.stderr
    assert "teacher engine   cpu" in res.stdout and "kv_cache 1.00 GiB" in res.stdout
    res = _plan(*models, "rollout.student.kv_cache_space_gb=100000")
    assert res.returncode == 2
    assert ("does not fit (cluster.check_memory=false starts it anyway; `switchkd plan` shows the estimate): "
            "the CPU roles need") in res.stderr
    assert "the largest is the student engine" in res.stderr and "Traceback" not in res.stderr
    res = _plan(*models, "rollout.student.kv_cache_space_gb=100000", "cluster.check_memory=false")
    assert res.returncode == 0
    assert "warning: does not fit, cluster.check_memory=false starts it anyway: the CPU roles need" in res.stdout


def test_a_plan_that_does_not_fit_is_refused_unless_check_memory_is_off():
    assert refuse_or_warn([], True, "run.yaml") is None
    with pytest.raises(ClusterError, match=r"^run.yaml: does not fit .*: the CPU roles need 9 GiB; GPU 0$"):
        refuse_or_warn(["the CPU roles need 9 GiB", "GPU 0"], True, "run.yaml")
    assert refuse_or_warn(["GPU 0"], False, "run.yaml") == "does not fit, cluster.check_memory=false starts it anyway: GPU 0"


def test_a_worker_killed_by_rays_memory_monitor_is_one_line(monkeypatch):
    monkeypatch.delenv("RAY_memory_usage_threshold", raising=False)
    monkeypatch.delenv("RAY_memory_monitor_refresh_ms", raising=False)
    killed = RuntimeError("The actor died. 1 worker(s) were killed due to the node running low on memory. Memory on "
                          "the node (IP: 127.0.0.1, ID: 6baa) was 22.52GB used / 23.54GB limit (0.956514)\nTop 10 ...")
    try:
        try:
            raise killed
        except RuntimeError as e:
            raise TimeoutError("weight sync of version 2 failed") from e
    except TimeoutError as outer:
        line = memory_killed_error(outer, step=3)
    assert line.startswith("Ray's memory monitor killed a worker at step 3 (the machine at 22.52 of 23.54 GiB): "
                           "the run needs more memory than the 0.95 of this machine")
    assert "\n" not in line and "--resume" in line
    assert memory_killed_error(RuntimeError("The actor died unexpectedly"), step=3) is None
