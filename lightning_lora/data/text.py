"""TextDataModule: raw text, tokenized, concatenated and cut into fixed-size blocks for causal-LM training."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_lora.data._common import (
    EncodingErrors,
    _TokenizedDataModule,
    check_flag,
    check_positive,
    pad_token_id,
    read_rows,
    read_text,
    require_columns,
    split_indices,
)
from lightning_lora.data.packing import PackedCollator, PackedDataset

_EXTENSIONS = (".txt", ".jsonl", ".json")


class TextDataModule(_TokenizedDataModule):
    """Causal language modelling on a ``.txt`` file or a JSONL file with a ``text_column`` column.

    A ``.txt`` file is one stream: its lines (newlines kept) are tokenized and joined. A JSONL file is one
    document per row, each followed by the tokenizer's EOS token (when it has one) so the model sees document
    boundaries. No other special tokens are added. The token stream is cut into ``block_size`` blocks (the
    incomplete tail is dropped); the blocks are shuffled with ``seed``, the first
    ``max(1, round(n_blocks * val_fraction))`` are validation and the rest train.

    Batches are ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (equal to ``input_ids``; the model
    shifts them), each ``(batch, block_size)``.

    With ``packing=True`` (JSONL only) documents are not run together: each document (+ EOS), cut into
    ``block_size`` pieces if longer, is one example, and examples are packed whole into rows of ``block_size``
    tokens where each attends only to itself (``lightning_lora.data.packing`` describes the batch). The split
    is then over documents: the first ``max(1, round(n_documents * val_fraction))`` shuffled ones are validation.

    Example::

        dm = TextDataModule("corpus.txt", "path/to/tokenizer", block_size=128)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))  # batch["input_ids"].shape == (8, 128)
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | PreTrainedTokenizerBase,
        block_size: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 42,
        num_workers: int = 0,
        encoding_errors: EncodingErrors = "strict",
        text_column: str = "text",
        packing: bool = False,
    ) -> None:
        """
        Args:
            path: Plain text file (.txt), or JSON Lines file with a text column.
            tokenizer: Local tokenizer directory, or a tokenizer object.
            block_size: Tokens per training sequence.
            batch_size: Sequences per batch.
            val_fraction: Fraction of the blocks held out for validation, in [0, 1).
            seed: Seed of the shuffle that decides which blocks are held out.
            num_workers: DataLoader worker processes.
            encoding_errors: How to treat non-UTF-8 bytes: "strict" (error), "replace" (U+FFFD) or "ignore".
            text_column: Column holding each document, for JSONL files.
            packing: Pack whole documents into the blocks, each attending only to itself, instead of cutting one
                token stream (JSONL only; needs CausalLMModule or a model that honours position_ids restarts).
        """
        super().__init__(path, tokenizer, _EXTENSIONS, batch_size, val_fraction, seed, num_workers, encoding_errors)
        check_positive("block_size", block_size)
        check_flag("packing", packing)
        if packing and os.path.splitext(str(path))[1].lower() == ".txt":
            raise ValueError(
                f"packing=True needs separate documents, but path {path!r} is a .txt file, read as one token stream "
                "(its blocks have no padding to save). Write one document per line as JSON Lines "
                '({"text": ...}) or use packing=False.'
            )
        self.save_hyperparameters(ignore=None if isinstance(tokenizer, str) else ["tokenizer"])
        self.block_size = block_size
        self.text_column = text_column
        self.packing = packing

    # prepare_data, setup and the loaders come from _TokenizedDataModule; unpacked batches use torch's default collation.

    def _build_datasets(self) -> None:
        documents, separate = self._read_file()
        ids = self.tokenizer(documents, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if separate and eos is not None:
            ids = [doc + [eos] for doc in ids]
        if self.packing:
            self._build_packed(ids)
            return
        stream = [token for doc in ids for token in doc]
        n_blocks = len(stream) // self.block_size
        if n_blocks == 0:
            raise ValueError(
                f"path {self.path!r} gives {len(stream)} tokens, fewer than one block of block_size="
                f"{self.block_size!r}; lower block_size or add text."
            )
        blocks = torch.tensor(stream[: n_blocks * self.block_size], dtype=torch.long).view(n_blocks, self.block_size)
        train, (val,) = split_indices(n_blocks, [self.val_fraction], self.seed, self.path)
        self.train_dataset = _BlockDataset(blocks[train])
        self.val_dataset = _BlockDataset(blocks[val])

    def _build_packed(self, documents: list[list[int]]) -> None:
        train, (val,) = split_indices(len(documents), [self.val_fraction], self.seed, self.path)

        def examples(indices: list[int]) -> list[dict[str, list[int]]]:
            pieces = [documents[i][start : start + self.block_size] for i in indices for start in range(0, len(documents[i]), self.block_size)]
            return [{"input_ids": piece, "labels": piece} for piece in pieces]

        self.train_dataset = PackedDataset(examples(train), self.block_size)
        self.val_dataset = PackedDataset(examples(val), self.block_size)

    def _collator(self) -> PackedCollator | None:
        return PackedCollator(self.block_size, pad_token_id(self.tokenizer)) if self.packing else None

    def _read_file(self) -> tuple[list[str], bool]:
        """The texts to tokenize, and whether they are separate documents (EOS between them)."""
        if os.path.splitext(self.path)[1].lower() == ".txt":
            lines = read_text(self.path, self.encoding_errors).splitlines(keepends=True)
            if not any(line.strip() for line in lines):
                raise ValueError(f"path {self.path!r} has no text; add text to the file.")
            return lines, False
        rows, lines = read_rows(self.path, self.encoding_errors)
        require_columns(self.path, rows, lines, {"text_column": self.text_column})
        return [str(row[self.text_column]) for row in rows], True


class _BlockDataset(Dataset):
    """Rows of a ``(n_blocks, block_size)`` token tensor as causal-LM examples."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]  # (block_size,)
        return {"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block}
