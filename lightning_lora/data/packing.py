"""Padding-free packing: several tokenized examples per fixed-length row, each kept apart by the batch itself.

A packed batch is what ``TextDataModule(packing=True)`` and ``InstructionDataModule(packing=True)`` hand out:

- ``input_ids``, ``labels``, ``position_ids``: ``(rows, row_length)``. Position ids restart at 0 for every
  example. ``labels`` are -100 on prompt tokens, on padding and on the **first token of every example**, so
  after the causal shift no token is scored as predicted from the example before it.
- ``document_ids``: ``(rows, row_length)``, the example's index within its row, -1 on padding.
- ``cu_seq_lens``: ``(segments + 1,)`` int32, the cumulative segment lengths over the flattened
  ``rows * row_length`` tokens, as varlen attention kernels take them. Every token is in exactly one segment;
  a row's padding tail is split into segments of its own, none longer than the longest example.
- ``max_length``: the longest segment of the batch (a Python int), the kernels' ``max_seqlen``.

There is deliberately no ``attention_mask``: given one, transformers models attend causally across the whole
row (only padding masked), which would let one example see another. ``CausalLMModule`` routes packed batches
through document-masked attention (``lightning_lora.tasks.packed_attention``); a plain transformers model
called with ``input_ids`` and ``position_ids`` also keeps examples apart (it detects the restarts).

Rows are packed once, when the dataset is built (best-fit decreasing over the example lengths, ties by
position), so the rows are the same in every run and process for a given seed; the loader then shuffles
whole rows per epoch and a mid-epoch resume skips the rows already seen like any other batches.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``row_length`` tokens: best-fit decreasing bin packing.

    Examples are placed longest first (ties: lower index first), each into the open row with the least room
    that still fits it, else into a new row. Deterministic: the same lengths always give the same rows.

    Example::

        pack_rows([5, 3, 4, 2], row_length=8)  # [[0, 1], [2, 3]]
    """
    for index, length in enumerate(lengths):
        if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= row_length:
            raise ValueError(
                f"example {index} has {length!r} tokens; every example must have 1 to row_length={row_length!r} "
                "tokens (cut longer examples first)."
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shortest = min(lengths, default=1)
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row index), sorted; rows too full for any example leave
    for i in order:
        slot = bisect.bisect_left(open_rows, (lengths[i], -1))  # the open row with the least room that fits
        if slot < len(open_rows):
            room, row = open_rows.pop(slot)
            rows[row].append(i)
        else:
            room, row = row_length, len(rows)
            rows.append([i])
        room -= lengths[i]
        if room >= shortest:
            bisect.insort(open_rows, (room, row))
    return rows


class PackedDataset(Dataset):
    """Examples (dicts with ``input_ids`` and ``labels`` lists) packed into rows of ``row_length`` tokens.

    Item ``i`` is the list of examples of row ``i``; ``PackedCollator`` turns a list of rows into a batch.

    Example::

        dataset = PackedDataset([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, ...], row_length=512)
        loader = DataLoader(dataset, batch_size=4, collate_fn=PackedCollator(512, pad_id=0))
    """

    def __init__(self, examples: list[dict[str, Any]], row_length: int) -> None:
        self.examples = examples
        self.row_length = row_length
        self.rows = pack_rows([len(example["input_ids"]) for example in examples], row_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.examples[i] for i in self.rows[index]]

    @property
    def num_tokens(self) -> int:
        """Tokens of all examples: the useful (non-pad) tokens of one pass over the rows."""
        return sum(len(example["input_ids"]) for example in self.examples)


class PackedCollator:
    """Lay rows of examples out as a packed batch (see the module docstring); a plain class so workers can pickle it."""

    def __init__(self, row_length: int, pad_id: int) -> None:
        self.row_length = row_length
        self.pad_id = pad_id

    def __call__(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        width = self.row_length
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        document_ids: list[int] = []
        segments: list[int] = []
        longest = max(len(example["input_ids"]) for row in rows for example in row)
        for row in rows:
            used = 0
            for document, example in enumerate(row):
                length = len(example["input_ids"])
                if not 0 < length == len(example["labels"]):
                    # Unequal lengths would shift every later label onto another token of the row, silently.
                    raise ValueError(
                        f"example {document} of a row has {length} input_ids and {len(example['labels'])} labels; every "
                        "example needs at least one token and one label per token. Build rows with PackedDataset."
                    )
                used += length
                input_ids += example["input_ids"]
                # The first token has nothing of its own example before it: never a target.
                labels += [IGNORE_INDEX, *example["labels"][1:]]
                position_ids += range(length)
                document_ids += [document] * length
                segments.append(length)
            pad = width - used
            if pad < 0:
                raise ValueError(f"a row holds {used} tokens, more than row_length={width}; pack with the same row_length.")
            input_ids += [self.pad_id] * pad
            labels += [IGNORE_INDEX] * pad
            document_ids += [-1] * pad
            while pad > 0:  # padding attends only to padding, in pieces no longer than the longest example
                piece = min(pad, longest)
                position_ids += range(piece)
                segments.append(piece)
                pad -= piece
        shape = (len(rows), width)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long).view(shape),
            "labels": torch.tensor(labels, dtype=torch.long).view(shape),
            "position_ids": torch.tensor(position_ids, dtype=torch.long).view(shape),
            "document_ids": torch.tensor(document_ids, dtype=torch.long).view(shape),
            "cu_seq_lens": torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32),
            "max_length": longest,
        }


def is_packed(batch: Any) -> bool:
    """Whether ``batch`` is a packed batch (it carries ``cu_seq_lens``)."""
    return isinstance(batch, dict) and "cu_seq_lens" in batch
