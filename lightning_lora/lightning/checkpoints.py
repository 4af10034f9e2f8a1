"""What a Lightning checkpoint of a LoRA run holds, how it is checked on resume, and how it is written and read.

- ``filter_checkpoint``: the adapter only (and whatever lives outside the backbone), plus metadata
  under ``checkpoint['lightning_lora']`` (backbone fingerprint, LoRA and quantization config);
- ``validate_checkpoint``: raise before any weight loads if the checkpoint was made for another
  backbone or LoRA config;
- ``AtomicCheckpointIO``: temp file + fsync + rename, so a kill never leaves a torn ``last.ckpt``;
- ``load_checkpoint``: the one reader of checkpoint files, ``weights_only=True`` (no pickled code runs);
  ``check_checkpoint``: the same check, for the files a strategy reads itself (FSDP).
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from torch import nn

from lightning_lora._io import atomic_write
from lightning_lora._version import __version__
from lightning_lora.adapter_io import adapter_state_dict, check_adapter_values
from lightning_lora.config import ADAPTER_FIELDS, LoRAConfig, init_changes_base
from lightning_lora.inject import backbone_fingerprint, lora_state
from lightning_lora.lightning import guards, strategies
from lightning_lora.sharding import is_sharded_param

CHECKPOINT_KEY = "lightning_lora"


def _prefix(backbone: str | None) -> str:
    return "" if backbone is None else backbone + "."


def checkpoint_metadata(module: nn.Module, backbone: str | None, adapter_only: bool, lora_plus_ratio: float | None = None) -> dict[str, Any]:
    """What ``checkpoint['lightning_lora']`` holds for the injected ``module`` (the backbone)."""
    state = lora_state(module)
    return {
        "lora_plus_ratio": lora_plus_ratio,  # splits the optimizer's groups: resuming needs the same split
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


def filter_checkpoint(
    checkpoint: dict[str, Any], module: nn.Module, *, backbone: str | None, adapter_only: bool, refuse_nonfinite: bool, lora_plus_ratio: float | None = None
) -> None:
    """Keep the adapter (and whatever lives outside the backbone) in ``checkpoint['state_dict']``; add the metadata."""
    checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(module, backbone, adapter_only, lora_plus_ratio)
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


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be read, is damaged, holds pickled objects ``weights_only`` refuses, or does not fit.

    A ``ValueError`` (bad input) that is also a ``RuntimeError``, as the reader raised before.
    """


