"""The data layer: JSONL / Parquet / HF datasets sources, both row layouts, chat templates,
seeded splits, length limits, bad rows counted by reason, one-line errors for unusable sources."""
import dataclasses
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from switchkd.cluster.config import ConfigError, load_config
from switchkd.rollout.config import DataConfig
from switchkd.rollout.data.prompts import (PromptError, load_examples, prepare_default_data, read_rows, split_of,
                                   uses_chat_template)
from switchkd.rollout.generate import load_prompts
from switchkd.rollout.data.sequences import Prompt, SequenceBuilder
from switchkd.rollout.switch import prompt_seed

ALL = {"split": "all"}
TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


class WordTokenizer:
    """One token per word (10 + its length), BOS 1 when special tokens are asked for, EOS 2."""
    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens):
        return {"input_ids": ([1] if add_special_tokens else []) + [10 + len(w) for w in text.split()]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_source(tmp_path, fmt, rows):
    """The same rows as a JSONL file, a Parquet file or an HF datasets directory."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return tmp_path / "d.parquet"
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d_hf"))
    return tmp_path / "d_hf"


def load(path, tokenizer=None, run_seed=0, **data):
    return load_examples(DataConfig(prompts=str(path), **{**ALL, **data}), tokenizer or WordTokenizer(), run_seed)


PLAIN = [{"prompt": "a bb", "response": "ccc dddd"}, {"prompt": "e"}, {"prompt": "ff gg hh", "response": "i"}]
DOLLY = [{"instruction": "say hi", "context": "", "response": "hi there"},
         {"instruction": "sum it", "context": "one two three", "response": "six"},
         {"instruction": "no context here", "context": None, "response": "ok"}]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_every_format_reads_plain_rows_alike(tmp_path, fmt):
    examples, skipped = load(write_source(tmp_path, fmt, PLAIN))
    assert skipped == Counter()
    assert [(e.prompt.index, e.text, e.response) for e in examples] == [
        (0, "a bb", "ccc dddd"), (1, "e", None), (2, "ff gg hh", "i")]
    assert [e.prompt.token_ids for e in examples] == [[1, 11, 12], [1, 11], [1, 12, 12, 12]]
    assert [e.prompt.reference_ids for e in examples] == [[13, 14, 2], [], [11, 2]]
    assert [e.prompt.seed for e in examples] == [prompt_seed(0, i) for i in range(3)]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_every_format_reads_dolly_rows_with_context_appended(tmp_path, fmt):
    examples, skipped = load(write_source(tmp_path, fmt, DOLLY))
    assert skipped == Counter()
    assert [e.text for e in examples] == ["say hi", "sum it\n\none two three", "no context here"]
    assert [e.response for e in examples] == ["hi there", "six", "ok"]


def test_load_prompts_keeps_its_signature_and_meaning(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a b", "response": "ccc dddd"}, {"prompt": "e"},
                                              {"prompt": "f", "response": 7}, {"prompt": "g", "response": None}])
    prompts, skipped = load_prompts(DataConfig(prompts=str(path), split="all"), WordTokenizer(), run_seed=3)
    assert [(p.index, p.token_ids, p.reference_ids, p.seed) for p in prompts] == [
        (0, [1, 11, 11], [13, 14, 2], prompt_seed(3, 0)), (1, [1, 11], [], prompt_seed(3, 1)),
        (3, [1, 11], [], prompt_seed(3, 3))]
    assert skipped == {"'response' is not a string": 1}
    row = SequenceBuilder(Prompt(0, [1], 5, [13, 2]), topk=2).row(0)
    assert row["reference_ids"] == [13, 2]


def test_bad_jsonl_rows_are_skipped_and_counted_by_reason(tmp_path):
    rows = [
        json.dumps({"prompt": "good one"}),
        "not json",
        "",
        "[1, 2]",
        json.dumps({"text": "x"}),
        json.dumps({"prompt": None}),
        json.dumps({"context": "c", "response": "r"}),
        json.dumps({"prompt": 5}),
        json.dumps({"instruction": ["x"]}),
        json.dumps({"instruction": "i", "context": 3}),
        json.dumps({"prompt": "p", "response": {"a": 1}}),
        json.dumps({"prompt": "   "}),
        json.dumps({"instruction": "", "context": "c"}),
        json.dumps({"prompt": "p", "response": " \n"}),
        json.dumps({"prompt": "good two", "response": "r"}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(rows) + "\n").encode() + b"\xff\xfe bad bytes\n")
    examples, skipped = load(path)
    assert [e.prompt.index for e in examples] == [0, 14]
    assert skipped == {
        "not JSON": 1, "blank line": 1, "not a JSON object": 1, "missing 'prompt'": 2, "missing 'instruction'": 1,
        "'prompt' is not a string": 1, "'instruction' is not a string": 1, "'context' is not a string": 1,
        "'response' is not a string": 1, "empty 'prompt'": 1, "empty 'instruction'": 1, "empty 'response'": 1,
        "not UTF-8": 1}


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_bad_columnar_rows_are_skipped_and_counted(tmp_path, fmt):
    rows = [{"prompt": "ok", "response": "r"}, {"prompt": None, "response": "r"}, {"prompt": "", "response": None},
            {"prompt": "ok too", "response": ""}]
    examples, skipped = load(write_source(tmp_path, fmt, rows))
    assert [e.prompt.index for e in examples] == [0]
    assert skipped == {"missing 'prompt'": 1, "empty 'prompt'": 1, "empty 'response'": 1}


def test_wrong_column_types_are_counted(tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "ints.parquet")
    examples, skipped = load(tmp_path / "ints.parquet")
    assert examples == [] and skipped == {"'prompt' is not a string": 2}


def test_length_limits_skip_and_count(tmp_path):
    rows = [{"prompt": "a b", "response": "c d"},            # prompt 3 tokens, reference 3 (EOS included)
            {"prompt": "a b c", "response": "d"},            # prompt 4: too long
            {"prompt": "a", "response": "b c d"}]            # reference 4: too long
    examples, skipped = load(write_jsonl(tmp_path / "p.jsonl", rows), max_prompt_tokens=3, max_response_tokens=3)
    assert [e.prompt.index for e in examples] == [0]
    assert skipped == {"longer than data.max_prompt_tokens": 1, "longer than data.max_response_tokens": 1}


def test_max_prompts_counts_usable_rows_of_the_split(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt number {i}"} for i in range(200)])
    everything, _ = load(path, split="test")
    first, _ = load(path, split="test", max_prompts=3)
    assert [e.prompt.index for e in first] == [e.prompt.index for e in everything[:3]]


def _split_indices(path, **data):
    return {s: {e.prompt.index for e in load(path, split=s, **data)[0]} for s in ("train", "validation", "test")}


def test_splits_are_disjoint_cover_everything_and_follow_the_fractions(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt number {i}"} for i in range(2000)])
    splits = _split_indices(path)
    assert set.union(*splits.values()) == set(range(2000))
    assert sum(map(len, splits.values())) == 2000
    assert 150 <= len(splits["test"]) <= 250 and 150 <= len(splits["validation"]) <= 250
    assert _split_indices(path) == splits                              # deterministic
    assert _split_indices(path, split_seed=1) != splits                # the seed matters
    wider = _split_indices(path, test_fraction=0.3)
    assert splits["test"] < wider["test"]


def test_split_is_stable_when_rows_are_appended_and_follows_the_prompt_text(tmp_path):
    rows = [{"prompt": f"prompt number {i}"} for i in range(300)]
    before = _split_indices(write_jsonl(tmp_path / "a.jsonl", rows))
    more = rows + [{"prompt": f"new prompt {i}"} for i in range(300)] + [rows[5], rows[6]]
    after = _split_indices(write_jsonl(tmp_path / "b.jsonl", more))
    for name in before:
        assert {i for i in after[name] if i < 300} == before[name]
    for dup, original in ((600, 5), (601, 6)):                        # identical prompts share a split
        assert [dup in after[s] for s in after] == [original in after[s] for s in after]
    assert split_of("x", 0, 0.0, 0.0) == "train" and split_of("x", 0, 0.0, 1.0) == "test"


@pytest.fixture
def tiny_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["teacher"])


def test_chat_template_auto_on_off(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the man said yes", "response": "no"}])
    raw = tiny_tokenizer("the man said yes", add_special_tokens=True)["input_ids"]
    templated = tiny_tokenizer("<|bos|>user: the man said yes\nassistant:", add_special_tokens=False)["input_ids"]
    assert raw != templated
    assert tiny_tokenizer.chat_template is None
    assert load(path, tiny_tokenizer, chat_template="auto")[0][0].prompt.token_ids == raw
    assert load(path, tiny_tokenizer, chat_template="off")[0][0].prompt.token_ids == raw
    with pytest.raises(PromptError, match=r"^data.chat_template=on: the tokenizer has no chat template"):
        load(path, tiny_tokenizer, chat_template="on")
    tiny_tokenizer.chat_template = TEMPLATE
    for mode in ("auto", "on"):
        example = load(path, tiny_tokenizer, chat_template=mode)[0][0]
        assert example.prompt.token_ids == templated and example.text == "the man said yes"
    assert load(path, tiny_tokenizer, chat_template="off")[0][0].prompt.token_ids == raw
    reference = load(path, tiny_tokenizer, chat_template="on")[0][0].prompt.reference_ids
    assert reference[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.decode(reference[:-1]) == "no"
    assert uses_chat_template("auto", WordTokenizer()) is False


def _one_line_error(path, match):
    with pytest.raises(PromptError) as err:
        list(read_rows(path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"data.prompts={path}: ") and match in message


def test_unusable_sources_fail_with_one_line_naming_the_file(tmp_path):
    import datasets

    _one_line_error(tmp_path / "missing.jsonl", "file does not exist")
    (tmp_path / "empty_dir").mkdir()
    _one_line_error(tmp_path / "empty_dir", "not a Hugging Face datasets directory")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    _one_line_error(tmp_path / "broken.parquet", "not a readable Parquet file")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "cols.parquet")
    _one_line_error(tmp_path / "cols.parquet", "no 'prompt' or 'instruction' column (columns: text)")
    datasets.Dataset.from_list([{"question": "q"}]).save_to_disk(str(tmp_path / "hf_cols"))
    _one_line_error(tmp_path / "hf_cols", "no 'prompt' or 'instruction' column (columns: question)")
    split_dict = datasets.DatasetDict({"train": datasets.Dataset.from_list(PLAIN)})
    split_dict.save_to_disk(str(tmp_path / "hf_dict"))
    _one_line_error(tmp_path / "hf_dict", "a DatasetDict with splits train")


@pytest.mark.parametrize("override,message", [
    (["data.validation_fraction=0.6", "data.test_fraction=0.5"], "must add up to at most 1"),
    (["data.chat_template=always"], "data.chat_template='always': allowed values are auto, on, off"),
    (["data.split=dev"], "data.split='dev': allowed values are train, validation, test, all"),
    (["data.max_response_tokens=0"], "data.max_response_tokens=0: must be >= 1"),
])
def test_data_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_chat_template_accepts_yaml_booleans():
    assert [load_config(None, [f"data.chat_template={v}"]).data.chat_template for v in ("on", "off", "true", "auto")] \
        == ["on", "off", "on", "auto"]


def test_default_data_is_prepared_once_and_loads(tmp_path):
    out = tmp_path / "data" / "default.jsonl"
    rows, written = prepare_default_data(out)
    assert written and rows > 2000
    stamp = out.stat().st_mtime_ns
    assert prepare_default_data(out) == (rows, False)
    assert out.stat().st_mtime_ns == stamp
    assert not list(out.parent.glob(".*tmp"))
    data = DataConfig(prompts=str(out), split="test")
    test, skipped = load_examples(data, WordTokenizer(), 0)
    train, _ = load_examples(dataclasses.replace(data, split="train"), WordTokenizer(), 0)
    assert skipped == Counter() and 50 < len(test) < 0.2 * rows
    assert all(e.response for e in test)
    assert not {e.text for e in test} & {e.text for e in train}
