"""Ready LightningModules for the CLI and for scripts: causal LM and sequence classification.

Both keep the transformers model in ``self.model`` (LoRACallback's ``backbone="model"``), build it in
``configure_model``, and optimize only the parameters that require grad.

The modules import Lightning and are loaded on first access, so ``resolve_path`` (and the
``lightning-lora`` entry point, which uses it) works without importing Lightning.
"""

import importlib

from lightning_lora.tasks._paths import resolve_path

_LAZY = {
    "CausalLMModule": "lightning_lora.tasks.causal_lm",
    "SequenceClassificationModule": "lightning_lora.tasks.classification",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_lora.tasks' has no attribute {name!r}")


__all__ = ["CausalLMModule", "SequenceClassificationModule", "resolve_path"]
