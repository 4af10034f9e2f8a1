"""Deprecated path: ``LoRACallback`` lives in ``lightning_lora.lightning.callback`` (import it from ``lightning_lora``)."""

from lightning_lora._deprecated import moved
from lightning_lora.lightning.callback import LoRACallback

moved(__name__, "lightning_lora.lightning.callback")

__all__ = ["LoRACallback"]
