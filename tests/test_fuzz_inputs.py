"""Bad-input fuzz: hundreds of generated bad configs, data rows, model directories and rollout files.

Every bad input must end in one of two ways: a user error (a
switchkd.rollout.errors.SwitchkdError) whose message is one line naming the key / file / row and the
problem, or -- for a bad row of an otherwise usable data file -- the row skipped and counted under
its reason while the good rows still load. Any other exception (a traceback for the user) or a bad
input accepted silently fails the test, which lists every such case at once.

Deterministic: every generator draws from random.Random(SEED + category). The counts per category
are printed at the end of the module (docs/reliability.md quotes them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import string
import subprocess
import sys
import traceback
import typing
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from switchkd.cluster.config import Config, all_keys, load_config
from switchkd.cluster.placement import plan_placement
from switchkd.rollout.data import schema
from switchkd.rollout.config import DataConfig
from switchkd.rollout.data.prompts import load_examples, load_prompts
from switchkd.rollout.errors import SwitchkdError
from switchkd.rollout.models.checks import CPU_HEAD_SIZES, check_pair, read_model_config
from switchkd.trainer.offline import load_rollouts

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"
SEED = 10
VOCAB = 512

COUNTS: dict[str, Counter] = defaultdict(Counter)   # category -> {"error": n, "skipped": n, "good rows": n}


class Fuzz:
    """Runs bad inputs of one category and collects what went wrong, to report all cases at once."""

    def __init__(self, category: str):
        self.category, self.problems, self.tried = category, [], 0

    def error(self, label: str, fn, *names: str) -> str | None:
        """``fn()`` must raise a user error with a one-line message containing every one of ``names``."""
        self.tried += 1
        try:
            fn()
        except SwitchkdError as e:
            message = str(e)
            if "\n" in message or not message.strip():
                self.problems.append(f"{label}: error is not one line: {message!r}")
            elif not all(n in message for n in names):
                self.problems.append(f"{label}: error does not name {names}: {message}")
            else:
                COUNTS[self.category]["error"] += 1
                return message
        except Exception as e:  # noqa: BLE001 -- the point: anything else is a traceback for the user
            where = traceback.extract_tb(e.__traceback__)[-1]
            self.problems.append(f"{label}: TRACEBACK {type(e).__name__}: {str(e)[:200]} "
                                 f"({Path(where.filename).name}:{where.lineno})")
        else:
            self.problems.append(f"{label}: silently accepted")
        return None

    def check(self, minimum: int) -> None:
        COUNTS[self.category]["mishandled"] += len(self.problems)
        assert not self.problems, (f"{len(self.problems)} of {self.tried} bad inputs mishandled:\n"
                                   + "\n".join(self.problems[:40]))
        assert self.tried >= minimum, f"only {self.tried} bad inputs generated"


class _Summary:
    """Prints the counts in pytest's terminal summary (registered while this module runs)."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_sep("-", "bad-input fuzz: inputs tried per category")
        for line in summary_lines():
            terminalreporter.write_line(line)


def summary_lines() -> list[str]:
    lines = []
    for category, c in COUNTS.items():
        checks = c["error"] + c["skipped"] + c["mishandled"]
        inputs = f"{c['inputs']:5d} bad inputs ({checks} checks)" if c["inputs"] else f"{checks:5d} bad inputs"
        extra = f", {c['good rows']} good rows still loaded" if c["good rows"] else ""
        lines.append(f"{category:<30} {inputs}: {c['error']} one-line errors, {c['skipped']} skipped and "
                     f"counted{extra}; {c['mishandled']} mishandled (traceback, accepted or unnamed)")
    total = sum(c["inputs"] or c["error"] + c["skipped"] + c["mishandled"] for c in COUNTS.values())
    return lines + [f"{'total':<30} {total:5d} bad inputs"]


@pytest.fixture(scope="module", autouse=True)
def _print_counts(request):
    plugins = request.config.pluginmanager
    if not plugins.has_plugin("switchkd-fuzz-summary"):
        plugins.register(_Summary(), "switchkd-fuzz-summary")
    yield


# ============================================================================ configs


def _leaf_fields(cls=Config, prefix: str = "") -> list[tuple[str, tuple, bool, dict]]:
    """(dotted key, allowed scalar types, optional, field metadata) of every value field."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.extend(_leaf_fields(t, f"{prefix}{f.name}."))
            continue
        args = typing.get_args(t)
        if typing.get_origin(t) is typing.Union or type(t).__name__ == "UnionType":
            types = tuple(a for a in args if a is not type(None))
            out.append((f"{prefix}{f.name}", types, len(types) < len(args), dict(f.metadata)))
        else:
            out.append((f"{prefix}{f.name}", (t,), False, dict(f.metadata)))
    return out


# YAML texts of values of the wrong type, by what they parse to
WRONG = {
    "str": ["'text'", "'1e-3x'"], "int": ["42"], "float": ["1.5"], "bool": ["true", "false"],
    "list": ["[1, 2]", "[a]", "[]"], "dict": ["{a: 1}", "{}"], "date": ["2024-01-01"],
}


def _wrong_values(types: tuple) -> list[str]:
    ok = {t.__name__ for t in types} | ({"int"} if float in types else set())  # ints are accepted for floats
    return [v for kind, values in WRONG.items() if kind not in ok for v in values]


def _out_of_range(types: tuple, meta: dict, rng: random.Random) -> list[str]:
    out = []
    if "choices" in meta:
        choices = meta["choices"]
        if str in types:
            out += ["bogus", rng.choice(["'PACK '", "Cpu", "fp64", "auto2", "x" * 300])]
        if int in types and all(isinstance(c, int) for c in choices):
            out += [str(max(choices) + rng.randint(1, 5)), str(min(choices) - rng.randint(1, 5))]
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None:
        if int in types:
            out += [str(lo - 1), str(lo - rng.randint(2, 10**6))]
        else:
            out += [repr(lo - rng.choice([0.5, 1e-6, 1e9]))]
        if meta.get("lo_open"):
            out.append(str(lo))
    if hi is not None:
        out += [repr(hi + rng.choice([1e-6, 0.5])) if float in types else str(hi + 1)]
    if float in types:
        out += [".nan", ".inf", "-.inf"]
    if str in types:
        out += ["''", "'   '"]
    return out


def _typo(key: str, valid: set, rng: random.Random) -> str:
    for _ in range(100):
        parts = key.split(".")
        i = rng.randrange(len(parts))
        w = parts[i]
        j = rng.randrange(len(w))
        op = rng.choice(["drop", "swap", "insert", "replace", "double", "case", "suffix", "dash"])
        if op == "drop" and len(w) > 1:
            w = w[:j] + w[j + 1:]
        elif op == "swap" and len(w) > 1:
            j = min(j, len(w) - 2)
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif op == "insert":
            w = w[:j] + rng.choice(string.ascii_lowercase) + w[j:]
        elif op == "replace":
            w = w[:j] + rng.choice(string.ascii_lowercase) + w[j + 1:]
        elif op == "double":
            w = w[:j] + w[j] + w[j:]
        elif op == "case":
            w = w[:j] + w[j].swapcase() + w[j + 1:]
        elif op == "suffix":
            w = w + rng.choice(["s", "_", "1", "_size", "x"])
        else:
            w = w.replace("_", "-") if "_" in w else "-" + w
        parts[i] = w
        typo = ".".join(parts)
        if typo not in valid:
            return typo
    raise AssertionError(f"no typo found for {key}")


def _first_unknown(key: str, valid: set) -> str:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        if ".".join(parts[:n]) not in valid:
            return ".".join(parts[:n])
    return key


def _alias_bomb(levels: int = 9) -> str:
    """'Billion laughs': 9 levels of 9 references, small as YAML, 9^9 elements if expanded."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel:\n  teacher: *l{levels - 1}\n"


