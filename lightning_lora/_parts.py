"""The parts a meta-device transformers model is made real in, and the steps that make each part real.

Shared by ``loading.build_quantized_model`` (every part on this process) and
``sharded_loading.build_lora_model`` (each part by one rank, shared with the others). A *part* is
one decoder block or, last, everything else; its *slots* are its modules with their parents, so a
quantized layer can take a linear's place. Each part is materialized (uninitialized storage), filled
(checkpoint tensors of that part only, or the model's own init under a per-part seed) and quantized.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora import quantization
from lightning_lora._matching import matches_any
from lightning_lora.config import QuantizationConfig


@dataclass
class Slot:
    """One module of the model and where it hangs, so quantizing can replace it in place."""

    name: str
    """Its path in the model as transformers builds it: checkpoint keys, skip patterns and init order use it."""
    module: nn.Module
    parent: nn.Module | None
    attr: str


@dataclass
class Part:
    """The modules built together: one decoder block (``index`` = its number), or everything else (the last)."""

    index: int
    seed: int
    slots: list[Slot]


def meta_model(config: Any, dtype: torch.dtype, model_class: Any = None) -> nn.Module:
    """``model_class`` (default ``AutoModelForCausalLM``) built from ``config`` with its parameters on meta."""
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    with parameters_on_meta():
        if hasattr(model_class, "from_config"):
            return model_class.from_config(config, dtype=dtype)
        return model_class(config)


def module_slots(model: nn.Module) -> list[Slot]:
    """Every module of ``model`` in ``named_modules`` order."""
    slots = []
    for name, module in model.named_modules():
        parent_name, _, attr = name.rpartition(".")
        slots.append(Slot(name, module, (model.get_submodule(parent_name) if parent_name else model) if name else None, attr))
    return slots


def plan_parts(model: nn.Module, slots: list[Slot], seed: int) -> list[Part]:
    """One part per decoder block (seed ``seed + i + 1``), then one with the rest (seed ``seed``)."""
    block_paths = [path for path, _ in decoder_blocks(model)]
    parts = [Part(i, seed + i + 1, [s for s in slots if under(s.name, path)]) for i, path in enumerate(block_paths)]
    parts.append(Part(len(block_paths), seed, [s for s in slots if not any(under(s.name, p) for p in block_paths)]))
    return parts


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device; buffers (e.g. RoPE's inv_freq) stay real.

    Buffers that are not saved in checkpoints (non-persistent) must keep the values their module's
    ``__init__`` computed, which ``torch.device('meta')`` would lose.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of the ModuleList holding most of the parameters (``model.layers`` of a Llama)."""
    best, best_numel = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            numel = sum(p.numel() for p in module.parameters())
            if numel > best_numel:
                best, best_numel = name, numel
    if best is None:
        return []
    return [(join(best, str(i)), block) for i, block in enumerate(model.get_submodule(best))]


def materialize(slots: list[Slot], device: torch.device, dtype: torch.dtype, memo: dict[int, tuple[nn.Parameter, weakref.ref]]) -> None:
    """Give the meta parameters owned directly by the slots' modules uninitialized storage on ``device``."""
    for slot in slots:
        module = slot.module
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            entry = memo.get(id(param))
            new = entry[1]() if entry is not None else None
            if new is None:
                target = dtype if param.is_floating_point() else param.dtype
                new = nn.Parameter(torch.empty(param.shape, device=device, dtype=target), requires_grad=param.requires_grad)
                memo[id(param)] = (param, weakref.ref(new))  # holding the meta parameter keeps its id unique
            module._parameters[name] = new
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


