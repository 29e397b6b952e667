"""Security: listeners on 127.0.0.1, owner-only files, no pickle of untrusted data, no remote code.

- Every listener switchkd starts binds to 127.0.0.1: the private Ray of ``ray_session`` (its
  GCS, raylet, workers and agents: the sockets are read back with psutil), the local
  OpenAI-compatible teacher server (its command line; that it refuses a wrong API key with a
  real server is tests/rollout/test_teacher_server.py::test_wrong_api_key_is_refused), and
  TensorBoard is never served (event files only).
- Weight-sync files, checkpoints and exported models are owner-only, whatever the umask.
- No pickle / torch.load / unsafe YAML / eval of data in the package sources (an AST scan with
  an allow-list that gives the reason for each exception).
- ``trust_remote_code`` is off by default and every value handed to transformers / vLLM comes
  from the config.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from switchkd.cluster.config import load_config
from switchkd.rollout.config import EngineConfig, ModelConfig, RolloutConfig, ServerConfig

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("rollout", "trainer", "cluster")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _listeners(procs) -> set[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every listening TCP socket of ``procs``."""
    out = set()
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((p.pid, name, c.laddr.ip, c.laddr.port))
        except psutil.Error:  # exited meanwhile
            continue
    return out


# ----------------------------------------------------------------------------- listeners


def test_private_ray_listens_on_loopback_only():
    import ray
    from switchkd.cluster.placement import Bundle, PlacementPlan, ray_session

    assert not ray.is_initialized(), "another test left Ray running; this test must start its own"
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    before_own = _listeners([me])
    plan = PlacementPlan([Bundle("trainer rank 0", {"CPU": 1.0}, "")], "PACK", "cpu")
    with ray_session(SimpleNamespace(address=None, num_cpus=1, num_gpus=0), plan):
        gcs = ray.get_runtime_context().gcs_address
        assert ray.get(ray.remote(lambda: 1).remote(), timeout=120) == 1   # a worker process is up too
        started = [p for p in me.children(recursive=True) if p.pid not in before_children]
        sockets = _listeners(started) | (_listeners([me]) - before_own)
        names = {p.name() for p in started if p.is_running()}
    assert gcs.startswith("127.0.0.1:"), f"the private Ray's GCS is at {gcs}, not on 127.0.0.1"
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    assert len(sockets) >= 3, f"expected the GCS, raylet and worker listeners, found {sockets}"
    exposed = sorted(s for s in sockets if s[2] not in LOOPBACK)
    assert not exposed, f"private Ray processes listen beyond 127.0.0.1: {exposed}"
    assert not any(port == 8265 for *_, port in sockets), "no dashboard is started"


