"""The `switchkd` command line end to end, as a user runs it (subprocesses, real files)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from switchkd.rollout.data.schema import read_rollouts

REPO = Path(__file__).resolve().parents[2]
SWITCHKD = [sys.executable, "-m", "switchkd.cluster.cli"]


def run(*args, cwd=REPO):
    return subprocess.run([*SWITCHKD, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_tiny_models_are_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run("tiny-models", "--out", tmp_path / name, "--seed", seed).returncode == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    config = json.loads((tmp_path / "a/teacher/config.json").read_text())
    assert config["head_dim"] == 64 and config["vocab_size"] == 512


def test_generate_writes_rollouts_and_counts_bad_rows(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    good = [json.dumps({"prompt": f"the man said {w}"}) for w in ("yes", "no", "water", "people")]
    bad = ["not json", json.dumps({"text": "x"}), json.dumps({"prompt": ""}), json.dumps({"prompt": 5}), "[1, 2]"]
    prompts.write_bytes(("\n".join([good[0], *bad, *good[1:]]) + "\n").encode() + b"\xff\xfe\n")
    out = tmp_path / "out.parquet"
    res = run("generate", "--config", "configs/tiny.yaml", "--output", out,
              f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}",
              f"data.prompts={prompts}", "rollout.temperature=0", "rollout.max_new_tokens=16")
    assert res.returncode == 0, res.stderr
    table = read_rollouts(out, vocab_size=512)
    assert table.num_rows == 4
    assert table.column("prompt_index").to_pylist() == [0, 6, 7, 8]
    assert "prompts: 4 (skipped: 1 not JSON, 1 missing 'prompt', 1 empty 'prompt', 1 'prompt' is not a string, " \
           "1 not a JSON object, 1 not UTF-8)" in res.stdout
    assert "teacher-token fraction" in res.stdout and "tokens/s" in res.stdout


@pytest.mark.parametrize("args,message", [
    (["rollout.swtch.tau0=1"], "unknown config key rollout.swtch; did you mean rollout.switch?"),
    (["model.teacher=/nonexistent/dir"], "model.teacher=/nonexistent/dir: directory does not exist"),
    (["data.prompts=/nonexistent.jsonl"], "data.prompts=/nonexistent.jsonl: file does not exist"),
    (["model.student=configs"], "model.student=configs: not a model directory (no config.json)"),
])
def test_user_errors_are_one_line_without_traceback(tiny_models, tmp_path, args, message):
    base = [f"model.teacher={tiny_models['teacher']}", f"model.student={tiny_models['student']}"]
    res = run("generate", "--config", "configs/tiny.yaml", "--output", tmp_path / "o.parquet", *base, *args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_vocab_mismatch_names_both_sizes(tiny_models, tmp_path):
    other = tmp_path / "student"
    other.mkdir()
    for f in Path(tiny_models["student"]).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 640
    (other / "config.json").write_text(json.dumps(config))
    res = run("generate", "--config", "configs/tiny.yaml", "--output", tmp_path / "o.parquet",
              f"model.teacher={tiny_models['teacher']}", f"model.student={other}")
    assert res.returncode == 2 and "(teacher 512, student 640)" in res.stderr


def test_normal_install_exposes_the_three_packages(tmp_path):
    """A non-editable install maps rollout/, trainer/, cluster/ to switchkd.* (the editable one runs the tests)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=600)
    assert (target / "switchkd/rollout/switch.py").is_file()
    assert (target / "switchkd/trainer/__init__.py").is_file()
    assert (target / "switchkd/cluster/cli.py").is_file()
    code = "import switchkd.rollout.switch as s, switchkd.cluster.config; print(s.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert out.stdout.strip().startswith(str(target))
