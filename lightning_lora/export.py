"""Write merged, LoRA-free weights for deployment: the one writer of merged models.

A transformers model is written with its own ``save_pretrained`` (``config.json``, ``model.safetensors``,
``generation_config.json`` where it has one), through a LoRA-free copy built on the meta device that takes
the merged tensors by assignment, so no second full set of weights is allocated. Any other module is
written as ``model.safetensors`` (plus ``config.json`` when it carries a config). Every file is written
atomically (temp file, fsync, rename): an interrupted export leaves the previous files intact.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_lora._io import atomic_write, atomic_write_bytes, atomic_write_files
from lightning_lora.merge import merged_state_dict

MERGED_WEIGHTS_NAME = "model.safetensors"


def save_merged(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Save ``merged_state_dict(model)`` so ``AutoModel*.from_pretrained(directory)`` (or a plain
    ``load_state_dict``) gets the fine-tuned model with no LoRA and no quantization.

    Tensors that share storage (tied embeddings) are written once; transformers re-ties them on load.
    """
    directory = Path(directory)
    state = merged_state_dict(model, dtype=dtype)
    if _is_pretrained(model):
        _save_pretrained(model, state, directory, dtype)
    else:
        _save_safetensors(model, state, directory, dtype)
    return directory


def _is_pretrained(model: nn.Module) -> bool:
    return callable(getattr(model, "save_pretrained", None)) and callable(getattr(type(model), "_from_config", None)) and hasattr(model, "config")


def _save_pretrained(model: nn.Module, state: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype | None) -> None:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the merged weights are plain floating point
    with torch.device("meta"):
        plain = type(model)._from_config(config)
    plain.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (e.g. rotary inv_freq) are not in the state dict
            owner, _, leaf = name.rpartition(".")
            source = _buffer_or_none(model, name)
            if source is not None:
                plain.get_submodule(owner).register_buffer(leaf, source.detach().clone(), persistent=False)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    if dtype is not None:
        plain.config.dtype = dtype
    # Each file lands atomically; weight files of an earlier export that this one does not rewrite go.
    atomic_write_files(directory, plain.save_pretrained, stale=("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin"))


def _buffer_or_none(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return model.get_buffer(name)
    except AttributeError:
        return None


def _save_safetensors(model: nn.Module, state: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype | None) -> None:
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else (id(value), 0)
        if ident in seen:
            continue  # a tied duplicate
        seen.add(ident)
        tensors[key] = value.detach().to("cpu").contiguous()
    atomic_write(directory / MERGED_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data = config.to_dict()
        data.pop("quantization_config", None)  # the merged weights are plain floating point
        if dtype is not None:
            data["torch_dtype"] = str(dtype).removeprefix("torch.")
            data["dtype"] = data["torch_dtype"]
        atomic_write_bytes(directory / "config.json", (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())
