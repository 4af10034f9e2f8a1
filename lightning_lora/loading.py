"""Build a quantized transformers model one decoder block at a time, so memory stays near its 4-bit size.

``from_pretrained`` + quantize materializes every full-precision weight before packing it; for a
70B model that is 140 GB of bf16 on one device. Here the model is built with its parameters on the
meta device, then each decoder block (and finally everything else) is

1. materialized on ``device`` (read from a safetensors checkpoint, only that block's tensors, or a
   seeded random init with the model's own ``_init_weights``: HF's init std),
2. quantized there, linear by linear, with ``quantization.quantize_linear``,
3. moved to ``offload_to`` (e.g. the CPU) when asked,

so the device holds one full-precision block at a time and the host the packed model. FSDP can then
shard the result from the CPU (``device_id`` moves one unit at a time), and ``LoRACallback`` sees
an already-quantized backbone and only injects LoRA.

Example::

    from transformers import LlamaConfig
    model = build_quantized_model(LlamaConfig(...), QuantizationConfig(mode="nf4", quant_storage="bfloat16"),
                                  checkpoint="/models/llama-70b", offload_to="cpu")
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora import quantization
from lightning_lora._matching import matches_any
from lightning_lora.config import QuantizationConfig


def build_quantized_model(
    config_or_path: Any,
    quantization_config: QuantizationConfig,
    *,
    device: torch.device | str = "cuda",
    offload_to: torch.device | str | None = "cpu",
    checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    skip: set[str] | frozenset[str] | None = None,
    seed: int = 0,
    model_class: Any = None,
) -> nn.Module:
    """A transformers model whose linear layers are bitsandbytes layers, built block by block.

    Args:
        config_or_path: A transformers ``PretrainedConfig``, or a directory with ``config.json``.
            A directory that also holds ``*.safetensors`` files is the checkpoint unless
            ``checkpoint`` names another.
        quantization_config: How to quantize (nf4 / fp4 / int8; ``quant_storage='bfloat16'`` for FSDP1).
        device: Where each block is materialized and quantized ('cuda' means the current CUDA device).
        offload_to: Where each quantized block goes afterwards ('cpu'), or None to keep it on ``device``.
        checkpoint: A ``.safetensors`` file or a directory of them (sharded checkpoints too). None with a
            config: seeded random weights with the model's own init (for benchmarks).
        dtype: Dtype of the weights that stay unquantized (embeddings, norms, output head) and of the
            full-precision weights before quantization.
        skip: Module paths kept in full precision. Default: the output head(s).
        seed: Seed of the random init (block ``i`` uses ``seed + i + 1``, the rest ``seed``).
        model_class: The transformers class to build; default ``AutoModelForCausalLM``.
    """
    if not isinstance(quantization_config, QuantizationConfig):
        raise TypeError(
            f"`quantization_config` must be a QuantizationConfig, got {type(quantization_config).__name__}: "
            "build one with QuantizationConfig(mode='nf4')."
        )
    quantization.require_bitsandbytes("quantization_config", quantization_config)
    device = _resolve_device(device)
    offload = torch.device(offload_to) if offload_to is not None else None
    config, checkpoint = _resolve_config(config_or_path, checkpoint)
    reader = _CheckpointReader(checkpoint) if checkpoint is not None else None

    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    with _parameters_on_meta():
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config, dtype=dtype)
        else:
            model = model_class(config)

    from lightning_lora.inject import output_head_names  # local: inject imports the layers

    skip = set(output_head_names(model) if skip is None else skip)
    blocks = _decoder_blocks(model)
    block_paths = [path for path, _ in blocks]
    # Parts hold module *paths*: holding the modules would keep each replaced full-precision linear alive.
    parts: list[tuple[list[str], int]] = []
    for index, (path, block) in enumerate(blocks):
        parts.append(([_join(path, name) for name, _ in block.named_modules()], seed + index + 1))
    rest = [name for name, _ in model.named_modules() if not any(_under(name, p) for p in block_paths)]
    parts.append((rest, seed))

    # meta parameter -> (it, a weak reference to its real one), so tied weights stay tied. Weak: a strong
    # reference would keep every full-precision weight alive after its quantized copy replaced it.
    memo: dict[int, tuple[nn.Parameter, weakref.ref]] = {}
    quantized: list[str] = []
    for names, part_seed in parts:
        modules = [(name, model.get_submodule(name)) for name in names]
        _materialize(modules, device, dtype, memo)
        if reader is not None:
            reader.load(modules, device)
        else:
            _random_init(model, modules, part_seed, device)
        quantized += _quantize_part(model, modules, quantization_config, skip, device)
        modules = [(name, model.get_submodule(name)) for name in names]  # quantized layers replaced some
        if offload is not None:
            _move_direct(modules, offload)
        del modules
    if device.type == "cuda":
        torch.cuda.empty_cache()

    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"Parameters left on the meta device after loading (first: {leftover[0]!r}); please report this.")
    if quantized:
        model.is_loaded_in_4bit = quantization_config.mode != "int8"
        model.is_loaded_in_8bit = quantization_config.mode == "int8"
    return model


# -- building on the meta device ---------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
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


def _decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of the ModuleList holding most of the parameters (``model.layers`` of a Llama)."""
    best, best_numel = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            numel = sum(p.numel() for p in module.parameters())
            if numel > best_numel:
                best, best_numel = name, numel
    if best is None:
        return []
    return [(_join(best, str(i)), block) for i, block in enumerate(model.get_submodule(best))]


def _materialize(modules: list[tuple[str, nn.Module]], device: torch.device, dtype: torch.dtype, memo: dict[int, tuple[nn.Parameter, weakref.ref]]) -> None:
    """Give the meta parameters owned directly by ``modules`` uninitialized storage on ``device``."""
    for _, module in modules:
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
def _random_init(model: nn.Module, modules: list[tuple[str, nn.Module]], seed: int, device: torch.device) -> None:
    init = getattr(model, "_init_weights", None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # leave the caller's RNG streams as they were
        torch.manual_seed(seed)
        for _, module in modules:
            if init is not None:
                init(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()


def _quantize_part(model: nn.Module, modules: list[tuple[str, nn.Module]], config: QuantizationConfig, skip: set[str], device: torch.device) -> list[str]:
    done = []
    for name, module in modules:
        if type(module) is not nn.Linear or name in skip or matches_any(name, config.skip_modules):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantization.quantize_linear(module, config, device))
        done.append(name)
    return done


def _move_direct(modules: list[tuple[str, nn.Module]], device: torch.device) -> None:
    """Move the parameters and buffers owned directly by ``modules`` (quantized layers included) to ``device``."""
    for name, module in modules:
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
class _CheckpointReader:
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
    def load(self, modules: list[tuple[str, nn.Module]], device: torch.device) -> None:
        from safetensors import safe_open

        wanted: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        loaded: set[int] = set()  # ids of the tensors read in this group: a tied weight is read once
        for module_name, module in modules:
            tensors = [(k, t) for k, t in module._parameters.items() if t is not None]
            tensors += [(k, t) for k, t in module._buffers.items() if t is not None and k not in module._non_persistent_buffers_set]
            for key, tensor in tensors:
                full = _join(module_name, key)
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
def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "meta":
        raise ValueError("`device`='meta' cannot hold quantized weights: pass 'cuda' (or 'cpu') to quantize on.")
    return device


def _resolve_config(config_or_path: Any, checkpoint: str | os.PathLike | None) -> tuple[Any, str | os.PathLike | None]:
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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")
