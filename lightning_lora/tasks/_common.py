"""What both tasks share: building a transformers model from a path or a config dict, argument checks,
and AdamW over the trainable parameters with an optional linear warmup / decay."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from lightning_lora.tasks._paths import resolve_path

LRSchedule = Literal["constant", "linear"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_arg(model: Any) -> None:
    if model is None or isinstance(model, dict):
        if isinstance(model, dict) and not isinstance(model.get("model_type"), str):
            raise ValueError(
                f"`model` is a config dict without a 'model_type' key: {model!r}. Add one, e.g. "
                "{'model_type': 'llama', 'hidden_size': 64, ...}, or pass a local model directory."
            )
        return
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"`model` must be a local model directory, a 'pkg://' path or a config dict with 'model_type', got {model!r}."
        )


def check_config_overrides(config_overrides: Any) -> None:
    if config_overrides is not None and (
        not isinstance(config_overrides, dict) or not all(isinstance(k, str) for k in config_overrides)
    ):
        raise TypeError(
            f"`config_overrides` must be a dict of transformers config fields, e.g. {{'hidden_dropout_prob': 0.0}}, got {config_overrides!r}."
        )


def check_hparams(lr: float, weight_decay: float, warmup_steps: int, lr_schedule: str, torch_dtype: str | None) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"`lr` must be a positive number, got {lr!r}. LoRA typically uses 1e-4 to 1e-3.")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be a number >= 0, got {weight_decay!r}. Use 0.0 to disable it.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}. Use 0 for no warmup.")
    if lr_schedule not in ("constant", "linear"):
        raise ValueError(f"`lr_schedule` must be 'constant' or 'linear', got {lr_schedule!r}.")
    if torch_dtype is not None and torch_dtype not in _DTYPES:
        raise ValueError(
            f"`torch_dtype` must be one of {sorted(_DTYPES)} or None (keep the checkpoint's dtype), got {torch_dtype!r}."
        )


def build_hf_model(
    auto_class: type,
    model: str | os.PathLike | dict[str, Any],
    *,
    torch_dtype: str | None,
    attn_implementation: str | None,
    init_seed: int,
    **config_overrides: Any,
) -> nn.Module:
    """``auto_class`` loaded from a local directory (never the hub), or built with random weights from a config dict.

    Random weights come from ``init_seed`` on a private RNG stream, so the same dict gives the same model in
    every process and every run (an exported adapter can be matched to its base); the global RNG is untouched.
    """
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["dtype"] = _DTYPES[torch_dtype]
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(model, dict):
        fields = dict(model)
        config = AutoConfig.for_model(fields.pop("model_type"), **{**fields, **config_overrides})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            built = auto_class.from_config(config, **kwargs)
    else:
        path = resolve_path(str(model))
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"`model`={str(model)!r} is not a local directory. Pass the folder holding config.json and the weights "
                "(models are never downloaded), a 'pkg://<package>/<dir>' path, or a config dict with 'model_type'."
            )
        built = auto_class.from_pretrained(path, local_files_only=True, **kwargs, **config_overrides)
    # from_pretrained returns eval mode, and Lightning keeps module modes as it finds them: without this the
    # model would train with dropout off (and bitsandbytes' CPU 4-bit layers would take their inference path).
    return built.train()


def build_backbone(module: Any, auto_class: Any, **config_fields: Any) -> nn.Module:
    """Build ``module.hparams.model`` with ``auto_class`` (e.g. AutoModelForCausalLM), as the task's hparams say."""
    hp = module.hparams
    if hp.model is None:
        raise ValueError(
            f"{type(module).__name__} got `model`=None and no backbone was assigned to `.model`: pass a local "
            "model directory or a config dict with 'model_type'."
        )
    model = build_hf_model(
        auto_class,
        hp.model,
        torch_dtype=hp.torch_dtype,
        attn_implementation=hp.attn_implementation,
        init_seed=hp.init_seed,
        **{**(hp.config_overrides or {}), **config_fields},
    )
    if hp.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing: the reentrant variant gives LoRA no gradients when the embedding
    # is frozen (transformers #26221), which is always the case here.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # the KV cache is useless in training and warns under checkpointing


def configure_adamw(module: Any, lr: float, weight_decay: float, warmup_steps: int, lr_schedule: str) -> Any:
    """AdamW over ``module``'s trainable parameters (run after LoRA froze the rest), with an optional schedule.

    Weight decay applies to matrices only (LoRA A/B, a saved head's weight), not to biases and norms.
    'linear' warms up over ``warmup_steps`` then decays to 0 at ``trainer.estimated_stepping_batches``;
    'constant' warms up then stays at ``lr``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(module).__name__} has no trainable parameters, so there is nothing to optimize. Check that "
            "LoRACallback's target_modules match layers of the model, or unfreeze something."
        )
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    if lr_schedule == "constant" and warmup_steps == 0:
        return optimizer
    total_steps = _total_steps(module.trainer) if lr_schedule == "linear" else None

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps is None or step == 0:
            return 1.0  # constant; or the first step of a warmup-free decay, (total - 0) / total whatever total is
        total = total_steps()
        return max(0.0, (total - step) / max(1, total - warmup_steps))

    # A plain function (not a callable object), so LambdaLR's state_dict does not pickle the trainer with it.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _total_steps(trainer: Any) -> Callable[[], int]:
    """The run's number of optimizer steps, read from ``trainer.estimated_stepping_batches`` at the first step after
    warmup, not here in ``configure_optimizers``.

    Reading it here builds the train loader when the trainer has none yet (``fit_loop.setup_data()``), and in
    Lightning 2.6 ``configure_optimizers`` runs before a checkpoint's loop state is restored: the loader would be
    set up with nothing to restore, and the fit loop then keeps it, so a mid-epoch resume would start the epoch
    over from batch 0. By the first optimizer step the fit loop has set the loader up itself, after the restore.
    Runs without an end are refused now, since no loader is needed to see them.
    """
    if trainer.max_epochs == -1 and trainer.max_steps == -1:
        raise ValueError(_endless("max_epochs=-1 and max_steps=-1"))
    cached: list[int] = []

    def total() -> int:
        if not cached:
            steps = trainer.estimated_stepping_batches
            if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps in (float("inf"), -1) or steps <= 0:
                raise ValueError(_endless(f"estimated_stepping_batches={steps!r}"))
            cached.append(int(steps))
        return cached[0]

    return total


def _endless(what: str) -> str:
    return (
        f"`lr_schedule`='linear' needs a finite number of steps, but the trainer has {what}; "
        "set trainer.max_steps or trainer.max_epochs, or use lr_schedule='constant'."
    )
