"""Shared plumbing for the DataModules: argument checks, file reading, seeded splits, padding,
and ``_TokenizedDataModule``, the base class that holds what the three DataModules do alike.

Only that base class touches Lightning; a tokenizer is loaded (by transformers' ``AutoTokenizer``,
imported lazily) only when it has to come from a directory.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_lora.data._resumable import ResumableDataLoader

EncodingErrors = Literal["strict", "replace", "ignore"]
_ENCODING_ERRORS = ("strict", "replace", "ignore")
TABLE_EXTENSIONS = (".csv", ".jsonl", ".json")
IGNORE_INDEX = -100  # the label value torch's cross_entropy skips (its default ignore_index)


# --- argument checks (cheap, run in __init__) ---------------------------------------------


def check_path(path: str, extensions: Sequence[str]) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path string, got {path!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} does not exist or is not a file; check the path.")
    if os.path.splitext(str(path))[1].lower() not in extensions:
        raise ValueError(
            f"path {path!r} has an unsupported extension; use one of {list(extensions)} "
            "(rename the file if its content already has that format)."
        )


def check_tokenizer(tokenizer: str | PreTrainedTokenizerBase) -> None:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return
    if not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(
            f"tokenizer must be a local directory path or a PreTrainedTokenizerBase, got {tokenizer!r}."
        )
    if not os.path.isdir(tokenizer):
        raise FileNotFoundError(
            f"tokenizer {tokenizer!r} is not a local directory; pass the folder that holds "
            "tokenizer.json / tokenizer_config.json (hub downloads are not used)."
        )


def check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_pad_multiple(value: int | None, packing: bool = False) -> None:
    """``pad_to_multiple_of``: None, or a positive integer for padded (not packed) batches."""
    if value is None:
        return
    check_positive("pad_to_multiple_of", value)
    if packing:
        raise ValueError(
            f"pad_to_multiple_of={value!r} pads batches, but packing=True builds rows of max_length tokens that need no "
            "padding: drop pad_to_multiple_of, or set packing=False."
        )


def check_flag(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")


def check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")


def check_common(
    batch_size: int, val_fraction: float, seed: int, num_workers: int, encoding_errors: str
) -> None:
    check_positive("batch_size", batch_size)
    check_fraction("val_fraction", val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
    if encoding_errors not in _ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {list(_ENCODING_ERRORS)}, got {encoding_errors!r}.")


# --- tokenizer ------------------------------------------------------------------------------


def load_tokenizer(tokenizer: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Return ``tokenizer`` itself, or load it from a local directory (never from the hub)."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id: the tokenizer's pad token, else its EOS, else 0 (masked by attention_mask)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# --- file reading ---------------------------------------------------------------------------


def read_text(path: str, encoding_errors: str) -> str:
    """Decode ``path`` as UTF-8 (a BOM is dropped), naming the first bad byte on failure."""
    with open(path, "rb") as f:
        raw = f.read()
    byte_order_marks = {"UTF-32": (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE), "UTF-16": (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)}
    for name, marks in byte_order_marks.items():
        if raw.startswith(marks):  # UTF-32's LE mark starts with UTF-16's: test it first
            raise ValueError(
                f"path {path!r} is {name} (it starts with a {name} byte order mark), not UTF-8, which no "
                f"encoding_errors (got {encoding_errors!r}) can read; re-encode the file as UTF-8, e.g. "
                f"`iconv -f {name} -t UTF-8`."
            )
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as err:
        offset = bom + err.start
        line = raw.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"path {path!r} is not valid UTF-8: byte 0x{raw[offset]:02x} at byte offset {offset} "
            f"(line {line}) with encoding_errors={encoding_errors!r}. Re-encode the file as UTF-8, or pass "
            "encoding_errors='replace' to read undecodable bytes as U+FFFD."
        ) from None


Row = dict[str, Any]


def read_rows(path: str, encoding_errors: str) -> tuple[list[Row], list[int]]:
    """Read a CSV (header row) or JSON Lines file into dicts, with each row's line number.

    A ``.json`` file may also be a single JSON array of objects.
    """
    text = read_text(path, encoding_errors)
    if os.path.splitext(path)[1].lower() == ".csv":
        rows, lines = _read_csv(path, text)
    elif os.path.splitext(path)[1].lower() == ".json" and text.lstrip().startswith("["):
        rows, lines = _read_json_array(path, text)
    else:
        rows, lines = _read_jsonl(path, text)
    if not rows:
        raise ValueError(f"path {path!r} has no data rows; add rows (CSV needs a header line plus rows).")
    return rows, lines


def _read_csv(path: str, text: str) -> tuple[list[Row], list[int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[Row] = []
    lines: list[int] = []
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # the default, 131,072 characters, is one long document
    try:
        header = reader.fieldnames or []
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:  # DictReader would keep the last column of each name and drop the others
            raise ValueError(
                f"path {path!r}: the CSV header {header!r} names the columns {repeated!r} more than once; "
                "give every column its own name."
            )
        for row in reader:
            if None in row or None in row.values():
                raise ValueError(
                    f"path {path!r}: the CSV row ending on line {reader.line_num} has a different number of "
                    f"fields than the header {reader.fieldnames!r}; quote fields that contain commas."
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as err:
        raise ValueError(f"path {path!r}: line {reader.line_num} is not valid CSV ({err}); fix the file.") from None
    finally:
        csv.field_size_limit(limit)
    return rows, lines


def _object(path: str, where: str) -> Callable[[list[tuple[str, Any]]], Row]:
    """A json ``object_pairs_hook`` that refuses a key given twice (json keeps the last one silently)."""

    def build(pairs: list[tuple[str, Any]]) -> Row:
        row = dict(pairs)
        if len(row) < len(pairs):
            keys = [key for key, _ in pairs]
            repeated = sorted({key for key in keys if keys.count(key) > 1})
            raise ValueError(f"path {path!r}: {where} gives the keys {repeated!r} more than once; keep one of each.")
        return row

    return build


def _read_jsonl(path: str, text: str) -> tuple[list[Row], list[int]]:
    rows: list[Row] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_object(path, f"line {number}"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"path {path!r}: line {number} is not valid JSON ({err.msg}): {line[:80]!r}. "
                "Each line must be one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"path {path!r}: line {number} is {row!r}, not a JSON object; write one object per line.")
        rows.append(row)
        lines.append(number)
    return rows, lines


def _read_json_array(path: str, text: str) -> tuple[list[Row], list[int]]:
    try:
        data = json.loads(text, object_pairs_hook=_object(path, "an object"))
    except json.JSONDecodeError as err:
        raise ValueError(f"path {path!r}: line {err.lineno} is not valid JSON ({err.msg}); fix the file.") from None
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"path {path!r}: item {i} is {row!r}, not a JSON object; use a list of objects.")
    return data, list(range(1, len(data) + 1))  # items, not lines, for a JSON array


def require_columns(path: str, rows: list[Row], lines: list[int], columns: dict[str, str]) -> None:
    """Check every row has each column; ``columns`` maps parameter name -> column name."""
    present = list(rows[0])
    for parameter, column in columns.items():
        if column not in present:
            raise ValueError(
                f"{parameter}={column!r} is not a column of path {path!r}; the columns are {present!r}. "
                f"Pass {parameter}= one of them."
            )
    for row, line in zip(rows, lines):
        for parameter, column in columns.items():
            if row.get(column) is None:
                raise ValueError(
                    f"path {path!r}: line {line} has no value for {parameter}={column!r} "
                    f"(it has {list(row)!r}); fill it in or drop the row."
                )


# --- splitting ------------------------------------------------------------------------------


def split_indices(
    n: int, fractions: Sequence[float], seed: int, path: str, limit: int | None = None
) -> tuple[list[int], list[list[int]]]:
    """Shuffle ``range(n)`` with ``seed``; carve held-out splits off the front, the rest is train.

    Each held-out split gets ``max(1, round(n * fraction))`` indices when its fraction is > 0, so
    it is never empty. Train is then cut to its first ``limit`` indices (None keeps all), which
    leaves the held-out splits the same for every ``limit``.
    Returns ``(train, [held_out_0, held_out_1, ...])``.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    sizes = [max(1, round(n * f)) if f > 0 else 0 for f in fractions]
    if n - sum(sizes) < 1:
        raise ValueError(
            f"path {path!r} gives {n} examples, too few for a non-empty train split plus held-out splits "
            f"of sizes {sizes} (fractions {list(fractions)!r}); add data or lower val_fraction/test_fraction."
        )
    held_out = []
    start = 0
    for size in sizes:
        held_out.append(order[start : start + size])
        start += size
    train = order[start:]
    return (train if limit is None else train[:limit]), held_out


