"""What LoRACallback and LoRAMixin share: when to inject, and which check runs at which hook.

Lightning's order in ``fit`` (2.6): Callback.setup -> LightningModule.setup -> configure_model ->
(single device / DDP: restore the checkpoint's model state) -> strategy.setup (move, wrap) ->
configure_optimizers -> on_fit_start. Injection must land before the strategy wraps the model and
before the optimizer is built, whichever of __init__, setup or configure_model built the backbone.

The jobs themselves live next door: ``checkpoints`` (what a checkpoint holds, resume checks),
``guards`` (non-finite steps), ``strategies`` (what differs per strategy), ``patches`` (every
change to the user's module and Lightning's objects).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_lora import lora_plus, serving
from lightning_lora._io import atomic_directory
from lightning_lora.adapter_io import save_adapter
from lightning_lora.adapters import add_adapter, set_active_adapter
from lightning_lora.chunked_loss import check_chunk_size, chunked_loss_size, enable_chunked_loss
from lightning_lora.compiling import compile_blocks
from lightning_lora.config import LoRAConfig, QuantizationConfig
from lightning_lora.inject import inject_lora, lora_state, parameter_summary, trainable_parameters
from lightning_lora.layers import DEFAULT_ADAPTER, LoRALinear, check_adapter_name
from lightning_lora.lightning import checkpoints, guards, patches, strategies
from lightning_lora.quantization import is_quantized


def serving_options(serving_targets: Any, strict_serving: Any, vllm_max_lora_rank: Any) -> dict[str, Any]:
    """``save_adapter``'s serving keywords, validated when the callback or mixin is configured (not at export time)."""
    if not isinstance(strict_serving, bool):
        raise TypeError(f"`strict_serving` must be True or False, got {strict_serving!r}.")
    return {
        "serving_targets": list(serving.check_serving_targets(serving_targets)) or None,
        "strict_serving": strict_serving,
        "vllm_max_lora_rank": serving.check_max_lora_rank(vllm_max_lora_rank),
    }


