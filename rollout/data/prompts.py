"""Prompts and reference responses for every command (generate, train, eval).

Sources (``data.prompts``): a JSONL file (one object per line), a Parquet file (``.parquet``),
or a Hugging Face ``datasets`` directory (``Dataset.save_to_disk``). Two row layouts:

    {"prompt": "...", "response": "..."}                              plain
    {"instruction": "...", "context": "...", "response": "..."}       Dolly (context appended when non-empty)

``response`` is optional: rows without one are still rollout prompts, with no reference.
Bad rows are skipped and counted by reason; a source that cannot be used at all raises
PromptError naming ``data.prompts`` and the problem (one line).

Each row goes to train, validation or test by a hash of (``data.split_seed``, prompt text), so
a row's split never changes when rows are added, moved or removed, and identical prompts
always share a split. A row's ``index`` (line or row number) is its identity: its sampling
seed derives from it.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from switchkd.rollout.config import DataConfig
from switchkd.rollout.data.sequences import Prompt
from switchkd.rollout.errors import SwitchkdError
from switchkd.rollout.io import atomic_write_bytes
from switchkd.rollout.switch import prompt_seed

DOLLY_SEPARATOR = "\n\n"
_BATCH_ROWS = 1024


class PromptError(SwitchkdError, ValueError):
    """A data source that cannot be used at all; the message names the config key or file."""


class _BadRow(Exception):
    """A row to skip; its message is the reason it is counted under."""


@dataclass(frozen=True)
class Example:
    """One usable row: the tokenized prompt (and reference), plus the texts it came from."""
    prompt: Prompt
    text: str                  # prompt text before any chat template
    response: str | None       # reference response text; None = no reference


# ---------------------------------------------------------------- reading rows


def read_rows(path: str | Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(index, row, None) for every row of a JSONL / Parquet / HF datasets source, or
    (index, None, reason) for a row that is not even a mapping."""
    path = Path(path)
    if path.is_dir():
        return _dataset_rows(path)
    if not path.is_file():
        raise PromptError(f"data.prompts={path}: file does not exist")
    if path.suffix in (".parquet", ".pq"):
        return _parquet_rows(path)
    return _jsonl_rows(path)


def _jsonl_rows(path: Path):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PromptError(f"data.prompts={path}: cannot be read ({e.strerror})") from None
    with f:
        for index, raw in enumerate(f):
            try:
                row = json.loads(raw.decode("utf-8-sig" if index == 0 else "utf-8"))  # a leading BOM is no error
            except UnicodeDecodeError:
                yield index, None, "not UTF-8"
            except json.JSONDecodeError:
                yield index, None, "blank line" if not raw.strip() else "not JSON"
            except RecursionError:
                yield index, None, "JSON nested too deeply"
            else:
                yield (index, row, None) if isinstance(row, dict) else (index, None, "not a JSON object")


def _parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PromptError(f"data.prompts={path}: not a readable Parquet file ({_first_line(e)})") from None
    _check_columns(path, source.schema_arrow.names)
    rows = (row for batch in source.iter_batches(batch_size=_BATCH_ROWS) for row in batch.to_pylist())
    yield from _numbered(path, rows, "Parquet file")


