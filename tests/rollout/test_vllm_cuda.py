"""The vLLM engines on CUDA (``make test-gpu``, in the environment of requirements/gpu.txt).

The CPU twins of every check here run in ``make test``: the fast-path patches against the
installed vLLM build, lockstep and block rollouts equal to the HF reference in float32, a
collective weight sync into an engine, and a closed-loop step. Here the engines run on
cuda, the sync goes over nccl and the trainer trains on a GPU. Marked ``gpu``: without a CUDA
build of vLLM and enough visible GPUs these tests fail (naming what is missing), never skip.
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from switchkd.rollout import switch
from switchkd.rollout.config import EngineConfig, ModelConfig, RolloutConfig
from switchkd.rollout.data.sequences import Prompt

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
EOS = 2
CUDA_ENGINE = EngineConfig(device="cuda", num_gpus=1, gpu_memory_utilization=0.25)


def _need_cuda_vllm(gpus: int = 1) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
        pytest.fail(f"this test needs {gpus} visible CUDA device(s); found "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        pytest.fail("the installed vLLM is not the CUDA build: install requirements/gpu.txt (docs/cluster.md)")


def _prompts(n: int, seed: int) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    return [Prompt(i, rng.integers(3, 500, size=rng.integers(3, 40)).tolist(), switch.prompt_seed(seed, i))
            for i in range(n)]


def test_fast_path_patches_match_the_cuda_build():
    """The patched vLLM functions and the internals they rely on are those of the CPU build."""
    _need_cuda_vllm()
    from switchkd.rollout.engines import fast_logprobs as fp

    for owner, name, sig in fp.PATCH_TARGETS:
        original = fp.ORIGINALS.get(f"{owner.__name__}.{name}", getattr(owner, name))
        assert str(inspect.signature(original)) == sig, f"{owner.__name__}.{name} changed signature"
    assert fp.verify_vllm_internals() == []


@pytest.mark.parametrize("mode", ["lockstep", "block"])
def test_cuda_rollouts_equal_the_hf_reference(tiny_models, mode):
    """Greedy float32 SWITCH rollouts on cuda engines: tokens and owners of the HF reference."""
    _need_cuda_vllm()
    from switchkd.rollout.engines.actors import start_engines
    from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator
    from switchkd.rollout.models.hf_reference import HFSwitchGenerator, load_hf_model

    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    cfg = RolloutConfig(engine="vllm", mode=mode, temperature=0.0, max_new_tokens=64, batch_size=16,
                        teacher=CUDA_ENGINE, student=CUDA_ENGINE)
    prompts = _prompts(16, seed=3)
    hf = (load_hf_model(model.teacher, "float32"), load_hf_model(model.student, "float32"))
    reference = HFSwitchGenerator(*hf, cfg, {EOS}, pad_id=0).generate(prompts)
    assert 0.05 < np.concatenate([r.owner for r in reference]).mean() < 0.95
    engines = start_engines(model, cfg)
    try:
        got = VLLMSwitchGenerator(model, cfg, {EOS}, engines=engines).generate(prompts)
    finally:
        for handle in engines:
            handle.shutdown()
    for ref, seq in zip(reference, got):
        assert seq.response_ids == ref.response_ids and seq.owner == ref.owner, f"prompt {ref.prompt.index}"
        np.testing.assert_allclose(seq.jsd, ref.jsd, atol=1e-4)


def test_nccl_weight_sync_into_a_cuda_engine(tiny_models):
    """A collective sync over nccl from cuda:1 into an engine on cuda:0: the engine then serves the
    new weights (its log-probs are those of an HF forward with them)."""
    _need_cuda_vllm(gpus=2)
    from transformers import AutoModelForCausalLM

    from switchkd.rollout.engines.actors import StudentEngine, engine_kwargs
    from switchkd.rollout.local_ray import free_port
    from switchkd.rollout.weight_sync import SyncTicket
    from switchkd.rollout.weight_sync.collective import new_group, send_weights

    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    engine = StudentEngine(**engine_kwargs(model.student, model, CUDA_ENGINE, 0))
    try:
        hf = AutoModelForCausalLM.from_pretrained(model.student, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(5)
        state = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in hf.named_parameters()}
        host, port, joined = "127.0.0.1", free_port(), {}

        def sender_joins():
            torch.cuda.set_device(1)
            joined["group"] = new_group("nccl", host, port, 0, 2, 120.0)

        thread = threading.Thread(target=sender_joins)
        thread.start()
        assert engine.init_weight_group(host, port, 2, "nccl", 120.0) == [1]
        thread.join()
        sent = {}

        def send():
            torch.cuda.set_device(1)
            sent["done"] = send_weights(joined["group"], {n: t.to("cuda:1") for n, t in state.items()}, 1,
                                        torch.device("cuda:1"), 120.0)

        thread = threading.Thread(target=send)
        thread.start()
        assert engine.update_weights(SyncTicket(1, "collective").to_dict()) == 1
        thread.join()
        ids = [[1, 17, 33, 250, 7, 99, 12, 480, 5, 61]]
        hf.load_state_dict(state, strict=False)
        with torch.no_grad():
            want = torch.log_softmax(hf(input_ids=torch.tensor(ids)).logits[0].double(), -1).numpy()
        np.testing.assert_allclose(engine.score(ids, [1])[0].astype(np.float64), want, atol=2e-3)
    finally:
        engine.shutdown()


def test_a_closed_loop_step_on_cuda(tiny_models, tmp_path):
    """`switchkd train` with a lockstep engine pair on one GPU and the trainer on another: two
    steps, the weights synced over nccl after each and checked against the trainer's."""
    _need_cuda_vllm(gpus=2)
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), f"model.teacher={tiny_models['teacher']}",
            f"model.student={tiny_models['student']}", f"data.prompts={REPO / 'configs/prompts/tiny.jsonl'}",
            "data.max_prompts=8", "rollout.max_new_tokens=16", "trainer.batch_size=4", "trainer.micro_batch_size=2",
            "trainer.max_steps=2", "trainer.device=cuda", "trainer.tensorboard=false",
            f"trainer.output_dir={tmp_path / 'run'}", "sync.transport=collective", "sync.check_equal=true",
            *(f"rollout.{role}.{key}={getattr(CUDA_ENGINE, key)}" for role in ("teacher", "student")
              for key in ("device", "num_gpus", "gpu_memory_utilization"))]
    res = subprocess.run([sys.executable, "-m", "switchkd.cluster.cli", "train", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["policy_version"] for m in metrics] == [1, 2]
    assert all(m["sync_max_tv"] < 1e-3 for m in metrics if m.get("engine_version") == m["policy_version"])