@torch.no_grad()
def random_init(model: nn.Module, slots: list[Slot], seed: int, device: torch.device) -> None:
    init = getattr(model, "_init_weights", None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # leave the caller's RNG streams as they were
        torch.manual_seed(seed)
        for slot in slots:
            if init is not None:
                init(slot.module)
            elif hasattr(slot.module, "reset_parameters"):
                slot.module.reset_parameters()


def will_quantize(slot: Slot, config: QuantizationConfig | None, skip: set[str]) -> bool:
    return config is not None and type(slot.module) is nn.Linear and slot.name not in skip and not matches_any(slot.name, config.skip_modules)


def quantize_part(slots: list[Slot], config: QuantizationConfig, skip: set[str], device: torch.device) -> list[str]:
    """Replace each plain ``nn.Linear`` of the slots (not skipped) by its bitsandbytes version; returns their names."""
    done = []
    for slot in slots:
        if will_quantize(slot, config, skip):
            slot.module = quantization.quantize_linear(slot.module, config, device)
            setattr(slot.parent, slot.attr, slot.module)
            done.append(slot.name)
    return done


def move_direct(slots: list[Slot], device: torch.device) -> None:
    """Move the parameters and buffers owned directly by the slots' modules (quantized layers included) to ``device``."""
    for slot in slots:
        module = slot.module
        if quantization.is_quantized(module):
            module.to(device)  # Params4bit.to moves its quant_state too
            continue
        for param in module._parameters.values():
            if param is not None and param.device != device:
                param.data = param.data.to(device)
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = buffer.to(device)


# -- checkpoints ---------------------------------------------------------------------------------
class CheckpointReader:
    """Reads the tensors of one group of modules from safetensors files, opening each file once per group."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"`checkpoint`={str(path)!r} is a directory without *.safetensors files. Point it at a safetensors checkpoint.")
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"`checkpoint`={str(path)!r} does not exist. Pass a .safetensors file or a directory of them.")
        self.file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.file_of[key] = file

    @torch.no_grad()
    def load(self, slots: list[Slot], device: torch.device) -> None:
        from safetensors import safe_open

        wanted: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        loaded: set[int] = set()  # ids of the tensors read in this group: a tied weight is read once
        for slot in slots:
            module_name, module = slot.name, slot.module
            tensors = [(k, t) for k, t in module._parameters.items() if t is not None]
            tensors += [(k, t) for k, t in module._buffers.items() if t is not None and k not in module._non_persistent_buffers_set]
            for key, tensor in tensors:
                full = join(module_name, key)
                file = self.file_of.get(full)
                if file is None:
                    if id(tensor) in loaded:
                        continue  # tied to a weight already read (e.g. lm_head and embed_tokens)
                    if isinstance(tensor, nn.Parameter):
                        sample = sorted(self.file_of)[:3]
                        raise ValueError(
                            f"The checkpoint has no tensor {full!r} (it has {len(self.file_of)} tensors, e.g. {sample}). "
                            "Is it a checkpoint of this architecture?"
                        )
                    continue  # a persistent buffer the checkpoint does not store keeps its computed value
                wanted.setdefault(file, []).append((full, tensor))
                loaded.add(id(tensor))
        map_location = str(device) if device.type != "cuda" else f"cuda:{device.index or 0}"
        for file, items in wanted.items():
            with safe_open(str(file), framework="pt", device=map_location) as handle:
                for full, tensor in items:
                    value = handle.get_tensor(full)
                    if tuple(value.shape) != tuple(tensor.shape):
                        raise ValueError(f"Checkpoint tensor {full!r} has shape {tuple(value.shape)}, the model expects {tuple(tensor.shape)}.")
                    tensor.copy_(value)


# -- small helpers -------------------------------------------------------------------------------
def resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "meta":
        raise ValueError("`device`='meta' cannot hold quantized weights: pass 'cuda' (or 'cpu') to quantize on.")
    return device


def resolve_config(config_or_path: Any, checkpoint: str | os.PathLike | None) -> tuple[Any, str | os.PathLike | None]:
    if isinstance(config_or_path, (str, os.PathLike)):
        from transformers import AutoConfig

        path = Path(config_or_path)
        if not (path / "config.json").is_file():
            raise ValueError(f"`config_or_path`={str(path)!r} has no config.json. Pass a transformers config or a model directory.")
        if checkpoint is None and any(path.glob("*.safetensors")):
            checkpoint = path
        return AutoConfig.from_pretrained(str(path)), checkpoint
    if not hasattr(config_or_path, "to_dict"):
        raise TypeError(f"`config_or_path` must be a transformers PretrainedConfig or a directory, got {type(config_or_path).__name__}.")
    return config_or_path, checkpoint


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")
