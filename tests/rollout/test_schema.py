"""The rollout schema: round trip, validation naming file and row, atomic writes."""
import pyarrow.parquet as pq
import pytest

from switchkd.rollout.data import schema


def _row(**changes):
    row = {
        "prompt_index": 3, "prompt_ids": [5, 6, 7], "response_ids": [8, 2], "owner": [0, 1],
        "jsd": [0.1, 0.5], "tau": [0.4, 0.39], "student_logprob": [-1.0, -2.0],
        "teacher_topk_ids": [[8, 9], [2, 4]], "teacher_topk_logprobs": [[-0.5, -1.5], [-0.1, -3.0]],
        "policy_version": 0, "seed": 17, "finish_reason": "stop", "reference_ids": [],
    }
    row.update(changes)
    return row


def test_round_trip(tmp_path):
    path = tmp_path / "r.parquet"
    schema.write_parquet(schema.to_table([_row(), _row(prompt_index=4)]), path)
    table = schema.read_rollouts(path, vocab_size=10)
    assert table.num_rows == 2 and table.column("response_ids").to_pylist()[0] == [8, 2]
    assert not list(tmp_path.glob(".*tmp")), "no temp files left behind"


@pytest.mark.parametrize("changes,message", [
    ({"owner": [0]}, "row 0 (prompt_index 3): owner has 1 entries, response has 2"),
    ({"owner": [0, 2]}, "owner values must be 0 (student) or 1 (teacher)"),
    ({"prompt_ids": []}, "empty prompt_ids"),
    ({"finish_reason": "abort"}, "finish_reason 'abort'"),
    ({"teacher_topk_logprobs": [[-0.5], [-0.1, -3.0]]}, "differ in length"),
])
def test_bad_rows_are_named(changes, message):
    with pytest.raises(schema.SchemaError, match=None) as err:
        schema.to_table([_row(**changes)])
    assert message in str(err.value)


def test_out_of_vocab_ids_are_refused(tmp_path):
    path = tmp_path / "r.parquet"
    schema.write_parquet(schema.to_table([_row(), _row(response_ids=[8, 12])]), path)
    with pytest.raises(schema.SchemaError, match=r"r.parquet: row 1 .*token id 12 outside the vocabulary \[0, 10\)"):
        schema.read_rollouts(path, vocab_size=10)


def test_wrong_version_missing_columns_and_not_parquet(tmp_path):
    table = schema.to_table([_row()])
    old = table.replace_schema_metadata({b"switchkd.schema_version": b"0"})
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(schema.SchemaError, match="schema version 0"):
        schema.read_rollouts(tmp_path / "old.parquet")
    pq.write_table(table.drop_columns(["jsd"]), tmp_path / "nojsd.parquet")
    with pytest.raises(schema.SchemaError, match="missing columns jsd"):
        schema.read_rollouts(tmp_path / "nojsd.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(schema.SchemaError, match="not a readable Parquet file"):
        schema.read_rollouts(tmp_path / "junk.parquet")
    with pytest.raises(schema.SchemaError, match="does not exist"):
        schema.read_rollouts(tmp_path / "missing.parquet")


def test_reference_ids_round_trip_and_vocab_check(tmp_path):
    path = tmp_path / "r.parquet"
    schema.write_parquet(schema.to_table([_row(reference_ids=[4, 9, 2]), _row(prompt_index=4)]), path)
    assert schema.read_rollouts(path, vocab_size=10).column("reference_ids").to_pylist() == [[4, 9, 2], []]
    schema.write_parquet(schema.to_table([_row(), _row(reference_ids=[4, 11])]), path)
    with pytest.raises(schema.SchemaError, match=r"row 1 .*token id 11 outside the vocabulary \[0, 10\)"):
        schema.read_rollouts(path, vocab_size=10)


def test_version_1_file_is_refused(tmp_path):
    v1 = schema.to_table([_row()]).drop_columns(["reference_ids"])
    v1 = v1.replace_schema_metadata({b"switchkd.schema_version": b"1"})
    pq.write_table(v1, tmp_path / "v1.parquet")
    with pytest.raises(schema.SchemaError, match="v1.parquet: rollout schema version 1, this switchkd reads version 2"):
        schema.read_rollouts(tmp_path / "v1.parquet")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "r.parquet"
    schema.write_parquet(schema.to_table([_row()]), path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        schema.write_parquet(schema.to_table([_row(prompt_index=9)]), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]
