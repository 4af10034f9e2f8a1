"""LightningModules and data shared by the Lightning tests (tiny models, CPU, fixed seeds)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from _models import VOCAB, tiny_bert_classifier, tiny_llama
from lightning_lora import LoRAConfig, LoRAMixin, QuantizationConfig


def token_loader(n: int = 32, seq: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (n, seq), generator=g)), batch_size=batch_size)


def classification_loader(n: int = 32, seq: int = 12, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(ids, labels), batch_size=batch_size)


class LlamaLM(L.LightningModule):
    """A tiny Llama LM whose backbone ``self.model`` is built in ``build_in``: 'init', 'setup' or 'configure_model'."""

    def __init__(self, build_in: str = "configure_model", lr: float = 1e-2, all_params_in_optimizer: bool = False) -> None:
        super().__init__()
        self.build_in = build_in
        self.lr = lr
        self.all_params_in_optimizer = all_params_in_optimizer
        self.model = tiny_llama() if build_in == "init" else None

    def setup(self, stage: str) -> None:
        if self.build_in == "setup" and self.model is None:
            self.model = tiny_llama()

    def configure_model(self) -> None:
        if self.build_in == "configure_model" and self.model is None:
            self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        params = self.parameters() if self.all_params_in_optimizer else [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr)


class BertClassifier(L.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_bert_classifier()

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = self.model(input_ids=ids, labels=labels).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class MixinLlamaLM(LoRAMixin, LlamaLM):
    """The same module as LlamaLM, adapted through LoRAMixin instead of the callback."""

    lora_backbone = "model"

    def __init__(self, lora_config: LoRAConfig, quantization_config: QuantizationConfig | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lora_config = lora_config
        self.quantization_config = quantization_config

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.lr)


def trainer(max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(max_steps=max_steps, callbacks=list(callbacks), **defaults)
