"""Write merged, LoRA-free weights for deployment: ``model.safetensors`` (+ ``config.json`` for HF models)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_lora._io import atomic_write, atomic_write_bytes
from lightning_lora.merge import merged_state_dict

MERGED_WEIGHTS_NAME = "model.safetensors"


def save_merged(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Save ``merged_state_dict(model)`` so ``AutoModel*.from_pretrained(directory)`` (or a plain
    ``load_state_dict``) gets the fine-tuned model with no LoRA and no quantization.

    Tensors that share storage (tied embeddings) are written once; transformers re-ties them on load.
    """
    directory = Path(directory)
    state = merged_state_dict(model, dtype=dtype)
    seen: dict[tuple[int, int], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else (id(value), 0)
        if ident in seen:
            continue  # a tied duplicate
        seen[ident] = key
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
    return directory
