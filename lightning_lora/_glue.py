"""What LoRACallback and LoRAMixin share: when to inject, what a checkpoint holds, how resume is checked.

Lightning's order in ``fit`` (2.6): Callback.setup -> LightningModule.setup -> configure_model ->
(single device / DDP: restore the checkpoint's model state) -> strategy.setup (move, wrap) ->
configure_optimizers -> on_fit_start. Injection must land before the strategy wraps the model and
before the optimizer is built, whichever of __init__, setup or configure_model built the backbone.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

import lightning_lora
from lightning_lora import distributed
from lightning_lora.adapter_io import adapter_state_dict, save_adapter
from lightning_lora.checkpoint_io import install_atomic_checkpoint_io
from lightning_lora.compiling import compile_blocks
from lightning_lora.config import LoRAConfig, QuantizationConfig
from lightning_lora.inject import backbone_fingerprint, inject_lora, lora_state, parameter_summary
from lightning_lora.layers import LoRALinear

CHECKPOINT_KEY = "lightning_lora"
# LoRAConfig fields that change which tensors exist or what they compute; dropout and init do not.
_SHAPE_FIELDS = ("r", "alpha", "target_modules", "exclude_modules", "bias", "modules_to_save", "use_rslora", "rank_pattern", "alpha_pattern")


class LoRAController:
    """Plain-Python logic behind the Lightning hooks, so the callback and the mixin behave alike."""

    def __init__(
        self,
        lora_config: LoRAConfig,
        quantization_config: QuantizationConfig | None = None,
        backbone: str | None = None,
        adapter_only_checkpoint: bool = True,
        skip_nonfinite: bool = True,
        max_nonfinite_steps: int = 10,
        compile_blocks: bool | list[str] = False,
    ) -> None:
        if not isinstance(compile_blocks, bool) and not (
            isinstance(compile_blocks, (list, tuple)) and compile_blocks and all(isinstance(c, str) for c in compile_blocks)
        ):
            raise ValueError(
                f"`compile_blocks` must be True, False or a list of block class names, got {compile_blocks!r}. "
                "Pass True to compile the model's decoder layers, or e.g. ['LlamaDecoderLayer']."
            )
        if backbone is not None and (not isinstance(backbone, str) or not backbone):
            raise ValueError(f"`backbone` must be the name of a LightningModule attribute (e.g. 'model') or None, got {backbone!r}.")
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"`max_nonfinite_steps` must be a positive integer, got {max_nonfinite_steps!r}; set it to e.g. 10.")
        self.lora_config = lora_config
        self.quantization_config = quantization_config
        self.backbone = backbone
        self.adapter_only_checkpoint = adapter_only_checkpoint
        self.skip_nonfinite = skip_nonfinite
        self.max_nonfinite_steps = max_nonfinite_steps
        self.compile_blocks = list(compile_blocks) if isinstance(compile_blocks, (list, tuple)) else compile_blocks
        self.nonfinite_streak = 0
        self.skipped_steps = 0

    # -- Lightning's setup -----------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: nn.Module, check_checkpoints: bool) -> None:
        """Everything both front ends do in ``setup``. ``check_checkpoints`` wraps the module's
        ``on_load_checkpoint`` so checkpoints are validated before any weight loads (the mixin
        overrides that hook itself instead)."""
        device = trainer.strategy.root_device
        kind = distributed.strategy_kind(trainer)
        install_atomic_checkpoint_io(trainer.strategy)  # no torn last.ckpt when the run is killed mid-write
        if self.adapter_only_checkpoint:
            pl_module.strict_loading = False  # the checkpoint lacks the frozen backbone by design
        if not self.maybe_inject(pl_module, device):
            run_after(pl_module, "configure_model", lambda *_: self.inject_after_configure_model(pl_module, device))
        if check_checkpoints:
            run_before(pl_module, "on_load_checkpoint", lambda checkpoint: self.validate_checkpoint(checkpoint, pl_module))
        if kind == "fsdp":
            pl_module.configure_gradient_clipping = functools.partial(fsdp_safe_clipping, trainer, pl_module)
        if self.adapter_only_checkpoint and kind in ("fsdp", "fsdp2"):
            distributed.allow_adapter_only_sharded_load(trainer.strategy, lambda: self.adapter_keys(pl_module))
        if kind == "fsdp2":
            # After configure_model sharded the model and the precision plugin converted it, before any step.
            run_before(pl_module, "configure_optimizers", lambda *_: distributed.check_fsdp2_keeps_4bit_bytes(pl_module))

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

    def prefix(self) -> str:
        return "" if self.backbone is None else self.backbone + "."

    def ready_to_inject(self, pl_module: nn.Module) -> bool:
        module = self.backbone_of(pl_module)
        if module is None or lora_state(module) is not None:
            return False
        params = list(module.parameters())
        return bool(params) and not any(p.is_meta for p in params)

    def maybe_inject(self, pl_module: nn.Module, device: torch.device | None = None) -> bool:
        """Inject if the backbone exists and has weights; returns whether LoRA is in place afterwards."""
        if self.ready_to_inject(pl_module):
            module = self.backbone_of(pl_module)
            quantization = self.quantization_config
            if quantization is not None:
                distributed.check_quantization_for_strategy(quantization, pl_module)
            # A backbone quantized already (e.g. by lightning_lora.loading) is wrapped as it is.
            planned = None if _already_quantized(module) else quantization
            distributed.check_precision_keeps_4bit_bytes(getattr(pl_module, "_trainer", None), module, planned)
            inject_lora(module, self.lora_config, planned, device=device)
            lora_state(module).quantization = quantization
            if self.compile_blocks:
                # After injection, before the strategy wraps the model: the compiled blocks hold the LoRA layers.
                names = compile_blocks(module, None if self.compile_blocks is True else self.compile_blocks)
                rank_zero_info(f"lightning_lora: compiled {len(names)} blocks ({type(module.get_submodule(names[0])).__name__}).")
        module = self.backbone_of(pl_module)
        return module is not None and lora_state(module) is not None

    def inject_after_configure_model(self, pl_module: nn.Module, device: torch.device | None) -> None:
        """The last chance before the strategy wraps the model and the optimizer is built."""
        self.maybe_inject(pl_module, device)
        self.require_injected(pl_module)

    def require_injected(self, pl_module: nn.Module) -> nn.Module:
        module = self.backbone_of(pl_module)
        if module is None or lora_state(module) is None:
            where = f"`self.{self.backbone}`" if self.backbone else "the LightningModule"
            raise RuntimeError(
                f"LoRA was never injected: {where} had no materialized weights in setup() or after configure_model(). "
                "Build the backbone in __init__, setup or configure_model, and set `backbone` to its attribute name."
            )
        return module

    # -- optimizer ---------------------------------------------------------------------------
    def check_optimizers(self, trainer: Any, pl_module: nn.Module) -> None:
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
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

    # -- checkpoints -------------------------------------------------------------------------
    def metadata(self, pl_module: nn.Module) -> dict[str, Any]:
        module = self.require_injected(pl_module)
        state = lora_state(module)
        return {
            "version": lightning_lora.__version__,
            "backbone": self.backbone,
            "adapter_only": self.adapter_only_checkpoint,
            "lora_config": state.config.to_dict(),
            "quantization": state.quantization.to_dict() if state.quantization else None,
            "fingerprint": state.fingerprint or backbone_fingerprint(module),
        }

    def adapter_keys(self, pl_module: nn.Module) -> set[str]:
        return {self.prefix() + key for key in adapter_state_dict(self.require_injected(pl_module))}

    def filter_checkpoint(self, checkpoint: dict[str, Any], pl_module: nn.Module) -> None:
        """Keep the adapter (and whatever lives outside the backbone) in ``checkpoint['state_dict']``."""
        checkpoint[CHECKPOINT_KEY] = self.metadata(pl_module)
        if not self.adapter_only_checkpoint or "state_dict" not in checkpoint:
            return
        keys = self.adapter_keys(pl_module)
        prefix = self.prefix()
        state_dict = checkpoint["state_dict"]
        kept = {k: v for k, v in state_dict.items() if k in keys or (prefix and not k.startswith(prefix))}
        if self.skip_nonfinite:
            bad = [k for k in keys if k in kept and isinstance(kept[k], torch.Tensor) and not torch.isfinite(kept[k]).all()]
            if bad:
                raise RuntimeError(f"Refusing to write a checkpoint with non-finite adapter weights (first: {bad[0]!r}).")
        checkpoint["state_dict"] = type(state_dict)(kept) if isinstance(state_dict, dict) else kept

    def validate_checkpoint(self, checkpoint: dict[str, Any], pl_module: nn.Module) -> None:
        """Raise before any weight is loaded if ``checkpoint`` was made for another backbone or LoRA config."""
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            if self.adapter_only_checkpoint:
                raise ValueError(
                    "The checkpoint has no lightning_lora metadata: it was not written with LoRACallback/LoRAMixin, so "
                    "its adapter cannot be checked. Resume from a checkpoint written by a LoRA run, or start without ckpt_path."
                )
            return
        current = self.metadata(pl_module)
        if meta["fingerprint"] != current["fingerprint"]:
            raise ValueError(
                f"The checkpoint was written for another backbone (fingerprint {meta['fingerprint']} vs this model's "
                f"{current['fingerprint']}: module names or shapes differ). Resume with the same base model architecture."
            )
        for field in _SHAPE_FIELDS:
            saved, now = meta["lora_config"].get(field), current["lora_config"].get(field)
            if saved != now:
                raise ValueError(
                    f"The checkpoint was written with LoRA `{field}`={saved!r}, this run has `{field}`={now!r}. "
                    f"Set `{field}`={saved!r} to resume it, or start a new run without ckpt_path."
                )
        saved_q = (meta.get("quantization") or {}).get("mode")
        now_q = (current.get("quantization") or {}).get("mode")
        if saved_q != now_q:
            raise ValueError(f"The checkpoint was trained on a {saved_q or 'full-precision'} backbone, this run quantizes to {now_q or 'nothing'}: set the same quantization to resume.")
        state_dict = checkpoint.get("state_dict", {})
        expected = self.adapter_keys(pl_module)
        missing = sorted(expected - set(state_dict))
        if missing and not distributed.is_sharded_checkpoint(checkpoint):
            raise ValueError(f"The checkpoint lacks {len(missing)} adapter tensors (first: {missing[0]!r}); it is incomplete or corrupted.")
        own = dict(pl_module.named_parameters())
        for key in sorted(expected & set(state_dict)):
            value = state_dict[key]
            if key in own and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(own[key].shape) and not distributed.is_sharded_param(own[key]):
                raise ValueError(f"Checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}.")

    # -- training-time safety ------------------------------------------------------------------
    def handle_nonfinite_gradients(self, trainer: Any, pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients when any is NaN/Inf; stop after ``max_nonfinite_steps`` in a row."""
        if not self.skip_nonfinite:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # One device->host sync per step, not one per tensor: a NaN/Inf anywhere makes that tensor's norm non-finite.
        norms = torch._foreach_norm([p.grad for p in params]) if params else []
        local_bad = bool(norms) and not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if not bad:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.skipped_steps += 1
        for p in params:
            p.grad = None  # the optimizer skips parameters without gradients: the weights stay finite
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite_streak} optimizer steps in a row had NaN/Inf gradients (global step {trainer.global_step}); "
                "stopping. Lower the learning rate, enable gradient clipping (gradient_clip_val), or check the data."
            )
        rank_zero_warn(f"Skipped optimizer step at global step {trainer.global_step}: NaN/Inf gradients ({self.nonfinite_streak} in a row).")

    # -- export --------------------------------------------------------------------------------
    def export(self, trainer: Any, pl_module: nn.Module, export_dir: str | os.PathLike, merge: bool) -> Path | None:
        """Write the PEFT-format adapter (and merged weights when asked) from rank zero; every rank gathers."""
        module = self.require_injected(pl_module)
        tensors = distributed.gather_adapter_state_dict(trainer, module)
        if not trainer.is_global_zero:
            return None
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise RuntimeError(f"Refusing to export an adapter with non-finite weights (first: {bad[0]!r}); nothing was written.")
        export_dir = Path(export_dir)
        save_adapter(module, export_dir / "adapter", state_dict=tensors)
        if merge:
            from lightning_lora.export import save_merged

            save_merged(module, export_dir / "merged")
        return export_dir


