"""Deprecated path: ``AtomicCheckpointIO`` lives in ``lightning_lora.lightning.checkpoints``."""

from lightning_lora._deprecated import moved
from lightning_lora.lightning.checkpoints import AtomicCheckpointIO, install_atomic_checkpoint_io

moved(__name__, "lightning_lora.lightning.checkpoints")

__all__ = ["AtomicCheckpointIO", "install_atomic_checkpoint_io"]
