"""The closed loop: ordering and staleness with fakes (fast), then `switchkd train` end to end on
the tiny pair with both transports and both staleness settings, cleanup on error and Ctrl-C,
and --dry-run of every shipped config."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from switchkd.cluster.config import load_config
from switchkd.cluster.driver import Interrupt, RolloutBatch, _loop
from switchkd.rollout.errors import Terminated
from switchkd.rollout.generate import summarize

REPO = Path(__file__).resolve().parents[2]
SWITCHKD = [sys.executable, "-m", "switchkd.cluster.cli"]


# --- the loop with fakes: who runs when, which version each batch has -----------------------------

class _Events:
    def __init__(self):
        self.lock, self.log, self.rollouts_running = threading.Lock(), [], 0


class _FakeTrainer:
    def __init__(self, events, seconds=0.0):
        self.events, self.step, self.policy_version, self.logged = events, 0, 0, []
        self.seconds = seconds

    def train_step(self, table, source, log):
        staleness = self.policy_version - table.column("v")[0].as_py()
        time.sleep(self.seconds)
        self.step += 1
        self.policy_version += 1
        return {"loss": 1.0, "policy_version": self.policy_version, "staleness": staleness}

    def log_metrics(self, metrics):
        self.logged.append(metrics)

    def save_checkpoint(self, data_state):
        pass


class _FakeSync:
    def __init__(self, events, trainer):
        self.events, self.trainer, self.engine_version, self.written = events, trainer, 0, None

    def write(self):
        with self.events.lock:
            self.written = self.trainer.policy_version
            self.events.log.append(("write", self.written, self.events.rollouts_running))
        return {"sync_write_seconds": 0.0}

    def load(self, written):
        if written is None or written <= self.engine_version:
            return {}
        with self.events.lock:
            assert self.events.rollouts_running == 0, "weights changed under a running rollout"
            self.events.log.append(("load", written))
        self.engine_version = written
        return {"engine_version": written}


class _FakeSource:
    def __init__(self, events, version_override=None):
        self.events, self.version_override = events, version_override
        self.engine_restarts = 0

    def run(self, step, version):
        start = time.perf_counter()
        with self.events.lock:
            self.events.rollouts_running += 1
            self.events.log.append(("rollout", step, version))
        time.sleep(0.05)
        with self.events.lock:
            self.events.rollouts_running -= 1
        version = self.version_override(step, version) if self.version_override else version
        return RolloutBatch(step, pa.table({"v": [version]}), version, summarize([], {}, 0.05),
                            (start, time.perf_counter()))


def _run_fake_loop(tmp_path, staleness, steps=5, version_override=None, interrupt=None, train_seconds=0.0):
    cfg = load_config(None, [f"loop.max_staleness={staleness}", "loop.export=false",
                             f"trainer.output_dir={tmp_path}", f"trainer.max_steps={steps}"])
    events = _Events()
    trainer = _FakeTrainer(events, train_seconds)
    _loop(cfg, trainer, _FakeSync(events, trainer), _FakeSource(events, version_override), steps, {}, False,
          interrupt or Interrupt())
    return events.log, trainer.logged


def test_strictly_on_policy_rolls_out_each_batch_with_the_latest_weights(tmp_path):
    log, metrics = _run_fake_loop(tmp_path, staleness=0)
    rollouts = [e for e in log if e[0] == "rollout"]
    assert rollouts == [("rollout", s, s) for s in range(5)]          # batch n made by version n
    assert [m["staleness"] for m in metrics] == [0] * 5
    assert [m["engine_version"] for m in metrics] == [1, 2, 3, 4, 5]
    # rollout n+1 only after the load of version n+1
    assert log.index(("rollout", 1, 1)) > log.index(("load", 1))


def test_staleness_one_overlaps_the_next_rollout_with_training_and_the_sync_with_both(tmp_path):
    log, metrics = _run_fake_loop(tmp_path, staleness=1)
    rollouts = [e for e in log if e[0] == "rollout"]
    assert rollouts == [("rollout", 0, 0), ("rollout", 1, 0), ("rollout", 2, 1), ("rollout", 3, 2), ("rollout", 4, 3)]
    assert [m["staleness"] for m in metrics] == [0, 1, 1, 1, 1]
    # the trainer wrote version n+1 while rollout n+1 ran (training is instant here, a rollout is not)
    assert [e[2] for e in log if e[0] == "write"] == [1, 1, 1, 1, 0]
    # the engine loaded version n+1 just before rolling out batch n+2, in the same background job
    for n in range(1, 4):
        assert log.index(("load", n)) + 1 == log.index(("rollout", n + 1, n))
    # each record: the version the engine serves at the end of its step; the last is loaded after
    # the last step (version 4 was never loaded: no rollout came after it)
    assert [m["engine_version"] for m in metrics] == [0, 1, 2, 3, 5]


@pytest.mark.parametrize("staleness", [0, 1])
def test_each_step_records_the_timeline_of_its_phases(tmp_path, staleness):
    """t_PHASE_start / t_PHASE_end (seconds since the loop started) for the rollout of the batch the
    step trained on, its training, and the sync halves: the rollout of step n+1 overlaps step n's
    training only with max_staleness=1."""
    _, metrics = _run_fake_loop(tmp_path, staleness=staleness, train_seconds=0.1)   # longer than a rollout
    for m in metrics:
        for phase in ("rollout", "train", "sync_write", "sync_load"):
            if f"t_{phase}_start" in m:
                assert 0 <= m[f"t_{phase}_start"] <= m[f"t_{phase}_end"]
        assert m["t_rollout_end"] <= m["t_train_start"]                  # a batch trains once complete
        assert m["t_train_end"] <= m["t_sync_write_start"]               # the new version is written after it
    overlapped = [metrics[n + 1]["t_rollout_start"] < metrics[n]["t_train_end"] for n in range(len(metrics) - 1)]
    assert overlapped == [bool(staleness)] * (len(metrics) - 1)
    assert all("t_sync_load_start" in m for m in metrics[1:-1]) or not staleness


def test_the_timeline_summary_counts_the_rollout_time_hidden_by_training(tmp_path):
    from switchkd.cluster.plots import plot_timeline, timeline_summary

    rows = [  # rollout 0 alone, then rollout n+1 runs for 2 s, 1.5 s of them while step n trains
        {"t_rollout_start": 0.0, "t_rollout_end": 2.0, "t_train_start": 2.0, "t_train_end": 3.5,
         "t_sync_write_start": 3.5, "t_sync_write_end": 3.75},
        {"t_rollout_start": 2.0, "t_rollout_end": 4.0, "t_train_start": 4.0, "t_train_end": 5.5,
         "t_sync_load_start": 3.75, "t_sync_load_end": 4.0},
    ]
    summary = timeline_summary(rows)
    assert summary["rollout_seconds"] == 4.0 and summary["train_seconds"] == 3.0
    assert summary["rollout_hidden_seconds"] == 1.5 and summary["rollout_hidden_fraction"] == 0.375
    assert summary["sync_write_seconds"] == 0.25 and summary["wall_seconds"] == 5.5
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_timeline(metrics, tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_batch_staler_than_the_bound_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="older than loop.max_staleness=0"):
        _run_fake_loop(tmp_path, staleness=0, version_override=lambda step, v: max(0, v - 1))


def test_a_ctrl_c_that_a_library_swallowed_still_stops_the_loop(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with Interrupt() as interrupt:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
            pytest.fail("SIGINT did not raise KeyboardInterrupt")
        except KeyboardInterrupt:
            pass  # what a library that swallows it does
        with pytest.raises(KeyboardInterrupt):
            _run_fake_loop(tmp_path, staleness=1, interrupt=interrupt)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_stops_the_loop_as_terminated(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Interrupt() as interrupt:
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        with pytest.raises(Terminated):
            _run_fake_loop(tmp_path, staleness=1, interrupt=interrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_that_a_library_re_raised_as_ctrl_c_still_leaves_as_terminated():
    with pytest.raises(Terminated):
        with Interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here
            except KeyboardInterrupt:
                raise KeyboardInterrupt from None   # as Ray's ray.get re-raises it
    with pytest.raises(KeyboardInterrupt) as e, Interrupt():
        raise KeyboardInterrupt   # no signal came: a Ctrl-C stays a Ctrl-C
    assert e.type is KeyboardInterrupt


# --- switchkd train end to end ----------------------------------------------------------------------

def _ray_processes() -> int:
    """Ray's daemons and lockstep teacher processes (children of engine actors) running now."""
    pattern = "raylet|gcs_server|switchkd.rollout.engines.lockstep_process"
    return len(subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split())