def _already_quantized(module: nn.Module) -> bool:
    from lightning_lora.quantization import is_quantized

    return any(is_quantized(m) for m in module.modules())


def fsdp_safe_clipping(trainer: Any, pl_module: nn.Module, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
    """``configure_gradient_clipping`` for FSDP: norm clipping through the FSDP root instead of FSDPPrecision."""
    if not gradient_clip_val:
        return
    if str(gradient_clip_algorithm) in ("norm", "GradClipAlgorithmType.NORM"):
        distributed.clip_grad_norm(trainer, pl_module, float(gradient_clip_val))
    else:
        pl_module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def run_after(obj: Any, name: str, extra: Any) -> None:
    """Make ``obj.name(...)`` call ``extra(...)`` after the original; once per instance.

    Deliberately not ``functools.wraps``: Lightning unwraps ``__wrapped__`` to decide whether a hook is
    overridden, and must see this one as overridden so that it calls it.
    """
    _wrap(obj, name, extra, after=True)


def run_before(obj: Any, name: str, extra: Any) -> None:
    """Make ``obj.name(...)`` call ``extra(...)`` before the original; once per instance."""
    _wrap(obj, name, extra, after=False)


def _wrap(obj: Any, name: str, extra: Any, after: bool) -> None:
    original = getattr(obj, name)
    if getattr(original, "_lightning_lora_wrapped", False):
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not after:
            extra(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            extra(*args, **kwargs)
        return result

    wrapper._lightning_lora_wrapped = True
    wrapper.__name__ = name
    setattr(obj, name, wrapper)
