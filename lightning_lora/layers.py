"""The LoRA layer: a frozen base linear plus a trainable low-rank update.

    y = base(x) + scale * B(A(dropout(x)))        A: (r, in), B: (out, r), scale = alpha / r

(Hu et al., 2021, "LoRA", eq. 3). A starts like an ``nn.Linear`` weight (kaiming-uniform, a=sqrt(5)),
B starts at zero, so a freshly wrapped model computes exactly what the base model computes.
The base may be an ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored (in, out)), or a
bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_mod  # the global module hooks live here

from lightning_lora import quantization


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
        self._quantized_snapshot: dict[str, Any] | None = None
        self.reset_lora_parameters(init)
        self.train(base_layer.training)  # a wrapped eval-mode model stays in eval mode

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
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            # Compiled graphs get the plain ops: inductor fuses them itself, and the custom autograd node
            # traced into a compiled graph on CUDA lost gradients (benchmarks/profile_step.py checks this).
            if self._fusable() and not torch.compiler.is_compiling():
                x_lora = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
                return _FusedLoRA.apply(x, x_lora, a, b, self)
            return self._forward_unfused(x, a, b)
        return self._forward_no_grad(x, a, b)

    def _fusable(self) -> bool:
        """Whether ``_FusedLoRA`` can stand in for base + LoRA.

        It needs a frozen float or 4-bit base (bias frozen too) with its class's stock forward,
        no forward or backward hooks on the base layer (it computes the base output without calling the
        base module), and no torch.func transform (the node defines no vmap rule).
        """
        base = self.base_layer
        if not USE_FUSED or quantization.is_8bit(base) or base.weight.requires_grad:
            return False
        if getattr(base, "bias", None) is not None and base.bias.requires_grad:
            return False
        return _unhooked(base) and _stock_forward(base) and not _functorch_active()

    def _forward_unfused(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)  # cast the small adapter, not the activation
        h = F.linear(self.dropout(x), a)  # (..., r)
        if out.dtype == h.dtype and out.dim() >= 2:
            # One kernel: out + scale * h @ B^T, written into the base output's shape.
            return torch.addmm(out.reshape(-1, self.out_features), h.reshape(-1, self.r), b.t(), alpha=self.scale).view(out.shape)
        return out + (F.linear(h, b) * self.scale).to(out.dtype)

    def _forward_no_grad(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Without autograd (inference, or a reentrant-checkpoint forward): the update added into the base output in place.

        With many tokens, adding the update to the output costs a read and a write of the whole
        (tokens, out) output plus a read of the input; adding ``scale * B @ A`` to the weight the base
        computes with (a temporary: dequantized for 4-bit bases) costs a pass over (out, in) instead,
        independent of the number of tokens. The cheaper of the two is taken (not while dropout is
        active, which acts on the input); the weight route rounds like ``merge_lora`` on a bf16 weight.
        """
        base = self.base_layer
        four_bit = quantization.is_4bit(base)
        dropout_active = self.training and not isinstance(self.dropout, nn.Identity)
        tokens = x.numel() // self.in_features
        fold_cost = (2 if four_bit else 3) * self.in_features * self.out_features
        if not dropout_active and tokens * (self.in_features + 2 * self.out_features) > fold_cost and self._fusable():
            dtype = _compute_dtype(x, _base_compute_dtype(base, x))
            weight = _frozen_weight(base, dtype)
            a, b = a.to(dtype), b.to(dtype)
            # A dequantized weight is a fresh tensor: add in place. A float weight is the parameter itself.
            weight = weight.addmm_(b, a, alpha=self.scale) if four_bit else torch.addmm(weight, b, a, alpha=self.scale)
            bias = getattr(base, "bias", None)
            out = F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))
            return out.to(x.dtype) if four_bit else out
        out = base(x)
        dtype = _compute_dtype(x, out.dtype)
        a, b = a.to(dtype), b.to(dtype)
        x_lora = self.dropout(x) if dropout_active else x
        h = torch.mm(x_lora.reshape(-1, self.in_features).to(dtype), a.t())
        # In place only when nothing else can hold the base output (a forward hook may have kept it).
        if out.dtype == dtype and out.is_contiguous() and not out.requires_grad and _unhooked(base):
            out.view(-1, self.out_features).addmm_(h, b.t(), alpha=self.scale)
            return out
        return out + (torch.mm(h, b.t()) * self.scale).view(out.shape).to(out.dtype)

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


USE_FUSED = True
"""Train through ``_FusedLoRA`` where it applies; benchmarks turn it off to measure the unfused path."""


