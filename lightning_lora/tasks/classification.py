"""SequenceClassificationModule: text classification on a transformers encoder, ready for LoRACallback and the CLI."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_lora.tasks._common import (
    LRSchedule,
    build_backbone,
    check_config_overrides,
    check_hparams,
    check_model_arg,
    configure_adamw,
)

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class SequenceClassificationModule(L.LightningModule):
    """Fine-tune a sequence classifier. The backbone is ``self.model`` (an ``AutoModelForSequenceClassification``),
    built in ``configure_model``; its classification head is new unless the checkpoint has one, so list it in
    LoRACallback's ``modules_to_save`` (e.g. 'classifier') to train and save it.

    Batches are dicts with ``input_ids``, ``attention_mask`` (``token_type_ids`` optional) and ``labels`` (batch,).
    Logs ``train_loss``, ``val_loss``/``val_acc``/``val_f1`` (macro F1), the same with ``test_``, and
    ``predict_step`` returns the predicted label ids.

    Example::

        dm = TextClassificationDataModule(path, tokenizer_dir, label_column="sentiment")
        module = SequenceClassificationModule(model_dir, num_labels=dm.num_labels)
        L.Trainer(max_epochs=1, callbacks=[LoRACallback(target_modules=["query", "value"],
                  modules_to_save=["classifier"])]).fit(module, datamodule=dm)
    """

    def __init__(
        self,
        model: str | dict[str, Any] | None = None,
        num_labels: int = 2,
        labels: list[str] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        torch_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        init_seed: int = 0,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            model: Local pretrained directory (or 'pkg://<package>/<dir>'), or a dict of config fields with
                'model_type' for random weights. None: set ``self.model`` before fitting.
            num_labels: Number of classes (the CLI links it from the DataModule's ``num_labels``).
            labels: Class names in id order, written into the model config as ``id2label`` (linked by the CLI).
            lr: Peak learning rate of AdamW.
            weight_decay: AdamW weight decay on matrices (LoRA A/B, the head's weight), not on biases.
            warmup_steps: Linear warmup from 0 to ``lr`` over this many optimizer steps.
            lr_schedule: 'constant' after warmup, or 'linear' decay to 0 at the last step.
            torch_dtype: Dtype to load the backbone in: 'bfloat16', 'float16', 'float32'; None keeps the checkpoint's.
            gradient_checkpointing: Recompute activations in backward (non-reentrant) to save memory.
            attn_implementation: transformers attention backend, e.g. 'sdpa' or 'eager'.
            init_seed: Seed of the random weights (a config dict, or a new classification head).
            config_overrides: transformers config fields to change when the model is built, e.g.
                {"hidden_dropout_prob": 0.0}.
        """
        super().__init__()
        check_model_arg(model)
        check_hparams(lr, weight_decay, warmup_steps, lr_schedule, torch_dtype)
        check_config_overrides(config_overrides)
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"`num_labels` must be an integer >= 2, got {num_labels!r}; it is the number of classes.")
        if labels is not None and len(labels) != num_labels:
            raise ValueError(
                f"`labels` has {len(labels)} names but `num_labels`={num_labels!r}; give one name per class, or labels=None."
            )
        self.save_hyperparameters()
        self.model: nn.Module | None = None
        metrics = {}
        for stage in ("val", "test"):
            metrics[f"{stage}_acc"] = MulticlassAccuracy(num_labels, average="micro")
            metrics[f"{stage}_f1"] = MulticlassF1Score(num_labels, average="macro")
        self.metrics = nn.ModuleDict(metrics)

    def configure_model(self) -> None:
        if self.model is not None:
            return  # Lightning calls this for every stage; build once
        from transformers import AutoModelForSequenceClassification

        extra: dict[str, Any] = {"num_labels": self.hparams.num_labels}
        if self.hparams.labels is not None:
            extra["id2label"] = dict(enumerate(self.hparams.labels))
            extra["label2id"] = {name: i for i, name in enumerate(self.hparams.labels)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.init_seed)  # the new head's init does not depend on the global seed
            self.model = build_backbone(self, AutoModelForSequenceClassification, **extra)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (batch, num_labels)."""
        return self.model(**{key: batch[key] for key in _MODEL_INPUTS if key in batch}).logits

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        batch_size = batch["labels"].shape[0]
        if stage != "train":
            preds = logits.argmax(dim=-1)
            for name in ("acc", "f1"):
                metric = self.metrics[f"{stage}_{name}"]
                metric.update(preds, batch["labels"])
                self.log(f"{stage}_{name}", metric, prog_bar=name == "acc", batch_size=batch_size)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "train", batch_size=batch_size, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Predicted label ids, (batch,)."""
        return self(batch).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.lr_schedule)
