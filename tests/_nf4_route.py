"""Shared by the tests of the compiled nf4 LoRA route (``_routes.frozen_nf4_lora_linear``) on CPU: bitsandbytes'
dequantize standing in for the Triton kernel, a two-layer block, and its gradients."""

from __future__ import annotations

import contextlib

import bitsandbytes.functional as BF
import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, QuantizationConfig, inject_lora, nf4_kernel
from lightning_lora.layers import lora_layers

ROWS = 1600  # more than the 1,536 rows where bitsandbytes may take its own small-batch kernel (the route is not taken)


@pytest.fixture
def kernel_stand_in(monkeypatch):
    """The kernel's two entry points, with bitsandbytes' dequantize in the Triton kernel's place (CPU)."""
    assert nf4_kernel.prepare() in (True, False)
    assert nf4_kernel.linear_plus_update_ready()
    monkeypatch.setattr(nf4_kernel, "usable", lambda packed, state: True)
    monkeypatch.setattr(nf4_kernel, "dequantize", lambda packed, state, dtype, pass_id=0: BF.dequantize_4bit(packed, state).to(dtype))


class Block(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96, bias=bias)
        self.down = nn.Linear(96, 64, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def nf4_block(bias: bool = False, dropout: float = 0.0) -> nn.Module:
    """``Block`` with nf4 bases (bf16 compute) and LoRA on both layers, B nonzero, run once."""
    torch.manual_seed(0)
    model = inject_lora(Block(bias), LoRAConfig(r=8, alpha=16, target_modules=["up", "down"], dropout=dropout),
                        QuantizationConfig(mode="nf4", compute_dtype="bfloat16"))  # fmt: skip
    model = model.to(torch.bfloat16) if bias else model  # the route needs the bias in the compute dtype
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.1)  # B is zero at init: make the update and A's gradient nonzero
    model(torch.randn(2, ROWS // 2, 64, dtype=torch.bfloat16))  # bitsandbytes sets the layers' compute dtype on their first call
    return model


def grads(model: nn.Module, fn, x: torch.Tensor, x_grad: bool = True, ctx=contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fn(x)``'s output and the gradients of a squared-mean loss: every parameter that got one, and ``x``'s."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x_grad)
    with ctx():
        out = fn(x)
    out.float().square().mean().backward()
    found = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    if x_grad:
        found["x"] = x.grad.float().clone()
    return out.detach().float(), found


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def float64_reference(model: nn.Module, x: torch.Tensor, x_grad: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grads``' output and gradients for ``nf4_block``'s model computed in float64 from its dequantized weights
    (the exact sum both orders of the compiled route round): what a route's error is measured against."""
    layers = lora_layers(model)
    leaves: dict[str, torch.Tensor] = {}

    def leaf(name: str, tensor: torch.Tensor) -> torch.Tensor:
        leaves[name] = tensor.detach().double().requires_grad_(tensor.requires_grad)
        return leaves[name]

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        layer = layers[name]
        base = layer.base_layer
        weight = BF.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
        a, b = leaf(f"{name}.lora_a.weight", layer.lora_a.weight), leaf(f"{name}.lora_b.weight", layer.lora_b.weight)
        out = x @ weight.t() + layer.scale * (x @ a.t()) @ b.t()
        return out if base.bias is None else out + leaf(f"{name}.base_layer.bias", base.bias)

    x64 = x.detach().double().requires_grad_(x_grad)
    out = linear("down", torch.relu(linear("up", x64)))
    out.square().mean().backward()
    found = {n: t.grad for n, t in leaves.items() if t.grad is not None}
    if x_grad:
        found["x"] = x64.grad
    return out.detach(), found