def _dataset_rows(path: Path):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise PromptError(f"data.prompts={path}: a directory, but not a Hugging Face datasets directory "
                          "(expected the output of Dataset.save_to_disk)") from None
    except Exception as e:  # datasets raises whatever its JSON / Arrow readers raise on damaged files
        raise PromptError(f"data.prompts={path}: not a readable Hugging Face datasets directory "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        names = ", ".join(dataset)
        raise PromptError(f"data.prompts={path}: a DatasetDict with splits {names}; point data.prompts at one "
                          f"of them (e.g. {path / next(iter(dataset))})")
    _check_columns(path, dataset.column_names)
    rows = (dict(zip(batch, values)) for batch in dataset.iter(batch_size=_BATCH_ROWS) for values in zip(*batch.values()))
    yield from _numbered(path, rows, "Hugging Face datasets directory")


def _numbered(path: Path, rows, what: str):
    """(index, row, None) per row; a source that breaks while being read (damaged data pages) is a
    PromptError naming the row, not a traceback."""
    import pyarrow as pa

    index = 0
    try:
        for row in rows:
            yield index, row, None
            index += 1
    except (pa.ArrowException, OSError) as e:
        raise PromptError(f"data.prompts={path}: not a readable {what} (after {index} rows: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _check_columns(path: Path, columns: list[str]) -> None:
    if "prompt" not in columns and "instruction" not in columns:
        raise PromptError(f"data.prompts={path}: no 'prompt' or 'instruction' column "
                          f"(columns: {', '.join(columns) or 'none'})")


def parse_row(row: dict) -> tuple[str, str | None]:
    """(prompt text, response text or None) of one row in either layout; _BadRow otherwise."""
    if "instruction" in row or "context" in row:
        text = _text(row, "instruction")
        context = row.get("context")
        if context is not None and not isinstance(context, str):
            raise _BadRow("'context' is not a string")
        _check_unicode(context, "context")
        if context and context.strip():
            text = text + DOLLY_SEPARATOR + context
    else:
        text = _text(row, "prompt")
    response = row.get("response")
    if response is not None:
        if not isinstance(response, str):
            raise _BadRow("'response' is not a string")
        if not response.strip():
            raise _BadRow("empty 'response'")
        _check_unicode(response, "response")
    return text, response


def _text(row: dict, key: str) -> str:
    if row.get(key) is None:
        raise _BadRow(f"missing '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise _BadRow(f"'{key}' is not a string")
    if not value.strip():
        raise _BadRow(f"empty '{key}'")
    _check_unicode(value, key)
    return value


def _check_unicode(value: str | None, key: str) -> None:
    """JSON escapes can carry lone surrogates (\\ud800), which no tokenizer or hash can encode."""
    if value is not None and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadRow(f"'{key}' is not valid Unicode (lone surrogate)") from None


# ---------------------------------------------------------------- split, template, tokens


def split_of(text: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """'train', 'validation' or 'test' for a prompt text: a pure function of (text, seed)."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def uses_chat_template(mode: str, tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template (``data.chat_template``)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if mode == "on" and not has_template:
        raise PromptError("data.chat_template=on: the tokenizer has no chat template (use auto or off)")
    return mode == "on" or (mode == "auto" and has_template)


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Prompt token ids: one user turn plus the generation prompt, or the raw text."""
    if chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer, text: str) -> list[int]:
    """Reference token ids: the text without special tokens, EOS appended."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def load_examples(data: DataConfig, tokenizer, run_seed: int) -> tuple[list[Example], Counter]:
    """The usable rows of ``data.split`` (at most ``data.max_prompts``), tokenized, with their
    per-prompt seeds; and a Counter of skipped rows by reason. Rows of other splits are not
    counted."""
    chat_template = uses_chat_template(data.chat_template, tokenizer)
    examples, skipped = [], Counter()
    for index, row, reason in read_rows(data.prompts):
        if data.max_prompts is not None and len(examples) >= data.max_prompts:
            break
        try:
            if reason:
                raise _BadRow(reason)
            text, response = parse_row(row)
        except _BadRow as bad:
            skipped[str(bad)] += 1
            continue
        if data.split != "all" and split_of(text, data.split_seed, data.validation_fraction,
                                            data.test_fraction) != data.split:
            continue
        ids = encode_prompt(tokenizer, text, chat_template)
        if len(ids) > data.max_prompt_tokens:
            skipped["longer than data.max_prompt_tokens"] += 1
            continue
        reference = encode_response(tokenizer, response) if response is not None else []
        if len(reference) > data.max_response_tokens:
            skipped["longer than data.max_response_tokens"] += 1
            continue
        examples.append(Example(Prompt(index, ids, prompt_seed(run_seed, index), reference), text, response))
    return examples, skipped


def load_prompts(data: DataConfig, tokenizer, run_seed: int) -> tuple[list[Prompt], Counter]:
    """Tokenized prompts (and reference responses, EOS appended) of ``data.split`` with
    per-prompt seeds; bad or too-long rows skipped and counted."""
    examples, skipped = load_examples(data, tokenizer, run_seed)
    return [e.prompt for e in examples], skipped


# ---------------------------------------------------------------- default data set


DEFAULT_DATA_PACKAGE = "chatterbot-corpus"   # BSD-3-Clause; pinned in requirements/models.txt
DEFAULT_DATA_PATH = "data/default.jsonl"


def default_data_rows() -> list[dict]:
    """Every consecutive (statement, reply) pair of the English chatterbot-corpus dialogues as
    {"prompt", "response", "source"} rows, in a fixed order."""
    import yaml

    try:
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ImportError:
        raise PromptError(f"the {DEFAULT_DATA_PACKAGE} package is not installed "
                          "(pip install --no-deps -r requirements/models.txt)") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    rows = []
    for path in sorted(Path(DATA_DIRECTORY, "english").glob("*.yml")):
        conversations = yaml.load(path.read_text(encoding="utf-8"), Loader=loader).get("conversations") or []
        for turns in conversations:
            if not isinstance(turns, list):
                continue
            for statement, reply in pairwise(turns):
                if isinstance(statement, str) and isinstance(reply, str) and statement.strip() and reply.strip():
                    rows.append({"prompt": statement.strip(), "response": reply.strip(),
                                 "source": f"{DEFAULT_DATA_PACKAGE}/english/{path.name}"})
    return rows


def prepare_default_data(out: str | Path = DEFAULT_DATA_PATH) -> tuple[int, bool]:
    """Write the default data set as prompt/response JSONL at ``out`` (atomically; left alone
    when already identical). Returns (rows, whether the file was written)."""
    rows = default_data_rows()
    content = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    out = Path(out)
    if out.is_file() and out.read_bytes() == content:
        return len(rows), False
    atomic_write_bytes(out, content)
    return len(rows), True


