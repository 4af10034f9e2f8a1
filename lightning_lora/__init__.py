"""LoRA and QLoRA fine-tuning as a first-class part of PyTorch Lightning.

The core (config, layers, injection, quantization, adapter I/O) is plain PyTorch; the Lightning
glue (``LoRACallback``, ``LoRAMixin``) is imported lazily so the core works without Lightning.
"""

__version__ = "0.1.0"

from lightning_lora.adapter_io import adapter_state_dict, load_adapter, save_adapter
from lightning_lora.config import LoRAConfig, QuantizationConfig
from lightning_lora.inject import backbone_fingerprint, inject_lora, parameter_summary, trainable_parameters
from lightning_lora.layers import LoRALinear
from lightning_lora.merge import cast_adapters, disable_lora, merge_lora, merged_state_dict, unmerge_lora
from lightning_lora.quantization import quantize_model

_LIGHTNING_NAMES = {"LoRACallback": "lightning_lora.callback", "LoRAMixin": "lightning_lora.mixin"}


def __getattr__(name: str):
    # Lightning is imported only when its glue is asked for.
    if name in _LIGHTNING_NAMES:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING_NAMES[name]), name)
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")


__all__ = [
    "LoRACallback",
    "LoRAConfig",
    "LoRALinear",
    "LoRAMixin",
    "QuantizationConfig",
    "__version__",
    "adapter_state_dict",
    "backbone_fingerprint",
    "cast_adapters",
    "disable_lora",
    "inject_lora",
    "load_adapter",
    "merge_lora",
    "merged_state_dict",
    "parameter_summary",
    "quantize_model",
    "save_adapter",
    "trainable_parameters",
    "unmerge_lora",
]