def test_bad_configs_fail_with_one_line_naming_the_key(tmp_path):
    rng = random.Random(SEED)
    fz = Fuzz("configs (load_config)")
    valid = set(all_keys())
    load = lambda *overrides: load_config(TINY_YAML, list(overrides))
    assert load() is not None

    # unknown keys: typos of real keys, as overrides and inside YAML files
    keys = sorted(valid)
    for key in rng.sample(keys, len(keys)) + rng.sample(keys, 40):
        typo = _typo(key, valid, rng)
        fz.error(f"typo {typo}", lambda t=typo: load(f"{t}=1"), f"unknown config key {_first_unknown(typo, valid)}")
    base = yaml.safe_load(TINY_YAML.read_text())
    for n in range(30):
        section = rng.choice(sorted(base))
        sub = rng.choice(sorted(base[section]))
        typo = _typo(sub, {f.name for f in dataclasses.fields(typing.get_type_hints(Config)[section])}, rng)
        raw = json.loads(json.dumps(base))
        raw[section][typo] = raw[section].pop(sub)
        path = tmp_path / f"typo{n}.yaml"
        path.write_text(yaml.safe_dump(raw))
        fz.error(f"yaml typo {section}.{typo}", lambda p=path: load_config(p), f"unknown config key {section}.{typo}")

    # wrong types and out-of-range values for every value field
    for key, types, optional, meta in _leaf_fields():
        wrong = _wrong_values(types)
        for value in rng.sample(wrong, min(4, len(wrong))):
            fz.error(f"type {key}={value}", lambda k=key, v=value: load(f"{k}={v}"), key)
        for value in _out_of_range(types, meta, rng):
            fz.error(f"range {key}={value}", lambda k=key, v=value: load(f"{k}={v}"), key)
        if not optional:
            fz.error(f"null {key}", lambda k=key: load(f"{k}=null"), key)

    # contradictory resources and cross-field rules: (label, overrides, a key the error names, via the plan)
    cases = []
    for _ in range(8):
        role, tp, micro, workers = rng.choice(["teacher", "student"]), rng.randint(2, 8), rng.randint(2, 8), rng.randint(1, 4)
        engine = f"rollout.{role}"
        batch = micro * workers * rng.randint(1, 4) + rng.randint(1, micro * workers - 1)
        mml = rng.randint(16, 4096)
        prompt = rng.randint(1, mml)
        new = mml - prompt + rng.randint(1, 500)
        draft = rng.randint(2, 100)
        val = round(rng.uniform(0.5, 1.0), 3)
        test = min(1.0, round(1.0 - val + rng.uniform(0.01, 0.5), 3))
        steps = rng.randint(1, 50)
        cases += [
            ("cpu engine with gpus", [f"{engine}.device=cpu", f"{engine}.num_gpus={rng.choice([0.5, 1, 2, 8])}"],
             f"{engine}.num_gpus", False),
            ("cuda engine, tp > gpus", [f"{engine}.device=cuda", f"{engine}.tensor_parallel_size={tp}",
                                        f"{engine}.num_gpus={rng.randrange(tp)}"], f"{engine}.num_gpus", False),
            ("cpu engine, tp > 1", [f"{engine}.tensor_parallel_size={tp}"], f"{engine}.tensor_parallel_size", False),
            ("batch not a multiple", [f"trainer.batch_size={batch}", f"trainer.micro_batch_size={micro}",
                                      f"trainer.num_workers={workers}"], "trainer.batch_size", False),
            ("prompt + new tokens > max_model_len", [f"{engine}.max_model_len={mml}", f"data.max_prompt_tokens={prompt}",
                                                     f"rollout.max_new_tokens={new}"], "max_model_len", False),
            ("draft > max draft", [f"rollout.draft_tokens={draft}", f"rollout.max_draft_tokens={rng.randint(1, draft - 1)}"],
             "rollout.draft_tokens", False),
            ("split fractions > 1", [f"data.validation_fraction={val}", f"data.test_fraction={test}"],
             "data.validation_fraction", False),
            ("warmup > max_steps", [f"trainer.max_steps={steps}", f"trainer.warmup_steps={steps + rng.randint(1, 50)}"],
             "trainer.warmup_steps", False),
            ("private Ray smaller than the plan (CPUs)", [f"cluster.num_cpus={rng.randint(1, 4)}",
                                                         f"trainer.cpus_per_worker={rng.randint(5, 64)}"],
             "cluster.num_cpus", True),
            # engines on different devices: block mode (lockstep needs both on one device)
            ("private Ray smaller than the plan (GPUs)", ["cluster.num_gpus=0", "rollout.mode=block", f"{engine}.device=cuda",
                                                         f"{engine}.num_gpus={rng.randint(1, 4)}"], "cluster.num_gpus", True),
        ]
    cases += [
        ("both token weights 0", ["trainer.student_token_weight=0", "trainer.teacher_token_weight=0"],
         "trainer.student_token_weight", False),
        ("skew alpha 1", ["trainer.loss=skew_kl", "trainer.skew_alpha=1.0"], "trainer.skew_alpha", False),
        ("student behind a server", ["rollout.student.server.url=http://127.0.0.1:1"], "rollout.student.server.url", False),
        ("teacher server, hf engine", ["rollout.engine=hf", "rollout.teacher.server.url=local"],
         "rollout.teacher.server.url", False),
    ]
    for label, overrides, name, via_plan in cases:
        fz.error(label, lambda o=overrides, v=via_plan: plan_placement(load(*o)) if v else load(*o), name)

    # malformed overrides
    for item in ["noequals", "=5", "=", "rollout.seed", " =1", "rollout.seed.x=1", "rollout..seed=1", ".seed=1",
                 "rollout.=1", "rollout.switch=3", "rollout=[1]", "trainer={lr: abc}",
                 "rollout.teacher=" + "[" * 5000 + "]" * 5000]:
        name = "trainer.lr" if item.startswith("trainer=") else item.partition("=")[0].strip()[:20] or "override"
        fz.error(f"override {item[:30]}", lambda i=item: load(i), name)

    # files: invalid YAML, YAML that is not a mapping, sections that are not mappings, binary junk
    texts = {
        "unclosed": "model: [unclosed\n", "bad indent": "model:\n  teacher: x\n   student: y\n", "tab": "\tmodel: 1\n",
        "two colons": "a: b: c\n", "open brace": "model: {teacher: x\n", "list then map": "- a\nb: c\n",
        "quote": "model:\n  teacher: 'unterminated\n", "undefined alias": "model: *nothing\n",
        "bad directive": "%YAML 9.9\n---\na: 1\n", "python tag": "model: !!python/object/apply:os.system ['true']\n",
        "two documents": "---\nmodel: {}\n---\ndata: {}\n", "nul": "model:\n  teacher: a\x00b\n",
        "deep": "model: " + "[" * 3000 + "]" * 3000 + "\n",
        "bad unicode escape": 'model: {teacher: "\\uZZZZ"}\n',
    }
    not_mapping = {"list": "- a\n- b\n", "int": "42\n", "string": "just text\n", "bool": "true\n",
                   "flow list": "[1, 2]\n", "float": "1.5\n"}
    sections = {"section int": "model: 5\n", "section list": "rollout: [1, 2]\n", "section str": "trainer: text\n",
                "nested section": "rollout:\n  switch: 3\n", "section null": "data:\n", "key int": "model:\n  1: 2\n",
                "key null": "rollout:\n  null: 1\n", "key bool": "true: 1\n",
                "self-referencing alias": "model: &x [*x]\n", "alias bomb": _alias_bomb()}
    for name, text in {**texts, **not_mapping, **sections}.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(text)
        names = (str(path),) if name in texts or name in not_mapping else ()
        fz.error(f"file {name}", lambda p=path: load_config(p), *names)
    for n in range(12):
        path = tmp_path / f"junk{n}.yaml"
        path.write_bytes(rng.randbytes(rng.randint(1, 400)) + b"\xff")
        fz.error(f"binary junk {n}", lambda p=path: load_config(p), str(path))
    fz.error("missing file", lambda: load_config(tmp_path / "nope.yaml"), "nope.yaml")
    fz.error("directory", lambda: load_config(tmp_path), str(tmp_path))
    fz.check(minimum=400)


