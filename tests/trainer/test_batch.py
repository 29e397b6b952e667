"""Rollout rows -> tensors, and bad batches refused with the file and row named (never inside DeepSpeed)."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from switchkd.cluster.cli import main
from switchkd.rollout.data import schema
from switchkd.rollout.data.schema import SchemaError
from switchkd.trainer.batch import check_rows, collate, first_trained_position, shifted_logits
from switchkd.trainer.offline import batch_rows, load_rollouts

TINY_YAML = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def _row(**changes):
    row = {
        "prompt_index": 3, "prompt_ids": [5, 6, 7], "response_ids": [8, 2], "owner": [0, 1],
        "jsd": [0.1, 0.5], "tau": [0.4, 0.39], "student_logprob": [-1.0, -2.0],
        "teacher_topk_ids": [[8, 9], [2, 4, 1]], "teacher_topk_logprobs": [[-0.5, -1.5], [-0.1, -3.0, -4.0]],
        "policy_version": 0, "seed": 17, "finish_reason": "stop", "reference_ids": [],
    }
    row.update(changes)
    return row


def test_collate_aligns_targets_with_shifted_logits():
    b = collate(schema.to_table([_row(), _row(prompt_ids=[5], response_ids=[4], owner=[1], jsd=[0.0], tau=[0.4],
                                              student_logprob=[-1.0], teacher_topk_ids=[[4]],
                                              teacher_topk_logprobs=[[-0.2]])]), pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 2], [5, 4, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # position t predicts input_ids[t + 1]: row 0's response starts at shifted position 2
    assert b.loss_mask.tolist() == [[False, False, True, True], [True, False, False, False]]
    assert b.owner.tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]
    assert b.topk_ids.shape == (2, 4, 3)
    assert b.topk_ids[0, 2].tolist() == [8, 9, -1] and b.topk_ids[0, 3].tolist() == [2, 4, 1]
    assert b.topk_logprobs[1, 0, 0].item() == pytest.approx(-0.2)
    assert (b.topk_ids[~b.loss_mask] == -1).all()


def test_first_trained_position_is_the_earliest_response_start_over_every_mask():
    b = collate(schema.to_table([_row(), _row(prompt_ids=[5, 6, 7, 9, 9], response_ids=[4], owner=[1], jsd=[0.0],
                                              tau=[0.4], student_logprob=[-1.0], teacher_topk_ids=[[4]],
                                              teacher_topk_logprobs=[[-0.2]])]), pad_id=0)
    assert first_trained_position(b.loss_mask) == 2
    ref = torch.zeros(1, 6, dtype=torch.bool)
    ref[0, 1] = True
    assert first_trained_position(b.loss_mask, ref) == 1
    assert first_trained_position(b.loss_mask, None) == 2
    assert first_trained_position(torch.zeros(2, 4, dtype=torch.bool)) == 0


def test_shifted_logits_project_only_the_kept_positions(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    ids = torch.randint(3, 30, (2, 9))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    projected = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[1]))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        kept = shifted_logits(model, ids, attention, 3)
    hook.remove()
    assert projected == [9, 5]            # the output layer ran at positions 3..7 only
    torch.testing.assert_close(kept, full[:, 3:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("changes,message", [
    ({"teacher_topk_logprobs": [[-0.5, float("nan")], [-0.1, -3.0, -4.0]]}, "response token 0: teacher_topk_logprobs holds NaN"),
    ({"teacher_topk_logprobs": [[0.5, 1.0], [-0.1, -3.0, -4.0]]}, "not log-probabilities"),
    ({"teacher_topk_ids": [[8, 8], [2, 4, 1]]}, "teacher_topk_ids repeats an id"),
    ({"teacher_topk_ids": [[8, 9], []], "teacher_topk_logprobs": [[-0.5, -1.5], []]}, "response token 1: no teacher top-k"),
    ({"prompt_ids": list(range(5)) * 3}, "prompt + response is 17 tokens, the student takes at most 16"),
    ({"response_ids": [8, 99]}, "token id 99 outside the vocabulary [0, 32)"),
])
def test_bad_rows_name_source_and_row(changes, message):
    table = schema.to_table([_row(), _row(prompt_index=7, **changes)])
    with pytest.raises(SchemaError) as err:
        check_rows(table, "batch.parquet", vocab_size=32, max_len=16)
    assert str(err.value).startswith("batch.parquet: row 1 (prompt_index 7): ") and message in str(err.value)


def test_empty_responses_are_skipped_and_counted():
    empty = _row(prompt_index=9, response_ids=[], owner=[], jsd=[], tau=[], student_logprob=[],
                 teacher_topk_ids=[], teacher_topk_logprobs=[])
    kept, skipped = check_rows(schema.to_table([_row(), empty, _row()]), "b", vocab_size=32, max_len=64)
    assert skipped == 1 and kept.num_rows == 2 and 9 not in kept.column("prompt_index").to_pylist()


def test_bad_files_name_the_file(rollout_file, tiny_models, tmp_path):
    table = pq.read_table(rollout_file)
    old = tmp_path / "old.parquet"
    pq.write_table(table.replace_schema_metadata({b"switchkd.schema_version": b"0"}), old)
    missing = tmp_path / "missing.parquet"
    pq.write_table(table.drop(["owner"]), missing)
    ids = table.column("response_ids").to_pylist()
    ids[2][0] = 100000
    bad_ids = tmp_path / "ids.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("response_ids"), "response_ids",
                                    pa.array(ids, pa.list_(pa.int32()))), bad_ids)
    for path, message in [(old, "rollout schema version 0"), (missing, "missing columns owner"),
                          (bad_ids, "row 2 (prompt_index 2): token id 100000 outside the vocabulary [0, 512)")]:
        with pytest.raises(SchemaError) as err:
            load_rollouts([str(path)], str(tiny_models["student"]))
        assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_cli_prints_bad_batch_as_one_line(rollout_file, tiny_models, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(rollout_file).drop(["teacher_topk_ids"]), bad)
    code = main(["train-offline", "--config", TINY_YAML, "--rollouts", str(bad),
                 f"model.student={tiny_models['student']}", f"trainer.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{bad}: missing columns teacher_topk_ids" in err


def test_data_order_is_a_function_of_seed_and_step():
    first_epoch = [batch_rows(10, 4, seed=1, step=s).tolist() for s in range(3)]
    assert sorted(sum(first_epoch, [])) == list(range(10)) and len(first_epoch[2]) == 2
    assert batch_rows(10, 4, seed=1, step=1).tolist() == first_epoch[1]
    assert batch_rows(10, 4, seed=1, step=3).tolist() != first_epoch[0]  # new permutation next epoch
