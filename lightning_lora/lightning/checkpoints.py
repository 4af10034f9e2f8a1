"""What a Lightning checkpoint of a LoRA run holds, how it is checked on resume, and how it is written and read.

- ``filter_checkpoint``: the adapter only (and whatever lives outside the backbone), plus metadata
  under ``checkpoint['lightning_lora']`` (backbone fingerprint, LoRA and quantization config);
- ``validate_checkpoint``: raise before any weight loads if the checkpoint was made for another
  backbone or LoRA config;
- ``AtomicCheckpointIO``: temp file + fsync + rename, so a kill never leaves a torn ``last.ckpt``;
- ``load_checkpoint``: the one reader of checkpoint files, ``weights_only=True`` (no pickled code runs).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from torch import nn

from lightning_lora._io import atomic_write
from lightning_lora._version import __version__
from lightning_lora.adapter_io import adapter_state_dict
from lightning_lora.config import ADAPTER_FIELDS, LoRAConfig, init_changes_base
from lightning_lora.inject import backbone_fingerprint, lora_state
from lightning_lora.lightning import guards, strategies
from lightning_lora.sharding import is_sharded_param

CHECKPOINT_KEY = "lightning_lora"


def _prefix(backbone: str | None) -> str:
    return "" if backbone is None else backbone + "."


def checkpoint_metadata(module: nn.Module, backbone: str | None, adapter_only: bool) -> dict[str, Any]:
    """What ``checkpoint['lightning_lora']`` holds for the injected ``module`` (the backbone)."""
    state = lora_state(module)
    return {
        "version": __version__,
        "backbone": backbone,
        "adapter_only": adapter_only,
        "lora_config": state.config.to_dict(),
        "adapter_name": state.active,
        "quantization": state.quantization.to_dict() if state.quantization else None,
        "fingerprint": state.fingerprint or backbone_fingerprint(module),
    }


def adapter_keys(module: nn.Module, backbone: str | None) -> set[str]:
    """The adapter's keys in the LightningModule's ``state_dict``."""
    prefix = _prefix(backbone)
    return {prefix + key for key in adapter_state_dict(module)}


def filter_checkpoint(checkpoint: dict[str, Any], module: nn.Module, *, backbone: str | None, adapter_only: bool, refuse_nonfinite: bool) -> None:
    """Keep the adapter (and whatever lives outside the backbone) in ``checkpoint['state_dict']``; add the metadata."""
    checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(module, backbone, adapter_only)
    if not adapter_only or "state_dict" not in checkpoint:
        return
    keys = adapter_keys(module, backbone)
    prefix = _prefix(backbone)
    state_dict = checkpoint["state_dict"]
    kept = {k: v for k, v in state_dict.items() if k in keys or (prefix and not k.startswith(prefix))}
    if refuse_nonfinite:
        bad = guards.first_nonfinite({k: kept[k] for k in keys if k in kept})
        if bad is not None:
            raise RuntimeError(f"Refusing to write a checkpoint with non-finite adapter weights (first: {bad!r}).")
    checkpoint["state_dict"] = type(state_dict)(kept) if isinstance(state_dict, dict) else kept


def validate_checkpoint(checkpoint: dict[str, Any], module: nn.Module, pl_module: nn.Module, *, backbone: str | None, adapter_only: bool) -> None:
    """Raise before any weight is loaded if ``checkpoint`` was made for another backbone or LoRA config."""
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        if adapter_only:
            raise ValueError(
                "The checkpoint has no lightning_lora metadata: it was not written with LoRACallback/LoRAMixin, so "
                "its adapter cannot be checked. Resume from a checkpoint written by a LoRA run, or start without ckpt_path."
            )
        return
    current = checkpoint_metadata(module, backbone, adapter_only)
    if meta["fingerprint"] != current["fingerprint"]:
        raise ValueError(
            f"The checkpoint was written for another backbone (fingerprint {meta['fingerprint']} vs this model's "
            f"{current['fingerprint']}: module names or shapes differ). Resume with the same base model architecture."
        )
    defaults = LoRAConfig().to_dict()  # a checkpoint older than a field holds its default
    for field in ADAPTER_FIELDS:
        saved, now = meta["lora_config"].get(field, defaults[field]), current["lora_config"].get(field)
        if saved != now:
            raise ValueError(
                f"The checkpoint was written with LoRA `{field}`={saved!r}, this run has `{field}`={now!r}. "
                f"Set `{field}`={saved!r} to resume it, or start a new run without ckpt_path."
            )
    saved_init, now_init = meta["lora_config"].get("init", defaults["init"]), current["lora_config"]["init"]
    if saved_init != now_init and (init_changes_base(saved_init) or init_changes_base(now_init)):
        raise ValueError(
            f"The checkpoint was written with LoRA `init`={saved_init!r}, this run has `init`={now_init!r}: PiSSA / OLoRA "
            f"leave a residual in the base weights that the adapter belongs to. Set `init`={saved_init!r} to resume it."
        )
    saved_name, now_name = meta.get("adapter_name", "default"), current["adapter_name"]
    if saved_name != now_name:
        raise ValueError(
            f"The checkpoint trained the adapter named {saved_name!r}, this run trains {now_name!r}: "
            f"set `adapter_name`={saved_name!r} to resume it."
        )
    saved_q = (meta.get("quantization") or {}).get("mode")
    now_q = (current.get("quantization") or {}).get("mode")
    if saved_q != now_q:
        raise ValueError(f"The checkpoint was trained on a {saved_q or 'full-precision'} backbone, this run quantizes to {now_q or 'nothing'}: set the same quantization to resume.")
    state_dict = checkpoint.get("state_dict", {})
    expected = adapter_keys(module, backbone)
    missing = sorted(expected - set(state_dict))
    if missing and not is_sharded_checkpoint(checkpoint):
        raise ValueError(f"The checkpoint lacks {len(missing)} adapter tensors (first: {missing[0]!r}); it is incomplete or corrupted.")
    own = dict(pl_module.named_parameters())
    for key in sorted(expected & set(state_dict)):
        value = state_dict[key]
        if key in own and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(own[key].shape) and not is_sharded_param(own[key]):
            raise ValueError(f"Checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}.")


def is_sharded_checkpoint(checkpoint: dict[str, Any]) -> bool:
    # Lightning's sharded FSDP checkpoints restore the model state inside the strategy, not from this dict.
    return "state_dict" not in checkpoint or not checkpoint["state_dict"]


# -- reading and writing checkpoint files ------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """Read a checkpoint file (local, or remote through fsspec) with ``torch.load(weights_only=True)``.

    Checkpoints of LoRA runs hold tensors and plain types only, so no pickled code runs. A missing file
    raises FileNotFoundError; a truncated or corrupted one a RuntimeError that names it and says what
    to do; torch's own error about a type ``weights_only`` refuses is raised as it is (it says how to
    allow the type).
    """
    if not get_filesystem(path).exists(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        return pl_load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError) as err:
        if "weights_only" in str(err) or "Weights only" in str(err):
            raise
        raise RuntimeError(
            f"`ckpt_path`={str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:200]}): the file is truncated or "
            "corrupted. Resume from an earlier checkpoint, or start without ckpt_path."
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save local checkpoints atomically; load them with ``weights_only=True`` unless told otherwise.

    Lightning 2.6's ``TorchCheckpointIO`` writes through an fsspec transaction: the temporary file goes
    to the system temp directory and is moved without fsync, so a kill or power loss can leave a torn
    ``last.ckpt`` (and a move across filesystems is a copy). This plugin writes next to the target with
    ``lightning_lora._io.atomic_write``; ``LoRACallback`` and ``LoRAMixin`` install it when the strategy
    uses the stock ``TorchCheckpointIO``.

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
        return load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)


def install_atomic_checkpoint_io(strategy: Any) -> None:
    """Swap the strategy's stock ``TorchCheckpointIO`` for ``AtomicCheckpointIO``; leave custom plugins alone."""
    if not strategies.writes_single_file_checkpoints(strategy):
        return  # FSDP / DeepSpeed write sharded checkpoints their own way
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
