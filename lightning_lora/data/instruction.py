"""InstructionDataModule: prompt/response (or chat) rows for causal-LM fine-tuning, loss on the response only."""

from __future__ import annotations

import string
import warnings
from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_lora.data._common import (
    IGNORE_INDEX,
    TABLE_EXTENSIONS,
    EncodingErrors,
    ListDataset,
    PadCollator,
    _TokenizedDataModule,
    check_flag,
    check_pad_multiple,
    check_positive,
    pad_token_id,
    read_rows,
    require_columns,
    split_indices,
)
from lightning_lora.data.packing import PackedCollator, PackedDataset


class InstructionDataModule(_TokenizedDataModule):
    """Instruction tuning data: each row becomes ``prompt tokens + response tokens + EOS``.

    ``labels`` equal ``input_ids`` with the prompt tokens and the padding set to -100, so the loss only
    scores the response (and the EOS that teaches the model to stop). Prompt and response are tokenized
    separately and concatenated, which puts the mask boundary exactly between them. The prompt is
    ``prompt_template.format(prompt=row[prompt_column])`` tokenized with the tokenizer's special tokens
    (e.g. BOS); the response without them. Rows longer than ``max_length`` are cut at the end; rows whose
    prompt alone fills ``max_length``, or with an empty response and no EOS, are dropped with a warning (they
    would carry no loss).

    With ``messages_column`` each row holds a chat, a list of ``{"role", "content"}`` dicts ending with an
    ``assistant`` message: that last message is the response, everything before it the prompt. The chat is
    rendered with the tokenizer's chat template if it has one, else as ``"role: content\\n"`` lines.

    The split is seeded like the other DataModules: validation is the first ``max(1, round(n * val_fraction))``
    shuffled rows, train the rest, cut to ``limit`` rows. Batches are right-padded to the longest row:
    ``input_ids``, ``attention_mask`` and ``labels``, each ``(batch, seq)``. With ``packing=True`` a batch is
    ``batch_size`` rows of ``max_length`` tokens, each holding several examples that attend only to themselves
    (``lightning_lora.data.packing`` describes the batch).

    Example::

        dm = InstructionDataModule("alpaca.jsonl", "path/to/tokenizer", prompt_template="Q: {prompt}\\nA: ")
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))  # batch["labels"][0] is -100 over the prompt
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | PreTrainedTokenizerBase,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str | None = None,
        prompt_template: str = "{prompt}\n",
        max_length: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 42,
        limit: int | None = None,
        num_workers: int = 0,
        encoding_errors: EncodingErrors = "strict",
        packing: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        """
        Args:
            path: JSON Lines (or CSV, for prompt/response rows) file, one example per row.
            tokenizer: Local tokenizer directory, or a tokenizer object.
            prompt_column: Column holding the prompt (instruction).
            response_column: Column holding the target response.
            messages_column: Column holding a chat (list of role/content dicts); replaces prompt/response.
            prompt_template: Format string turning the prompt into model input; must contain "{prompt}".
            max_length: Prompt plus response are cut to this many tokens.
            batch_size: Examples per batch.
            val_fraction: Fraction of all rows held out for validation, in [0, 1).
            seed: Seed of the shuffle that decides the split and the rows ``limit`` keeps.
            limit: Keep at most this many training rows (validation is unchanged); None keeps all.
            num_workers: DataLoader worker processes.
            encoding_errors: How to treat non-UTF-8 bytes: "strict" (error), "replace" (U+FFFD) or "ignore".
            packing: Pack several examples into each row of ``max_length`` tokens, each attending only to itself,
                instead of padding every example (needs CausalLMModule or a model that honours position_ids restarts).
            pad_to_multiple_of: Pad each batch to a multiple of this many tokens (at most ``max_length``), so that
                batches come in few shapes (each new one costs compiled layers a recompile, cuDNN attention a plan);
                None pads to the batch's longest example. Not with ``packing``.
        """
        super().__init__(
            path, tokenizer, TABLE_EXTENSIONS, batch_size, val_fraction, seed, num_workers, encoding_errors
        )
        check_positive("max_length", max_length)
        check_flag("packing", packing)
        check_pad_multiple(pad_to_multiple_of, packing)
        if limit is not None:
            check_positive("limit", limit)
        _check_prompt_template(prompt_template)
        self.save_hyperparameters(ignore=None if isinstance(tokenizer, str) else ["tokenizer"])
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.messages_column = messages_column
        self.prompt_template = prompt_template
        self.max_length = max_length
        self.limit = limit
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        self._pairs: list[tuple[str, str]] | None = None

    # prepare_data, setup and the loaders come from _TokenizedDataModule.

    def _build_datasets(self) -> None:
        pairs = self._read_file()
        train, (val,) = split_indices(len(pairs), [self.val_fraction], self.seed, self.path, self.limit)
        self.train_dataset = self._tokenize([pairs[i] for i in train])
        self.val_dataset = self._tokenize([pairs[i] for i in val])

    def _read_file(self) -> list[tuple[str, str]]:
        """Rows as ``(prompt text, response text)``; read once."""
        if self._pairs is None:
            self._pairs = self._render_rows()
        return self._pairs

    def _render_rows(self) -> list[tuple[str, str]]:
        rows, lines = read_rows(self.path, self.encoding_errors)
        if self.messages_column is not None:
            require_columns(self.path, rows, lines, {"messages_column": self.messages_column})
            return [self._render_chat(row[self.messages_column], line) for row, line in zip(rows, lines)]
        require_columns(
            self.path, rows, lines, {"prompt_column": self.prompt_column, "response_column": self.response_column}
        )
        return [
            (self.prompt_template.format(prompt=row[self.prompt_column]), str(row[self.response_column]))
            for row in rows
        ]

    def _render_chat(self, messages: Any, line: int) -> tuple[str, str]:
        where = f"path {self.path!r}: line {line}, messages_column={self.messages_column!r}"
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where} holds {messages!r}, not a non-empty list of {{'role', 'content'}} dicts.")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str
            ):
                raise ValueError(f"{where} has message {message!r}; each needs string 'role' and 'content' keys.")
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                f"{where} ends with role {messages[-1]['role']!r}; the last message must be the 'assistant' "
                "reply to train on. Drop trailing messages or append the reply."
            )
        if self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(messages, tokenize=False)
            if not full.startswith(prompt):
                raise ValueError(
                    f"{where}: the tokenizer's chat template does not render the chat as the prompt plus a "
                    "reply, so the prompt cannot be masked; use a tokenizer without this template."
                )
            return prompt, full[len(prompt) :]
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
        return prompt, messages[-1]["content"]

    def _tokenize(self, pairs: list[tuple[str, str]]) -> ListDataset | PackedDataset:
        if not pairs:
            return PackedDataset([], self.max_length) if self.packing else ListDataset([])
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id
        # A chat template already writes BOS and the like into the text.
        templated = self.messages_column is not None and bool(tokenizer.chat_template)
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=not templated)["input_ids"]
        responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
        examples: list[dict[str, Any]] = []
        too_long = empty = 0
        for prompt_ids, response_ids in zip(prompts, responses):
            if eos is not None and response_ids[-1:] != [eos]:
                response_ids = response_ids + [eos]
            if not response_ids:  # an empty response and no EOS: nothing to score
                empty += 1
                continue
            if len(prompt_ids) >= self.max_length:
                too_long += 1
                continue
            input_ids = (prompt_ids + response_ids)[: self.max_length]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: self.max_length]
            examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
        reasons = []
        if too_long:
            reasons.append(f"{too_long} whose prompt alone fills max_length={self.max_length} (raise max_length to keep them)")
        if empty:
            column = (
                f"the last message of messages_column={self.messages_column!r}" if self.messages_column is not None
                else f"response_column={self.response_column!r}"
            )
            reasons.append(
                f"{empty} with no response tokens in {column} and a tokenizer without "
                "an EOS token to train instead (fill in the responses, or use a tokenizer with an eos_token)"
            )
        if not examples:
            raise ValueError(
                f"path {self.path!r} leaves no row to train on: of {len(pairs)} rows, " + "; ".join(reasons) + "."
            )
        if reasons:
            dropped = f"Dropped {len(pairs) - len(examples)} of {len(pairs)} rows of {self.path!r}: "
            warnings.warn(dropped + "; ".join(reasons) + ".", stacklevel=2)
        if self.packing:
            return PackedDataset([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples], self.max_length)
        return ListDataset(examples)

    def _collator(self) -> PadCollator | PackedCollator:
        if self.packing:
            return PackedCollator(self.max_length, pad_token_id(self.tokenizer))
        pads = {"input_ids": pad_token_id(self.tokenizer), "attention_mask": 0, "labels": IGNORE_INDEX}
        return PadCollator(pads, self.pad_to_multiple_of, self.max_length)


def _check_prompt_template(prompt_template: str) -> None:
    fix = 'use a format string with one "{prompt}" field, writing literal braces as "{{" and "}}"'
    if not isinstance(prompt_template, str):
        raise ValueError(f"prompt_template must be a string containing '{{prompt}}', got {prompt_template!r}; {fix}.")
    try:
        # The fields str.format fills: "{{prompt}}" is the literal text "{prompt}", not a field.
        parsed = [(field, spec) for _, field, spec, _ in string.Formatter().parse(prompt_template) if field is not None]
        fields = [field for field, _ in parsed]
        prompt_template.format(prompt="")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ValueError(f"prompt_template {prompt_template!r} is not a valid format string ({err!r}); {fix}.") from None
    if "prompt" not in fields or any(field != "prompt" or "{" in spec for field, spec in parsed):
        raise ValueError(
            f"prompt_template {prompt_template!r} has the fields {fields!r}, but the only field it may have is "
            f'"{{prompt}}" (at least once, without attributes, indexes or nested fields); {fix}.'
        )
