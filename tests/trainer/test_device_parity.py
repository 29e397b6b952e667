"""The DeepSpeed trainer on each device equals a plain PyTorch loop on the CPU, step for step.

The plain loop is benchmarks/trainer_throughput.py's (the one the speed ratio is measured
against), run on the CPU in fp32; the trainer runs ZeRO 1-3 on ``device``. Same initial
weights, batch, loss, AdamW, clipping and LR schedule, so the loss and gradient norm of every
step agree, and so does the weight change. The cuda case is marked ``gpu`` (``make test-gpu``,
on a GPU machine); ``make test`` runs the CPU one. Without a GPU, ``-m gpu`` fails, never skips.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _bench():
    spec = importlib.util.spec_from_file_location("trainer_throughput", REPO / "benchmarks" / "trainer_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def student(bench, tmp_path_factory):
    return bench.build_student(tmp_path_factory.mktemp("parity") / "student", layers=2, hidden=128)


def _config(bench, student, out, device, stage):
    return bench.trainer_config(student, out, stage=stage, rows=4, micro=2, device=device,
                                extra=("trainer.lr=0.001", "trainer.grad_clip=1.0"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_trainer_matches_plain_cpu_loop(bench, student, tmp_path, device, stage):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail("the gpu tests need a visible CUDA device")
    table = bench.synthetic_batch(rows=4, prompt=8, response=24, topk=8)
    plain = bench.PlainLoop(_config(bench, student, tmp_path / "plain", "cpu", stage))
    before = {k: v.clone() for k, v in plain.model.state_dict().items()}
    trainer = bench.Trainer(_config(bench, student, tmp_path / "run", device, stage))
    try:
        for step in range(STEPS):
            plain.step(table)
            got = trainer.train_step(table, checked=True, log=False)
            # loss of step 2 onwards is taken after updates: it checks the optimizer too
            assert got["loss"] == pytest.approx(float(plain.loss), rel=1e-4), f"step {step + 1}"
            assert got["grad_norm"] == pytest.approx(float(plain.grad_norm), rel=1e-3), f"step {step + 1}"
        weights = trainer.state_dict_for_sync()
    finally:
        trainer.shutdown()
    ref = plain.model.state_dict()
    assert set(weights) == set(ref)
    moved = torch.cat([(ref[k] - before[k]).flatten() for k in ref])
    diff = torch.cat([(weights[k].float().cpu() - ref[k]).flatten() for k in ref])
    assert moved.norm() > 0
    assert diff.norm() / moved.norm() < 1e-2
