"""AtomicCheckpointIO: Lightning checkpoints written as temp file + fsync + rename, loaded without pickle code.

Lightning 2.6's ``TorchCheckpointIO`` writes through an fsspec transaction: the temporary file goes to the
system temp directory (``tempfile.mkstemp()``) and is moved without fsync, so a kill or power loss can
leave a torn ``last.ckpt`` (and ``shutil.move`` across filesystems is a copy). This plugin writes next to
the target with ``lightning_lora._io.atomic_write``; ``LoRACallback`` and ``LoRAMixin`` install it when the
strategy uses the stock ``TorchCheckpointIO``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem

from lightning_lora._io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save local checkpoints atomically; load them with ``weights_only=True`` unless told otherwise.

    Example::

        trainer = L.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[LoRACallback(r=8)])
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: fsspec's transaction
        if storage_options is not None:
            raise TypeError(f"`storage_options`={storage_options!r} is not supported by AtomicCheckpointIO; pass None.")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        # Checkpoints of LoRA runs hold tensors and plain types only: refuse pickled code by default.
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)
        except (RuntimeError, EOFError) as err:
            if "weights_only" in str(err) or "Weights only" in str(err):
                raise  # torch's own message says which type is not allowed and how to allow it
            raise RuntimeError(
                f"`ckpt_path`={str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:200]}): the file is truncated or "
                "corrupted. Resume from an earlier checkpoint, or start without ckpt_path."
            ) from err


def install_atomic_checkpoint_io(strategy: Any) -> None:
    """Swap the strategy's stock ``TorchCheckpointIO`` for ``AtomicCheckpointIO``; leave custom plugins alone."""
    if type(strategy).__name__ not in ("SingleDeviceStrategy", "DDPStrategy"):
        return  # FSDP / DeepSpeed write sharded checkpoints their own way
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
