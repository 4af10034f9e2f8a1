"""Write merged, LoRA-free weights for deployment: the one writer of merged models.

A transformers model is written with its own ``save_pretrained`` (``config.json``, ``model.safetensors``,
``generation_config.json`` where it has one), through a LoRA-free copy built on the meta device that takes
the merged tensors by assignment, so no second full set of weights is allocated; so is a module whose
weights all lie in one transformers model it holds (a LightningModule adapted as a whole, whose paths
start with ``model.``; a compiled model's ``_orig_mod``). Any other module is written as
``model.safetensors`` (plus ``config.json`` when it carries a config). The directory changes as a whole
(``_io.atomic_directory``): an interrupted export, or a full disk, leaves the previous one as it was, and
a reader never sees the weights of one export next to the config of another.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_lora._io import atomic_directory, require_directory_path, require_path_argument
from lightning_lora._matching import path_under
from lightning_lora.adapter_io import adapter_state_dict, check_adapter_values, is_transformers_model, transformers_models
from lightning_lora.merge import _merged_state, diverged_ties, float_dtype, require_lora_computing, warn_diverged_ties

MERGED_WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
# Weight files of an earlier export that this one may not rewrite (another sharding, the .bin format).
_OWNED = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "config.json", "generation_config.json")


def save_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    parameter: str = "directory",
) -> Path:
    """Save ``merged_state_dict(model)`` so ``AutoModel*.from_pretrained(directory)`` (or a plain
    ``load_state_dict``) gets the fine-tuned model with no LoRA and no quantization.

    Tensors that share storage (tied embeddings) are written once; transformers re-ties them on load.
    ``tokenizer_dir``: copy the tokenizer files found there, so the directory is a complete model.
    ``directory`` is replaced as a whole; an adapter with a NaN/Inf or integer tensor is refused first, and so is a
    call inside ``disable_lora`` / ``per_sample_adapters`` (the model computes without the merged update there).
    """
    directory = require_directory_path(directory, parameter)
    dtype = None if dtype is None else float_dtype(dtype)
    require_lora_computing(model, "save_merged")
    check_adapter_values(adapter_state_dict(model), "the adapter to merge", what="Refusing to write merged weights; nothing was written")
    state = _merged_state(model, dtype=dtype)
    model, state = _transformers_part(model, state)
    owned = _OWNED + (TOKENIZER_FILES if tokenizer_dir is not None else ())  # a tokenizer put there by hand stays
    with atomic_directory(directory, owned=owned, parameter=parameter) as tmp:
        if is_transformers_model(model):
            _save_pretrained(model, state, tmp, dtype)
        else:
            warn_diverged_ties(model, state, "save_merged")
            _save_safetensors(model, state, tmp, dtype)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return directory


def copy_tokenizer_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of ``source`` (if it is a directory) into ``target``; returns their names."""
    require_path_argument(target, "target")
    if not os.path.isdir(source):
        return []
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]
    for name in copied:
        shutil.copyfile(os.path.join(source, name), Path(target) / name)
    return copied


def _transformers_part(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the transformers model in ``model`` holding every tensor of ``state``, ``state`` keyed from it), so that
    ``from_pretrained`` reads the export; ``(model, state)`` when ``model`` holds weights of its own beside it."""
    for path, inner in transformers_models(model).items():
        if all(path_under(key, path) for key in state):
            return inner, {key[len(path) + 1 :]: value for key, value in state.items()}
    return model, state


def _save_pretrained(model: nn.Module, state: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype | None) -> None:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the merged weights are plain floating point
    with torch.device("meta"):
        plain = type(model)._from_config(config)
    diverged = diverged_ties(plain, state)
    if diverged and getattr(config, "tie_word_embeddings", False):
        # LoRA on a head tied to the embedding: the merged head is no longer the embedding, and a tied model
        # (save_pretrained writes one of the two) would load the base weights for both. Write them apart.
        config.tie_word_embeddings = False
        with torch.device("meta"):
            plain = type(model)._from_config(config)
        diverged = diverged_ties(plain, state)
    if diverged:
        first, second = diverged[0]
        raise ValueError(
            f"`save_merged` cannot write {type(model).__name__}: {first!r} and {second!r} are one tied tensor in it, but differ "
            "once merged (LoRA on a tied layer), and its config has no tie_word_embeddings to untie them; nothing was written. "
            "Save `merged_state_dict(model)` for an untied copy of the architecture."
        )
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
    plain.save_pretrained(directory)


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
    save_file(tensors, str(directory / MERGED_WEIGHTS_NAME), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data = config.to_dict()
        data.pop("quantization_config", None)  # the merged weights are plain floating point
        if dtype is not None:
            data["torch_dtype"] = str(dtype).removeprefix("torch.")
            data["dtype"] = data["torch_dtype"]
        (directory / "config.json").write_bytes((json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())
