"""The Lightning wing: everything of lightning_lora that imports Lightning.

- ``callback.py`` / ``mixin.py``: the two front ends, thin: each hook calls the controller;
- ``controller.py``: when to inject, what to check at fit start, export;
- ``checkpoints.py``: what a checkpoint holds, how it is checked on resume, atomic writes, the one reader;
- ``guards.py``: skipping optimizer steps with non-finite gradients;
- ``strategies.py``: everything that differs per Lightning strategy;
- ``patches.py``: every change made to the user's module, Lightning's objects or torch's functions.

The core (the package's other modules) never imports this folder.
"""

from lightning_lora.lightning.callback import LoRACallback
from lightning_lora.lightning.checkpoints import AtomicCheckpointIO, load_checkpoint
from lightning_lora.lightning.controller import LoRAController
from lightning_lora.lightning.mixin import LoRAMixin

__all__ = ["AtomicCheckpointIO", "LoRACallback", "LoRAController", "LoRAMixin", "load_checkpoint"]
