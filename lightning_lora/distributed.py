"""DDP / FSDP specifics: which quantization a strategy can shard, norm clipping under FSDP, and
gathering every rank's adapter shard before a rank-zero write.

Facts from ../shared/PRIOR-ART.md ("Measured: Lightning FSDP with nf4 backbones"): FSDP1 flattens
tensors of one dtype only, so packed 4-bit weights must be stored in the dtype FSDP flattens
(``quant_storage='bfloat16'``); Lightning's FSDPPrecision raises on norm clipping; FSDP1 root modules
have ``clip_grad_norm_``; under FSDP2 parameters are DTensors and ``full_tensor()`` gathers one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_lora.adapter_io import adapter_state_dict
from lightning_lora.config import QuantizationConfig


def strategy_kind(trainer_or_strategy: Any) -> str:
    """'fsdp' (FSDP1), 'fsdp2' (ModelParallelStrategy), 'ddp', or 'single'."""
    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    name = type(strategy).__name__
    if name == "FSDPStrategy":
        return "fsdp"
    if name == "ModelParallelStrategy":
        return "fsdp2"
    if "DDP" in name:
        return "ddp"
    return "single"


def check_quantization_for_strategy(quantization: QuantizationConfig, pl_module: nn.Module) -> None:
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:
        return
    kind = strategy_kind(trainer)
    if kind == "fsdp" and quantization.mode != "int8" and quantization.quant_storage == "uint8":
        raise ValueError(
            "FSDPStrategy cannot flatten packed 4-bit weights stored as uint8 (`quant_storage`='uint8'). "
            "Set `quant_storage`='bfloat16' (the dtype FSDP flattens) in LoRACallback/QuantizationConfig."
        )
    if kind in ("fsdp", "fsdp2") and quantization.mode == "int8":
        raise ValueError(
            "`quantize`='int8' cannot be sharded with FSDP: bitsandbytes keeps int8 scales outside the parameters. "
            "Use 'nf4' with FSDP, or DDP for int8."
        )


def is_sharded_param(param: torch.Tensor) -> bool:
    return type(param).__name__ == "DTensor" or param.dim() == 1 and getattr(param, "_is_flat_param", False)


def is_sharded_checkpoint(checkpoint: dict[str, Any]) -> bool:
    # Lightning's sharded FSDP checkpoints restore the model state inside the strategy, not from this dict.
    return "state_dict" not in checkpoint or not checkpoint["state_dict"]


def clip_grad_norm(trainer: Any, pl_module: nn.Module, max_norm: float) -> torch.Tensor:
    """Norm clipping that works under every strategy (Lightning's FSDPPrecision raises for FSDP1)."""
    kind = strategy_kind(trainer)
    if kind == "fsdp":
        root = trainer.strategy.model  # the FSDP root wrapper; its clip_grad_norm_ reduces over all shards
        return root.clip_grad_norm_(max_norm)
    params = [p for p in pl_module.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def gather_adapter_state_dict(trainer: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The full adapter on CPU. Under FSDP every rank must call this (the gathers are collectives)."""
    kind = strategy_kind(trainer) if trainer is not None else "single"
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(trainer.strategy.model, writeback=False, offload_to_cpu=False):
            return {k: v.detach().to("cpu", copy=True) for k, v in adapter_state_dict(module).items()}
    out = {}
    for key, value in adapter_state_dict(module).items():
        if type(value).__name__ == "DTensor":
            value = value.full_tensor()
        out[key] = value.detach().to("cpu", copy=True)
    return out
