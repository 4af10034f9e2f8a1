"""Deprecated path: the controller lives in ``lightning_lora.lightning.controller``, the hook patches in ``.patches``."""

from lightning_lora._deprecated import moved
from lightning_lora.lightning.checkpoints import CHECKPOINT_KEY
from lightning_lora.lightning.controller import LoRAController
from lightning_lora.lightning.patches import run_after, run_before

moved(__name__, "lightning_lora.lightning.controller")

__all__ = ["CHECKPOINT_KEY", "LoRAController", "run_after", "run_before"]
