"""Ready LightningModules for the CLI and for scripts: causal LM and sequence classification.

Both keep the transformers model in ``self.model`` (LoRACallback's ``backbone="model"``), build it in
``configure_model``, and optimize only the parameters that require grad.
"""

from lightning_lora.tasks._paths import resolve_path
from lightning_lora.tasks.causal_lm import CausalLMModule
from lightning_lora.tasks.classification import SequenceClassificationModule

__all__ = ["CausalLMModule", "SequenceClassificationModule", "resolve_path"]
