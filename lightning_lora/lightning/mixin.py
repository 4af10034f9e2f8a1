"""LoRAMixin: LoRA / QLoRA declared by the LightningModule itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora._io import require_path_argument
from lightning_lora.adapter_io import load_adapter, save_adapter
from lightning_lora.config import LoRAConfig, QuantizationConfig
from lightning_lora.inject import trainable_parameters
from lightning_lora.lightning import strategies
from lightning_lora.lightning.controller import LoRAController, serving_options
from lightning_lora.merge import merge_lora, unmerge_lora


class LoRAMixin:
    """Mix into a LightningModule (before ``LightningModule``) to adapt ``self.<lora_backbone>`` with LoRA.

    Declare the configs as class attributes or set them in ``__init__``; the mixin injects in
    ``setup`` (or right after ``configure_model`` builds the backbone), keeps checkpoints
    adapter-only and checks them on resume. Hooks you override (``setup``, ``on_fit_start``, ``on_train_start``,
    ``on_save_checkpoint``, ``on_load_checkpoint``, ``on_before_optimizer_step``) must call ``super()``.

    Example::

        class MyModule(LoRAMixin, L.LightningModule):
            lora_config = LoRAConfig(r=8, target_modules=["q_proj", "v_proj"])
            quantization_config = QuantizationConfig(mode="nf4")
            lora_backbone = "model"

            def configure_model(self):
                if self.model is None:
                    self.model = AutoModelForCausalLM.from_pretrained(path)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.trainable_parameters(), lr=2e-4)
    """

    lora_config: LoRAConfig | None = None
    quantization_config: QuantizationConfig | None = None
    lora_backbone: str | None = "model"
    adapter_only_checkpoint: bool = True
    skip_nonfinite: bool = True
    max_nonfinite_steps: int = 10
    compile_blocks: bool | list[str] = False
    lora_plus_ratio: float | None = None
    """LoRA+: B matrices (and 1-D tensors) train at this multiple of the optimizer group's learning rate (e.g. 16)."""
    lora_adapter_name: str = "default"
    """The adapter this module injects (or adds to a backbone that has adapters already) and trains."""
    chunked_ce: int = 0
    """If > 0, the backbone's causal-LM loss (``model(..., labels=...)`` in training) runs over chunks of this many tokens
    without forming the full logits (``output.logits`` is then None); see ``lightning_lora.chunked_loss``."""

    @property
    def lora_controller(self) -> LoRAController:
        controller = self.__dict__.get("_lora_controller")
        if controller is None:
            if not isinstance(self.lora_config, LoRAConfig):
                raise ValueError(
                    f"{type(self).__name__}.lora_config must be a LoRAConfig, got {self.lora_config!r}. "
                    "Set it as a class attribute or in __init__: `self.lora_config = LoRAConfig(r=8, ...)`."
                )
            backbone = self.lora_backbone if self.lora_backbone else None
            controller = LoRAController(
                self.lora_config,
                self.quantization_config,
                backbone,
                self.adapter_only_checkpoint,
                self.skip_nonfinite,
                self.max_nonfinite_steps,
                self.compile_blocks,
                lora_plus_ratio=self.lora_plus_ratio,
                adapter_name=self.lora_adapter_name,
                chunked_ce=self.chunked_ce,
            )
            self.__dict__["_lora_controller"] = controller
        return controller

    @property
    def lora_model(self) -> nn.Module:
        """The adapted backbone."""
        return self.lora_controller.require_injected(self)

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.lora_controller.setup(self.trainer, self, check_checkpoints=False)  # on_load_checkpoint below checks

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.lora_controller.check_optimizers(self.trainer, self)
        self.lora_controller.log_summary(self)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.lora_controller.warn_if_eval_mode(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.lora_controller.filter_checkpoint(checkpoint, self)

    @property
    def strict_loading(self) -> bool:
        # Adapter-only checkpoints lack the frozen backbone by design; ``load_from_checkpoint`` reads this
        # before any hook runs, so it cannot wait for ``setup``. An explicit value wins.
        explicit = getattr(self, "_strict_loading", None)
        return (not self.adapter_only_checkpoint) if explicit is None else explicit

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        self._strict_loading = value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.lora_controller.maybe_inject(self)  # load_from_checkpoint never runs setup: inject now if the backbone exists
        self.lora_controller.validate_checkpoint(checkpoint, self)
        super().on_load_checkpoint(checkpoint)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.lora_controller.handle_nonfinite_gradients(self.trainer, self, optimizer)

    # -- user API --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (LoRA, and biases / modules_to_save per config), for the optimizer."""
        return trainable_parameters(self)

    def save_adapter(
        self,
        directory: str | os.PathLike,
        serving_targets: list[str] | None = None,
        strict_serving: bool = False,
        vllm_max_lora_rank: int = 16,
        convert_to_lora: bool = False,
    ) -> Path:
        """Write the trained adapter in PEFT's format (gathered across ranks under FSDP; written by rank zero).

        ``serving_targets`` ('vllm', 'llama.cpp'): first say which will refuse or mis-scale it (``strict_serving``: raise).
        ``convert_to_lora``: a PiSSA / OLoRA adapter as plain LoRA on the original base (``save_adapter``'s option).
        """
        require_path_argument(directory, "directory")  # on every rank, before the gather: not only where it writes
        options = serving_options(serving_targets, strict_serving, vllm_max_lora_rank)
        trainer = getattr(self, "_trainer", None)
        tensors = strategies.gather_adapter_state_dict(trainer, self.lora_model)
        if trainer is not None and not trainer.is_global_zero:
            return Path(directory)
        return save_adapter(self.lora_model, directory, state_dict=tensors, convert_to_lora=convert_to_lora, **options)

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
        """Load a saved adapter (ours or PEFT's) into the backbone, all or nothing; injects LoRA first if needed.

        ``adapter_name``: load it as that adapter (added frozen beside the others), see ``adapter_io.load_adapter``.
        """
        module = self.lora_controller.backbone_of(self)
        if module is None:
            raise RuntimeError(f"`self.{self.lora_backbone}` is not built yet: call load_adapter after the backbone exists.")
        return load_adapter(module, directory, adapter_name=adapter_name)

    def merge_lora(self) -> nn.Module:
        return merge_lora(self.lora_model)

    def unmerge_lora(self) -> nn.Module:
        return unmerge_lora(self.lora_model)