class LoRAController:
    """Plain-Python logic behind the Lightning hooks, so the callback and the mixin behave alike."""

    def __init__(
        self,
        lora_config: LoRAConfig | None,
        quantization_config: QuantizationConfig | None = None,
        backbone: str | None = None,
        adapter_only_checkpoint: bool = True,
        skip_nonfinite: bool = True,
        max_nonfinite_steps: int = 10,
        compile_blocks: bool | list[str] = False,
        *,
        lora_plus_ratio: float | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        chunked_ce: int = 0,
    ) -> None:
        check_adapter_name(adapter_name)
        check_chunk_size(chunked_ce, "chunked_ce", allow_off=True)
        if not isinstance(compile_blocks, bool) and not (
            isinstance(compile_blocks, (list, tuple)) and compile_blocks and all(isinstance(c, str) for c in compile_blocks)
        ):
            raise ValueError(
                f"`compile_blocks` must be True, False or a list of block class names, got {compile_blocks!r}. "
                "Pass True to compile the model's decoder layers, or e.g. ['LlamaDecoderLayer']."
            )
        if backbone is not None and (not isinstance(backbone, str) or not backbone):
            raise ValueError(f"`backbone` must be the name of a LightningModule attribute (e.g. 'model') or None, got {backbone!r}.")
        for name, value in (("adapter_only_checkpoint", adapter_only_checkpoint), ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}.")
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"`max_nonfinite_steps` must be a positive integer, got {max_nonfinite_steps!r}; set it to e.g. 10.")
        self.lora_config = lora_config
        self.quantization_config = quantization_config
        self.backbone = backbone
        self.adapter_only_checkpoint = adapter_only_checkpoint
        self.skip_nonfinite = skip_nonfinite
        self.max_nonfinite_steps = max_nonfinite_steps
        self.compile_blocks = list(compile_blocks) if isinstance(compile_blocks, (list, tuple)) else compile_blocks
        self.adapter_name = adapter_name
        self.chunked_ce = chunked_ce
        self.guard = guards.NonFiniteGuard(skip_nonfinite, max_nonfinite_steps)
        self.lora_plus_ratio = None if lora_plus_ratio is None else lora_plus.check_lr_ratio(lora_plus_ratio)

    # -- Lightning's setup -----------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: nn.Module, check_checkpoints: bool) -> None:
        """Everything both front ends do in ``setup``. ``check_checkpoints`` wraps the module's
        ``on_load_checkpoint`` so checkpoints are validated before any weight loads (the mixin
        overrides that hook itself instead)."""
        device = trainer.strategy.root_device
        checkpoints.install_atomic_checkpoint_io(trainer.strategy)  # no torn last.ckpt when the run is killed mid-write
        if self.adapter_only_checkpoint:
            pl_module.strict_loading = False  # the checkpoint lacks the frozen backbone by design
        if not self.maybe_inject(pl_module, device):
            patches.run_after(pl_module, "configure_model", lambda *_: self.inject_after_configure_model(pl_module, device))
        if check_checkpoints:
            patches.run_before(pl_module, "on_load_checkpoint", lambda checkpoint: self.validate_checkpoint(checkpoint, pl_module))
        if self.lora_plus_ratio is not None:
            # Split the groups as the user's optimizer is built, so its schedulers and checkpoints see the final groups.
            ratio = self.lora_plus_ratio
            patches.run_inside(
                pl_module, "configure_optimizers", lambda: patches.lora_plus_groups(lora_plus.b_side_parameters(pl_module), ratio), purpose="lora_plus"
            )
        adapter_keys = (lambda: self.adapter_keys(pl_module)) if self.adapter_only_checkpoint else None
        # Strategies that do not read through the checked reader (FSDP, a custom CheckpointIO) get the file checked first.
        reads_checked = isinstance(getattr(trainer.strategy, "_checkpoint_io", None), checkpoints.AtomicCheckpointIO)
        check_file = None if reads_checked and strategies.writes_single_file_checkpoints(trainer.strategy) else checkpoints.check_checkpoint
        strategies.install(trainer, pl_module, adapter_keys, check_file)

    # -- injection -----------------------------------------------------------------------------
    def backbone_of(self, pl_module: nn.Module) -> nn.Module | None:
        if self.backbone is None:
            return pl_module
        if self.backbone.split(".")[0] not in dir(pl_module) and not hasattr(pl_module, self.backbone.split(".")[0]):
            raise ValueError(
                f"`backbone`={self.backbone!r} is not an attribute of {type(pl_module).__name__}. "
                "Name the attribute that holds the model to adapt (e.g. 'model'), or None for the whole module."
            )
        module = pl_module
        for part in self.backbone.split("."):
            module = getattr(module, part, None)
            if module is None:
                return None  # not built yet: configure_model will build it
        if not isinstance(module, nn.Module):
            raise ValueError(f"`backbone`={self.backbone!r} names a {type(module).__name__}, not a torch.nn.Module.")
        return module

    def ready_to_inject(self, pl_module: nn.Module) -> bool:
        module = self.backbone_of(pl_module)
        if module is None:
            return False
        state = lora_state(module)
        if state is not None and self.adapter_name in state.plans:
            self.adopt_or_check(state)
            return False
        if state is not None and self.lora_config is None:
            raise ValueError(
                f"LoRACallback(from_backbone=True) takes adapter {self.adapter_name!r} from the backbone, which has adapters "
                f"{list(state.plans)}: set `adapter_name` to one of them."
            )
        if self.lora_config is None:
            return False  # from_backbone: the backbone must come with LoRA (configure_model may still build it)
        params = list(module.parameters())
        return bool(params) and not any(p.is_meta for p in params)

    def maybe_inject(self, pl_module: nn.Module, device: torch.device | None = None) -> bool:
        """Inject if the backbone exists and has weights; returns whether LoRA is in place afterwards."""
        if self.ready_to_inject(pl_module):
            module = self.backbone_of(pl_module)
            quantization = self.quantization_config
            strategies.check_lora_config(self.lora_config, pl_module)
            if quantization is not None:
                strategies.check_quantization(quantization, pl_module)
            # A backbone quantized already (e.g. by lightning_lora.loading) is wrapped as it is.
            already_quantized = any(is_quantized(m) for m in module.modules())
            planned = None if already_quantized else quantization
            strategies.check_precision_keeps_4bit_bytes(getattr(pl_module, "_trainer", None), module, planned)
            if lora_state(module) is not None:
                # The backbone has other adapters already (e.g. loaded by the user): this one is added, and trains.
                add_adapter(module, self.adapter_name, self.lora_config)
                set_active_adapter(module, self.adapter_name)
            else:
                inject_lora(module, self.lora_config, planned, device=device, adapter_name=self.adapter_name)
                lora_state(module).quantization = quantization
            if self.compile_blocks:
                # After injection, before the strategy wraps the model: the compiled blocks hold the LoRA layers.
                names = compile_blocks(module, None if self.compile_blocks is True else self.compile_blocks)
                rank_zero_info(f"lightning_lora: compiled {len(names)} blocks ({type(module.get_submodule(names[0])).__name__}).")
        module = self.backbone_of(pl_module)
        if module is None or not self._has_adapter(module):
            return False
        if lora_state(module).active != self.adapter_name:
            set_active_adapter(module, self.adapter_name)  # it was loaded by the user: this run trains it
        if self.chunked_ce and chunked_loss_size(module) != self.chunked_ce:
            enable_chunked_loss(module, self.chunked_ce)  # the user's `model(..., labels=...)` never forms the logits
        return True

    def _has_adapter(self, module: nn.Module) -> bool:
        state = lora_state(module)
        return state is not None and self.adapter_name in state.plans

    def adopt_or_check(self, state: Any) -> None:
        """A backbone that came with LoRA (e.g. from ``sharded_loading.build_lora_model``): take its configs (no config
        of our own, i.e. ``from_backbone``) or refuse it when they differ from ours."""
        config = state.plans[self.adapter_name].config  # the adapter this run trains
        if self.lora_config is None:
            self.lora_config = config
            self.quantization_config = self.quantization_config or state.quantization
            return
        for name, mine, theirs in (("LoRA", self.lora_config, config), ("quantization", self.quantization_config, state.quantization)):
            if mine is None or theirs is None or mine == theirs:
                continue
            field = next(f for f in mine.to_dict() if getattr(mine, f) != getattr(theirs, f))
            raise ValueError(
                f"The backbone already has LoRA, built with {name} `{field}`={getattr(theirs, field)!r}, but this "
                f"LoRACallback/LoRAMixin has `{field}`={getattr(mine, field)!r}. Pass the same config to both, or use "
                "LoRACallback(from_backbone=True) to take the backbone's."
            )

    def inject_after_configure_model(self, pl_module: nn.Module, device: torch.device | None) -> None:
        """The last chance before the strategy wraps the model and the optimizer is built."""
        self.maybe_inject(pl_module, device)
        self.require_injected(pl_module)

    def require_injected(self, pl_module: nn.Module) -> nn.Module:
        module = self.backbone_of(pl_module)
        if module is None or not self._has_adapter(module):
            where = f"`self.{self.backbone}`" if self.backbone else "the LightningModule"
            if self.lora_config is None:
                raise RuntimeError(
                    f"LoRACallback(from_backbone=True) expects {where} to come with LoRA in it after configure_model(), but it has "
                    "none. Build it with lightning_lora.sharded_loading.build_lora_model, or give the callback a LoRA config."
                )
            raise RuntimeError(
                f"LoRA was never injected: {where} had no materialized weights in setup() or after configure_model(). "
                "Build the backbone in __init__, setup or configure_model, and set `backbone` to its attribute name."
            )
        return module

    # -- fit start -----------------------------------------------------------------------------
    def check_optimizers(self, trainer: Any, pl_module: nn.Module) -> None:
        trainable = {id(p) for p in trainable_parameters(pl_module)}
        for index, optimizer in enumerate(trainer.optimizers):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if params and not any(id(p) in trainable for p in params):
                raise ValueError(
                    f"Optimizer {index} ({type(optimizer).__name__}) holds {len(params)} parameters and none of them trains: "
                    "it was built from frozen weights, or before LoRA was injected. In configure_optimizers, pass "
                    "`[p for p in self.parameters() if p.requires_grad]` (or `lightning_lora.trainable_parameters(self)`)."
                )
            frozen = [p for p in params if id(p) not in trainable]
            if frozen:
                rank_zero_warn(
                    f"Optimizer {index} holds {len(frozen)} frozen parameters ({sum(p.numel() for p in frozen):,} elements). "
                    "They never update; pass only `[p for p in self.parameters() if p.requires_grad]` to keep the "
                    "optimizer small."
                )
        self.check_lora_plus(trainer, pl_module)

    def check_lora_plus(self, trainer: Any, pl_module: nn.Module) -> None:
        """Raise if LoRA+ was asked for but an optimizer's B matrices do not train at ``lora_plus_ratio`` x its lr."""
        if self.lora_plus_ratio is None:
            return
        problems = lora_plus.groups_missing_ratio(trainer.optimizers, lora_plus.b_side_parameters(pl_module), self.lora_plus_ratio)
        if problems:
            raise ValueError(
                f"`lora_plus_ratio`={self.lora_plus_ratio!r} is not in effect: {'; '.join(problems)}. Build the optimizer "
                "with torch.optim classes inside configure_optimizers, pass per-group max_lr lists to OneCycleLR/CyclicLR, "
                "or build the groups yourself with lightning_lora.lora_plus_param_groups."
            )

    def warn_if_eval_mode(self, pl_module: nn.Module) -> None:
        """Lightning keeps the train/eval mode it finds; ``from_pretrained`` returns eval mode (dropout off)."""
        module = self.require_injected(pl_module)
        frozen_in_eval = [name for name, m in module.named_modules() if isinstance(m, LoRALinear) and not m.training]
        if frozen_in_eval:
            rank_zero_warn(
                f"{len(frozen_in_eval)} LoRA layers are in eval mode as training starts (first: {frozen_in_eval[0]!r}), so "
                "dropout is off. Models from `from_pretrained` come in eval mode: call `.train()` on the backbone after loading."
            )

    def log_summary(self, pl_module: nn.Module) -> str:
        summary = parameter_summary(self.require_injected(pl_module))
        rank_zero_info(f"lightning_lora: {summary}")
        return summary

    # -- checkpoints (see checkpoints.py) ------------------------------------------------------------
    def metadata(self, pl_module: nn.Module) -> dict[str, Any]:
        return checkpoints.checkpoint_metadata(self.require_injected(pl_module), self.backbone, self.adapter_only_checkpoint, self.lora_plus_ratio)

    def adapter_keys(self, pl_module: nn.Module) -> set[str]:
        return checkpoints.adapter_keys(self.require_injected(pl_module), self.backbone)

    def filter_checkpoint(self, checkpoint: dict[str, Any], pl_module: nn.Module) -> None:
        checkpoints.filter_checkpoint(
            checkpoint,
            self.require_injected(pl_module),
            backbone=self.backbone,
            adapter_only=self.adapter_only_checkpoint,
            refuse_nonfinite=self.skip_nonfinite,
            lora_plus_ratio=self.lora_plus_ratio,
        )

    def validate_checkpoint(self, checkpoint: dict[str, Any], pl_module: nn.Module) -> None:
        checkpoints.validate_checkpoint(
            checkpoint,
            self.require_injected(pl_module),
            pl_module,
            backbone=self.backbone,
            adapter_only=self.adapter_only_checkpoint,
            lora_plus_ratio=self.lora_plus_ratio,
        )

    def restore(self, pl_module: nn.Module, path: str | os.PathLike, parameter: str = "ckpt_path") -> None:
        """Load a checkpoint file of a LoRA run into ``pl_module`` (LoRA injected) outside ``Trainer.fit``: the checked
        reader, the resume checks, then the weights (``lightning-lora export`` does this)."""
        checkpoint = checkpoints.load_checkpoint(path, parameter=parameter)
        if "state_dict" not in checkpoint:
            raise checkpoints.CheckpointError(f"`{parameter}`={str(path)!r} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt written by `fit`.")
        self.validate_checkpoint(checkpoint, pl_module)
        result = pl_module.load_state_dict(checkpoint["state_dict"], strict=False)
        if result.unexpected_keys:
            raise checkpoints.CheckpointError(
                f"`{parameter}`={str(path)!r} holds {len(result.unexpected_keys)} tensors this model lacks "
                f"(first: {result.unexpected_keys[0]!r}); pass the config it was trained with."
            )

    # -- training steps (see guards.py) ------------------------------------------------------------
    def handle_nonfinite_gradients(self, trainer: Any, pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.guard.check_gradients(trainer, optimizer)

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.guard.skipped = value

    @property
    def nonfinite_streak(self) -> int:
        return self.guard.streak

    # -- export --------------------------------------------------------------------------------
    def export(
        self, trainer: Any, pl_module: nn.Module, export_dir: str | os.PathLike, merge: bool,
        serving_options: dict[str, Any] | None = None, convert_init: bool = False,
    ) -> Path | None:
        """Write the PEFT-format adapter (and merged weights when asked) from rank zero; every rank gathers.

        ``export_dir`` changes as a whole: ``adapter/`` and ``merged/`` come from the same weights, and a
        run that fails or is killed while exporting leaves the previous export as it was.
        ``serving_options``: ``save_adapter``'s serving_targets / strict_serving / vllm_max_lora_rank.
        ``convert_init``: also write ``export_dir/adapter_converted``, the PiSSA / OLoRA adapter as plain LoRA on the
        original base (``save_adapter(..., convert_to_lora=True)``).
        """  # fmt: skip
        module = self.require_injected(pl_module)
        tensors = strategies.gather_adapter_state_dict(trainer, module)
        if not trainer.is_global_zero:
            return None
        with atomic_directory(export_dir, owned=("adapter", "adapter_converted", "merged"), parameter="export_dir") as tmp:
            save_adapter(module, tmp / "adapter", state_dict=tensors, **(serving_options or {}))
            if convert_init:
                save_adapter(module, tmp / "adapter_converted", state_dict=tensors, convert_to_lora=True, **(serving_options or {}))
            if merge:
                from lightning_lora.export import save_merged

                save_merged(module, tmp / "merged")
        return Path(export_dir)
