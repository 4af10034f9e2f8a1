"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, "DoRA", eq. 5).

The adapted weight ``W + scale * B @ A`` (out, in) is split into a direction (each row divided by its
L2 norm) and a trained magnitude ``m`` (out,), initialised to the row norms so that the layer starts
as the base layer:

    W' = (m / ||W + scale * B @ A||_row) * (W + scale * B @ A)

The norm is treated as a constant in backward (the paper's section 4.3: it gets no gradient), which is
also what PEFT computes. As an addition to the base output ``y = W x + bias`` this is

    y' = y + (m / n - 1) * (W x) + (m / n) * scale * B A x

and with dropout on the LoRA input in training, ``W x`` in the middle term is taken on the dropped-out
input (PEFT's formulation, so outputs and gradients match it). These functions read the adapter's
``lora_a``, ``lora_b``, ``lora_magnitude``, ``scale`` and ``dropout`` and the layer's ``base_layer`` and
``fan_in_fan_out``; they never cache the norm, so weight updates that bypass autograd are always seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora import _routes, quantization


def _precise(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 tensors: the norm is a reduction over the input features."""
    return torch.promote_types(dtype, torch.float32)


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||weight + delta||`` of each row of two (out, in) matrices, in float32 or wider, without gradient: (out,)."""
    dtype = _precise(torch.promote_types(weight.dtype, delta.dtype))
    return torch.linalg.norm(weight.detach().to(dtype) + delta.detach().to(dtype), dim=1)


def lora_delta(adapter: nn.Module) -> torch.Tensor:
    """``scale * B @ A`` of ``adapter`` in float32 (float64 for a float64 adapter), (out, in)."""
    dtype = _precise(adapter.lora_b.weight.dtype)
    return (adapter.lora_b.weight.to(dtype) @ adapter.lora_a.weight.to(dtype)) * adapter.scale


def base_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's weight as (out, in) in ``dtype`` (default float32, float64 for a float64 base), dequantized
    for bitsandbytes layers."""
    base = layer.base_layer
    dtype = _precise(base.weight.dtype) if dtype is None and base.weight.is_floating_point() else (dtype or torch.float32)
    if quantization.is_quantized(base):
        return quantization.dequantize_weight(base, dtype=dtype)
    return _routes._frozen_weight(base, dtype, layer.fan_in_fan_out).detach()


@torch.no_grad()
def init_magnitude(layer: nn.Module, adapter: nn.Module) -> None:
    """Set ``m`` to the row norms of the current adapted weight, so the layer's output does not change."""
    norm = row_norm(base_weight(layer), lora_delta(adapter))
    adapter.lora_magnitude.copy_(norm.to(adapter.lora_magnitude.dtype))


def adapted_weight(weight: torch.Tensor, adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', m / n)`` for a float32 (out, in) base ``weight``: the merged DoRA weight and its row factors (out,)."""
    delta = lora_delta(adapter).to(weight)
    factor = adapter.lora_magnitude.detach().to(weight.dtype) / row_norm(weight, delta)
    return factor[:, None] * (weight + delta), factor


def output(layer: nn.Module, adapter: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """The layer's DoRA output for input ``x`` (..., in), given the base layer's own output ``base_out`` (..., out)."""
    base = layer.base_layer
    dtype = _routes._compute_dtype(x, base_out.dtype)
    a, b = adapter.lora_a.weight, adapter.lora_b.weight
    weight = base_weight(layer)  # (out, in) float32 (float64 for a float64 base), frozen
    factor = (adapter.lora_magnitude / row_norm(weight, lora_delta(adapter))).to(dtype)  # (out,); m gets the gradient
    dropout_active = layer.training and not isinstance(adapter.dropout, nn.Identity)
    x_lora = adapter.dropout(x).to(dtype) if dropout_active else x.to(dtype)
    lora_out = F.linear(F.linear(x_lora, a.to(dtype)), b.to(dtype)) * adapter.scale  # (..., out)
    if dropout_active:
        weighted = F.linear(x_lora, weight.to(dtype))  # W x on the dropped-out input, no bias
    else:
        bias = getattr(base, "bias", None)
        weighted = base_out if bias is None else base_out - bias
    return base_out + ((factor - 1) * weighted + factor * lora_out).to(base_out.dtype)
