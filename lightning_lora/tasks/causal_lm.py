"""CausalLMModule: next-token prediction on a transformers causal LM, ready for LoRACallback and the CLI."""

from __future__ import annotations

import inspect
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from lightning_lora.chunked_loss import check_plain_head, chunked_nll
from lightning_lora.data.packing import is_packed
from lightning_lora.tasks._common import (
    LRSchedule,
    build_backbone,
    check_config_overrides,
    check_hparams,
    check_model_arg,
    configure_adamw,
)
from lightning_lora.tasks.packed_attention import enable_packed_attention, restore_attention

IGNORE_INDEX = -100


class TokenPerplexity(Metric):
    """exp(total NLL / total scored tokens) over everything seen: the corpus perplexity.

    Equal to ``torchmetrics.text.Perplexity(ignore_index=-100)`` on the logits, but fed with summed token
    losses, so it also works with ``chunked_ce`` (which never forms the full logits). Not the exp of the
    mean of per-batch losses, which would weight a short batch like a long one.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.tokens += tokens.detach().to(torch.long)

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.tokens.clamp_min(1))  # float64: log(compute()) is the mean NLL


class CausalLMModule(L.LightningModule):
    """Fine-tune a causal LM. The backbone is ``self.model`` (an ``AutoModelForCausalLM``), built in
    ``configure_model`` so it can be created under the strategy's init context.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``labels == -100`` are not scored,
    e.g. prompt tokens); the model shifts labels by one. The loss is the mean over scored tokens. Packed batches
    (the data modules' ``packing=True``, see ``lightning_lora.data.packing``) run with each example attending
    only to itself (``lightning_lora.tasks.packed_attention``) and give each token the loss it has unpacked.

    Example::

        module = CausalLMModule({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128})
        trainer = L.Trainer(max_steps=10, callbacks=[LoRACallback(r=8)])
        trainer.fit(module, datamodule=InstructionDataModule("data.jsonl", "path/to/tokenizer"))
    """

    def __init__(
        self,
        model: str | dict[str, Any] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        torch_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        chunked_ce: int = 0,
        attn_implementation: str | None = None,
        init_seed: int = 0,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            model: Local pretrained directory (or 'pkg://<package>/<dir>'), or a dict of config fields with
                'model_type' for random weights (tiny test models). None: set ``self.model`` before fitting.
            lr: Peak learning rate of AdamW.
            weight_decay: AdamW weight decay on matrices (LoRA A/B), not on biases.
            warmup_steps: Linear warmup from 0 to ``lr`` over this many optimizer steps.
            lr_schedule: 'constant' after warmup, or 'linear' decay to 0 at the last step.
            torch_dtype: Dtype to load the backbone in: 'bfloat16', 'float16', 'float32'; None keeps the checkpoint's.
            gradient_checkpointing: Recompute activations in backward (non-reentrant) to save memory.
            chunked_ce: If > 0, compute the loss over chunks of this many tokens of the final hidden state,
                never forming the full (tokens, vocab) float32 logits; same loss value.
            attn_implementation: transformers attention backend, e.g. 'sdpa', 'eager', 'flash_attention_2'.
            init_seed: Seed of the random weights when ``model`` is a config dict.
            config_overrides: transformers config fields to change when the model is built, e.g.
                {"hidden_dropout_prob": 0.0}.
        """
        super().__init__()
        check_model_arg(model)
        check_hparams(lr, weight_decay, warmup_steps, lr_schedule, torch_dtype)
        check_config_overrides(config_overrides)
        if isinstance(chunked_ce, bool) or not isinstance(chunked_ce, int) or chunked_ce < 0:
            raise ValueError(
                f"`chunked_ce` must be an integer >= 0 (0 = off), got {chunked_ce!r}. 1024 to 8192 tokens is typical."
            )
        self.save_hyperparameters()
        self.model: nn.Module | None = None
        self.val_perplexity = TokenPerplexity()
        self._batch_start: float | None = None

    # --- model ---------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return  # Lightning calls this for every stage; build once
        from transformers import AutoModelForCausalLM

        self.model = build_backbone(self, AutoModelForCausalLM)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab). For packed rows pass ``position_ids``, ``cu_seq_lens`` and ``max_length``."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if cu_seq_lens is not None:
            batch.update(position_ids=position_ids, cu_seq_lens=cu_seq_lens, max_length=max_length)
        return self._run_backbone(batch).logits

    def _run_backbone(self, batch: dict[str, Any], base_model: bool = False, logits_to_keep: torch.Tensor | None = None) -> Any:
        """The transformers model (or its ``base_model``, without the head) on a packed or unpacked batch."""
        inputs = self._backbone_inputs(batch)
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        # Packed rows: document-masked attention, left on until an unpacked batch or the end of fit, so that
        # gradient checkpointing's recompute in backward attends per document too. Otherwise the model's own.
        if is_packed(batch):
            enable_packed_attention(self.model, training=torch.is_grad_enabled())
        else:
            restore_attention(self.model)
        try:
            return (self.model.base_model if base_model else self.model)(**inputs, use_cache=False)
        except Exception:
            restore_attention(self.model)  # a refused call leaves the model as it was
            raise

    def teardown(self, stage: str) -> None:
        if self.model is not None:
            restore_attention(self.model)  # generation / export after fit use the model's own attention

    @staticmethod
    def _backbone_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        if not is_packed(batch):
            return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        if batch.get("attention_mask") is not None or batch.get("position_ids") is None or batch.get("max_length") is None:
            raise ValueError(
                "a packed batch (one with cu_seq_lens) needs position_ids and max_length and must not carry an "
                f"attention_mask (it would let examples see each other); got keys {sorted(batch)}. Build packed "
                "batches with lightning_lora.data.packing.PackedCollator."
            )
        cu_seq_lens, max_length = batch["cu_seq_lens"], int(batch["max_length"])
        # transformers' names for varlen attention inputs (FlashAttentionKwargs); they reach every attention layer.
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length,
            "max_length_k": max_length,
        }

    # --- loss ----------------------------------------------------------------------------------

    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL over scored tokens, number of scored tokens) of a batch; labels are shifted here."""
        # Position t's target is token t + 1, the last position has none. The labels move, not the logits: slicing
        # the (batch, seq, vocab) logits would cost a copy and a zero-filled gradient of their whole size.
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (batch, seq)
        if is_packed(batch):
            # An example's first token would be predicted from the example before it: never a target.
            starts = F.pad(batch["position_ids"][:, 1:], (0, 1), value=0) == 0
            targets = targets.masked_fill(starts, IGNORE_INDEX)
        if self.hparams.chunked_ce > 0:
            return self._chunked_token_losses(batch, targets)
        keep = None
        if _takes_logits_to_keep(self.model):
            # Logits only at positions some row scores (prompts, padding, packed example starts need none): for
            # instruction data most of the (tokens, vocab) head matmul and float32 logits. The model's own head
            # and logit transforms still run (transformers' logits_to_keep, a 1-D tensor of positions).
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
            targets = targets[:, keep]
        logits = self._run_backbone(batch, logits_to_keep=keep).logits  # (batch, kept positions, vocab)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return nll, (targets != IGNORE_INDEX).sum()

    def _chunked_token_losses(self, batch: dict[str, Any], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Only the scored positions go through the head, `chunked_ce` tokens at a time (lightning_lora.chunked_loss).
        head = check_plain_head(self.model)
        outputs = self._run_backbone(batch, base_model=True)
        scored = targets != IGNORE_INDEX
        hidden, scored_targets = outputs.last_hidden_state[scored], targets[scored]  # (tokens, hidden), (tokens,)
        nll = chunked_nll(head, hidden, scored_targets, self.hparams.chunked_ce)
        return nll, scored.sum()

    # --- steps ---------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, tokens = self.token_losses(batch)
        loss = nll / tokens.clamp_min(1)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, tokens = self.token_losses(batch)
        self.val_perplexity.update(nll, tokens)

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole validation set: loss = total NLL / total tokens. compute() sums both over
        # all ranks first, so every rank holds the same value; sync_dist only averages equal numbers.
        perplexity = self.val_perplexity.compute()
        self.log("val_loss", perplexity.log().float(), prog_bar=True, sync_dist=True)
        self.log("val_perplexity", perplexity.float(), sync_dist=True)
        self.val_perplexity.reset()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self._batch_start is None:
            return
        seconds = time.perf_counter() - self._batch_start
        if is_packed(batch):
            tokens = int((batch["document_ids"] >= 0).sum()) if "document_ids" in batch else batch["input_ids"].numel()
        else:
            mask = batch.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        # Real (non-pad) tokens through forward, backward and the optimizer step, on this process.
        self.log("train_tokens_per_s", tokens / max(seconds, 1e-9), on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.lr_schedule)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters
