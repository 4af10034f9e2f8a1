"""ProgressLog: training progress as plain lines, for output that is not a terminal (a pipe, a log file, a cluster job).

Lightning's TQDM bar redraws one line with carriage returns: in a file that is a single line that grows until
the epoch ends, and line-based viewers (``tail -f``, a scheduler's log page) show nothing meanwhile.
``ProgressLog`` is a Lightning progress bar (so it replaces TQDM rather than adding to it) that prints one
complete line after the first optimizer step, then every ``every_n_seconds``, after each validation and at
the end::

    [train] epoch 0 | step 40/188 (21%) | train_loss 0.6932 | 44.1 samples/s | 1,456 tokens/s | 0:00:29 elapsed | ETA 0:01:48

``lightning-lora fit`` installs it when stdout is not a TTY (``lightning_lora.lightning.lora_cli``); in Python,
pass it to the Trainer yourself: ``L.Trainer(callbacks=[ProgressLog(every_n_seconds=60)])``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import torch
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.utilities import rank_zero_only


class ProgressLog(ProgressBar):
    """One line of training progress every ``every_n_seconds`` (rank 0 only): steps, metrics, throughput, ETA.

    Args:
        every_n_seconds: Seconds between two lines (one also comes after the first step, each validation and the end).
        stream: Where to write; default ``sys.stdout``, flushed after every line.
    """

    def __init__(self, every_n_seconds: float = 30.0, stream: IO[str] | None = None) -> None:
        super().__init__()
        if isinstance(every_n_seconds, bool) or not isinstance(every_n_seconds, (int, float)) or not every_n_seconds >= 0:
            raise ValueError(
                f"`every_n_seconds` must be a number >= 0 (seconds between progress lines), got {every_n_seconds!r}; e.g. 30."
            )
        self.every_n_seconds = float(every_n_seconds)
        self._stream = stream
        self._enabled = True
        self._start = 0.0
        self._last_line = 0.0
        self._start_step = 0
        self._samples = 0
        self._tokens = 0
        self._lines_written = 0

    # --- ProgressBar interface ---------------------------------------------------------------------

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    # --- hooks -------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = self._last_line = time.monotonic()
        self._start_step = trainer.global_step  # a resumed run's rate counts only its own steps
        self._samples = self._tokens = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        samples, tokens = batch_counts(batch)
        self._samples += samples
        self._tokens += tokens
        now = time.monotonic()
        first = trainer.global_step == self._start_step + 1 and self._lines_written == 0
        if first or now - self._last_line >= self.every_n_seconds:
            self._write(self._train_line(trainer, pl_module, now))
            self._last_line = now

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        self._write(f"[validate] epoch {trainer.current_epoch} | step {trainer.global_step} | {_format_metrics(metrics) or 'no metrics'}")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(self._train_line(trainer, pl_module, time.monotonic(), prefix="[train done]"))

    # --- lines -------------------------------------------------------------------------------------

    def _train_line(self, trainer: Any, pl_module: Any, now: float, prefix: str = "[train]") -> str:
        elapsed = now - self._start
        done = trainer.global_step - self._start_step
        total = _total_steps(trainer)
        # At the end Lightning has already counted the stopped epoch as done: the epoch number would be one too high.
        parts = [prefix] if prefix != "[train]" else [f"{prefix} epoch {trainer.current_epoch}"]
        if total is not None:
            parts.append(f"step {trainer.global_step}/{total} ({100 * trainer.global_step / max(total, 1):.0f}%)")
        else:
            parts.append(f"step {trainer.global_step}")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        if metrics:
            parts.append(_format_metrics(metrics))
        if elapsed > 0:
            if self._samples:
                parts.append(f"{self._samples / elapsed:,.1f} samples/s")
            if self._tokens:
                parts.append(f"{self._tokens / elapsed:,.0f} tokens/s")
        parts.append(f"{_clock(elapsed)} elapsed")
        if total is not None and done > 0 and prefix == "[train]":
            parts.append(f"ETA {_clock(elapsed / done * max(total - trainer.global_step, 0))}")
        return " | ".join(parts)

    @rank_zero_only
    def _write(self, line: str) -> None:
        if not self._enabled:
            return
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
        self._lines_written += 1


def batch_counts(batch: Any) -> tuple[int, int]:
    """(samples, tokens) of a batch: a dict with ``input_ids`` (tokens = the attention mask's sum when there is one),
    or a tensor / tuple whose first tensor is (batch, ...). (0, 0) when the batch holds no tensor."""
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        mask = batch.get("attention_mask")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
            tokens = int(mask.sum()) if isinstance(mask, torch.Tensor) else ids.numel()
            return int(ids.shape[0]), tokens
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 1]
        return (int(tensors[0].shape[0]), 0) if tensors else (0, 0)
    if isinstance(batch, (list, tuple)):
        tensors = [v for v in batch if isinstance(v, torch.Tensor) and v.dim() >= 1]
        if not tensors:
            return 0, 0
        first = tensors[0]
        return int(first.shape[0]), (first.numel() if first.dtype == torch.long and first.dim() == 2 else 0)
    if isinstance(batch, torch.Tensor) and batch.dim() >= 1:
        return int(batch.shape[0]), (batch.numel() if batch.dtype == torch.long and batch.dim() == 2 else 0)
    return 0, 0


def _total_steps(trainer: Any) -> int | None:
    # Safe here (training has started: the loader exists), unlike in configure_optimizers.
    steps = trainer.estimated_stepping_batches
    if isinstance(steps, float) and not math.isfinite(steps) or steps is None or steps < 0:
        return None
    return int(steps)


def _format_metrics(metrics: Mapping[str, Any]) -> str:
    parts = []
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
