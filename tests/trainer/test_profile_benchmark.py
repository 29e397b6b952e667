"""benchmarks/trainer_profile.py runs on the CPU: every ZeRO variant timed, both profiles printed."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trainer_profile.py"


def test_profile_times_every_variant_and_prints_both_profiles(capsys):
    spec = importlib.util.spec_from_file_location("trainer_profile", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main("fp32")
    out = capsys.readouterr().out
    timed = [line.split()[1] for line in out.splitlines() if line.startswith("fp32 ") and " x plain " in line]
    assert timed == ["plain", *bench.VARIANTS]
    assert "==== plain: by self cpu time" in out and "==== z1: by self cpu time" in out
    assert "aten::mm" in out   # the profiler saw the model's matmuls
