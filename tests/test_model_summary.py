"""The model summary users see counts a 4-bit weight as the parameters it stands for, as parameter_summary does."""

from __future__ import annotations

import logging
import sys
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import summarize
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

from _lightning import LlamaLM, token_loader
from lightning_lora import LoRACallback, parameter_summary
from lightning_lora.inject import count_parameters
from lightning_lora.lightning.lora_cli import LoRACLI
from lightning_lora.lightning.run_dir import RunDirectory
from lightning_lora.lightning.summary import LoRAModelSummary, QuantizedAwareSummary, stored_bytes


@pytest.fixture(scope="module")
def fitted() -> tuple[L.LightningModule, list[str]]:
    """A tiny Llama with an nf4 backbone and LoRA, after one step with LoRAModelSummary; and what it logged."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("lightning.pytorch.callbacks.model_summary").addHandler(handler)
    module = LlamaLM(build_in="init")
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[LoRACallback(r=4, target_modules=["q_proj", "v_proj"], backbone="model", quantize="nf4"), LoRAModelSummary()],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, token_loader())
    logging.getLogger("lightning.pytorch.callbacks.model_summary").removeHandler(handler)
    return module, records


def test_totals_agree_with_parameter_summary_and_lightnings_own_count_does_not(fitted) -> None:
    module, _ = fitted
    counts = count_parameters(module)
    ours = QuantizedAwareSummary(module, max_depth=1)
    assert (ours.total_parameters, ours.trainable_parameters) == (counts["total"], counts["trainable"])
    assert f"all params: {counts['total']:,}" in parameter_summary(module)
    lightning = summarize(module, max_depth=1)
    packed = counts["total"] - lightning.total_parameters
    assert packed > 0  # Lightning counts each packed byte (two 4-bit values) as one parameter
    assert lightning.trainable_parameters == counts["trainable"]  # LoRA itself is not quantized
    assert ours.param_nums == [counts["total"]]  # the one child, `model`, holds every parameter
    assert ours.model_size == pytest.approx(stored_bytes(module) / 1e6)


def test_the_logged_table_shows_the_same_totals(fitted) -> None:
    module, records = fitted
    counts = count_parameters(module)
    table = "\n".join(records)
    assert f"{get_human_readable_count(counts['total'])} Total params" in " ".join(table.split())
    assert f"{get_human_readable_count(counts['trainable'])} Trainable params" in " ".join(table.split())


@pytest.mark.parametrize(
    ("config", "installed"),
    [({}, True), ({"enable_model_summary": False}, False), ({"callbacks": [ModelSummary(max_depth=2)]}, False)],
)
def test_the_cli_uses_it_unless_the_config_chose_otherwise(monkeypatch, config: dict, installed: bool) -> None:
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(isatty=lambda: True, write=print, flush=lambda: None))
    callbacks = LoRACLI._library_callbacks(SimpleNamespace(run_directory=RunDirectory()), config)
    assert any(isinstance(cb, LoRAModelSummary) for cb in callbacks) is installed
