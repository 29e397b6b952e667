"""Weight sync, both transports: after a sync the engine's log-probs equal the trainer's, the
engine reports the new version, and bad versions (corrupt, truncated, stale) are refused while
the engine keeps serving the weights it had."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch

from switchkd.rollout.engines.actors import StudentEngine, engine_kwargs
from switchkd.rollout.weight_sync import SyncTicket, WeightSyncError
from switchkd.rollout.weight_sync.collective import new_group, plan_buckets, receive_weights, send_weights
from switchkd.rollout.weight_sync.shm import checksum_file, read_weights, write_weights
from switchkd.rollout.local_ray import free_port

IDS = [[1, 17, 33, 250, 7, 99, 12, 480, 5, 61]]


@pytest.fixture(scope="module")
def engine(tiny_models):
    from switchkd.cluster.config import load_config

    cfg = load_config(None, [f"model.student={tiny_models['student']}"])
    eng = StudentEngine(**engine_kwargs(str(tiny_models["student"]), cfg.model, cfg.rollout.student, 0))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def student(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()


def _state(model, seed: int) -> dict[str, torch.Tensor]:
    """The model's weights moved by seeded noise: a new 'policy version' to sync."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def _hf_logprobs(model, state) -> np.ndarray:
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor(IDS)).logits[0].double(), -1).numpy()


def _engine_logprobs(engine) -> np.ndarray:
    return engine.score(IDS, [1])[0].astype(np.float64)


def _assert_serves(engine, model, state):
    np.testing.assert_allclose(_engine_logprobs(engine), _hf_logprobs(model, state), atol=2e-4)


def test_shm_sync_loads_new_weights_and_version(engine, student, tmp_path):
    before = _engine_logprobs(engine)
    version = engine.version() + 1
    state = _state(student, version)
    path = write_weights(tmp_path, version, state)
    assert engine.update_weights(SyncTicket(version, "shm", str(path)).to_dict()) == version
    assert engine.version() == version
    after = _engine_logprobs(engine)
    assert np.abs(after - before).max() > 1e-2  # the weights did change
    _assert_serves(engine, student, state)
    # owner-only files, a complete version directory only
    assert oct(os.stat(path).st_mode & 0o777) == "0o700"
    assert all(oct(os.stat(f).st_mode & 0o777) == "0o600" for f in path.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("fault", ["truncated", "corrupt", "manifest_version", "missing_manifest", "stale"])
def test_shm_bad_version_is_refused_and_engine_keeps_serving(engine, student, tmp_path, fault):
    good = engine.version() + 1
    state = _state(student, good)
    engine.update_weights(SyncTicket(good, "shm", str(write_weights(tmp_path / "a", good, state))).to_dict())
    served = _engine_logprobs(engine)
    bad = good + 1 if fault != "stale" else good
    path = write_weights(tmp_path / "b", bad, _state(student, 1000 + bad))
    weights = path / "model.safetensors"
    if fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif fault == "corrupt":
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        weights.write_bytes(bytes(raw))
    elif fault == "manifest_version":
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "version": bad + 5}))
    elif fault == "missing_manifest":
        (path / "manifest.json").unlink()
    with pytest.raises(WeightSyncError) as err:
        engine.update_weights(SyncTicket(bad, "shm", str(path)).to_dict())
    assert {"truncated": "truncated", "corrupt": "CRC-32", "manifest_version": "manifest is version",
            "missing_manifest": "missing", "stale": "already serves"}[fault] in str(err.value)
    assert engine.version() == good
    np.testing.assert_array_equal(_engine_logprobs(engine), served)


def test_collective_sync_loads_new_weights_and_refuses_stale(engine, student):
    host, port = "127.0.0.1", free_port()
    joined = {}
    t = threading.Thread(target=lambda: joined.update(g=new_group("gloo", host, port, 0, 2, 60.0)))
    t.start()
    assert engine.init_weight_group(host, port, 2, "gloo", 60.0) == [1]
    t.join()
    sender = joined["g"]

    def sync(version, state):
        out = {}
        t = threading.Thread(target=lambda: out.update(v=send_weights(sender, state, version,
                                                                      torch.device("cpu"), 60.0, bucket_bytes=1 << 16)))
        t.start()
        try:
            return engine.update_weights(SyncTicket(version, "collective").to_dict())
        finally:
            t.join()

    version = engine.version() + 1
    state = _state(student, 7 + version)
    assert sync(version, state) == version and engine.version() == version
    _assert_serves(engine, student, state)
    served = _engine_logprobs(engine)
    with pytest.raises(WeightSyncError, match="already serves"):
        sync(version, _state(student, 99))  # drained, then refused
    assert engine.version() == version
    np.testing.assert_array_equal(_engine_logprobs(engine), served)
    # the group is still in step after a refusal
    state = _state(student, 11)
    assert sync(version + 1, state) == version + 1
    _assert_serves(engine, student, state)


def test_sync_into_a_tied_embedding_model_updates_its_output_layer(tiny_models, tmp_path):
    """The loader skips a tied lm_head; its CPU kernel's packed copy must still be rebuilt."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from switchkd.cluster.config import load_config

    config = AutoConfig.from_pretrained(tiny_models["student"])
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = AutoModelForCausalLM.from_config(config).eval()
    tied.save_pretrained(tmp_path / "tied")
    cfg = load_config(None, [f"model.student={tmp_path / 'tied'}"])
    eng = StudentEngine(**engine_kwargs(str(tmp_path / "tied"), cfg.model, cfg.rollout.student, 0))
    try:
        state = {n: p.detach() + 0.05 * torch.randn(p.shape) for n, p in tied.named_parameters()}
        assert "lm_head.weight" not in state  # tied: only the embedding travels
        eng.update_weights(SyncTicket(1, "shm", str(write_weights(tmp_path / "sync", 1, state))).to_dict())
        _assert_serves(eng, tied, state)
    finally:
        eng.shutdown()


def test_collective_roundtrip_mixed_dtypes_and_buckets():
    host, port = "127.0.0.1", free_port()
    state = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(300).bfloat16(),
             "d": torch.randn(2, 2, 2)}
    got = {}

    def receiver():
        group = new_group("gloo", host, port, 1, 2, 30.0)
        got["v"], got["w"] = receive_weights(group, torch.device("cpu"), 30.0)

    t = threading.Thread(target=receiver)
    t.start()
    send_weights(new_group("gloo", host, port, 0, 2, 30.0), state, 5, torch.device("cpu"), 30.0, bucket_bytes=64)
    t.join()
    assert got["v"] == 5 and [n for n, _ in got["w"]] == list(state)
    for name, tensor in got["w"]:
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name])


def test_plan_buckets_groups_consecutive_same_dtype_within_limit():
    f32, i64 = torch.float32, torch.int64
    assert plan_buckets([(f32, 4), (f32, 4), (f32, 4), (i64, 1), (f32, 100)], 32) == [[0, 1], [2], [3], [4]]


def test_collective_peer_that_never_comes_times_out():
    with pytest.raises(WeightSyncError, match="weight-sync group"):
        new_group("gloo", "127.0.0.1", free_port(), 0, 2, 1.0)


def test_read_weights_refuses_a_non_safetensors_file(tmp_path):
    path = write_weights(tmp_path, 1, {"w": torch.ones(2)})
    (path / "model.safetensors").write_bytes(b"\x80\x04not safetensors")  # e.g. a pickle
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(bytes=(path / "model.safetensors").stat().st_size,
                    crc32=checksum_file(path / "model.safetensors"))
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightSyncError, match="not a valid safetensors"):
        read_weights(path, 1)
