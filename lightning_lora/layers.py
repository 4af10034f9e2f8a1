"""The LoRA layer: a frozen base linear plus a trainable low-rank update.

    y = base(x) + scale * B(A(dropout(x)))        A: (r, in), B: (out, r), scale = alpha / r

(Hu et al., 2021, "LoRA", eq. 3). A starts like an ``nn.Linear`` weight (kaiming-uniform, a=sqrt(5)),
B starts at zero, so a freshly wrapped model computes exactly what the base model computes.
The base may be an ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored (in, out)), or a
bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.

This file is the reference: what the layer computes, merges and saves. The faster routes its
forward picks (a fused autograd node, the no-grad weight route) and their guards are in ``_routes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_lora import _routes, quantization
from lightning_lora.config import LoRAConfig


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if _is_conv1d(base):
        in_features, out_features = base.weight.shape  # Conv1D stores (in, out)
        return in_features, out_features
    return base.in_features, base.out_features


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module) or quantization.is_quantized(module)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so the core needs no transformers import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class LoRALinear(nn.Module):
    """Wraps a base linear layer and adds ``scale * lora_b(lora_a(dropout(x)))`` to its output.

    Example::

        layer = LoRALinear(nn.Linear(64, 32), r=4, alpha=8)
        assert torch.equal(layer(x), layer.base_layer(x))  # B is zero at init
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not is_supported_base(base_layer):
            raise TypeError(
                f"LoRALinear cannot wrap {type(base_layer).__name__}: supported bases are nn.Linear, "
                "transformers Conv1D and bitsandbytes Linear4bit / Linear8bitLt."
            )
        if quantization.is_4bit(base_layer):
            quantization.keep_standard_layout(base_layer)  # also for layers quantized by transformers
        self.base_layer = base_layer
        self.in_features, self.out_features = base_features(base_layer)
        self.r = r
        self.alpha = alpha
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.fan_in_fan_out = _is_conv1d(base_layer)
        device = base_layer.weight.device
        self.lora_a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        self.fused = True  # train through the fused node where it applies (``fused_training`` switches it)
        self._quantized_snapshot: dict[str, Any] | None = None
        self.reset_lora_parameters(init)
        self.train(base_layer.training)  # a wrapped eval-mode model stays in eval mode

    @classmethod
    def from_config(cls, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> LoRALinear:
        """The layer ``config`` asks for around ``base_layer``, with this layer's rank and alpha (after the patterns)."""
        return cls(base_layer, r=r, alpha=alpha, dropout=config.dropout, use_rslora=config.use_rslora, init=config.init)

    # -- the adapter protocol: which of the layer's tensors are the adapter ------------------------------
    @staticmethod
    def adapter_names(bias: str = "none") -> tuple[str, ...]:
        """Names, relative to the layer, of its tensors that train and are saved: A and B, and with
        ``bias='lora_only'`` the base layer's bias (``inject.InjectionPlan`` turns these into the model's rule)."""
        return ("lora_a.weight", "lora_b.weight", "base_layer.bias") if bias == "lora_only" else ("lora_a.weight", "lora_b.weight")

    @staticmethod
    def adapter_shapes(in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        """Shapes of A and B for a base of ``in_features`` -> ``out_features`` at rank ``r`` (keys as ``adapter_names``)."""
        return {"lora_a.weight": (r, in_features), "lora_b.weight": (out_features, r)}

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_a.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        if type(self.lora_a) is not nn.Linear or type(self.lora_b) is not nn.Linear:
            # Wrapped adapters (e.g. FSDP1 units) hold their full weights only inside their own forward.
            out = self.base_layer(x)
            return out + (self.lora_b(self.lora_a(self.dropout(x))) * self.scale).to(out.dtype)
        a, b = self.lora_a.weight, self.lora_b.weight
        if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad):
            return _routes.no_grad(self, x, a, b)
        # Compiled graphs get the plain ops: inductor fuses them itself, and the custom autograd node
        # traced into a compiled graph on CUDA lost gradients (benchmarks/profile_step.py checks this).
        if _routes.fusable(self) and not torch.compiler.is_compiling():
            return _routes.fused_training(self, x, a, b)
        return _routes.unfused_training(self, x, a, b)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` as float32, laid out like ``nn.Linear.weight``: (out, in)."""
        return (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scale

    @torch.no_grad()
    def merge(self) -> float | None:
        """Fold the update into the base weight. Returns the relative rounding error for quantized bases."""
        if self.merged:
            return None
        delta = self.delta_weight()
        error = None
        base = self.base_layer
        if quantization.is_quantized(base):
            self._quantized_snapshot = quantization.snapshot_quantized(base)
            target = quantization.dequantize_weight(base) + delta.to(base.weight.device)
            quantization.requantize_weight(base, target)
            rounded = quantization.dequantize_weight(base)
            error = ((rounded - target).norm() / target.norm().clamp_min(1e-12)).item()
        else:
            base.weight += (delta.t() if self.fan_in_fan_out else delta).to(base.weight.dtype)
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``. Quantized bases get their original quantized weight back, bit for bit."""
        if not self.merged:
            return
        base = self.base_layer
        if quantization.is_quantized(base):
            quantization.restore_quantized(base, self._quantized_snapshot)
            self._quantized_snapshot = None
        else:
            delta = self.delta_weight()
            base.weight -= (delta.t() if self.fan_in_fan_out else delta).to(base.weight.dtype)
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """The base weight plus the update, float32, in the base layer's own layout; the layer is left as is.

        For quantized bases the update is added to the dequantized original weight, so the result
        carries no second rounding (unlike the weight ``merge`` writes back).
        """
        base = self.base_layer
        if not quantization.is_quantized(base):
            if self.merged:
                return base.weight.detach().float()
            weight = base.weight.detach().float()
        else:
            weight = quantization.dequantize_weight(base, self._quantized_snapshot if self.merged else None)
        delta = self.delta_weight().to(weight.device)
        return weight + (delta.t() if self.fan_in_fan_out else delta)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}, merged={self.merged}"


@contextmanager
def fused_training(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Inside the block, every LoRA layer of ``model`` trains through the fused node (``enabled``) or plain ops.

    The fused node is the default wherever it applies; benchmarks and tests turn it off to compare.
    ``with fused_training(model, False): loss = model(x).sum()``
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    previous = [layer.fused for layer in layers]
    for layer in layers:
        layer.fused = bool(enabled)
    try:
        yield model
    finally:
        for layer, fused in zip(layers, previous):
            layer.fused = fused


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of ``model`` by its module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}