def _unhooked(module: nn.Module) -> bool:
    """No forward or backward hook, on ``module`` or global, would miss a computation that bypasses its forward."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks,
             module_mod._global_forward_hooks, module_mod._global_forward_pre_hooks, module_mod._global_backward_hooks,
             module_mod._global_backward_pre_hooks)  # fmt: skip
    return not any(hooks)


def _stock_forward(base: nn.Module) -> bool:
    """The base computes what its library class computes: no subclass overrides ``forward``."""
    if quantization.is_4bit(base):
        return quantization.has_stock_forward(base)
    return _is_conv1d(base) or type(base).forward is nn.Linear.forward


def _functorch_active() -> bool:
    check = getattr(torch._C._functorch, "_are_functorch_transforms_active", None) or getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


def _compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on, else that of the base output."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(x.device.type)  # autocast leaves float64 alone
    return fallback


def _frozen_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as an (out, in) matrix in ``dtype``: dequantized for 4-bit bases, a view or cast otherwise."""
    if quantization.is_4bit(base):
        return quantization.dequantize_weight(base, dtype=dtype)
    weight = base.weight.t() if _is_conv1d(base) else base.weight
    return weight.to(dtype)


class _FusedLoRA(torch.autograd.Function):
    """``base(x) + scale * (x_lora @ A^T) @ B^T`` as one autograd node, for a frozen float or 4-bit base.

    Compared with the base layer's own autograd plus the LoRA ops, this writes the update into the
    base output in place (no copy of the output), accumulates the LoRA input gradient into the base's
    in place (no separate sum), skips dequantizing in backward when ``x`` needs no gradient, and saves
    only what the unfused path saves (``x``, the (tokens, r) product, the small adapter casts); a
    4-bit weight is dequantized again in backward rather than kept. ``x_lora`` is the dropout output,
    or None when there is no dropout (then ``x`` feeds both paths).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_lora: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, layer: LoRALinear) -> torch.Tensor:
        base = layer.base_layer
        bias = getattr(base, "bias", None)
        dtype = _compute_dtype(x, _base_compute_dtype(base, x))
        x2 = x.reshape(-1, layer.in_features).to(dtype)
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, layer.in_features).to(dtype)
        if quantization.is_4bit(base):
            out = quantization.matmul_4bit_frozen(base, x2, None if bias is None else bias.to(dtype))
        else:
            weight = _frozen_weight(base, dtype)
            out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias.to(dtype), x2, weight.t())
        a_c, b_c = a.to(dtype), b.to(dtype)
        h = torch.mm(xl2, a_c.t())
        out.addmm_(h, b_c.t(), alpha=layer.scale)
        ctx.layer, ctx.dtype, ctx.x_dtype, ctx.dropout, ctx.scale = layer, dtype, x.dtype, x_lora is not None, layer.scale
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        ctx.save_for_backward(xl2, h, a_c, b_c)
        # Like the base layers themselves: bitsandbytes returns the input dtype, torch's linear the compute dtype.
        out_dtype = x.dtype if quantization.is_4bit(base) else dtype
        return out.view(*x.shape[:-1], layer.out_features).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl2, h, a_c, b_c = ctx.saved_tensors
        layer = ctx.layer
        needs_x, needs_x_lora, needs_a, needs_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, layer.out_features).to(ctx.dtype)
        grad_h = torch.mm(g, b_c).mul_(ctx.scale)  # (tokens, r)
        grad_a = torch.mm(grad_h.t(), xl2).to(ctx.a_dtype) if needs_a else None
        grad_b = torch.mm(g.t(), h).mul_(ctx.scale).to(ctx.b_dtype) if needs_b else None
        grad_x = grad_x_lora = None
        if needs_x:
            grad_x = torch.mm(g, _frozen_weight(layer.base_layer, ctx.dtype))
            if not ctx.dropout:
                grad_x.addmm_(grad_h, a_c)
            grad_x = grad_x.view(*grad.shape[:-1], layer.in_features).to(ctx.x_dtype)
        if ctx.dropout and needs_x_lora:
            grad_x_lora = torch.mm(grad_h, a_c).view(*grad.shape[:-1], layer.in_features).to(ctx.x_dtype)
        return grad_x, grad_x_lora, grad_a, grad_b, None


def _base_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the base layer computes in without autocast: bitsandbytes' ``compute_dtype`` for 4-bit, else x's."""
    if quantization.is_4bit(base) and base.compute_dtype is not None:
        return base.compute_dtype
    return x.dtype


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of ``model`` by its module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}
