"""The same engine classes hosted in Ray actors give the same rollouts as in-process ones."""
import numpy as np
import pytest

from switchkd.rollout.config import DataConfig, ModelConfig, RolloutConfig
from switchkd.rollout.generate import run_generate
from switchkd.rollout.local_ray import init_ray
from switchkd.rollout.data.schema import read_rollouts


@pytest.mark.parametrize("mode,teacher_rows", [("lockstep", "logprobs"), ("block", "logprobs"), ("block", "hidden")])
def test_ray_actor_engines_match_in_process(tiny_models, tmp_path, mode, teacher_rows):
    """Lockstep: one PairEngine actor; block: a teacher and a student actor. With
    teacher_rows=hidden the teacher actor sends hidden states, turned into log-probs here."""
    ray = pytest.importorskip("ray")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "the man said {w}"}}\n' for w in ("yes", "no", "water", "people")))
    model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    data = DataConfig(prompts=str(prompts))
    cfg = RolloutConfig(engine="vllm", mode=mode, temperature=1.0, max_new_tokens=24)
    run_generate(model, data, cfg, str(tmp_path / "local.parquet"))
    init_ray(num_cpus=2, log_to_driver=False)
    try:
        import dataclasses

        run_generate(model, data, dataclasses.replace(cfg, use_ray=True, teacher_rows=teacher_rows),
                     str(tmp_path / "ray.parquet"))
    finally:
        ray.shutdown()
    local, remote = read_rollouts(tmp_path / "local.parquet"), read_rollouts(tmp_path / "ray.parquet")
    for column in ("response_ids", "owner", "teacher_topk_ids"):
        assert local.column(column).to_pylist() == remote.column(column).to_pylist()
    for column in ("teacher_topk_logprobs", "jsd"):
        np.testing.assert_allclose(_values(remote, column), _values(local, column), atol=1e-4)


def _values(table, column: str) -> np.ndarray:
    """Every float of a (nested) list column, flat."""
    values = table.column(column).combine_chunks()
    while hasattr(values, "flatten"):
        values = values.flatten()
    return np.asarray(values, np.float64)


def test_wait_until_ready_waits_for_a_restart_and_fails_fast_on_a_dead_actor():
    """A restarting actor is waited for; one with no restarts left (ActorDiedError) fails at once,
    so a run whose engine died for good stops instead of waiting out sync.timeout_s."""
    import os
    import signal

    ray = pytest.importorskip("ray")
    from ray.exceptions import ActorDiedError

    from switchkd.rollout.engines.actors import EngineHandle

    class Engine:
        def version(self):
            return os.getpid()

    init_ray(num_cpus=2, log_to_driver=False)
    try:
        for max_restarts in (1, 0):
            actor = ray.remote(num_cpus=0)(Engine).options(max_restarts=max_restarts, max_task_retries=0).remote()
            handle = EngineHandle(actor=actor)
            os.kill(handle.call("version"), signal.SIGKILL)
            if max_restarts:
                handle.wait_until_ready(60)
                assert handle.call("version") > 0
            else:  # before the fix: TimeoutError after 60 s of retrying a dead actor
                with pytest.raises(ActorDiedError):
                    handle.wait_until_ready(60)
    finally:
        ray.shutdown()
