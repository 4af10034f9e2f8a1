"""Deprecated path: ``LoRAMixin`` lives in ``lightning_lora.lightning.mixin`` (import it from ``lightning_lora``)."""

from lightning_lora._deprecated import moved
from lightning_lora.lightning.mixin import LoRAMixin

moved(__name__, "lightning_lora.lightning.mixin")

__all__ = ["LoRAMixin"]
