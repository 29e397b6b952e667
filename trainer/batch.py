"""Rollout rows -> training tensors, in one place, after checks DeepSpeed never sees.

A row is prompt_ids + response_ids. Logits are shifted once here so that position t predicts
input_ids[t + 1]; every per-token tensor below is aligned to those shifted positions.

    input_ids        int64   [B, L]      prompt + response, right-padded with pad_id
    attention_mask   int64   [B, L]      1 on real tokens
    loss_mask        bool    [B, L-1]    True where the predicted token is a response token
    owner            int64   [B, L-1]    SWITCH owner of the predicted token (0 student, 1 teacher)
    topk_ids         int64   [B, L-1, K] teacher top-k ids (-1 = padding), K = widest row
    topk_logprobs    float32 [B, L-1, K] teacher log-probs at those ids

The SFT term (trainer.sft_ratio) reads prompt_ids + reference_ids instead (``collate_reference``),
over the rows that have a reference, with the same shift: ref_mask marks reference positions.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from switchkd.rollout.data import schema
from switchkd.rollout.data.schema import SchemaError

_LOGPROB_TOLERANCE = 1e-3  # rounding slack for "probabilities sum to at most 1"


@dataclass
class TokenBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    owner: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor

    def to(self, device) -> "TokenBatch":
        return TokenBatch(**{k: v.to(device) for k, v in vars(self).items()})

    def from_position(self, first: int) -> "TokenBatch":
        """The per-position targets (loss mask, owner, teacher top-k) from shifted position
        ``first`` on, aligned with ``shifted_logits(..., first)``; the model inputs stay whole."""
        return dataclasses.replace(self, loss_mask=self.loss_mask[:, first:], owner=self.owner[:, first:],
                                   topk_ids=self.topk_ids[:, first:], topk_logprobs=self.topk_logprobs[:, first:])


def check_rows(table: pa.Table, source: str, vocab_size: int, max_len: int) -> tuple[pa.Table, int]:
    """Validate ``table`` for training; returns (rows to train on, empty responses skipped).

    Beyond the schema: teacher log-probs must be finite log-probabilities of one distribution,
    top-k ids distinct, and prompt + response must fit the model. Empty responses carry no
    tokens to learn from, so dropping them is safe; they are counted, not fatal. The per-token
    checks run on flat arrays (a rollout file holds millions of top-k entries).
    """
    schema.validate(table, source=source, vocab_size=vocab_size)
    problem = _first_problem(table, max_len)
    if problem:
        row, text = problem
        index = table.column("prompt_index")[row].as_py()
        raise SchemaError(f"{source}: row {row} (prompt_index {index}): {text}")
    lengths = _lengths(table, "response_ids")
    keep = np.flatnonzero(lengths > 0)
    return (table if len(keep) == table.num_rows else table.take(keep)), table.num_rows - len(keep)


def check_references(table: pa.Table, source: str, max_len: int) -> None:
    """For trainer.sft_ratio > 0: some row must carry reference_ids, and prompt + reference must fit."""
    from switchkd.trainer.ds_config import TrainerError

    ref = _lengths(table, "reference_ids")
    if not (ref > 0).any():
        raise TrainerError(f"trainer.sft_ratio>0 but {source} has no reference_ids")
    total = _lengths(table, "prompt_ids") + ref
    if (total > max_len).any():
        row = int(np.argmax(total > max_len))
        index = table.column("prompt_index")[row].as_py()
        raise SchemaError(f"{source}: row {row} (prompt_index {index}): prompt + reference is {total[row]} "
                          f"tokens, the student takes at most {max_len}")


def reference_tokens(table: pa.Table) -> int:
    """Reference tokens in ``table`` (the SFT term's per-token denominator)."""
    return int(_lengths(table, "reference_ids").sum())


def collate_reference(table: pa.Table, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(input_ids [R, L], attention_mask [R, L], ref_mask [R, L-1]) of prompt + reference for the
    R rows with a reference, right-padded; ref_mask is True where the predicted token is a reference
    token. None when no row has one."""
    pairs = [(p, r) for p, r in zip(table.column("prompt_ids").to_pylist(), table.column("reference_ids").to_pylist())
             if r]
    if not pairs:
        return None
    length = max(len(p) + len(r) for p, r in pairs)
    input_ids = np.full((len(pairs), length), pad_id, dtype=np.int64)
    attention = np.zeros((len(pairs), length), dtype=np.int64)
    mask = np.zeros((len(pairs), length - 1), dtype=bool)
    for i, (p, r) in enumerate(pairs):
        input_ids[i, : len(p) + len(r)] = p + r
        attention[i, : len(p) + len(r)] = 1
        mask[i, len(p) - 1: len(p) - 1 + len(r)] = True
    return torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(mask)


def _lengths(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).combine_chunks().value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def _first_problem(table: pa.Table, max_len: int) -> tuple[int, str] | None:
    """(row, message) of the first bad row, or None; rows are checked in order, tokens within them."""
    n = _lengths(table, "response_ids")
    total = _lengths(table, "prompt_ids") + n
    found = []
    if (total > max_len).any():
        row = int(np.argmax(total > max_len))
        found.append((row, -1, f"prompt + response is {total[row]} tokens, the student takes at most {max_len}"))
    ids_per_token = table.column("teacher_topk_ids").combine_chunks().flatten()
    k = ids_per_token.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    token_row = np.repeat(np.arange(len(n)), n)
    token_pos = np.arange(len(k)) - np.repeat(np.cumsum(n) - n, n)
    ids = ids_per_token.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    lps = (table.column("teacher_topk_logprobs").combine_chunks().flatten().flatten()
           .to_numpy(zero_copy_only=False).astype(np.float64))
    entry_token = np.repeat(np.arange(len(k)), k)
    nonempty = np.flatnonzero(k > 0)
    starts = (np.cumsum(k) - k)[nonempty]   # reduceat segments: one per token with entries
    checks = [(k == 0, "no teacher top-k entries")]
    bad_value = np.zeros(len(k), dtype=bool)
    clean = lps.copy()
    if len(lps):
        bad_value[nonempty] = np.logical_or.reduceat(np.isnan(lps) | np.isposinf(lps), starts)
        clean[bad_value[entry_token]] = -np.inf
    checks.append((bad_value, "teacher_topk_logprobs holds NaN or +inf"))
    too_much = np.zeros(len(k), dtype=bool)
    if len(lps):
        too_much[nonempty] = ((np.logaddexp.reduceat(clean, starts) > _LOGPROB_TOLERANCE)
                              | (np.maximum.reduceat(clean, starts) > _LOGPROB_TOLERANCE))
    checks.append((too_much, "teacher_topk_logprobs are not log-probabilities (they sum above 1)"))
    span = int(ids.max(initial=0)) + 1                  # ids are in [0, vocab) (schema-checked)
    keys = np.sort(entry_token * span + ids)
    repeated = np.zeros(len(k), dtype=bool)
    repeated[keys[1:][keys[1:] == keys[:-1]] // span] = True
    checks.append((repeated, "teacher_topk_ids repeats an id"))
    for bad, text in checks:
        if bad.any():
            t = int(np.argmax(bad))
            found.append((int(token_row[t]), int(token_pos[t]), f"response token {token_pos[t]}: {text}"))
    if not found:
        return None
    row, _, text = min(found, key=lambda f: (f[0], f[1]))
    return row, text


def collate(table: pa.Table, pad_id: int) -> TokenBatch:
    """Checked rows (``check_rows``) -> right-padded tensors aligned to the shifted logits."""
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    owners = table.column("owner").to_pylist()
    topk_ids = table.column("teacher_topk_ids").to_pylist()
    topk_lps = table.column("teacher_topk_logprobs").to_pylist()
    b = len(prompts)
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    k = max((len(ids) for row in topk_ids for ids in row), default=1)
    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    attention = np.zeros((b, length), dtype=np.int64)
    loss_mask = np.zeros((b, length - 1), dtype=bool)
    owner = np.zeros((b, length - 1), dtype=np.int64)
    ids = np.full((b, length - 1, k), -1, dtype=np.int64)
    lps = np.zeros((b, length - 1, k), dtype=np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        start, end = len(p) - 1, len(p) - 1 + len(r)   # shifted positions predicting the response
        input_ids[i, : len(p) + len(r)] = p + r
        attention[i, : len(p) + len(r)] = 1
        loss_mask[i, start:end] = True
        owner[i, start:end] = owners[i]
        for t, (row_ids, row_lps) in enumerate(zip(topk_ids[i], topk_lps[i])):
            ids[i, start + t, : len(row_ids)] = row_ids
            lps[i, start + t, : len(row_lps)] = row_lps
    return TokenBatch(*(torch.from_numpy(a) for a in (input_ids, attention, loss_mask, owner, ids, lps)))


def first_trained_position(*masks: torch.Tensor | None) -> int:
    """The first shifted position at which any row of any of ``masks`` is trained (0 if none is)."""
    columns = [int(m.any(0).int().argmax()) for m in masks if m is not None and bool(m.any())]
    return min(columns, default=0)


def shifted_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int,
                   project_all: bool = False) -> torch.Tensor:
    """Logits [B, L-1-first, V] at shifted positions first .. L-2 (position t predicts
    input_ids[:, t + 1]). A model that takes HF's ``logits_to_keep`` (a DeepSpeed engine: its
    module) runs its output layer at those positions only, so the prompt before ``first`` costs no
    projection onto the vocabulary; ``project_all`` projects every position and slices after."""
    forward = getattr(model, "module", model).forward
    if project_all or "logits_to_keep" not in inspect.signature(forward).parameters:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, first:-1]
    positions = torch.arange(first, input_ids.shape[1] - 1, device=input_ids.device)
    return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