def test_bad_configs_through_the_cli_are_one_stderr_line_exit_2(tmp_path):
    fz = Fuzz("configs (CLI --dry-run)")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "junk.yaml").write_bytes(b"\x00\xff\xfe junk")
    cases = [
        ([f"--config={TINY_YAML}", "rollout.swich.tau0=0.3"], "rollout.swich"),
        ([f"--config={TINY_YAML}", "trainer.batch_size=abc"], "trainer.batch_size"),
        ([f"--config={TINY_YAML}", "trainer.lr=.nan"], "trainer.lr"),
        ([f"--config={TINY_YAML}", "rollout.teacher.device=cpu", "rollout.teacher.num_gpus=1"], "rollout.teacher.num_gpus"),
        ([f"--config={TINY_YAML}", "cluster.num_cpus=1"], "cluster.num_cpus"),
        ([f"--config={tmp_path / 'bad.yaml'}"], "bad.yaml"),
        ([f"--config={tmp_path / 'list.yaml'}"], "list.yaml"),
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    procs = [(args, name, subprocess.Popen([sys.executable, "-m", "switchkd.cluster.cli", "train", "--dry-run", *args],
                                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for args, name in cases]
    for args, name, proc in procs:
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        fz.tried += 1
        if proc.returncode != 2 or len(lines) != 1 or not lines[0].startswith("switchkd: error:") or name not in lines[0]:
            fz.problems.append(f"{args}: exit {proc.returncode}, stderr {err[-600:]!r}")
        else:
            COUNTS[fz.category]["error"] += 1
    fz.check(minimum=len(cases))


# ============================================================================ data rows and files


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["teacher"])


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 8))) for _ in range(n))


def _not_json(rng: random.Random) -> bytes:
    while True:
        text = "".join(rng.choice(string.ascii_letters + '{}[]:,"\' ') for _ in range(rng.randint(1, 60)))
        try:
            json.loads(text)
        except ValueError:
            if text.strip():
                return text.encode()


INVALID_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80", b"\xfe\xfe"]


