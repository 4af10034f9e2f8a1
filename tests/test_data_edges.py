"""Edge cases of lightning_lora.data found in review: inputs that gave silently wrong data or an unclear error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_lora.data import InstructionDataModule, TextClassificationDataModule
from lightning_lora.data._resumable import ResumableDataLoader
from test_data import EOS, content_error, ids, word_tokenizer, write_csv, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


# --- prompt templates --------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["Q: {{prompt}} A:", "{{prompt}} {other}", "{prompt.upper}", "{prompt[0]}"])
def test_a_template_that_does_not_insert_the_prompt_is_refused(tmp_path: Path, tok, template: str) -> None:
    # "{{prompt}}" holds the text "{prompt}" but formats to a literal: every row would get the same prompt.
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "response": "w2"}])
    with pytest.raises(ValueError) as info:
        InstructionDataModule(path, tok, prompt_template=template)
    assert f"prompt_template {template!r}" in str(info.value) and '"{prompt}"' in str(info.value)


def test_a_template_with_a_conversion_or_spec_still_inserts_each_prompt(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "response": "w2"}, {"prompt": "w3", "response": "w4"}])
    dm = InstructionDataModule(path, tok, prompt_template="Q: {prompt!s:>2} {{x}} A:", val_fraction=0.0)
    assert sorted(p for p, _ in dm._read_file()) == ["Q: w1 {x} A:", "Q: w3 {x} A:"]


# --- instruction rows without a scored token -------------------------------------------------------------


def test_rows_with_an_empty_response_and_no_eos_are_dropped_with_a_warning(tmp_path: Path) -> None:
    rows = [{"prompt": "w1", "response": ""}, {"prompt": "w2", "response": "w3"}, {"prompt": "w4", "response": "  "}]
    dm = InstructionDataModule(write_jsonl(tmp_path / "d.jsonl", rows), word_tokenizer(eos=False), val_fraction=0.0)
    with pytest.warns(UserWarning, match=r"Dropped 2 of 3 rows .* no response tokens"):
        dm.setup("fit")
    assert [e["labels"] for e in dm.train_dataset] == [[-100, *ids("w3")]]


def test_an_empty_response_with_eos_still_trains_the_eos(tmp_path: Path, tok) -> None:
    dm = InstructionDataModule(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "response": ""}]), tok, val_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("fit")
    assert [e["labels"] for e in dm.train_dataset] == [[-100, EOS]]


def test_only_empty_responses_and_no_eos_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    dm = InstructionDataModule(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "response": ""}] * 2), word_tokenizer(eos=False), val_fraction=0.0
    )
    message = content_error(dm)
    assert "response_column='response'" in message and "no response tokens" in message


# --- labels -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"), [("NaN", "nan"), ("1.0", "1.0"), ("true", "True"), ('["a"]', "['a']"), ('{"a": 1}', "{'a': 1}")]
)
def test_a_label_that_is_not_a_string_or_integer_is_refused(tmp_path: Path, tok, raw: str, shown: str) -> None:
    # NaN became a class "nan", 1.0 a class apart from 1, true a class "True".
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1", "label": 1}\n{"text": "w2", "label": %s}\n{"text": "w3", "label": 0}\n' % raw)
    with pytest.raises(ValueError) as info:
        TextClassificationDataModule(str(path), tok).labels
    message = str(info.value)
    assert "line 2" in message and "label_column='label'" in message and shown in message and "string or an integer" in message


def test_integer_and_string_labels_of_json_lines_are_one_class(tmp_path: Path, tok) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1", "label": 1}\n{"text": "w2", "label": "1"}\n{"text": "w3", "label": 10}\n')
    assert TextClassificationDataModule(str(path), tok).labels == ["1", "10"]


def test_label_ids_do_not_depend_on_set_order_when_integers_tie(tmp_path: Path, tok) -> None:
    # "1", "01" and "001" are equal as integers: sorted(key=int) kept the hash-randomized set order.
    names = [f"{zeros}{n}" for n in range(1, 6) for zeros in ("", "0", "00")]
    rows = [[f"w{i}", name] for i, name in enumerate(names)]
    labels = TextClassificationDataModule(write_csv(tmp_path / "d.csv", ["text", "label"], rows), tok).labels
    assert labels == [f"{zeros}{n}" for n in range(1, 6) for zeros in ("00", "0", "")]


@pytest.mark.parametrize("odd", ["--1", "²", "1_0"])
def test_labels_that_only_look_like_integers_sort_as_strings(tmp_path: Path, tok, odd: str) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["w1", odd], ["w2", "2"], ["w3", "10"]])
    assert TextClassificationDataModule(path, tok).labels == sorted([odd, "2", "10"])


def test_given_labels_that_are_equal_as_strings_are_refused(tmp_path: Path, tok) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["w1", "1"], ["w2", "2"]])
    with pytest.raises(ValueError, match=r"labels must be a non-empty list of distinct label names, got \[1, '1', 2\]"):
        TextClassificationDataModule(path, tok, labels=[1, "1", 2])


def test_labels_that_differ_only_by_surrounding_whitespace_are_refused(tmp_path: Path, tok) -> None:
    # "pos" and " pos" (e.g. a CSV written with ", " between fields) became two classes, with nothing said.
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["w1", "pos"], ["w2", "neg"], ["w3", " pos"], ["w4", "neg"]])
    with pytest.raises(ValueError) as info:
        TextClassificationDataModule(path, tok).labels
    message = str(info.value)
    assert "labels 'pos' (line 2) and ' pos' (line 4)" in message and "label_column='label'" in message
    assert "only by surrounding whitespace" in message and "strip the labels" in message
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "w1", "label": "1"}\n{"text": "w2", "label": "1\\t"}\n')
    with pytest.raises(ValueError, match=r"labels '1' \(line 1\) and '1\\t' \(line 2\).*only by surrounding whitespace"):
        TextClassificationDataModule(str(jsonl), tok).labels
    with pytest.raises(ValueError, match=r"`labels` holds 'pos' \(position 0\) and 'pos ' \(position 2\).*only by surrounding whitespace"):
        TextClassificationDataModule(path, tok, labels=["pos", "neg", "pos "])
    with pytest.raises(ValueError, match=r"line 4 has unseen label ' pos'.*differs from 'pos' only by surrounding whitespace"):
        TextClassificationDataModule(path, tok, labels=["pos", "neg"]).labels


def test_a_label_with_whitespace_on_every_row_stays_one_class(tmp_path: Path, tok) -> None:
    # Labels are not normalised: a label written the same way on every row is a class of its own name.
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["w1", " pos"], ["w2", "neg"], ["w3", " pos"]])
    assert TextClassificationDataModule(path, tok).label2id == {" pos": 0, "neg": 1}


# --- file reading ---------------------------------------------------------------------------------------


def test_a_csv_with_a_repeated_column_name_is_refused(tmp_path: Path, tok) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label,text\nw1,a,w2\nw3,b,w4\n", encoding="utf-8")
    message = content_error(TextClassificationDataModule(str(path), tok))
    assert repr(str(path)) in message and "'text'" in message and "more than once" in message


def test_a_json_line_with_a_repeated_key_is_refused(tmp_path: Path, tok) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1", "label": "a"}\n{"text": "w2", "label": "a", "label": "b"}\n', encoding="utf-8")
    message = content_error(TextClassificationDataModule(str(path), tok))
    assert "line 2" in message and "'label'" in message and "more than once" in message


def test_a_csv_field_longer_than_the_csv_modules_default_limit_is_read(tmp_path: Path, tok) -> None:
    long_text = " ".join(["w1"] * 60_000)  # 180k characters; csv's default field_size_limit is 131,072
    dm = TextClassificationDataModule(
        write_csv(tmp_path / "c.csv", ["text", "label"], [[long_text, "a"], ["w2 w3", "b"]]), tok, val_fraction=0.0, max_length=3
    )
    dm.setup("fit")
    assert sorted(e["input_ids"] for e in dm.train_dataset) == [ids("w1 w1 w1"), ids("w2 w3")]


@pytest.mark.parametrize("errors", ["strict", "replace", "ignore"])
def test_a_utf16_file_is_named_as_such_whatever_encoding_errors(tmp_path: Path, tok, errors: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"text": "w1", "label": "a"}\n'.encode("utf-16"))
    message = content_error(TextClassificationDataModule(str(path), tok, encoding_errors=errors))
    assert repr(str(path)) in message and "UTF-16" in message and "UTF-8" in message


# --- pad_to_multiple_of with workers and validation --------------------------------------------------------


def test_pad_to_multiple_of_gives_the_same_batches_with_worker_processes(tmp_path: Path, tok) -> None:
    rows = [{"prompt": "w1 " * (i % 5 + 1), "response": "w2"} for i in range(12)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    batches = {}
    for workers in (0, 1):
        dm = InstructionDataModule(
            path, tok, batch_size=4, val_fraction=0.25, pad_to_multiple_of=4, max_length=7, num_workers=workers
        )
        dm.setup("fit")
        batches[workers] = [[b[k] for k in ("input_ids", "labels")] for b in [*dm.train_dataloader(), *dm.val_dataloader()]]
    assert [b[0].shape[1] for b in batches[0]] and all(b[0].shape[1] in (4, 7) for b in batches[0])
    assert len(batches[0]) == len(batches[1])
    for a, b in zip(batches[0], batches[1]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- resume -------------------------------------------------------------------------------------------


DATA = TensorDataset(torch.arange(16))


def _taken(loader: ResumableDataLoader, n: int) -> tuple[list[list[int]], dict[str, int]]:
    iterator = iter(loader)
    return [next(iterator)[0].tolist() for _ in range(n)], loader.state_dict()


def test_a_mid_epoch_resume_with_another_batch_size_is_refused(tmp_path: Path) -> None:
    _, state = _taken(ResumableDataLoader(DATA, batch_size=2, shuffle=True, seed=1), 3)
    resumed = ResumableDataLoader(DATA, batch_size=4, shuffle=True, seed=1)
    with pytest.raises(ValueError) as info:
        resumed.load_state_dict(state)  # would skip 3 batches of 4: 12 samples, 6 of them never seen
    message = str(info.value)
    for part in ["batch_size=4", "batch_size=2", "3 batches", "end-of-epoch"]:
        assert part in message


def test_a_mid_epoch_resume_with_the_same_batch_size_continues_exactly(tmp_path: Path) -> None:
    full = [b[0].tolist() for b in ResumableDataLoader(DATA, batch_size=2, shuffle=True, seed=1, num_workers=1)]
    first, state = _taken(ResumableDataLoader(DATA, batch_size=2, shuffle=True, seed=1, num_workers=1), 3)
    resumed = ResumableDataLoader(DATA, batch_size=2, shuffle=True, seed=1, num_workers=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert first + [b[0].tolist() for b in resumed] == full


def test_an_end_of_epoch_state_resumes_with_another_batch_size(tmp_path: Path) -> None:
    _, state = _taken(ResumableDataLoader(DATA, batch_size=4, shuffle=True, seed=1), 4)  # the whole epoch
    resumed = ResumableDataLoader(DATA, batch_size=8, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    want = [b[0].tolist() for b in ResumableDataLoader(DATA, batch_size=8, shuffle=True, seed=2)]  # epoch 1: seed + 1
    assert [b[0].tolist() for b in resumed] == want


def test_a_state_saved_before_the_batch_size_was_recorded_still_loads() -> None:
    resumed = ResumableDataLoader(DATA, batch_size=2, shuffle=True, seed=1)
    resumed.load_state_dict({"epoch": 0, "batches": 7})
    full = [b[0].tolist() for b in ResumableDataLoader(DATA, batch_size=2, shuffle=True, seed=1)]
    assert [b[0].tolist() for b in resumed] == full[7:]
