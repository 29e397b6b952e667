"""Prompt JSONL: the optional "response" becomes the row's reference_ids (EOS appended)."""
import json

from switchkd.rollout.config import DataConfig
from switchkd.rollout.generate import load_prompts
from switchkd.rollout.prompts import read_prompt_jsonl
from switchkd.rollout.sequences import Prompt, SequenceBuilder


class _Tokenizer:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens):
        return {"input_ids": ([1] if add_special_tokens else []) + [10 + len(w) for w in text.split()]}


def test_response_is_read_tokenized_and_emitted(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a b", "response": "ccc dddd"}, {"prompt": "e"}, {"prompt": "f", "response": 7},
            {"prompt": "g", "response": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, skipped = read_prompt_jsonl(path)
    assert good == [(0, "a b", "ccc dddd"), (1, "e", None), (3, "g", None)]
    assert skipped == {"'response' is not a string": 1}
    prompts, _ = load_prompts(DataConfig(prompts=str(path)), _Tokenizer(), run_seed=0)
    assert [p.reference_ids for p in prompts] == [[13, 14, 2], [], []]
    assert prompts[0].token_ids == [1, 11, 11]    # the prompt keeps its special tokens
    row = SequenceBuilder(Prompt(0, [1], 5, [13, 2]), topk=2).row(0)
    assert row["reference_ids"] == [13, 2]
