"""The configuration reference, docs/configuration.md, generated from the config dataclasses.

    python -m switchkd.cluster.config_reference --out docs/configuration.md

A field's description is the ``# comment`` on its source line, after the comment lines right
above it, so the reference follows the code (tests/cluster/test_config_reference.py checks it).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import re
import tokenize
import types
import typing
from pathlib import Path

from switchkd.cluster.config import Config

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m switchkd.cluster.config_reference --out docs/configuration.md"
FIELD_LINE = re.compile(r"^\s+(\w+)\s*:")

INTRO = f"""# Configuration reference

Generated from the config dataclasses by `{COMMAND}`; do not edit by hand.

A config is a YAML file (see `configs/`) with one mapping per section below; any key can be
overridden on the command line as `section.key=value` (values parsed as YAML scalars, `null`
included), e.g. `switchkd train --config configs/tiny.yaml rollout.switch.tau0=0.3`. Unknown keys
fail with the closest valid key suggested; wrong types, values outside "allowed" and impossible
combinations fail with one line naming the key, before any model loads. A top-level
`base: other.yaml` (relative to the file) lays the file over another config, mappings merged key
by key (`configs/baselines/` is one `base.yaml` and a few lines per method).
"""


def class_source(cls) -> str:
    """The source of ``cls`` from this checkout (switchkd.rollout.config -> rollout/config.py), which an
    editable install of another worktree would not give."""
    path = REPO.joinpath(*cls.__module__.split(".")[1:]).with_suffix(".py")
    text = path.read_text(encoding="utf-8")
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    return "\n".join(text.splitlines()[node.lineno - 1:node.end_lineno]) + "\n"


def field_comments(cls) -> dict[str, str]:
    """{field name: description}: the comment lines right above a field, then its trailing comment."""
    source = class_source(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    result = {}
    for number, line in enumerate(lines, start=1):
        match = FIELD_LINE.match(line)
        if not match or match.group(1) not in names:
            continue
        above, previous = [], number - 1
        while previous in comments and lines[previous - 1].lstrip().startswith("#"):
            above.insert(0, comments[previous])
            previous -= 1
        result[match.group(1)] = " ".join(above + ([comments[number]] if number in comments else []))
    return result


def sections(root=Config) -> list[tuple[list[str], type]]:
    """(dotted paths, class) of every config section below ``root``, in field order; a class used at
    several paths (rollout.teacher and rollout.student) is one section."""
    paths_of: dict[type, list[str]] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                paths_of.setdefault(hints[f.name], []).append(prefix + f.name)
                walk(hints[f.name], prefix + f.name + ".")

    walk(root, "")
    return [(paths, cls) for cls, paths in paths_of.items()]


def render(root=Config) -> str:
    """docs/configuration.md: one table per section (key, type, default, allowed values, description)."""
    out = [INTRO]
    for paths, cls in sections(root):
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        rows = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
        if not rows:
            continue
        prefix = _joined(paths)
        out += [f"## `{prefix}`", ""]
        doc = ast.get_docstring(ast.parse(class_source(cls)).body[0])
        out += [doc, ""] if doc else []
        out += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for f in rows:
            out.append(f"| `{prefix}.{f.name}` | {_type(hints[f.name])} | {_default(f)} | {_allowed(f.metadata)} "
                       f"| {comments.get(f.name, '').replace('|', '&#124;')} |")
        out.append("")
    return "\n".join(out)


def _joined(paths: list[str]) -> str:
    """rollout.teacher + rollout.student -> rollout.{teacher,student}."""
    parts = [p.split(".") for p in paths]
    differ = [i for i in range(len(parts[0])) if len({tuple(p)[i] for p in parts}) > 1]
    if len(paths) == 1 or len({len(p) for p in parts}) > 1 or len(differ) != 1:
        return ", ".join(paths)
    i = differ[0]
    return ".".join(parts[0][:i] + ["{" + ",".join(p[i] for p in parts) + "}"] + parts[0][i + 1:])


def _type(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else annotation.__name__


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _default(f: dataclasses.Field) -> str:
    return f"`{_yaml(f.default)}`" if f.default is not dataclasses.MISSING else ""


def _allowed(meta) -> str:
    if "choices" in meta:
        return ", ".join(f"`{_yaml(c)}`" for c in meta["choices"])
    bounds = []
    if meta.get("lo") is not None:
        bounds.append(f"{'>' if meta.get('lo_open') else '>='} {meta['lo']}")
    if meta.get("hi") is not None:
        bounds.append(f"<= {meta['hi']}")
    return ", ".join(bounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the markdown file to write, e.g. docs/configuration.md")
    args = parser.parse_args(argv)
    Path(args.out).write_text(render(), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