def _bad_row(kind: str, rng: random.Random) -> tuple[bytes, str]:
    """(a bad JSONL line of ``kind``, the reason it must be counted under)."""
    j = lambda obj: json.dumps(obj).encode()
    good = {"prompt": _words(rng, 3)}
    if kind == "lone surrogate":   # valid JSON, but a string no tokenizer can encode
        key = rng.choice(["prompt", "response", "context"])
        row = {"instruction" if key == "context" else "prompt": "ok", key: "a\ud800b" if key != "context" else "\udbff"}
        return json.dumps(row).encode(), f"'{key}' is not valid Unicode (lone surrogate)"   # ASCII \\ud800 escape
    line = {
        "not JSON": lambda: _not_json(rng),
        "truncated JSON": lambda: j({**good, "response": _words(rng, 3)})[:rng.randint(1, 20)],
        "not UTF-8": lambda: b'{"prompt": "' + _words(rng, 2).encode() + rng.choice(INVALID_UTF8) + b'"}',
        "raw bytes": lambda: bytes(b for b in rng.randbytes(rng.randint(4, 60)) if b != 10) + b"\xff",
        "blank line": lambda: rng.choice([b"", b"   ", b"\t", b"\r"]),
        "not a JSON object": lambda: j(rng.choice([[1, 2], 3, "prompt", None, True, [good], 2.5])),
        "missing prompt": lambda: j(rng.choice([{}, {"response": "x"}, {"text": "hello"}, {"prompt": None},
                                                {"Prompt": "x"}])),
        "prompt not a string": lambda: j({"prompt": rng.choice([1, 2.5, [1, 2], ["a"], {"a": 1}, True, False])}),
        "nested junk": lambda: j({"prompt": {"a": [1, {"b": None, "c": [[[]]]}]}, "response": [{"x": 1}]}),
        "empty prompt": lambda: j({"prompt": rng.choice(["", " ", "\n\t ", "\u3000\u2003"])}),
        "response not a string": lambda: j({**good, "response": rng.choice([1, [1], {"a": "b"}, False])}),
        "empty response": lambda: j({**good, "response": rng.choice(["", "  ", "\n"])}),
        "context not a string": lambda: j({"instruction": _words(rng, 3), "context": rng.choice([1, ["a"], {"x": 1}])}),
        "missing instruction": lambda: j({"context": _words(rng, 3), "response": "x"}),
        "NaN prompt": lambda: rng.choice([b'{"prompt": NaN}', b'{"prompt": Infinity}', b'{"prompt": -Infinity}']),
        "nested too deep": lambda: rng.choice([b"[" * 100_000 + b"]" * 100_000,
                                               b'{"prompt": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001]),
        "long prompt": lambda: j({"prompt": _words(rng, rng.randint(400, 800))}),
        "long response": lambda: j({**good, "response": _words(rng, rng.randint(400, 800))}),
    }[kind]()
    return line, REASONS[kind]


REASONS = {
    "not JSON": "not JSON", "truncated JSON": "not JSON", "not UTF-8": "not UTF-8", "raw bytes": "not UTF-8",
    "blank line": "blank line", "not a JSON object": "not a JSON object", "missing prompt": "missing 'prompt'",
    "prompt not a string": "'prompt' is not a string", "nested junk": "'prompt' is not a string",
    "empty prompt": "empty 'prompt'", "response not a string": "'response' is not a string",
    "empty response": "empty 'response'", "context not a string": "'context' is not a string",
    "missing instruction": "missing 'instruction'", "NaN prompt": "'prompt' is not a string",
    "nested too deep": "JSON nested too deeply", "long prompt": "longer than data.max_prompt_tokens",
    "long response": "longer than data.max_response_tokens",
}
BAD_ROW_KINDS = [*REASONS, "lone surrogate"]


def _good_row(rng: random.Random) -> bytes:
    row = rng.choice([
        {"prompt": _words(rng, rng.randint(1, 8))},
        {"prompt": _words(rng, 4), "response": _words(rng, rng.randint(1, 8))},
        {"instruction": _words(rng, 4), "context": rng.choice(["", _words(rng, 3)]), "response": _words(rng, 2)},
        {"prompt": "caf\u00e9 \u4e2d\u6587 \U0001f600 \x00 " + _words(rng, 2), "extra": [1, {"ignored": True}]},
    ])
    return json.dumps(row, ensure_ascii=rng.random() < 0.5).encode()


def _data(path, **kw) -> DataConfig:
    return DataConfig(prompts=str(path), split="all", max_prompt_tokens=256, max_response_tokens=256,
                      chat_template="off", **kw)


def test_bad_rows_are_skipped_and_counted_by_reason(tokenizer, tmp_path):
    rng = random.Random(SEED + 1)
    category = "data rows (JSONL, Parquet, HF)"
    problems, tried = [], 0

    def load_and_compare(path: Path, good: list[int], expected: Counter):
        nonlocal tried
        tried += sum(expected.values())
        try:
            examples, skipped = load_examples(_data(path), tokenizer, run_seed=0)
        except Exception as e:  # noqa: BLE001 -- a bad row must never fail the whole file
            problems.append(f"{path.name}: {type(e).__name__}: {str(e)[:300]}")
            return
        if [e.prompt.index for e in examples] != good:
            problems.append(f"{path.name}: loaded rows {[e.prompt.index for e in examples]}, expected {good}")
        if skipped != expected:
            problems.append(f"{path.name}: skipped {dict(skipped)}, expected {dict(expected)}")
        prompts, again = load_prompts(_data(path), tokenizer, run_seed=0)
        if [p.index for p in prompts] != good or again != skipped:
            problems.append(f"{path.name}: load_prompts disagrees with load_examples")
        COUNTS[category]["skipped"] += sum(skipped.values())
        COUNTS[category]["good rows"] += len(examples)

    for n in range(6):
        lines, good, expected = [], [], Counter()
        if n == 0:  # a byte-order mark before the first row is not an error
            good.append(0)
            lines.append(b"\xef\xbb\xbf" + _good_row(rng))
        kinds = BAD_ROW_KINDS * (3 if n % 2 else 2)
        rng.shuffle(kinds)
        for kind in kinds:
            for _ in range(rng.randint(0, 2)):
                good.append(len(lines))
                lines.append(_good_row(rng))
            line, reason = _bad_row(kind, rng)
            lines.append(line)
            expected[reason] += 1
        if n == 0:  # a 1 MB prompt
            lines.append(json.dumps({"prompt": _words(rng, 180_000)[:1 << 20]}).encode())
            expected["longer than data.max_prompt_tokens"] += 1
        path = tmp_path / f"rows{n}.jsonl"
        path.write_bytes((b"\r\n" if n % 3 == 0 else b"\n").join(lines) + b"\n")
        load_and_compare(path, good, expected)

    # Parquet: columns of the wrong type, nulls, empty strings (one file per layout, good rows first)
    columns = {
        "prompt int": {"prompt": pa.array([1, 2, None])},
        "prompt list": {"prompt": pa.array([["a"], [], None])},
        "prompt struct": {"prompt": pa.array([{"a": 1}, {"a": 2}, None])},
        "prompt binary": {"prompt": pa.array([b"\xff", b"ab", None], pa.binary())},
        "prompt float": {"prompt": pa.array([1.5, float("nan"), None])},
        "prompt empty or null": {"prompt": pa.array(["", "  ", None])},
        "response int": {"prompt": pa.array(["a", "b", "c"]), "response": pa.array([1, 2, 3])},
        "response empty": {"prompt": pa.array(["a", "b", "c"]), "response": pa.array(["", " ", "\n"])},
        "context int": {"instruction": pa.array(["a", "b", "c"]), "context": pa.array([1, 2, 3])},
        "instruction null": {"instruction": pa.array([None, None, None], pa.string()), "context": pa.array(["x", "y", "z"])},
    }
    for name, cols in columns.items():
        text_col = cols.get("prompt", cols.get("instruction"))
        n_good = rng.randint(1, 5) if pa.types.is_string(text_col.type) else 0
        firsts = pa.table({k: pa.array([f"good {i}" if k in ("prompt", "instruction") else None for i in range(n_good)],
                                       v.type) for k, v in cols.items()})
        path = tmp_path / f"{name.replace(' ', '_')}.parquet"
        pq.write_table(pa.concat_tables([firsts, pa.table(cols)]), path)
        load_and_compare(path, list(range(n_good)), _parquet_reasons(name))

    # a Hugging Face datasets directory with bad rows
    import datasets

    path = tmp_path / "hf_dataset"
    datasets.Dataset.from_dict({"prompt": ["good a", "", None, "  ", "good b", "good c"],
                                "response": [None, "x", "y", "z", "", "fine"]}).save_to_disk(str(path))
    load_and_compare(path, [0, 5], Counter({"empty 'prompt'": 2, "missing 'prompt'": 1, "empty 'response'": 1}))

    # files of nothing but junk: every line skipped and counted (the commands then stop on "no usable prompts")
    category = "data rows (all-junk files)"
    for n in range(4):
        path = tmp_path / f"junk{n}.jsonl"
        junk = rng.randbytes(rng.randint(2000, 20000))
        path.write_bytes(junk)
        lines = junk.count(b"\n") + (0 if junk.endswith(b"\n") else 1)
        tried += lines
        examples, skipped = load_examples(_data(path), tokenizer, run_seed=0)
        if examples or sum(skipped.values()) != lines:
            problems.append(f"{path.name}: {len(examples)} loaded from junk, skipped {dict(skipped)} of {lines} lines")
        COUNTS[category]["skipped"] += sum(skipped.values())
    COUNTS[category]["mishandled"] += len(problems)
    assert not problems, "\n".join(problems)
    assert tried >= 200


def _parquet_reasons(name: str) -> Counter:
    """Why the 3 bad rows of each Parquet layout above are skipped."""
    return {
        "prompt int": Counter({"'prompt' is not a string": 2, "missing 'prompt'": 1}),
        "prompt list": Counter({"'prompt' is not a string": 2, "missing 'prompt'": 1}),
        "prompt struct": Counter({"'prompt' is not a string": 2, "missing 'prompt'": 1}),
        "prompt binary": Counter({"'prompt' is not a string": 2, "missing 'prompt'": 1}),
        "prompt float": Counter({"'prompt' is not a string": 2, "missing 'prompt'": 1}),
        "prompt empty or null": Counter({"empty 'prompt'": 2, "missing 'prompt'": 1}),
        "response int": Counter({"'response' is not a string": 3}),
        "response empty": Counter({"empty 'response'": 3}),
        "context int": Counter({"'context' is not a string": 3}),
        "instruction null": Counter({"missing 'instruction'": 3}),
    }[name]


def test_unusable_data_sources_are_one_line_errors(tokenizer, tmp_path):
    rng = random.Random(SEED + 2)
    fz = Fuzz("data files")
    load = lambda p: load_examples(_data(p), tokenizer, run_seed=0)
    for n in range(3):
        missing = tmp_path / f"missing{n}{rng.choice(['.jsonl', '.parquet', ''])}"
        fz.error(f"missing {missing.name}", lambda p=missing: load(p), f"data.prompts={missing}", "does not exist")
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    fz.error("empty directory", lambda: load(empty_dir), f"data.prompts={empty_dir}")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    fz.error("fifo", lambda: load(fifo), f"data.prompts={fifo}")
    datasets_dirs = {
        "state garbage": {"state.json": "garbage", "dataset_info.json": "{"},
        "state list": {"state.json": "[1, 2]", "dataset_info.json": "{}"},
        "state only": {"state.json": "{}"},
        "dict garbage": {"dataset_dict.json": "nope"},
        "dict missing split": {"dataset_dict.json": '{"splits": ["train"]}'},
        "arrow missing": {"state.json": json.dumps({"_data_files": [{"filename": "x.arrow"}], "_fingerprint": "a",
                                                    "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                                                    "_output_all_columns": False, "_split": None}),
                          "dataset_info.json": "{}"},
    }
    datasets_dirs["arrow garbage"] = {**datasets_dirs["arrow missing"], "x.arrow": "garbage"}
    for name, files in datasets_dirs.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        for f, text in files.items():
            (d / f).write_text(text)
        fz.error(f"datasets dir {name}", lambda d=d: load(d), f"data.prompts={d}")

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": [_words(rng, 30) for _ in range(3000)]}), good, compression="none",
                   row_group_size=500)
    data = good.read_bytes()
    for n in range(8):
        path = tmp_path / f"garbage{n}.parquet"
        path.write_bytes(rng.randbytes(rng.randint(0 if n == 0 else 1, 5000)))
        fz.error(f"garbage parquet {n}", lambda p=path: load(p), f"data.prompts={path}")
    for n, cut in enumerate([4, 8, 100, len(data) // 2, len(data) - 9, len(data) - 1]):
        path = tmp_path / f"cut{n}.parquet"
        path.write_bytes(data[:cut])
        fz.error(f"truncated parquet at {cut}", lambda p=path: load(p), f"data.prompts={path}")
    for n in range(4):  # data pages overwritten, footer intact
        path = tmp_path / f"pages{n}.parquet"
        start = rng.randint(len(data) // 8, len(data) // 2)
        path.write_bytes(data[:start] + rng.randbytes(len(data) // 3) + data[start + len(data) // 3:])
        fz.error(f"corrupt pages {n}", lambda p=path: load(p), f"data.prompts={path}")
    for n, cols in enumerate([{}, {"text": ["a"]}, {"question": ["a"], "answer": ["b"]}, {"Prompt": ["x"]}]):
        path = tmp_path / f"columns{n}.parquet"
        pq.write_table(pa.table(cols), path)
        fz.error(f"parquet columns {list(cols)}", lambda p=path: load(p), f"data.prompts={path}", "no 'prompt'")
    fz.check(minimum=30)


# ============================================================================ model directories


def _model_copy(src: Path, dst: Path) -> Path:
    """A copy of a tiny model dir; the weights are a symlink unless a case rewrites them."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def _edit_config(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is ...:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _write(name: str, content: bytes | str):
    def edit(d: Path):
        (d / name).unlink(missing_ok=True)
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def _remove(*names: str):
    def edit(d: Path):
        for n in names:
            (d / n).unlink()
    return edit


class _Trap:
    """Unpickling this creates the marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bad_model_directories_fail_with_one_line(tiny_models, tmp_path):
    rng = random.Random(SEED + 3)
    fz = Fuzz("model directories")
    teacher, student = tiny_models["teacher"], tiny_models["student"]
    marker = tmp_path / "UNPICKLED"
    trap = pickle.dumps({"model.embed_tokens.weight": _Trap(marker)})
    weights = (teacher / "model.safetensors").read_bytes()
    header = int.from_bytes(weights[:8], "little")

    cases = [  # (label, edit, expected fragments)
        ("no config.json", _remove("config.json"), "no config.json"),
        ("config.json is a dir", lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()), "no config.json"),
        ("config invalid utf-8", _write("config.json", b'{"vocab_size": 512, "x": "\xff"}'), "not valid JSON"),
        ("config nested too deep", _write("config.json", "[" * 100_000 + "]" * 100_000), "not valid JSON"),
        ("config empty", _write("config.json", ""), "not valid JSON"),
        ("no weights", _remove("model.safetensors"), "no *.safetensors weights"),
        ("tokenizer.json missing", _remove("tokenizer.json"), "no tokenizer.json"),
        ("tokenizer.json garbage", _write("tokenizer.json", "garbage"), "tokenizer cannot be loaded"),
        ("tokenizer.json empty object", _write("tokenizer.json", "{}"), "tokenizer cannot be loaded"),
        ("tokenizer_config garbage", _write("tokenizer_config.json", "{oops"), "tokenizer cannot be loaded"),
        ("weights empty", _write("model.safetensors", b""), "not a safetensors file"),
        ("weights 4 bytes", _write("model.safetensors", weights[:4]), "not a safetensors file"),
        ("weights header cut", _write("model.safetensors", weights[:8 + header // 2]), "not a safetensors file"),
        ("weights header huge", _write("model.safetensors", (1 << 62).to_bytes(8, "little") + b"{}"), "not a safetensors file"),
        ("weights header not json", _write("model.safetensors", (5).to_bytes(8, "little") + b"\xff\xfe{[x"), "not a safetensors file"),
        ("weights header a list", _write("model.safetensors", (2).to_bytes(8, "little") + b"[]"), "not a safetensors file"),
        ("weights are a pickle", _write("model.safetensors", trap), "not a safetensors file"),
        ("weights are a directory", lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir()),
         "model.safetensors"),
        ("broken weights symlink", lambda d: ((d / "model.safetensors").unlink(),
                                              (d / "model.safetensors").symlink_to(d / "gone")), "model.safetensors"),
        ("index names missing shard", _write("model.safetensors.index.json",
                                             json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})),
         "missing shards"),
        ("index garbage", _write("model.safetensors.index.json", "[1, 2"), "not a valid index"),
        ("index without weight_map", _write("model.safetensors.index.json", "{}"), "not a valid index"),
        ("hidden size and heads missing", _edit_config(head_dim=..., hidden_size=..., num_attention_heads=...),
         "no head size"),
    ]
    for n in range(5):
        junk = bytes(b for b in rng.randbytes(rng.randint(1, 300)) if b not in b"{[\"0123456789-tfn") or b"x"
        cases.append((f"config junk {n}", _write("config.json", junk), "not valid JSON"))
    for value in ([1], "text", 3, None, True):
        cases.append((f"config is {value!r}", _write("config.json", json.dumps(value)), "no integer vocab_size"))
    for value in (..., "512", 512.0, True, 0, -5, None, [512]):
        cases.append((f"vocab_size={value!r}", _edit_config(vocab_size=value), "vocab_size"))
    for key in ("hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings"):
        for value in ("64", 0, -1, 1.5, True, [64]):
            cases.append((f"{key}={value!r}", _edit_config(**{key: value}), key))
    for size in rng.sample([s for s in range(4, 600, 4) if s not in CPU_HEAD_SIZES], 8):
        cases.append((f"head_dim={size}", _edit_config(head_dim=size), f"head size {size} is not supported"))
    cases.append(("hidden/heads = 40", _edit_config(head_dim=..., hidden_size=120, num_attention_heads=3),
                  "head size 40 is not supported"))
    for suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        name = ("pytorch_model" if suffix == ".bin" else "model") + suffix
        cases.append((f"{suffix} weights only", lambda d, name=name: (_remove("model.safetensors")(d),
                                                                      _write(name, trap)(d)),
                      f"found {name}; pickled weights are not loaded"))
    for size in rng.sample([v for v in range(2, 100_000) if v != VOCAB], 6):
        cases.append((f"vocab {size} vs {VOCAB}", _edit_config(vocab_size=size), "different vocabularies"))

    def swapped_tokenizer(d: Path):
        tok = json.loads((d / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        a, b = sorted(vocab)[10], sorted(vocab)[11]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (d / "tokenizer.json").write_text(json.dumps(tok))
    cases.append(("tokenizers differ", swapped_tokenizer, "tokenizers differ"))

    for i, (label, edit, fragment) in enumerate(cases):
        side = rng.choice(["teacher", "student"])
        d = _model_copy(tiny_models[side], tmp_path / f"{side}{i}")
        edit(d)
        COUNTS[fz.category]["inputs"] += 1
        key = f"model.{side}"
        pair = (d, student) if side == "teacher" else (teacher, d)
        if "vocabularies" in fragment or "tokenizers differ" in fragment:
            key = "model.teacher and model.student"
        fz.error(f"{side}: {label}", lambda pair=pair: check_pair(str(pair[0]), str(pair[1]), "vllm", "cpu"),
                 key, fragment)
        if "head size" not in fragment and "different" not in fragment and "tokeni" not in fragment:
            fz.error(f"{side}: {label} (read_model_config)", lambda d=d, k=key: read_model_config(d, k), key, fragment)
    COUNTS[fz.category]["inputs"] += 2
    fz.error("missing dir", lambda: check_pair(str(tmp_path / "nope"), str(student), "hf"), "model.teacher", "does not exist")
    fz.error("file not dir", lambda: check_pair(str(teacher), str(teacher / "config.json"), "hf"), "model.student",
             "does not exist")
    assert not marker.exists(), "a pickle in a model directory was unpickled"
    fz.check(minimum=80)


# ============================================================================ rollout Parquets


def _rollout_rows(rng: random.Random, n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        p, r, k = rng.randint(1, 12), rng.randint(1, 10), rng.randint(1, 5)
        probs = [0.5 ** (j + 1) for j in range(k)]
        rows.append({
            "prompt_index": i, "prompt_ids": [rng.randrange(VOCAB) for _ in range(p)],
            "response_ids": [rng.randrange(VOCAB) for _ in range(r)], "owner": [rng.randint(0, 1) for _ in range(r)],
            "jsd": [rng.uniform(0, 0.69) for _ in range(r)], "tau": [0.4] * r,
            "student_logprob": [-rng.uniform(0, 5) for _ in range(r)],
            "teacher_topk_ids": [rng.sample(range(VOCAB), k) for _ in range(r)],
            "teacher_topk_logprobs": [[math.log(q) for q in probs] for _ in range(r)],
            "policy_version": rng.randint(0, 3), "seed": rng.randint(0, 2**40), "finish_reason": rng.choice(["stop", "length"]),
            "reference_ids": rng.choice([[], [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]]),
        })
    return rows


def _other_type(name: str, t: pa.DataType):
    """A plausible wrong Arrow type for column ``name`` and a converter of its Python values."""
    if pa.types.is_string(t):
        return pa.binary(), lambda v: None if v is None else v.encode()
    if pa.types.is_integer(t):
        return pa.string(), lambda v: str(v)
    inner = t.value_type
    if pa.types.is_list(inner):
        return pa.list_(inner.value_type), lambda v: [x[0] if x else 0 for x in v]
    if pa.types.is_floating(inner):
        return pa.list_(pa.float64()), lambda v: v
    return pa.list_(pa.int64()), lambda v: v


def test_bad_rollout_files_name_the_file_and_row(tiny_models, tmp_path):
    rng = random.Random(SEED + 4)
    fz = Fuzz("rollout Parquets")
    student = str(tiny_models["student"])
    good_rows = _rollout_rows(rng)
    good = tmp_path / "good.parquet"
    schema.write_parquet(schema.to_table(good_rows), good)
    assert schema.read_rollouts(good, VOCAB).num_rows == 4 and load_rollouts([str(good)], student)[1] == 0

    counter = iter(range(10**6))

    def write_table(table: pa.Table) -> Path:
        path = tmp_path / f"r{next(counter)}.parquet"
        pq.write_table(table, path)
        return path

    def bad_file(label: str, path: Path, *names: str, trainer_only: bool = False):
        COUNTS[fz.category]["inputs"] += 1
        if not trainer_only:
            fz.error(f"{label} (read_rollouts)", lambda: schema.read_rollouts(path, VOCAB), str(path), *names)
        fz.error(f"{label} (load_rollouts)", lambda: load_rollouts([str(good), str(path)], student), str(path), *names)

    def bad_rows(label: str, rows: list[dict], row: int, *names: str, trainer_only: bool = False):
        table = pa.Table.from_pylist(rows, schema=schema.ROLLOUT_SCHEMA)
        bad_file(label, write_table(table), f"row {row} ", *names, trainer_only=trainer_only)

    def mutate(fn) -> tuple[list[dict], int]:
        rows = json.loads(json.dumps(good_rows))
        r = rng.randrange(len(rows))
        fn(rows[r])
        return rows, r

    base = schema.to_table(good_rows)
    # wrong or missing schema version
    for version in [b"1", b"3", b"0", b"", b"\xff\xfe", b"2.0", b"two", b"2 "]:
        bad_file(f"version {version!r}", write_table(base.replace_schema_metadata({b"switchkd.schema_version": version})),
                 "schema version")
    bad_file("no metadata", write_table(base.replace_schema_metadata(None)), "schema version <missing>")
    # missing columns, wrong types, duplicate columns
    for name in schema.ROLLOUT_SCHEMA.names:
        bad_file(f"missing {name}", write_table(base.drop_columns([name])), f"missing columns {name}")
        t, convert = _other_type(name, schema.ROLLOUT_SCHEMA.field(name).type)
        values = pa.array([convert(v) for v in base.column(name).to_pylist()], t)
        i = base.schema.get_field_index(name)
        bad_file(f"{name} as {t}", write_table(base.set_column(i, name, values)), f"column {name} has type")
        bad_file(f"{name} twice", write_table(base.append_column(name, base.column(name))), "not a readable Parquet")
    bad_file("a prompts file", write_table(pa.table({"prompt": ["a", "b"]})), "schema version")
    # rows: out-of-vocabulary ids, length mismatches, bad values, nulls
    for _ in range(6):
        for col in ("prompt_ids", "response_ids", "reference_ids", "teacher_topk_ids"):
            bad = rng.choice([VOCAB, VOCAB + rng.randint(1, 10**6), -1, -rng.randint(2, 10**6), 2**31 - 1])

            def put(row, col=col, bad=bad):
                target = row[col] if col != "teacher_topk_ids" else rng.choice(row[col])
                if target:
                    target[rng.randrange(len(target))] = bad
                else:   # an empty reference_ids
                    target.append(bad)
            rows, r = mutate(put)
            bad_rows(f"{col} id {bad}", rows, r, f"token id {bad} outside the vocabulary [0, {VOCAB})")
    for col in schema.PER_TOKEN:
        for change in ("extra", "short"):
            def edit(row, col=col, change=change):
                row[col] = row[col] + row[col][:1] if change == "extra" else row[col][:-1]
            rows, r = mutate(edit)
            bad_rows(f"{col} {change}", rows, r, f"{col} has")
    for owner in (2, -1, 127):
        rows, r = mutate(lambda row, o=owner: row["owner"].__setitem__(0, o))
        bad_rows(f"owner {owner}", rows, r, "owner values must be 0")
    for reason in ("", "abort", "STOP", None):
        rows, r = mutate(lambda row, f=reason: row.__setitem__("finish_reason", f))
        bad_rows(f"finish_reason {reason!r}", rows, r, "finish_reason")
    rows, r = mutate(lambda row: row.__setitem__("prompt_ids", []))
    bad_rows("empty prompt_ids", rows, r, "empty prompt_ids")
    rows, r = mutate(lambda row: row["teacher_topk_logprobs"][0].append(-9.0))
    bad_rows("top-k lengths differ", rows, r, "differ in length")
    for name in schema.ROLLOUT_SCHEMA.names:
        rows, r = mutate(lambda row, n=name: row.__setitem__(n, None))
        bad_rows(f"{name} null", rows, r, "finish_reason None" if name == "finish_reason" else f"{name} holds a null")
        if name in ("prompt_ids", "response_ids", "reference_ids", "owner", "jsd", "student_logprob",
                    "teacher_topk_ids", "teacher_topk_logprobs"):
            def null_item(row, n=name):
                if row[n]:
                    row[n][rng.randrange(len(row[n]))] = None
                else:   # an empty reference_ids
                    row[n].append(None)
            rows, r = mutate(null_item)
            bad_rows(f"{name} null element", rows, r, f"{name} holds a null")
    for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
        rows, r = mutate(lambda row, n=name: row[n][0].__setitem__(0, None))
        bad_rows(f"{name} null inner element", rows, r, f"{name} holds a null")
    # trainer checks on top of the schema (load_rollouts only)
    for value, text in ((float("nan"), "holds NaN"), (float("inf"), "holds NaN or +inf"), (0.5, "not log-probabilities")):
        rows, r = mutate(lambda row, v=value: row["teacher_topk_logprobs"][0].__setitem__(0, v))
        bad_rows(f"top-k logprob {value}", rows, r, text, trainer_only=True)
    def repeat_id(row):
        ids = row["teacher_topk_ids"][0]
        ids.append(ids[0])
        row["teacher_topk_logprobs"][0].append(-9.0)
    rows, r = mutate(repeat_id)
    bad_rows("repeated top-k id", rows, r, "repeats an id", trainer_only=True)
    rows, r = mutate(lambda row: (row["teacher_topk_ids"].__setitem__(0, []), row["teacher_topk_logprobs"].__setitem__(0, [])))
    bad_rows("no top-k entries", rows, r, "no teacher top-k", trainer_only=True)
    rows, r = mutate(lambda row: row.__setitem__("prompt_ids", [1] * 2048))
    bad_rows("longer than the student takes", rows, r, "the student takes at most 2048", trainer_only=True)
    # files that are not rollout Parquets at all
    data = good.read_bytes()
    for cut in sorted(rng.sample(range(1, len(data)), 8)) + [0]:
        path = tmp_path / f"cut{cut}.parquet"
        path.write_bytes(data[:cut])
        bad_file(f"truncated at {cut}", path, "not a readable Parquet file")
    for n, content in enumerate([rng.randbytes(200), rng.randbytes(5000), b"PAR1", b"PAR1" + rng.randbytes(64) + b"PAR1",
                                 json.dumps(good_rows).encode(), b"prompt_index,seed\n1,2\n"]):
        path = tmp_path / f"junk{n}.parquet"
        path.write_bytes(content)
        bad_file(f"junk {n}", path, "not a readable Parquet file")
    bad_file("missing file", tmp_path / "nope.parquet", "does not exist")
    bad_file("a directory", tmp_path, "does not exist")

    # empty responses: skipped and counted by the trainer, and all-empty is an error
    empty = dict(good_rows[0], prompt_index=9, response_ids=[], owner=[], jsd=[], tau=[], student_logprob=[],
                 teacher_topk_ids=[], teacher_topk_logprobs=[])
    path = write_table(schema.to_table(good_rows + [empty, dict(empty, prompt_index=10)]))
    table, skipped = load_rollouts([str(path)], student)
    assert (table.num_rows, skipped) == (4, 2)
    COUNTS[fz.category]["skipped"] += skipped
    COUNTS[fz.category]["inputs"] += 3
    fz.error("only empty responses", lambda: load_rollouts([str(write_table(schema.to_table([empty])))], student),
             "no rows with a response")
    fz.check(minimum=150)
