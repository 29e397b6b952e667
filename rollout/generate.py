"""`switchkd generate`: prompts -> SWITCH rollouts (HF reference or vLLM) -> Parquet + summary."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from switchkd.rollout.data import schema
from switchkd.rollout.config import DataConfig, ModelConfig, RolloutConfig
from switchkd.rollout.data.prompts import PromptError, load_prompts
from switchkd.rollout.models.checks import check_pair
from switchkd.rollout.data.sequences import SequenceBuilder

POSITION_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class RolloutSummary:
    prompts: int
    skipped: Counter
    tokens: int
    seconds: float
    teacher_fraction: float
    teacher_fraction_by_position: dict[str, float]
    finish_reasons: Counter
    topk_agreement: float | None = None    # rollout.switch.logprobs=topk: decisions equal to exact ones

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        buckets = "  ".join(f"[{k}] {v:.2f}" for k, v in self.teacher_fraction_by_position.items())
        return [
            f"prompts: {self.prompts} (skipped: {skipped})",
            f"tokens: {self.tokens} in {self.seconds:.1f} s ({self.tokens / max(self.seconds, 1e-9):.1f} tokens/s)",
            f"teacher-token fraction: {self.teacher_fraction:.3f}",
            f"teacher fraction by position: {buckets}",
            f"finish reasons: {dict(self.finish_reasons)}",
        ] + ([f"top-k decision agreement with exact: {self.topk_agreement:.4f}"] if self.topk_agreement is not None else [])


def make_generator(model: ModelConfig, rollout: RolloutConfig, tokenizer):
    """The configured generator for `switchkd generate` (EOS and padding from ``tokenizer``)."""
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return build_generator(model, rollout, eos_ids, pad_id=tokenizer.pad_token_id or 0)


def build_generator(model: ModelConfig, rollout: RolloutConfig, eos_ids: set[int], pad_id: int = 0, engines=None):
    """THE generator factory (`switchkd generate` and the `switchkd train` loop): every method is
    a config of one interface, ``generate(prompts, on_tokens) -> list[SequenceBuilder]``.

    rollout.source=generate: sampled rollouts whose owners follow rollout.switch.rule (SWITCH,
    on-policy/GKD, SeqKD, SKD), HF reference or vLLM (block / stepwise). rollout.source=reference:
    the data's reference responses scored by both models (KD on ground truth, SFT). ``engines``
    (teacher, student EngineHandles) are used when given, started from the config otherwise."""
    reference = rollout.source == "reference"
    if rollout.engine == "hf":
        from switchkd.rollout.models.hf_reference import HFSwitchGenerator, load_hf_model

        teacher = load_hf_model(model.teacher, model.dtype, model.trust_remote_code)
        student = load_hf_model(model.student, model.dtype, model.trust_remote_code)
        if reference:
            from switchkd.rollout.data.reference import HFScorer, ReferenceGenerator

            return ReferenceGenerator(HFScorer(teacher, student, pad_id), rollout, eos_ids)
        return HFSwitchGenerator(teacher, student, rollout, eos_ids, pad_id=pad_id)
    if reference:
        from switchkd.rollout.engines.actors import start_engines
        from switchkd.rollout.data.reference import ReferenceGenerator, VLLMScorer

        return ReferenceGenerator(VLLMScorer(*(engines or start_engines(model, rollout))), rollout, eos_ids)
    from switchkd.rollout.engines.vllm_generator import VLLMSwitchGenerator

    return VLLMSwitchGenerator(model, rollout, eos_ids, engines=engines)


def summarize(seqs: list[SequenceBuilder], skipped: Counter, seconds: float) -> RolloutSummary:
    """Token counts, teacher fractions (overall and by position bucket) and finish reasons."""
    owners = [np.asarray(s.owner, dtype=np.int64) for s in seqs]
    tokens = sum(len(o) for o in owners)
    by_position = {}
    for lo, hi in zip(POSITION_BUCKETS, POSITION_BUCKETS[1:]):
        chunk = np.concatenate([o[lo:hi] for o in owners]) if owners else np.zeros(0)
        if chunk.size:
            by_position[f"{lo}-{hi - 1}"] = float(chunk.mean())
    return RolloutSummary(
        prompts=len(seqs), skipped=skipped, tokens=tokens, seconds=seconds,
        teacher_fraction=float(np.concatenate(owners).mean()) if tokens else 0.0,
        teacher_fraction_by_position=by_position,
        finish_reasons=Counter(s.finish_reason for s in seqs),
    )


def run_generate(model: ModelConfig, data: DataConfig, rollout: RolloutConfig, output: str,
                 policy_version: int = 0) -> RolloutSummary:
    """Generate SWITCH rollouts for the configured prompts and write them to ``output`` (Parquet)."""
    from transformers import AutoTokenizer

    check_pair(model.teacher, model.student, rollout.engine, rollout.student.device)
    tokenizer = AutoTokenizer.from_pretrained(model.teacher)
    prompts, skipped = load_prompts(data, tokenizer, rollout.seed)
    if not prompts:
        raise PromptError(f"data.prompts={data.prompts}: no usable prompts (skipped: {dict(skipped) or 'none'})")
    generator = make_generator(model, rollout, tokenizer)
    try:
        start = time.perf_counter()
        with tqdm(total=len(prompts) * rollout.max_new_tokens, unit="tok", desc="rollout", leave=False) as bar:
            seqs = generator.generate(prompts, on_tokens=bar.update)
        seconds = time.perf_counter() - start
    finally:
        getattr(generator, "shutdown", lambda: None)()
    schema.write_parquet(schema.to_table([s.row(policy_version) for s in seqs]), output)
    summary = summarize(seqs, skipped + getattr(generator, "skipped", Counter()), seconds)
    summary.topk_agreement = generator.rule.agreement
    return summary