def _shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _config(tiny_models, tmp_path, *overrides) -> list[str]:
    return ["--config", str(REPO / "configs" / "tiny.yaml"), f"model.teacher={tiny_models['teacher']}",
            f"model.student={tiny_models['student']}", f"data.prompts={REPO / 'configs/prompts/tiny.jsonl'}",
            "data.max_prompts=24", "rollout.max_new_tokens=16", "trainer.batch_size=4", "trainer.micro_batch_size=2",
            "trainer.lr=0.003", "trainer.tensorboard=false", f"trainer.output_dir={tmp_path / 'run'}", *overrides]


def _train(args, timeout=600, **kw):
    return subprocess.run([*SWITCHKD, "train", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def clean_machine():
    """Asserts a test leaves no Ray (or lockstep teacher) processes and no new /dev/shm entries behind."""
    ray_before, shm_before = _ray_processes(), _shm_entries()
    yield
    deadline = time.time() + 30
    while _ray_processes() > ray_before and time.time() < deadline:
        time.sleep(1)
    assert _ray_processes() <= ray_before, "Ray or lockstep teacher processes left behind"
    assert _shm_entries() - shm_before == set(), f"/dev/shm leftovers: {_shm_entries() - shm_before}"


@pytest.mark.parametrize("transport,staleness", [("shm", 1), ("collective", 0)])
def test_train_runs_the_closed_loop(tiny_models, tmp_path, clean_machine, transport, staleness):
    res = _train(_config(tiny_models, tmp_path, "trainer.max_steps=3", f"sync.transport={transport}",
                         f"loop.max_staleness={staleness}", "sync.check_equal=true"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained to step 3 (policy version 3)" in res.stdout
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    # every load landed (with staleness 1, version n is loaded during step n; 2 never: nothing
    # rolled out after it) and the engine matched the trainer's log-probs of that version
    assert [m["engine_version"] for m in metrics] == ([0, 1, 3] if staleness else [1, 2, 3])
    assert [m.get("sync_max_tv", 1.0) < 1e-3 for m in metrics] == ([False, True, True] if staleness else [True] * 3)
    expected = [0, 1, 1] if staleness else [0, 0, 0]
    assert [m["staleness"] for m in metrics] == expected
    assert [m["batch_policy_version"] for m in metrics] == ([0, 0, 1] if staleness else [0, 1, 2])
    from switchkd.rollout.data.schema import read_rollouts

    versions = [read_rollouts(run / "rollouts" / f"step_{s:06d}.parquet").column("policy_version").to_pylist()
                for s in range(3)]
    assert [set(v) for v in versions] == [{b} for b in [m["batch_policy_version"] for m in metrics]]
    assert (run / "checkpoints" / "step_3" / "trainer_state.json").is_file()
    assert (run / "export" / "model.safetensors").is_file()
    # the console holds switchkd's lines; the libraries' start-up chatter is in the run's logs/
    workers = "".join(path.read_text() for path in (run / "logs").glob("worker-*.log"))
    assert "non-default args" in workers                                  # every vLLM engine start logs it
    assert "Started a local Ray instance" in (run / "logs" / "driver.log").read_text()
    assert [text for text in ("non-default args", "Started a local Ray instance", "Failed to load weights")
            if text in res.stdout + res.stderr] == []


def _start_and_wait_for_first_step(tiny_models, tmp_path, *overrides):
    proc = subprocess.Popen([*SWITCHKD, "train", *_config(tiny_models, tmp_path, "trainer.max_steps=50", *overrides)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)   # its own process group, which a test may signal whole
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    return proc


def _kill(actor_class: str) -> None:
    """SIGKILL the actor's process (waiting for it if it is still coming back from a restart)."""
    deadline = time.time() + 120
    while not (pids := subprocess.run(["pgrep", "-f", f"ray::{actor_class}"], capture_output=True,
                                      text=True).stdout.split()) and time.time() < deadline:
        time.sleep(0.5)
    assert pids, f"no {actor_class} actor process found"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


def test_a_run_whose_engine_dies_without_restarts_fails_and_cleans_up(tiny_models, tmp_path, clean_machine):
    proc = _start_and_wait_for_first_step(tiny_models, tmp_path, "cluster.engine_max_restarts=0")
    _kill("PairEngine")  # rollout.mode=lockstep: both engines in one actor (and its child)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode not in (0, 130), err[-3000:]
    assert "PairEngine" in err


@pytest.mark.parametrize("victim,mode", [("PairEngine", "lockstep"), ("StudentEngine", "block"),
                                         ("TeacherEngine", "block")])
def test_a_killed_engine_is_restarted_and_every_prompt_is_trained_once(tiny_models, tmp_path, clean_machine, victim,
                                                                      mode):
    """Kill an engine actor at a random point: Ray restarts it, the weights are re-synced, the
    batch in flight is rolled out again; the prompt ledger of the epoch is exact. Lockstep hosts
    both engines in one PairEngine actor (the teacher in its child process); block mode has a teacher and a student actor."""
    import random

    from transformers import AutoTokenizer

    from switchkd.rollout.data.prompts import load_prompts
    from switchkd.rollout.data.schema import read_rollouts

    epochs = 6  # long enough that a kill within a second of the first step lands mid-run on a fast machine
    args = _config(tiny_models, tmp_path, f"trainer.epochs={epochs}", f"rollout.mode={mode}")
    cfg = load_config(args[1], args[2:])
    prompts, _ = load_prompts(cfg.data, AutoTokenizer.from_pretrained(tiny_models["teacher"]), 0)
    per_epoch = -(-len(prompts) // cfg.trainer.batch_size)
    proc = subprocess.Popen([*SWITCHKD, "train", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(random.Random().uniform(0.0, 1.0))
    _kill(victim)
    steps_before_kill = len(metrics.read_text().splitlines())
    assert steps_before_kill < epochs * per_epoch - 1, "the kill came after the last rollout: the test saw no restart"
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["policy_version"] for m in rows] == list(range(1, len(rows) + 1))
    assert rows[-1]["engine_restarts"] >= 1 or "weight sync of version" in err  # died in a rollout or a sync
    files = sorted((tmp_path / "run" / "rollouts").glob("step_*.parquet"))
    assert len(files) == len(rows) == epochs * per_epoch
    for epoch in range(epochs):  # each prompt exactly once per epoch
        trained = [i for f in files[epoch * per_epoch:(epoch + 1) * per_epoch]
                   for i in read_rollouts(f).column("prompt_index").to_pylist()]
        assert sorted(trained) == sorted(p.index for p in prompts), f"epoch {epoch}"


def test_a_bad_sync_dir_is_one_line_and_cleans_up(tiny_models, tmp_path, clean_machine):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = _train(_config(tiny_models, tmp_path, "trainer.max_steps=2", f"sync.dir={blocker}/sync"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"switchkd: error: sync.dir={blocker}/sync: cannot create")


def test_model_len_must_hold_prompt_and_response(tiny_models, tmp_path):
    res = _train(_config(tiny_models, tmp_path, "rollout.student.max_model_len=16"))
    assert res.returncode == 2
    assert "rollout.student.max_model_len=16: must hold data.max_prompt_tokens + rollout.max_new_tokens" in res.stderr


@pytest.mark.parametrize("sig,code,message", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_stops_the_run_and_cleans_up(tiny_models, tmp_path, clean_machine, sig, code, message):
    proc = _start_and_wait_for_first_step(tiny_models, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == code, err[-3000:]
    assert f"switchkd: {message}" in err


def test_sigterm_to_the_whole_process_group_stops_the_run_and_cleans_up(tiny_models, tmp_path, clean_machine):
    """As `kill -TERM -PGID` does. The private Ray's daemons are in groups of their own, so the
    signal reaches the driver alone (had it reached the raylet, Ray would end the driver with
    exit status 1 before it cleaned up)."""
    proc = _start_and_wait_for_first_step(tiny_models, tmp_path)
    daemons = [int(pid) for pid in subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "raylet|gcs_server"],
                                                  capture_output=True, text=True).stdout.split()]
    assert daemons and all(os.getpgid(pid) != proc.pid for pid in daemons)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    assert "switchkd: terminated" in err


def test_sigterm_to_every_process_of_the_run_leaves_nothing_behind(tiny_models, tmp_path, clean_machine):
    """As a scheduler that signals every process of a job does (Slurm at a time limit). The
    driver usually stops the run in order (exit 143); when its raylet goes first, Ray may end it
    with exit status 1 on its next object access. Either way no process is left and what the run
    wrote is whole."""
    import psutil

    proc = _start_and_wait_for_first_step(tiny_models, tmp_path)
    driver = psutil.Process(proc.pid)
    for p in [driver, *driver.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, err = proc.communicate(timeout=180)
    assert proc.returncode in (143, 1), err[-3000:]
    assert proc.returncode == 1 or "switchkd: terminated" in err
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] >= 1 for line in metrics)


def test_train_refuses_an_output_dir_with_checkpoints_without_resume(tiny_models, tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_1").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_1" / "trainer_state.json").write_text("{}")
    res = _train(_config(tiny_models, tmp_path))
    assert res.returncode == 2 and "pass --resume" in res.stderr


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").glob("**/*.yaml")))
def test_dry_run_validates_every_shipped_config(config):
    res = _train(["--config", str(REPO / "configs" / config), "--dry-run"], timeout=120)
    # Valid and planned; whether it fits depends on this machine (the Qwen pair, once prepared,
    # needs more than 24 GiB), and a refusal is the plan's one line.
    refused = res.returncode == 2 and "the CPU roles need" in res.stderr
    assert res.returncode == 0 or refused, res.stderr[-2000:]
    assert f"configs/{config}: valid" in res.stdout and "placement group:" in res.stdout
    assert "trainer rank 0" in res.stdout


def test_dry_run_rejects_contradictory_resources():
    res = _train(["--config", str(REPO / "configs" / "multi-gpu.yaml"), "--dry-run",
                  "rollout.teacher.num_gpus=1"], timeout=120)
    assert res.returncode == 2
    assert "rollout.teacher.num_gpus=1: a cuda engine with tensor_parallel_size=2 needs at least that many GPUs" in res.stderr


def _kill_session(proc) -> None:
    """SIGKILL a run and every process of its session (its private Ray too): a crash of the whole run."""
    sid = os.getsid(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the run had already ended, with all of its processes
        pass
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        left = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout.split()
        if not left:
            return
        for pid in left:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_models, tmp_path):
    """Strictly on-policy with fixed seeds: a run SIGKILLed at a random step and resumed with
    --resume reaches the same weights as an uninterrupted one, on the same batches (none trained
    twice, none skipped), and the engine gets the resumed weights first."""
    import random

    from safetensors.torch import load_file

    from switchkd.rollout.data.schema import read_rollouts

    common = ("loop.max_staleness=0", "trainer.save_every=1", "data.max_prompts=16", "trainer.max_steps=4")
    straight = _train(_config(tiny_models, tmp_path / "a", *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = _config(tiny_models, tmp_path / "b", *common)
    shm_before = _shm_entries()
    proc = subprocess.Popen([*SWITCHKD, "train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    checkpoint = tmp_path / "b" / "run" / "checkpoints" / f"step_{random.Random().randint(1, 3)}"
    while not (checkpoint / "trainer_state.json").is_file():  # a complete checkpoint, then a random moment
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    time.sleep(random.Random().uniform(0.0, 0.5))
    while not metrics.is_file():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    _kill_session(proc)
    for name in _shm_entries() - shm_before:  # nothing cleans up after SIGKILL: its sync dir stays
        shutil.rmtree(f"/dev/shm/{name}", ignore_errors=True)
    resumed = _train(["--resume", *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert [m["engine_version"] for m in rows] == [1, 2, 3, 4]
    for step in range(4):
        name = f"step_{step:06d}.parquet"
        assert (read_rollouts(a / "rollouts" / name).column("prompt_index").to_pylist()
                == read_rollouts(b / "rollouts" / name).column("prompt_index").to_pylist())
    wa, wb = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() < 1e-5, name