# --- datasets and collation -----------------------------------------------------------------


class ListDataset(Dataset):
    """A map-style dataset over a list of pre-tokenized examples (dicts of int lists)."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class PadCollator:
    """Right-pad each key to the longest sequence in the batch; plain class so workers can pickle it.

    ``pad_values`` maps each sequence key to its pad value; ``attention_mask`` is padded with 0.
    Keys not in ``pad_values`` (scalars such as class labels) are stacked into a LongTensor.
    ``pad_to_multiple_of``: the padded length is rounded up to a multiple of it (but not beyond ``max_length``,
    unless the batch is longer already), so that batches come in few shapes: each new shape costs compiled layers
    a recompile and cuDNN's attention a new plan (``benchmarks/results/2026-12-02-lean-4bit-h200``).
    """

    def __init__(self, pad_values: dict[str, int], pad_to_multiple_of: int | None = None, max_length: int | None = None) -> None:
        self.pad_values = pad_values
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            rounded = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
            longest = rounded if self.max_length is None else max(longest, min(rounded, self.max_length))
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            if key in self.pad_values:
                pad = self.pad_values[key]
                batch[key] = torch.tensor(
                    [ex[key] + [pad] * (longest - len(ex[key])) for ex in examples], dtype=torch.long
                )  # (batch, longest)
            else:
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.long)  # (batch,)
        return batch


# --- the DataModule base --------------------------------------------------------------------


class _TokenizedDataModule(LightningDataModule):
    """What the DataModules do alike: the common argument checks, a tokenizer loaded on first use,
    the prepare_data/setup pattern and seeded ``ResumableDataLoader``s over the built datasets.

    A subclass validates its own arguments and calls ``save_hyperparameters`` in its ``__init__``
    (Lightning reads the arguments from that frame), reads its file in ``_read_file`` (called on
    rank 0 by prepare_data, and again by ``_build_datasets``), fills ``train_dataset`` and
    ``val_dataset`` in ``_build_datasets``, and overrides ``_collator`` to pad its batches.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | PreTrainedTokenizerBase,
        extensions: Sequence[str],
        batch_size: int,
        val_fraction: float,
        seed: int,
        num_workers: int,
        encoding_errors: str,
    ) -> None:
        super().__init__()
        check_path(path, extensions)
        check_tokenizer(tokenizer)
        check_common(batch_size, val_fraction, seed, num_workers, encoding_errors)
        self.path = str(path)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.encoding_errors = encoding_errors
        self._tokenizer_arg = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_arg)
        return self._tokenizer

    def _read_file(self) -> Any:
        """Read and validate ``path`` (no tokenizing)."""
        raise NotImplementedError

    def _build_datasets(self) -> None:
        """Tokenize and split the file into ``train_dataset`` and ``val_dataset`` (and any others)."""
        raise NotImplementedError

    def _collator(self) -> Callable[[list[Any]], Any] | None:
        """Batches the examples of a loader; None keeps torch's default collation."""
        return None

    # --- LightningDataModule hooks ---

    def prepare_data(self) -> None:
        # Only validates the file on rank 0 so a bad file fails fast; setup builds state on every rank.
        self._read_file()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self._build_datasets()

    def _dataloader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call setup() before asking for a dataloader.")
        return ResumableDataLoader(
            dataset,
            seed=self.seed,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self._collator(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_fraction == 0:
            return []  # no validation split: Lightning skips validation
        return self._dataloader(self.val_dataset, shuffle=False)
