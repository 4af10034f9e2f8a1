"""LoRA and QLoRA fine-tuning as a first-class part of PyTorch Lightning.

The core (config, layers, injection, quantization, adapter I/O) is plain PyTorch; the Lightning wing
(``lightning_lora.lightning``: ``LoRACallback``, ``LoRAMixin``) is the only part that imports Lightning.
Importing this package imports neither: each public name below is imported on first use (PEP 562),
so ``import lightning_lora`` (and ``lightning-lora --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_lora._version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    "LoRACallback": "lightning_lora.lightning.callback",
    "LoRAConfig": "lightning_lora.config",
    "LoRALinear": "lightning_lora.layers",
    "LoRAMixin": "lightning_lora.lightning.mixin",
    "ParamLoRA": "lightning_lora.param_lora",
    "QuantizationConfig": "lightning_lora.config",
    "TrainableTokens": "lightning_lora.tokens",
    "add_adapter": "lightning_lora.adapters",
    "adapter_state_dict": "lightning_lora.adapter_io",
    "backbone_fingerprint": "lightning_lora.inject",
    "cast_adapters": "lightning_lora.merge",
    "delete_adapter": "lightning_lora.adapters",
    "disable_chunked_loss": "lightning_lora.chunked_loss",
    "disable_lora": "lightning_lora.merge",
    "enable_chunked_loss": "lightning_lora.chunked_loss",
    "inject_lora": "lightning_lora.inject",
    "load_adapter": "lightning_lora.adapter_io",
    "load_adapters": "lightning_lora.adapter_io",
    "lora_plus_param_groups": "lightning_lora.lora_plus",
    "merge_lora": "lightning_lora.merge",
    "merged_state_dict": "lightning_lora.merge",
    "parameter_summary": "lightning_lora.inject",
    "per_sample_adapters": "lightning_lora.adapters",
    "quantize_model": "lightning_lora.quantization",
    "save_adapter": "lightning_lora.adapter_io",
    "serving_issues": "lightning_lora.serving",
    "set_active_adapter": "lightning_lora.adapters",
    "trainable_parameters": "lightning_lora.inject",
    "unmerge_lora": "lightning_lora.merge",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from lightning_lora.adapter_io import adapter_state_dict, load_adapter, load_adapters, save_adapter
    from lightning_lora.adapters import add_adapter, delete_adapter, per_sample_adapters, set_active_adapter
    from lightning_lora.chunked_loss import disable_chunked_loss, enable_chunked_loss
    from lightning_lora.config import LoRAConfig, QuantizationConfig
    from lightning_lora.inject import backbone_fingerprint, inject_lora, parameter_summary, trainable_parameters
    from lightning_lora.layers import LoRALinear
    from lightning_lora.lightning.callback import LoRACallback
    from lightning_lora.lightning.mixin import LoRAMixin
    from lightning_lora.lora_plus import lora_plus_param_groups
    from lightning_lora.param_lora import ParamLoRA
    from lightning_lora.serving import serving_issues
    from lightning_lora.tokens import TrainableTokens
    from lightning_lora.merge import cast_adapters, disable_lora, merge_lora, merged_state_dict, unmerge_lora
    from lightning_lora.quantization import quantize_model