def validate_checkpoint(
    checkpoint: dict[str, Any], module: nn.Module, pl_module: nn.Module, *, backbone: str | None, adapter_only: bool, lora_plus_ratio: float | None = None
) -> None:
    """Raise before any weight is loaded if ``checkpoint`` was made for another backbone or LoRA config, is damaged,
    or would write anything but the adapter into the frozen backbone."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"The checkpoint is a {type(checkpoint).__name__}, not a dict: it was not written by Lightning.")
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        if adapter_only:
            raise ValueError(
                "The checkpoint has no lightning_lora metadata: it was not written with LoRACallback/LoRAMixin, so "
                "its adapter cannot be checked. Resume from a checkpoint written by a LoRA run, or start without ckpt_path."
            )
        return
    meta = checked_metadata(meta)
    current = checkpoint_metadata(module, backbone, adapter_only, lora_plus_ratio)
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
    if meta.get("lora_plus_ratio") != lora_plus_ratio:
        raise ValueError(
            f"The checkpoint was trained with `lora_plus_ratio`={meta.get('lora_plus_ratio')!r}, this run has {lora_plus_ratio!r}: "
            "its optimizer state holds other parameter groups. Set the same lora_plus_ratio to resume it."
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
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"The checkpoint's 'state_dict' is a {type(state_dict).__name__}, not a dict: the checkpoint is damaged.")
    expected = adapter_keys(module, backbone)
    missing = sorted(expected - set(state_dict))
    if missing and not is_sharded_checkpoint(checkpoint):
        raise ValueError(f"The checkpoint lacks {len(missing)} adapter tensors (first: {missing[0]!r}); it is incomplete or corrupted.")
    if meta.get("adapter_only", True):
        # An adapter-only checkpoint never holds the frozen backbone: loading such a tensor would overwrite the base model.
        prefix = _prefix(backbone)
        stray = sorted(key for key in state_dict if key not in expected and (not prefix or key.startswith(prefix)))
        if stray:
            raise CheckpointError(
                f"The checkpoint is adapter-only but holds {len(stray)} tensors that are not the adapter (first: {stray[0]!r}); "
                "loading them would overwrite the frozen backbone. It was tampered with or written by another run: resume from a "
                "checkpoint of this run."
            )
    own = dict(pl_module.named_parameters())
    values = {}
    for key in sorted(expected & set(state_dict)):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor: the checkpoint is damaged.")
        if key in own and tuple(value.shape) != tuple(own[key].shape) and not is_sharded_param(own[key]):
            raise ValueError(f"Checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}.")
        if not hasattr(value, "device_mesh"):  # DTensor shards are checked where they are whole
            values[key] = value
    check_adapter_values(values, "the checkpoint", what="Nothing was loaded")


_METADATA_TYPES: dict[str, type | tuple[type, ...]] = {
    "fingerprint": str, "lora_config": dict, "quantization": (dict, type(None)), "adapter_only": bool, "adapter_name": str,
}  # fmt: skip
_OPTIONAL_METADATA = ("quantization", "adapter_only", "adapter_name")  # absent from checkpoints of older versions


def checked_metadata(meta: Any) -> dict[str, Any]:
    """``checkpoint['lightning_lora']`` after checking that each entry the resume checks read has the right type."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint[{CHECKPOINT_KEY!r}] is a {type(meta).__name__}, not a dict: the checkpoint's metadata is damaged. Resume from another checkpoint.")
    for key, kind in _METADATA_TYPES.items():
        optional = key in _OPTIONAL_METADATA
        if (key not in meta and not optional) or (key in meta and not isinstance(meta[key], kind)):
            raise CheckpointError(
                f"checkpoint[{CHECKPOINT_KEY!r}][{key!r}] is {'missing' if key not in meta else repr(meta[key])[:80]}: the checkpoint's "
                "metadata is damaged. Resume from another checkpoint, or start without ckpt_path."
            )
    if meta.get("quantization") is not None and not isinstance(meta["quantization"].get("mode"), (str, type(None))):
        raise CheckpointError(f"checkpoint[{CHECKPOINT_KEY!r}]['quantization'] is {meta['quantization']!r}: the checkpoint's metadata is damaged.")
    if not isinstance(meta["lora_config"].get("init", "kaiming"), str):
        raise CheckpointError(f"checkpoint[{CHECKPOINT_KEY!r}]['lora_config']['init'] is {meta['lora_config']['init']!r}: the checkpoint's metadata is damaged.")
    return meta


def is_sharded_checkpoint(checkpoint: dict[str, Any]) -> bool:
    # Lightning's sharded FSDP checkpoints restore the model state inside the strategy, not from this dict.
    return "state_dict" not in checkpoint or not checkpoint["state_dict"]


# -- reading and writing checkpoint files ------------------------------------------------------------
# torch's wording for a refused object ("GLOBAL os.system was not an allowed global", "... whose module posix is blocked").
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)")


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", parameter: str = "ckpt_path") -> dict[str, Any]:
    """The one reader of checkpoint files (local, or remote through fsspec): ``torch.load(weights_only=True)``, always.

    Checkpoints of LoRA runs hold tensors, plain types and lightning_lora's configs only, so no pickled
    code runs; a file that would need anything else to unpickle is refused with a ``CheckpointError``
    naming the object, and nothing of it runs. A missing file raises FileNotFoundError; a truncated or
    corrupted one a ``CheckpointError`` (a ValueError) that names it and says what to do.
    """
    if not get_filesystem(path).exists(path):
        raise FileNotFoundError(f"`{parameter}`={str(path)!r}: checkpoint file not found.")
    try:
        return pl_load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as err:  # torch raises a dozen kinds for damaged zips and pickles (RuntimeError, EOFError, KeyError, ...)
        raise _read_error(path, err, parameter) from None


