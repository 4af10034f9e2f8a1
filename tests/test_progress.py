"""Progress lines when output is not a terminal: a piped `lightning-lora fit`, ProgressLog itself, and when the CLI installs it."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from _lightning import LlamaLM, token_loader
from _processes import Queue
from lightning_lora import LoRACallback
from lightning_lora.lightning.lora_cli import LoRACLI
from lightning_lora.lightning.progress import ProgressLog, batch_counts
from lightning_lora.lightning.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parent.parent
TRAIN_LINE = re.compile(
    r"^\[train\] epoch 0 \| step (\d+)/3 \(\d+%\) \| train_loss [\d.]+ \| [\d.,]+ samples/s \| [\d,]+ tokens/s"
    r" \| \d+:\d\d:\d\d elapsed \| ETA \d+:\d\d:\d\d$"
)


def test_a_piped_fit_prints_progress_lines_and_no_progress_bar(tmp_path: Path, fork_server) -> None:
    # stdout and stderr not a terminal (one file): a fork of the session's warm process, its output in one text.
    command = [
        sys.executable, "-m", "lightning_lora.cli", "fit", "--config", str(ROOT / "configs" / "tiny-llama-cpu.yaml"),
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "3", "--data.init_args.limit", "24",
    ]  # fmt: skip
    queue = Queue()
    queue.add("fit", command, cwd=tmp_path, forks=fork_server)
    result = queue.run(timeout=600)["fit"]
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    train = [m for m in map(TRAIN_LINE.match, lines) if m]
    assert [int(m.group(1)) for m in train][:1] == [1]  # a line right after the first optimizer step
    done = [line for line in lines if line.startswith("[train done]")]
    assert len(done) == 1 and done[0].startswith("[train done] | step 3/3 (100%) | train_loss ") and "ETA" not in done[0]
    assert "\r" not in result.stdout + result.stderr  # TQDM's redraws are gone, not duplicated
    assert f"lightning-lora: run directory {tmp_path / 'run' / 'lightning_logs' / 'version_0'}" in result.stdout


def _fit_with(progress: ProgressLog, steps: int = 4, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[LoRACallback(r=4, target_modules=["q_proj"], backbone="model"), progress], **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(LlamaLM(build_in="init"), token_loader(n=32, batch_size=4))
    return trainer


def test_every_step_prints_a_line_when_the_interval_is_zero() -> None:
    out = io.StringIO()
    _fit_with(ProgressLog(every_n_seconds=0, stream=out))
    lines = out.getvalue().splitlines()
    steps = [int(re.search(r"\| step (\d+)/4 ", line).group(1)) for line in lines]
    assert steps == [1, 2, 3, 4, 4]  # one per step, then the final line
    assert lines[-1].startswith("[train done]")
    assert all("samples/s" in line and "tokens/s" in line for line in lines)


def test_a_long_interval_prints_the_first_step_and_the_end_only() -> None:
    out = io.StringIO()
    _fit_with(ProgressLog(every_n_seconds=3600, stream=out), steps=5)
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[:2] for line in lines] == [["[train] epoch 0", "step 1/5 (20%)"], ["[train done]", "step 5/5 (100%)"]]


def test_it_is_lightnings_progress_bar_so_tqdm_is_not_added() -> None:
    trainer = _fit_with(ProgressLog(every_n_seconds=3600, stream=io.StringIO()), steps=1)
    bars = [cb for cb in trainer.callbacks if isinstance(cb, (ProgressLog, TQDMProgressBar))]
    assert [type(cb) for cb in bars] == [ProgressLog]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "config", "installed"),
    [
        (False, {}, True),  # a pipe or a file: progress lines
        (True, {}, False),  # a terminal: Lightning's own bar, nothing added
        (False, {"enable_progress_bar": False}, False),  # asked for no progress at all
        (False, {"callbacks": [TQDMProgressBar()]}, False),  # the config chose its bar
    ],
)
def test_the_cli_installs_progress_lines_only_when_stdout_is_not_a_terminal(monkeypatch, tty: bool, config: dict, installed: bool) -> None:
    monkeypatch.setattr(sys, "stdout", _Stream(tty))
    cli = SimpleNamespace(run_directory=RunDirectory())
    callbacks = LoRACLI._library_callbacks(cli, config)
    assert any(isinstance(cb, ProgressLog) for cb in callbacks) is installed


def test_batch_counts() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert batch_counts({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": mask}) == (2, 3)
    assert batch_counts({"input_ids": torch.zeros(2, 3, dtype=torch.long)}) == (2, 6)
    assert batch_counts({"pixels": torch.zeros(5, 3, 8, 8)}) == (5, 0)
    assert batch_counts((torch.zeros(4, 7, dtype=torch.long),)) == (4, 28)
    assert batch_counts([torch.zeros(4, 7), torch.zeros(4)]) == (4, 0)
    assert batch_counts("text") == (0, 0)


@pytest.mark.parametrize("value", [-1, "30", True, float("nan")])
def test_bad_interval_is_a_clear_error(value) -> None:
    with pytest.raises(ValueError, match=r"`every_n_seconds` must be a number >= 0 .*got " + re.escape(repr(value))):
        ProgressLog(every_n_seconds=value)
