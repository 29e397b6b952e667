"""The root config: YAML files plus dotted command-line overrides, checked before anything loads.

    cfg = load_config("configs/tiny.yaml", ["rollout.switch.tau0=0.3", "rollout.engine=vllm"])

Unknown keys (with the closest valid key suggested), wrong types and values outside
a field's ``choice``/``bounded`` metadata raise ConfigError with one line naming the
key path, the bad value and what is allowed. Sections live with their owners
(switchkd.rollout.config, switchkd.trainer.config); this module only composes and checks.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from switchkd.rollout.config import DataConfig, ModelConfig, RolloutConfig, bounded, choice
from switchkd.rollout.errors import SwitchkdError
from switchkd.rollout.weight_sync import TRANSPORTS
from switchkd.trainer.config import TrainerConfig
from switchkd.trainer.ds_config import deep_merge

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class ConfigError(SwitchkdError, ValueError):
    """A user error in a config file or override; its message is one line for the user."""


@dataclass(frozen=True)
class SyncConfig:
    """Weight sync from trainer rank 0 to the student engine (switchkd.rollout.weight_sync)."""
    transport: str = choice("shm", TRANSPORTS)    # shm: one node; collective: across nodes
    dir: Optional[str] = None                      # shm: root directory; None = a private dir on /dev/shm
    timeout_s: float = bounded(300.0, lo=0.0, lo_open=True)   # one sync; a dead peer fails, never hangs
    retries: int = bounded(2, lo=0)                # a failed sync is retried this many times
    check_equal: bool = False                      # after each sync, compare engine and trainer log-probs


@dataclass(frozen=True)
class LoopConfig:
    """The closed loop: rollout -> train -> sync (switchkd.cluster.driver)."""
    max_staleness: int = choice(1, (0, 1))         # 0: strictly on-policy; 1: rollout n+1 overlaps training n
    save_rollouts: bool = True                     # each step's batch to OUTPUT_DIR/rollouts/step_N.parquet
    export: bool = True                            # the final student to OUTPUT_DIR/export (HF format)


@dataclass(frozen=True)
class ClusterConfig:
    """Where the actors run (switchkd.cluster.placement)."""
    address: Optional[str] = None                  # None: a private Ray on 127.0.0.1; "auto" / "ray://...": join one
    num_cpus: Optional[int] = bounded(None, lo=1)  # private Ray: logical CPUs (None: the cores, at least what the plan needs)
    num_gpus: Optional[int] = bounded(None, lo=0)  # private Ray: GPUs (None: detected)
    placement_strategy: str = choice("PACK", PLACEMENT_STRATEGIES)   # Ray placement group strategy
    placement_timeout_s: float = bounded(600.0, lo=0.0, lo_open=True)   # wait for the resources, then fail
    engine_max_restarts: int = bounded(3, lo=0)     # an engine actor that dies is restarted this often
    engine_resource: Optional[str] = None   # custom Ray resource of the nodes that host the engines (`ray start --resources '{"NAME": 1}'`)
    trainer_resource: Optional[str] = None  # custom Ray resource of the nodes that host the trainer ranks
    check_memory: bool = True   # refuse a run whose memory estimate does not fit (false: warn and start)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        need = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        for role in ("teacher", "student"):
            engine = getattr(self.rollout, role)
            if engine.server.url is None and need > engine.max_model_len:
                raise ValueError(f"rollout.{role}.max_model_len={engine.max_model_len}: must hold data.max_prompt_tokens "
                                 f"+ rollout.max_new_tokens = {need}")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read YAML at ``path`` (None = defaults; a ``base:`` key names a config, relative to the file,
    that this one is laid over), apply ``key.sub=value`` overrides, validate."""
    raw: dict = {} if path is None else read_yaml_with_base(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"override {item!r}: the key has an empty part")
        try:
            parsed = _parse_scalar(value)
        except RecursionError:
            raise ConfigError(f"override {key.strip()}: value nested too deeply") from None
        _set_dotted(raw, key.strip(), parsed)
    return build(Config, raw, prefix="")


def read_yaml_with_base(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping in ``path``, laid over the config its ``base:`` key names (recursively)."""
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: base must be a config file path, got {_short(base)}")
    try:
        base_path = (path.parent / base).resolve()
    except (OSError, ValueError) as e:   # e.g. an embedded NUL byte
        raise ConfigError(f"config file {path}: base {_short(base)} is not a usable path ({e})") from None
    seen = (*chain, path.resolve())
    if base_path in seen:
        loop = " -> ".join(str(p) for p in (*seen, base_path))
        raise ConfigError(f"config file {path}: base configs form a cycle: {loop}")
    if not _is_file(base_path):
        raise ConfigError(f"config file {path}: base config {_short(base)} does not exist ({_short(str(base_path))})")
    return deep_merge(read_yaml_with_base(base_path, seen), raw)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _read_yaml(path: Path) -> dict:
    if not _is_file(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def to_dict(cfg) -> dict:
    """The config as plain nested dicts (for logs, checkpoints, YAML dumps)."""
    return dataclasses.asdict(cfg)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every valid dotted key path under ``cls``, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        sub = _dataclass_type(typing.get_type_hints(cls)[f.name])
        keys.extend([path, *all_keys(sub, path + ".")] if sub else [path])
    return keys


def build(cls, raw, prefix: str):
    """Instantiate dataclass ``cls`` from nested dict ``raw``, checking keys, types and bounds."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {_short(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            guess = difflib.get_close_matches(path, all_keys(), n=1, cutoff=0.6)
            hint = f"; did you mean {guess[0]}?" if guess else f"; valid keys here: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {path if path.isprintable() and len(path) <= 200 else _short(path)}{hint}")
        sub = _dataclass_type(hints[key])
        kwargs[key] = build(sub, value, path + ".") if sub else _check_value(path, value, hints[key], fields[key].metadata)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_value(path: str, value, annotation, meta):
    allowed_types, optional = _scalar_types(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}=null: a value is required ({_type_names(allowed_types)})")
    if float in allowed_types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if float in allowed_types and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, allowed_types) or (isinstance(value, bool) and bool not in allowed_types):
        raise ConfigError(f"{path}={_short(value)}: expected {_type_names(allowed_types)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}={value!r}: must be a finite number")
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{path}={value!r}: must not be empty")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{path}={_short(value)}: allowed values are {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ConfigError(f"{path}={value!r}: must be {'>' if meta.get('lo_open') else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}={value!r}: must be <= {hi}")
    return value


def _short(value) -> str:
    """repr of a bad value for a one-line error: bounded, however large or deep the value."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 80, 80, 3


def _scalar_types(annotation) -> tuple[tuple, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = tuple(a for a in args if a is not type(None))
        return non_none, len(non_none) < len(args)
    return (annotation,), False


def _type_names(ts) -> str:
    return " or ".join(t.__name__ for t in ts)


def _dataclass_type(annotation):
    return annotation if dataclasses.is_dataclass(annotation) else None


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value
