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

import os
import weakref
from typing import Any

import torch
from torch import nn

from lightning_lora import quantization
from lightning_lora._matching import output_head_names
from lightning_lora._parts import (
    CheckpointReader,
    materialize,
    meta_model,
    module_slots,
    move_direct,
    plan_parts,
    quantize_part,
    random_init,
    resolve_config,
    resolve_device,
)
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
    device = resolve_device(device)
    offload = torch.device(offload_to) if offload_to is not None else None
    config, checkpoint = resolve_config(config_or_path, checkpoint)
    reader = CheckpointReader(checkpoint) if checkpoint is not None else None

    model = meta_model(config, dtype, model_class)
    skip = set(output_head_names(model) if skip is None else skip)
    # meta parameter -> (it, a weak reference to its real one), so tied weights stay tied. Weak: a strong
    # reference would keep every full-precision weight alive after its quantized copy replaced it.
    memo: dict[int, tuple[nn.Parameter, weakref.ref]] = {}
    quantized: list[str] = []
    for part in plan_parts(model, module_slots(model), seed):
        materialize(part.slots, device, dtype, memo)
        if reader is not None:
            reader.load(part.slots, device)
        else:
            random_init(model, part.slots, part.seed, device)
        quantized += quantize_part(part.slots, quantization_config, skip, device)
        if offload is not None:
            move_direct(part.slots, offload)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"Parameters left on the meta device after loading (first: {leftover[0]!r}); please report this.")
    if quantized:
        model.is_loaded_in_4bit = quantization_config.mode != "int8"
        model.is_loaded_in_8bit = quantization_config.mode == "int8"
    return model
