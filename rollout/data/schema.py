"""The rollout batch: one Arrow schema, versioned, validated on read, written atomically.

One row per sequence. Per-token list columns all have the response's length n.

    prompt_index           int64                  row of the prompt in the prompt file
    prompt_ids             list<int32>   [P]      prompt token ids (no padding)
    response_ids           list<int32>   [n]      generated token ids (EOS included when hit)
    owner                  list<int8>    [n]      0 = student drew the token, 1 = teacher
    jsd                    list<float32> [n]      JSD(p_T, p_S) at each position (natural log)
    tau                    list<float32> [n]      threshold tau_t at each position
    student_logprob        list<float32> [n]      student log p_S(y_t | prefix)
    teacher_topk_ids       list<list<int32>>   [n, k]  teacher top-k ids, highest first
    teacher_topk_logprobs  list<list<float32>> [n, k]  teacher log-probs at those ids
    policy_version         int64                  student weights version that generated it
    seed                   int64                  per-prompt sampling seed
    finish_reason          string                 "stop" (EOS) or "length"
    reference_ids          list<int32>   [R]      reference (ground-truth) response ids for this
                                                  prompt, EOS appended; empty when the data has none

The schema version lives in the Arrow metadata; readers refuse other versions.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from switchkd.rollout.errors import SwitchkdError
from switchkd.rollout.io import atomic_write

SCHEMA_VERSION = "2"  # 2: + reference_ids
_VERSION_KEY = b"switchkd.schema_version"
FINISH_REASONS = ("stop", "length")
PER_TOKEN = ("owner", "jsd", "tau", "student_logprob", "teacher_topk_ids", "teacher_topk_logprobs")

ROLLOUT_SCHEMA = pa.schema(
    [
        ("prompt_index", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("owner", pa.list_(pa.int8())),
        ("jsd", pa.list_(pa.float32())),
        ("tau", pa.list_(pa.float32())),
        ("student_logprob", pa.list_(pa.float32())),
        ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("policy_version", pa.int64()),
        ("seed", pa.int64()),
        ("finish_reason", pa.string()),
        ("reference_ids", pa.list_(pa.int32())),
    ],
    metadata={_VERSION_KEY: SCHEMA_VERSION.encode()},
)


class SchemaError(SwitchkdError, ValueError):
    """A rollout file or table that does not follow ROLLOUT_SCHEMA; the message names file and row."""


def to_table(rows: list[dict]) -> pa.Table:
    """Build a validated table from row dicts (numpy arrays or lists per column)."""
    columns = {name: [_plain(r[name]) for r in rows] for name in ROLLOUT_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA)
    validate(table, source="<in-memory batch>")
    return table


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


def validate(table: pa.Table, source: str, vocab_size: int | None = None) -> None:
    """Raise SchemaError naming ``source`` and the row when ``table`` breaks the schema."""
    version = (table.schema.metadata or {}).get(_VERSION_KEY, b"<missing>").decode("utf-8", "replace")[:40]
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{source}: rollout schema version {version}, this switchkd reads version {SCHEMA_VERSION}")
    missing = [n for n in ROLLOUT_SCHEMA.names if n not in table.column_names]
    if missing:
        raise SchemaError(f"{source}: missing columns {', '.join(missing)}")
    for f in ROLLOUT_SCHEMA:
        actual = table.schema.field(f.name).type
        if actual != f.type:
            raise SchemaError(f"{source}: column {f.name} has type {actual}, expected {f.type}")
    nulls = _first_null(table)
    if nulls:
        i, name = nulls
        raise SchemaError(f"{source}: row {i} (prompt_index {table.column('prompt_index')[i].as_py()}): "
                          f"{name} holds a null")
    data = table.select(ROLLOUT_SCHEMA.names).to_pylist()
    for i, row in enumerate(data):
        problem = _row_problem(row, vocab_size)
        if problem:
            raise SchemaError(f"{source}: row {i} (prompt_index {row['prompt_index']}): {problem}")


def _first_null(table: pa.Table) -> tuple[int, str] | None:
    """(row, column) of the first null anywhere in a row (the value, a list or a list element),
    except ``finish_reason`` (named by its own check); None when there is none. Vectorized."""
    import numpy as np
    import pyarrow.compute as pc

    first = None
    for name in ROLLOUT_SCHEMA.names:
        if name == "finish_reason":
            continue
        values, rows = table.column(name).combine_chunks(), np.arange(table.num_rows)
        while True:
            if values.null_count:
                row = int(rows[np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]])
                first = (row, name) if first is None or row < first[0] else first
            if not pa.types.is_list(values.type):
                break
            rows = rows[pc.list_parent_indices(values).to_numpy(zero_copy_only=False)]
            values = pc.list_flatten(values)
    return first


def _row_problem(row: dict, vocab_size: int | None) -> str | None:
    n = len(row["response_ids"] or [])
    if not row["prompt_ids"]:
        return "empty prompt_ids"
    for name in PER_TOKEN:
        if row[name] is None or len(row[name]) != n:
            return f"{name} has {0 if row[name] is None else len(row[name])} entries, response has {n}"
    if any(o not in (0, 1) for o in row["owner"]):
        return "owner values must be 0 (student) or 1 (teacher)"
    if any(len(a) != len(b) for a, b in zip(row["teacher_topk_ids"], row["teacher_topk_logprobs"])):
        return "teacher_topk_ids and teacher_topk_logprobs differ in length"
    if row["finish_reason"] not in FINISH_REASONS:
        return f"finish_reason {row['finish_reason']!r} not in {FINISH_REASONS}"
    if row["reference_ids"] is None:
        return "reference_ids is null (an empty list means no reference)"
    if vocab_size is not None:
        ids = [*row["prompt_ids"], *row["response_ids"], *row["reference_ids"],
               *(i for ks in row["teacher_topk_ids"] for i in ks)]
        bad = [i for i in ids if i is None or not 0 <= i < vocab_size]
        if bad:
            return f"token id {bad[0]} outside the vocabulary [0, {vocab_size})"
    return None


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """Write ``table`` to ``path`` atomically."""
    atomic_write(path, lambda f: pq.write_table(table, f))


def read_rollouts(path: str | Path, vocab_size: int | None = None) -> pa.Table:
    """Read and validate a rollout Parquet file; SchemaError names the file and row on problems."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: rollout file does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        message = (str(e).strip().splitlines() or [""])[0]
        raise SchemaError(f"{path}: not a readable Parquet file ({message})") from None
    validate(table, source=str(path), vocab_size=vocab_size)
    return table
