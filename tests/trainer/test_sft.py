"""trainer.sft_ratio: the ground-truth mixing term on reference_ids, checked in float64."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from switchkd.trainer.batch import collate
from switchkd.trainer.ds_config import TrainerError
from switchkd.trainer.group import Trainer
from switchkd.trainer.losses import distill_loss, owner_weights
from switchkd.trainer.offline import load_rollouts


def _with_references(table: pa.Table, rows_with_ref) -> pa.Table:
    """``table`` with random reference responses of varied length on ``rows_with_ref`` ([] elsewhere)."""
    rng = np.random.default_rng(0)
    refs = [rng.integers(3, 500, size=3 + i).tolist() if i in rows_with_ref else [] for i in range(table.num_rows)]
    col = table.schema.get_field_index("reference_ids")
    return table.set_column(col, "reference_ids", pa.array(refs, type=pa.list_(pa.int32())))


def _expected(student_dir, table, cfg):
    """(distill, sft) of the untrained student in float64: the per-token means of the step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float64).eval()
    b = collate(table, pad_id=0)
    tc = cfg.trainer
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        distill = distill_loss(tc.loss, logits, teacher_topk_ids=b.topk_ids, teacher_topk_logprobs=b.topk_logprobs,
                               loss_mask=b.loss_mask, **tc.loss_params(),
                               token_weights=owner_weights(b.owner, b.loss_mask, tc.student_token_weight,
                                                           tc.teacher_token_weight))
        nll, count = 0.0, 0
        for p, r in zip(table.column("prompt_ids").to_pylist(), table.column("reference_ids").to_pylist()):
            if not r:
                continue
            ids = torch.tensor([p + r])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            targets = ids[0, len(p):]
            nll -= float(lp[len(p) - 1:].gather(-1, targets[:, None]).sum())
            count += len(r)
    return float(distill), nll / count


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_step_loss_is_the_reference_nll_mix(make_cfg, rollout_file, tiny_models, tmp_path, ratio):
    table, _ = load_rollouts([str(rollout_file)], str(tiny_models["student"]))
    table = _with_references(table.slice(0, 4), rows_with_ref={0, 2, 3})   # row 1 has none
    cfg = make_cfg(output_dir=tmp_path / f"r{ratio}", sft_ratio=ratio, batch_size=4, micro_batch_size=2)
    distill, sft = _expected(str(tiny_models["student"]), table, cfg)
    with Trainer(cfg) as trainer:
        m = trainer.train_step(table)
    assert m["sft_loss"] == pytest.approx(sft, rel=1e-5)
    assert m["loss"] == pytest.approx((1 - ratio) * distill + ratio * sft, rel=1e-5)
    if ratio == 1.0:
        assert m["loss"] == pytest.approx(sft, rel=1e-5)


def test_sft_ratio_without_references_names_the_file(make_cfg, rollout_file, tiny_models, tmp_path):
    cfg = make_cfg(output_dir=tmp_path / "run", sft_ratio=0.5)
    with pytest.raises(TrainerError, match=f"trainer.sft_ratio>0 but {rollout_file} has no reference_ids"):
        load_rollouts([str(rollout_file)], str(tiny_models["student"]), sft_ratio=0.5)
    table, _ = load_rollouts([str(rollout_file)], str(tiny_models["student"]))
    with Trainer(cfg) as trainer:
        with pytest.raises(TrainerError, match="trainer.sft_ratio>0 but batch.parquet has no reference_ids"):
            trainer.train_step(table.slice(0, 4), source="batch.parquet")
