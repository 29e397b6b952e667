"""docs/configuration.md is exactly what the config dataclasses generate."""
import importlib.util
import re
from pathlib import Path

from switchkd.cluster.config import all_keys

REPO = Path(__file__).resolve().parents[2]


def _reference():
    """This checkout's generator, whichever worktree the editable install points at."""
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "cluster" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_md_is_up_to_date():
    ref = _reference()
    assert (REPO / "docs" / "configuration.md").read_text(encoding="utf-8") == ref.render(), (
        f"docs/configuration.md differs from the config dataclasses: regenerate it with `{ref.COMMAND}`")


def test_every_key_has_a_row():
    keys = all_keys()
    leaves = {k for k in keys if not any(other.startswith(k + ".") for other in keys)}
    rows = set()
    for key in re.findall(r"^\| `([^`]+)` \|", _reference().render(), flags=re.M):
        head, _, rest = key.partition("{")
        names, _, tail = rest.partition("}")
        rows |= {f"{head}{name}{tail}" for name in names.split(",")} if rest else {key}
    assert rows == leaves


def test_comments_above_and_after_a_field_are_its_description():
    from switchkd.rollout.config import RolloutConfig, SwitchConfig

    ref = _reference()
    assert ref.field_comments(SwitchConfig)["tau0"] == "JSD lives in [0, ln 2]; tau0 >= ln 2 = never intervene"
    assert ref.field_comments(RolloutConfig)["lockstep_teacher"].startswith("lockstep's teacher engine: in a child")
    assert ref.field_comments(RolloutConfig)["lockstep_teacher"].endswith("one step after the other (inline)")
