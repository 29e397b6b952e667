"""Console routing: switchkd's lines on the terminal, the libraries' chatter in the run's log file."""
import subprocess
import sys

import pytest

SCRIPT = """
import logging, os, sys
from switchkd.rollout.logs import LOG_DIR_ENV, console, library_output_to, setup_logging, worker_runtime_env

verbose = sys.argv[2] == "1"
setup_logging(verbose)
with library_output_to(sys.argv[1], verbose):
    os.write(1, b"c-level stdout\\n")
    os.write(2, b"c-level stderr\\n")
    print("library print", flush=True)
    logging.getLogger("vllm.model_loader").warning("RotaryEmbedding: Failed to load weights")
    logging.getLogger("switchkd.cluster.pipeline").info("stage 1/3: warm-up")
    logging.getLogger("ray").error("a library error")
    console().write("progress bar\\n")
    print("workers routed:", bool(worker_runtime_env()), file=console())
print("after the block", LOG_DIR_ENV in os.environ, flush=True)
os.write(2, b"c-level after\\n")
"""


def _run(tmp_path, verbose: bool) -> tuple[str, str, str]:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "logs"), "1" if verbose else "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout, res.stderr, (tmp_path / "logs" / "driver.log").read_text()


LIBRARY = ("c-level stdout", "c-level stderr", "library print", "Failed to load weights")
OWN = ("stage 1/3: warm-up", "a library error", "progress bar")


def test_library_output_goes_to_the_log_file_and_switchkd_lines_to_the_console(tmp_path):
    out, err, log = _run(tmp_path, verbose=False)
    console = out + err
    assert [text for text in LIBRARY if text in console] == []
    assert [text for text in OWN if text not in console] == []
    assert [text for text in LIBRARY if text not in log] == []
    assert "workers routed: True" in console
    # the block restores the process's stdout and stderr and stops routing new Ray workers
    assert "after the block False" in out and "c-level after" in err and "c-level after" not in log


def test_verbose_keeps_everything_on_the_console_and_the_records_in_the_log(tmp_path):
    out, err, log = _run(tmp_path, verbose=True)
    console = out + err
    assert [text for text in LIBRARY + OWN if text not in console] == []
    assert "Failed to load weights" in log and "stage 1/3: warm-up" in log
    assert "workers routed: False" in console


@pytest.mark.parametrize("flag,verbose", [([], False), (["-v"], True), (["--verbose"], True)])
def test_the_cli_takes_a_verbose_flag(flag, verbose):
    from switchkd.cluster.cli import build_parser

    assert build_parser().parse_args([*flag, "models", "prepare"]).verbose is verbose
