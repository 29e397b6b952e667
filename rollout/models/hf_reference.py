"""The exact reference generator: teacher and student in transformers, lockstep, batched.

This is the executable definition of SWITCH: at every response
position both models give their full next-token distribution, switch.OwnerRule decides
the owner (SWITCH or a baseline rule) and draws the token from the owner's
distribution, and both models consume it.
KV caches, left padding and per-prompt seeds make it batched yet batch-independent.
"""
from __future__ import annotations

from typing import Callable

import torch

from switchkd.rollout import switch
from switchkd.rollout.config import RolloutConfig
from switchkd.rollout.data.sequences import Prompt, SequenceBuilder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_model(path: str, dtype: str, trust_remote_code: bool = False):
    """A causal LM from a safetensors HF directory, in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.eval()


class HFSwitchGenerator:
    """SWITCH rollouts with both models in transformers (the reference; also the no-vLLM engine)."""

    def __init__(self, teacher, student, cfg: RolloutConfig, eos_ids: set[int], pad_id: int):
        self.teacher, self.student, self.cfg = teacher, student, cfg
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.rule = switch.OwnerRule(cfg.switch, cfg.temperature)

    def generate(self, prompts: list[Prompt], on_tokens: Callable[[int], None] = lambda n: None) -> list[SequenceBuilder]:
        """Roll out ``prompts`` in batches of rollout.batch_size; returns one builder per prompt."""
        out = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            out += self._generate_batch(prompts[start : start + self.cfg.batch_size], on_tokens)
        return out

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[Prompt], on_tokens) -> list[SequenceBuilder]:
        cfg = self.cfg
        seqs = [SequenceBuilder(p, cfg.teacher_topk) for p in prompts]
        width = max(len(p.token_ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last column is its newest token
            input_ids[i, width - len(p.token_ids):] = torch.tensor(p.token_ids)
            mask[i, width - len(p.token_ids):] = 1
        caches = [None, None]
        for t in range(cfg.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            lp_t, lp_s, caches = self._next_logprobs(input_ids, mask, positions, caches)
            d, tau, own = self.rule.decide(lp_t, lp_s, [t] * len(seqs), seeds=[s.prompt.seed for s in seqs])
            next_ids = torch.full((len(seqs), 1), self.pad_id, dtype=torch.long)
            for i, seq in enumerate(seqs):
                if seq.done:
                    continue
                token = self.rule.draw(int(own[i]), lp_t[i], lp_s[i], seq.prompt.seed, t)
                seq.extend([token], [own[i]], [d[i]], [tau[i]], lp_s[i : i + 1], lp_t[i : i + 1])
                seq.finish_if(self.eos_ids, cfg.max_new_tokens)
                next_ids[i, 0] = token
                on_tokens(1)
            if all(s.done for s in seqs):
                break
            input_ids = next_ids
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        return seqs

    def _next_logprobs(self, input_ids, mask, positions, caches):
        new_caches, lps = [], []
        for model, cache in zip((self.teacher, self.student), caches):
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            lps.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))
            new_caches.append(out.past_key_values)
        return lps[0], lps[1], new_caches
