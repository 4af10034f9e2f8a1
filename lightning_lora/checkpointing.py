"""Activation checkpointing per decoder layer, optionally with the checkpointed layer inputs kept in host memory.

With checkpointing, what a step keeps on the GPU for backward is one (batch, seq, hidden) input per decoder
layer: 7.9 GiB for a 126-layer, 16384-wide model at 2048 tokens, whatever the number of GPUs, since FSDP
shards parameters, not activations. ``offload_to_cpu=True`` moves each of those inputs to pinned host memory
as the forward saves it and brings it back when backward recomputes the layer, so the GPU holds about two
of them at a time. The copies are synchronous (torch's ``save_on_cpu``): a step spends the time to move
those bytes over PCIe twice (for the shape above about 0.7 s at 25 GB/s).

It works because non-reentrant checkpointing saves its inputs as ordinary saved tensors, which go through
the saved-tensor hooks active where the checkpoint is called, while everything saved *inside* the
checkpointed layer goes through checkpointing's own hooks (and is recomputed). The hooks here wrap only
the checkpoint calls, so nothing else (the loss buffers, the parameters) is moved.

Example::

    enable_activation_checkpointing(model, offload_to_cpu=True)   # a transformers model, before FSDP wraps it
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["enable_activation_checkpointing", "offloading_checkpoint"]


def offloading_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) whose saved inputs live in host memory until backward."""
    kwargs.setdefault("use_reentrant", False)
    if kwargs["use_reentrant"]:
        raise ValueError("`use_reentrant`=True cannot offload: the reentrant checkpoint keeps its inputs outside autograd. Use False.")
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    if device_type == "cpu":  # already in host memory
        return checkpoint(function, *args, **kwargs)
    pin = device_type == "cuda"
    with torch.autograd.graph.save_on_cpu(pin_memory=pin, device_type=device_type):
        return checkpoint(function, *args, **kwargs)


def enable_activation_checkpointing(model: nn.Module, *, offload_to_cpu: bool = False) -> None:
    """Non-reentrant checkpointing of every decoder layer of a transformers model (``gradient_checkpointing_enable``).

    Non-reentrant because the reentrant variant gives LoRA no gradients when the embedding is frozen
    (transformers #26221). With ``offload_to_cpu``, each layer's saved input goes to pinned host memory
    (see the module docstring). Call it before FSDP wraps the model; it works under FSDP1 and FSDP2 as on one GPU.
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise TypeError(
            f"`enable_activation_checkpointing` needs a transformers model (with gradient_checkpointing_enable), got "
            f"{type(model).__name__}; wrap other models' blocks with torch.utils.checkpoint yourself."
        )
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*deprecated")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # the KV cache is useless in training and warns under checkpointing
    if not offload_to_cpu:
        return
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} turned checkpointing on without exposing its layers' checkpoint function; "
            "`offload_to_cpu`=True cannot be applied to it. Use offload_to_cpu=False."
        )
    for layer in layers:
        layer._gradient_checkpointing_func = functools.partial(offloading_checkpoint, use_reentrant=False)