def check_checkpoint(path: str | os.PathLike, parameter: str = "ckpt_path") -> None:
    """Check, without loading the tensors, that ``path`` (a checkpoint file or a sharded checkpoint directory)
    unpickles under ``weights_only``; for checkpoints that a strategy reads itself (FSDP) before it does.

    Lightning's FSDP strategy reads full checkpoints with an unrestricted unpickler, and torch's distributed
    checkpoint reads its ``.metadata`` with ``pickle.load``: either would run code from a crafted file.
    """
    path = Path(path)
    if path.is_dir():
        for name in (".metadata", "meta.pt"):
            if (path / name).is_file():
                _check_pickle(path / name, parameter, raw=name == ".metadata")
        return
    if not path.is_file():
        raise FileNotFoundError(f"`{parameter}`={str(path)!r}: checkpoint file not found.")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the tensors' bytes are not read
    except (PermissionError, MemoryError):
        raise
    except Exception as err:
        raise _read_error(path, err, parameter) from None


def _check_pickle(path: Path, parameter: str, raw: bool) -> None:
    try:
        if raw:  # torch.distributed.checkpoint's .metadata: a plain pickle (protocol 4, which torch's own checker cannot read)
            with open(path, "rb") as handle:
                _MetadataUnpickler(handle).load()
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (PermissionError, MemoryError):
        raise
    except Exception as err:
        raise _read_error(path, err, parameter) from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's ``.metadata``: its own dataclasses, torch sizes, dtypes and layouts, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        import torch.distributed.checkpoint.filesystem as dcp_filesystem
        import torch.distributed.checkpoint.metadata as dcp_metadata

        if module == dcp_metadata.__name__ or (module == dcp_filesystem.__name__ and name == "_StorageInfo"):
            value = getattr(sys.modules[module], name, None)
            if isinstance(value, type) and (value.__module__ == module):
                return value
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # a layout by its name: torch.strided, ...
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
            return getattr(pathlib, name)  # the checkpoint's own location, in StorageMeta
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} was not an allowed global")


def _read_error(path: Any, err: BaseException, parameter: str) -> CheckpointError:
    text = str(err)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        name = next(group for group in refused.groups() if group)
        return CheckpointError(
            f"`{parameter}`={str(path)!r} holds a pickled {name.rstrip('.,;')} that torch.load(weights_only=True) refuses; nothing of it "
            "was run. Checkpoints of LoRA runs never hold one: the file was not written by lightning_lora, or was tampered with. "
            "Use a checkpoint you wrote (if it is your own object, register it with torch.serialization.add_safe_globals)."
        )
    return CheckpointError(
        f"`{parameter}`={str(path)!r} cannot be read ({type(err).__name__}: {text[:200]}): the file is truncated or "
        "corrupted. Resume from an earlier checkpoint, or start without ckpt_path."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save local checkpoints atomically; load them with ``weights_only=True`` (always: see ``load_checkpoint``).

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
        # ``weights_only`` comes from ``Trainer.fit(weights_only=...)``; False would let a crafted file run code, so
        # it is not honoured: the checked reader always unpickles with weights_only=True.
        return load_checkpoint(path, map_location=map_location)


def install_atomic_checkpoint_io(strategy: Any) -> None:
    """Swap the strategy's stock ``TorchCheckpointIO`` for ``AtomicCheckpointIO``; leave custom plugins alone."""
    if not strategies.writes_single_file_checkpoints(strategy):
        return  # FSDP / DeepSpeed write sharded checkpoints their own way
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