def test_local_teacher_server_binds_loopback_and_gets_a_generated_key(tiny_models, monkeypatch):
    """The command line and environment start_local_server hands to vLLM (nothing is started here)."""
    from switchkd.rollout.engines import teacher_launcher

    seen = {}

    class FakePopen:
        def __init__(self, cmd, env=None, **kwargs):
            seen.update(cmd=cmd, env=env)

        def poll(self):
            return None

    monkeypatch.setattr(teacher_launcher.subprocess, "Popen", FakePopen)
    url, key, proc = teacher_launcher.start_local_server(tiny_models["teacher"], wait=False)
    teacher_launcher._STARTED.discard(proc)
    Path(proc.log_path).unlink(missing_ok=True)
    cmd = seen["cmd"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and url.startswith("http://127.0.0.1:")
    assert "0.0.0.0" not in cmd and "::" not in cmd
    assert len(key) >= 32 and seen["env"]["VLLM_API_KEY"] == key, "the server must require the generated key"
    assert key not in " ".join(map(str, cmd)), "the key must not show in the process list"
    assert "--trust-remote-code" not in cmd


def test_in_process_vllm_engine_listens_on_loopback_only(tiny_models):
    from switchkd.rollout.engines.vllm_engine import VLLMEngine

    me = psutil.Process()
    children, own = {p.pid for p in me.children(recursive=True)}, _listeners([me])
    engine = VLLMEngine(model=str(tiny_models["student"]), dtype="float32")
    try:
        started = [p for p in me.children(recursive=True) if p.pid not in children]
        sockets = (_listeners([me]) - own) | _listeners(started)
    finally:
        engine.shutdown()
    exposed = sorted(s for s in sockets if s[2] not in LOOPBACK)
    assert not exposed, f"the vLLM engine listens beyond 127.0.0.1: {exposed}"


_STORE_PROBE = """
import json, psutil
from switchkd.rollout.local_ray import free_port
from switchkd.rollout.weight_sync.collective import new_group
from switchkd.trainer.worker import _init_process_group
_init_process_group("gloo", 0, 1, "127.0.0.1", free_port(), 60)   # the trainer's group (train, train-offline)
group = new_group("gloo", "127.0.0.1", free_port(), 0, 1, 60)      # the collective weight-sync group
print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]))
"""


def test_trainer_rendezvous_stores_listen_on_loopback_only():
    out = subprocess.run([sys.executable, "-c", _STORE_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    ips = json.loads(out.stdout.strip().splitlines()[-1])
    assert ips, "no listener found: the probe is broken"
    assert set(ips) <= LOOPBACK, f"listening on {sorted(set(ips) - LOOPBACK)}"


def test_tensorboard_writes_event_files_and_serves_nothing(tmp_path):
    from switchkd.trainer.metrics import MetricsLogger

    me = psutil.Process()
    children, own = {p.pid for p in me.children(recursive=True)}, _listeners([me])
    logger = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*")), "no event file written"
    assert _listeners([me]) == own, "TensorBoard opened a listening socket"
    assert {p.pid for p in me.children(recursive=True)} <= children, "TensorBoard started a process"
    for path in _package_files():
        text = path.read_text()
        for marker in ("tensorboard.program", "TensorBoard(", "'tensorboard', '--logdir", '"tensorboard", "--logdir'):
            assert marker not in text, f"{path}: starts a TensorBoard server ({marker})"


# ----------------------------------------------------------------------------- file modes


@pytest.fixture
def open_umask():
    """The most permissive umask: owner-only modes must not depend on the user's umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_weight_sync_files_are_owner_only(tmp_path, open_umask):
    from switchkd.rollout.weight_sync.shm import default_root, write_weights

    root = tmp_path / "sync"
    version = write_weights(root, 3, {"w": torch.arange(4.0)})
    auto = default_root()
    try:
        assert _mode(auto) == 0o700
    finally:
        shutil.rmtree(auto)
    assert _mode(root) == 0o700 and _mode(version) == 0o700
    files = list(version.iterdir())
    assert {f.name for f in files} == {"model.safetensors", "manifest.json"}
    assert all(_mode(f) == 0o600 for f in files), {f.name: oct(_mode(f)) for f in files}


def test_checkpoints_directory_is_owner_only(tmp_path, open_umask):
    from switchkd.trainer import checkpoint

    out = tmp_path / "run"
    tmp = checkpoint.temp_dir(out, 1)
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "weights.pt").write_bytes(b"x")   # what DeepSpeed writes, with the umask's modes
    final = checkpoint.finalize(tmp, {"step": 1}, keep_last=2)
    root = checkpoint.checkpoints_dir(out)
    assert final.parent == root and _mode(root) == 0o700, oct(_mode(root))
    # a checkpoints/ directory left world-readable (an older run) is closed on the next save
    os.chmod(root, 0o755)
    checkpoint.finalize(checkpoint.temp_dir(out, 2), {"step": 2}, keep_last=2)
    assert _mode(root) == 0o700


def test_exported_models_are_owner_only(tiny_models, tmp_path, open_umask):
    from switchkd.trainer import checkpoint
    from switchkd.trainer.export import export_checkpoint, write_hf_dir
    from transformers import AutoModelForCausalLM

    student = tiny_models["student"]
    model = AutoModelForCausalLM.from_pretrained(student, use_safetensors=True)
    out = write_hf_dir(model, model.state_dict(), str(student), tmp_path / "export")
    assert _mode(out) == 0o700 and list(out.glob("*.safetensors"))
    ckpt = checkpoint.checkpoints_dir(tmp_path / "run") / "step_1"
    shutil.copytree(student, ckpt / "hf")
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({"step": 1}))
    export_checkpoint(ckpt, tmp_path / "copied")
    assert _mode(tmp_path / "copied") == 0o700


# ----------------------------------------------------------------------------- no pickle, no remote code

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_YAML_LOADERS = {"Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}

# (file, source text of the flagged call) -> why it is acceptable
ALLOWED = {
    ("trainer/worker.py", "self.engine.load_checkpoint(ckpt_dir, tag=DS_TAG)"):
        "DeepSpeed's own engine state (torch.load inside DeepSpeed), read only on --resume of the user's own run "
        "from trainer.output_dir/checkpoints, which switchkd creates owner-only (0700)",
    ("rollout/data/prompts.py", "yaml.load(path.read_text(encoding='utf-8'), Loader=loader)"):
        "loader = getattr(yaml, 'CSafeLoader', yaml.SafeLoader): the safe loader, C-accelerated when available",
}


def _name(node) -> str:
    """Dotted name of a Name / Attribute chain ('torch.load', 'self.engine.load_checkpoint')."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "?"


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def unsafe_calls(source: str) -> list[tuple[int, str, str]]:
    """(line, call source, problem) of each call that can unpickle or execute data, or that
    hard-codes trust_remote_code=True."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name, kw = _name(node.func), {k.arg: k.value for k in node.keywords if k.arg}
        parts = name.split(".")
        problem = None
        if ((parts[0] in PICKLE_MODULES and parts[-1] in ("load", "loads", "Unpickler", "open"))
                or parts[-1] == "read_pickle" or name.endswith("jit.load")):
            problem = f"{name}: unpickles data"
        elif name == "torch.load" and not _is_true(kw.get("weights_only")):
            problem = "torch.load without weights_only=True"
        elif parts[0] in ("np", "numpy") and parts[-1] == "load" and "allow_pickle" in kw and not _is_false(kw["allow_pickle"]):
            problem = "numpy load with allow_pickle"
        elif parts[0] == "yaml" and parts[-1] in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
            problem = f"{name}: not a safe YAML loader"
        elif parts[0] == "yaml" and parts[-1] in ("load", "load_all"):
            loader = _name(kw["Loader"]).split(".")[-1] if "Loader" in kw else None
            if loader is None or loader in UNSAFE_YAML_LOADERS or "Safe" not in loader:
                problem = f"{name}: use yaml.safe_load"
        elif name in ("eval", "exec"):
            problem = f"{name}() of a string"
        elif parts[-1] == "load_checkpoint" and name != "self.load_checkpoint":  # not switchkd's own method
            problem = "DeepSpeed checkpoint loading (torch.load of pickles)"
        elif parts[-1] == "from_pretrained" and "Model" in name and not (
                _is_true(kw.get("use_safetensors")) or "gguf_file" in kw):
            problem = "model from_pretrained without use_safetensors=True (could torch.load a .bin)"
        if "trust_remote_code" in kw:
            value = kw["trust_remote_code"]
            if not (isinstance(value, (ast.Name, ast.Attribute)) and _name(value).endswith("trust_remote_code")):
                problem = f"trust_remote_code={ast.unparse(value)}: must come from the config (model.trust_remote_code)"
        if problem:
            found.append((node.lineno, ast.unparse(node), problem))
    return found


def _package_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_scanner_flags_what_it_should():
    bad = """
import pickle, torch, yaml, numpy as np
pickle.load(f); pickle.loads(b); torch.load(p); torch.load(p, weights_only=False); np.load(p, allow_pickle=True)
yaml.load(t); yaml.load(t, Loader=yaml.Loader); yaml.full_load(t); yaml.unsafe_load(t); eval(s)
AutoModelForCausalLM.from_pretrained(d); LLM(model=d, trust_remote_code=True); engine.load_checkpoint(d)
"""
    good = """
torch.load(p, weights_only=True); yaml.safe_load(t); yaml.load(t, Loader=yaml.SafeLoader)
AutoModelForCausalLM.from_pretrained(d, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code)
AutoTokenizer.from_pretrained(d); load_file(p); json.loads(s); np.load(b, allow_pickle=False); np.load(b)
"""
    assert len(unsafe_calls(bad)) == 13, unsafe_calls(bad)
    assert unsafe_calls(good) == []


def test_no_pickle_of_untrusted_data_or_hard_coded_remote_code():
    found, used = [], set()
    for path in _package_files():
        rel = path.relative_to(REPO).as_posix()
        for line, call, problem in unsafe_calls(path.read_text()):
            if (rel, call) in ALLOWED:
                used.add((rel, call))
            else:
                found.append(f"{rel}:{line}: {problem}: {call}")
    assert not found, "unsafe loading in the package sources:\n" + "\n".join(found)
    assert used == set(ALLOWED), f"allow-list entries no longer needed: {set(ALLOWED) - used}"
    assert 'loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)' in (REPO / "rollout/data/prompts.py").read_text()


def test_trust_remote_code_is_off_unless_the_config_turns_it_on(tiny_models, monkeypatch):
    assert ModelConfig().trust_remote_code is False and load_config().model.trust_remote_code is False
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).model.trust_remote_code is False, f"{path.name} turns trust_remote_code on"

    import transformers
    from switchkd.rollout import generate
    from switchkd.rollout.engines import actors as engines
    from switchkd.rollout.engines import teacher_client
    from switchkd.rollout.models import hf_reference

    real_load_hf_model = hf_reference.load_hf_model
    seen = []

    def fake_from_pretrained(path, **kw):
        seen.append(("transformers", kw.get("trust_remote_code"), kw.get("use_safetensors")))
        raise RuntimeError("stop here")

    monkeypatch.setattr(hf_reference, "load_hf_model", lambda path, dtype, trust=False: seen.append(("hf", trust)))
    monkeypatch.setattr(hf_reference, "HFSwitchGenerator", lambda *a, **k: None)
    monkeypatch.setattr(teacher_client, "launch_teacher",
                        lambda path, **kw: seen.append(("server", "--trust-remote-code" in kw["extra_args"])))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    for trust in (False, True):
        seen.clear()
        model = ModelConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]),
                            trust_remote_code=trust)
        assert engines.engine_kwargs(model.student, model, EngineConfig(), 0)["trust_remote_code"] is trust  # vLLM
        generate.build_generator(model, RolloutConfig(engine="hf"), {2})                  # HF teacher and student
        teacher_client.teacher_from_config(model.teacher, model, EngineConfig(server=ServerConfig(url="local")))
        with pytest.raises(RuntimeError, match="stop here"):
            real_load_hf_model(model.student, "float32", model.trust_remote_code)           # -> transformers
        assert seen == [("hf", trust), ("hf", trust), ("server", trust), ("transformers", trust, True)], seen
