"""The fast routes of ``LoRALinear.forward`` and the guards that decide when they may run.

``layers.LoRALinear`` is the reference: base output plus ``scale * B(A(dropout(x)))``. Here are the
three faster ways to compute the same thing, each for one situation:

- ``fused_training``: one autograd node (``_FusedLoRA``) for a frozen float or 4-bit base;
- ``unfused_training``: plain ops, the update added into the base output with one ``addmm``
  (compiled graphs, 8-bit bases, hooks on the base layer, ``layer.fused = False``); in a compiled graph, a frozen
  nf4 base on CUDA without dropout takes ``frozen_nf4_lora_linear`` (the update added in place);
- ``no_grad``: without autograd, the update added to the output in place, or folded into the
  (dequantized) weight when that is cheaper in memory traffic or, at small batch on a GPU, in kernel launches.

Nothing here imports the layer module: the routes take the layer and read its attributes
(``base_layer``, ``in_features``, ``out_features``, ``fan_in_fan_out``, ``fused``) and the adapter's that runs
(``r``, ``scale``, ``dropout``, ``use_dora``: the layer itself for its default adapter, else a ``LoRAAdapter``).
DoRA adapters take none of these routes (``fusable`` says no): they run ``dora.output``.

At small batch on a GPU the layer's host time is what the GPU waits for, so the per-call code here keeps its
Python short (``benchmarks/host_overhead.py``): submodules and parameters are read with ``_members.member`` (not
through ``nn.Module.__getattr__``), a tensor already in the dtype wanted is not cast (``_cast``), and every guard
is a plain check made each call: hooks, adapters, merging, dtypes and torch.func transforms can change at any time.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_mod  # the global module hooks live here

from lightning_lora import nf4_kernel, quantization
from lightning_lora._members import member

LoRALinear = nn.Module  # for annotations: the routes take a ``layers.LoRALinear`` (not imported: it imports this module)
Adapter = nn.Module  # the module holding one adapter's A, B, scale and dropout (``layers.LoRAAdapter``, or the layer)


# -- guards --------------------------------------------------------------------------------------
def fusable(layer: LoRALinear, adapter: Adapter | None = None, base: nn.Module | None = None) -> bool:
    """Whether ``_FusedLoRA`` (and the weight route) can stand in for base + LoRA (``adapter``, default the active one).

    It needs a frozen float or 4-bit base (bias frozen too) with its class's stock forward,
    no forward or backward hooks on the base layer (it computes the base output without calling the
    base module), no torch.func transform (the node defines no vmap rule), and an additive adapter:
    DoRA rescales the base output too, which the node does not compute. ``base``: the layer's ``base_layer``, where
    the caller has it already.
    """
    base = member(layer, "base_layer") if base is None else base
    adapter = layer.get_adapter(layer.active_adapter) if adapter is None else adapter
    if adapter is None or adapter.use_dora or not layer.fused:
        return False
    if quantization.is_8bit(base) or quantization.packed_tensor(member(base, "weight")).requires_grad:
        return False
    bias = member(base, "bias")
    if bias is not None and bias.requires_grad:
        return False
    return _unhooked(base) and _stock_forward(base, layer.fan_in_fan_out) and not _functorch_active()


def _unhooked(module: nn.Module) -> bool:
    """No forward or backward hook, on ``module`` or global, would miss a computation that bypasses its forward."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
                or module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks
                or module_mod._global_backward_hooks or module_mod._global_backward_pre_hooks)  # fmt: skip


def _stock_forward(base: nn.Module, conv1d: bool) -> bool:
    """The base computes what its library class computes: no subclass overrides ``forward``."""
    if quantization.is_4bit(base):
        return quantization.has_stock_forward(base)
    return conv1d or type(base).forward is nn.Linear.forward


# Looked up once: a getattr that misses (the first spelling, on current torch) costs about 2 us of host time a call.
_TRANSFORMS_ACTIVE = getattr(torch._C._functorch, "_are_functorch_transforms_active", None) or getattr(
    torch._C, "_are_functorch_transforms_active", None
)


def _functorch_active() -> bool:
    return bool(_TRANSFORMS_ACTIVE()) if _TRANSFORMS_ACTIVE is not None else False


# -- dtypes and the frozen weight ------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on, else that of the base output."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(x.device.type)  # autocast leaves float64 alone
    return fallback


def _base_compute_dtype(base: nn.Module, x: torch.Tensor, four_bit: bool) -> torch.dtype:
    """The dtype the base layer computes in without autocast: bitsandbytes' ``compute_dtype`` for 4-bit, else x's."""
    if four_bit and base.compute_dtype is not None:
        return base.compute_dtype
    return x.dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, without the call when it would return ``tensor`` itself (about 1 us of host time each)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _frozen_weight(base: nn.Module, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    """The base weight as an (out, in) matrix in ``dtype``: dequantized for 4-bit bases, a view or cast otherwise.

    ``transposed``: the base stores its weight as (in, out) (GPT-2 ``Conv1D``).
    """
    if quantization.is_4bit(base):
        return quantization.dequantize_weight(base, dtype=dtype)
    weight = member(base, "weight")
    return _cast(weight.t() if transposed else weight, dtype)


# -- the routes ------------------------------------------------------------------------------------
def fused_training(layer: LoRALinear, adapter: Adapter, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dropout = member(adapter, "dropout")
    x_lora = None if isinstance(dropout, nn.Identity) else dropout(x)
    return _FusedLoRA.apply(x, x_lora, a, b, layer, adapter.scale)


def unfused_training(layer: LoRALinear, adapter: Adapter, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    # In a compiled graph, a stock frozen nf4 base on CUDA: dequantized by one Triton kernel (None: the layer computes itself).
    compiled_4bit = torch.compiler.is_compiling() and quantization.is_4bit(base) and fusable(layer, adapter)
    if compiled_4bit and isinstance(member(adapter, "dropout"), nn.Identity):
        out = frozen_nf4_lora_linear(base, x, a, b, adapter.scale)  # the update added in place
        if out is not None:
            return out
    out = quantization.frozen_nf4_linear(base, x) if compiled_4bit else None
    if out is None:
        out = base(x)
    if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        a, b = a.to(x.dtype), b.to(x.dtype)  # cast the small adapter, not the activation
    h = F.linear(adapter.dropout(x), a)  # (..., r)
    if out.dtype == h.dtype and out.dim() >= 2:
        # One kernel: out + scale * h @ B^T, written into the base output's shape.
        return torch.addmm(out.reshape(-1, layer.out_features), h.reshape(-1, adapter.r), b.t(), alpha=adapter.scale).view(out.shape)
    return out + (F.linear(h, b) * adapter.scale).to(out.dtype)


def frozen_nf4_lora_linear(module: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Inside a compiled graph: ``quantization.frozen_nf4_linear(module, x) + scale * (x @ a^T) @ b^T`` by one opaque
    op (``nf4_kernel.linear_plus_update``: the update written, the base product accumulated into it), and its input
    gradient by another (``nf4_kernel.matmul_sum``); None where it does not apply.

    ``a`` (r, in) and ``b`` (out, r) are a LoRA adapter's matrices (without dropout: ``x`` feeds both paths). Written
    as ``torch.addmm(base_out, h, b^T)``, the functional graph copies the base output into a new buffer first (one
    device-to-device copy of a (tokens, out) matrix per layer and step, 2.6 ms of a 16-layer 7B step on an H200:
    ``benchmarks/results/2026-12-02-step-profile-h200/``); the ops compute without it. The sum is rounded
    twice either way; here the first rounding falls on the small update rather than on the base product, which
    is added to it in the matmul's float32 accumulator. Backward is the plain ops' computation otherwise (the weight
    dequantized again, nothing of it kept). None, besides where
    ``quantization.frozen_nf4_linear`` is None, where ``x`` is not in the layer's compute dtype or autocast computes in another:
    the plain ops handle those casts.
    """
    layer = quantization.kernel_layer(module, x)
    if layer is None or not nf4_kernel.linear_plus_update_ready():
        return None
    weight, state, bias, dtype = layer
    if x.dtype != dtype or (torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) != dtype):
        return None
    return _FrozenNF4LoRA.apply(x, weight, bias, state, a, b, scale)


class _FrozenNF4LoRA(torch.autograd.Function):
    """``x @ dequantize(W)^T (+ bias) + scale * (x @ A^T) @ B^T`` for a frozen nf4 weight and a trainable A, B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: Any, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
        x2 = x.reshape(-1, x.shape[-1])
        # One opaque call: the adapter's casts, h = x @ A^T (tokens, r), the base matmul and the update added in place.
        out, h = nf4_kernel.linear_plus_update(x2, nf4_kernel.dequantize(weight, state, x.dtype), bias, a, b, scale)
        ctx.state, ctx.scale = state, scale
        # x, not its 2-D view: dynamo refuses to save a view of an input made inside the node. The packed weight and
        # A, B are the parameters themselves: no memory (backward casts B again in the graph, A inside matmul_sum).
        ctx.save_for_backward(weight, x, h, a, b)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, x, h, a, b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        needs_x, _, _, _, needs_a, needs_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        grad_h = torch.mm(g, _cast(b, x2.dtype)) * ctx.scale  # (tokens, r)
        grad_a = torch.mm(grad_h.t(), x2).to(a.dtype) if needs_a else None
        grad_b = (torch.mm(g.t(), h) * ctx.scale).to(b.dtype) if needs_b else None
        grad_x = None
        if needs_x:  # as bitsandbytes: dequantized in the weight's own dtype, then cast
            w = nf4_kernel.dequantize(weight, ctx.state, ctx.state.dtype, pass_id=1).to(g.dtype)
            # g @ W + grad_h @ A in one buffer: the small product written, the large one accumulated into it.
            grad_x = nf4_kernel.matmul_sum(g, w, grad_h, a).view(*grad.shape[:-1], x2.shape[-1])
        return grad_x, None, None, None, grad_a, grad_b, None


# Devices where an eager forward at small batch waits on the host's kernel launches rather than on the device.
LAUNCH_BOUND_DEVICES = ("cuda",)


def folds(layer: LoRALinear, x: torch.Tensor, four_bit: bool, base: nn.Module | None = None) -> bool:
    """Whether ``no_grad`` adds the update to the weight (True) rather than to the output, for input ``x``.

    By memory traffic: with many tokens, adding the update to the output costs a read and a write of the whole
    (tokens, out) output plus a read of the input; adding ``scale * B @ A`` to the weight the base computes with
    (a temporary: dequantized for 4-bit bases) costs a pass over (out, in) instead, independent of the tokens.

    By launches: at small batch on a GPU an eager forward is bound by the host, which launches the kernels
    (1 x 512 tokens through 16 7B layers: ~13 ms of GPU work, 35-47 ms of host time). Where bitsandbytes computes
    a 4-bit base by dequantizing its weight into a temporary anyway (``quantization.gemm_4bit_dequantizes``: not at
    one row, nor where its own small-batch kernel reads the 4-bit weight), folding the update into that temporary
    takes one kernel (``addmm_``) where the output route takes two (``x @ A``, then ``addmm_``). It is taken when
    ``tokens * in * out`` is at most ``layer.fold_below_macs`` (the matmul is then short next to the launches),
    not inside a compiled graph (inductor fuses the update itself) and not while a CUDA graph is captured (its
    replay has no launch cost to save, and the extra pass over the weight would be paid on every replay).
    Neither rule applies while autograd records a gradient to ``x`` (a frozen adapter, the input needing gradients:
    attributions, trained embeddings): ``linear`` would keep the whole folded weight for the backward, where the
    output route keeps the adapter's small matrices. ``base``: the layer's ``base_layer``, where the caller has it.
    """
    limit = layer.fold_below_macs
    if not isinstance(limit, numbers.Integral) or isinstance(limit, bool) or limit < 0:
        raise ValueError(
            f"`LoRALinear.fold_below_macs` must be a non-negative int (tokens x in x out multiply-adds), got {limit!r}. "
            "Set it to e.g. 2**35, or to 0 to turn the small-batch fold off."
        )
    if x.requires_grad and torch.is_grad_enabled():
        return False
    tokens = x.numel() // layer.in_features
    fold_cost = (2 if four_bit else 3) * layer.in_features * layer.out_features
    if tokens * (layer.in_features + 2 * layer.out_features) > fold_cost:
        return True
    if not four_bit or tokens < 2 or x.device.type not in LAUNCH_BOUND_DEVICES:
        return False
    if tokens * layer.in_features * layer.out_features > limit or torch.compiler.is_compiling():
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    base = member(layer, "base_layer") if base is None else base
    # bitsandbytes casts x to the layer's compute dtype before its op (autocast does not reach it): ask with that.
    return quantization.gemm_4bit_dequantizes(base, x, _base_compute_dtype(base, x, True))


def no_grad(layer: LoRALinear, adapter: Adapter, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Without autograd (inference, or a reentrant-checkpoint forward): the update added into the base output in place,
    or into the weight the base computes with (``folds`` says which; not while dropout is active, which acts on the
    input). The weight route rounds like ``merge_lora`` on a bf16 weight; for a 4-bit base it dequantizes with
    ``quantization.dequantize_4bit_no_grad``. A stock, unhooked 4-bit base on the output route is computed by
    ``quantization.linear_4bit_no_grad`` (its own result, less host time).
    """
    base = member(layer, "base_layer")
    four_bit = quantization.is_4bit(base)
    dropout = member(adapter, "dropout")
    dropout_active = layer.training and not isinstance(dropout, nn.Identity)
    fold = not dropout_active and folds(layer, x, four_bit, base)
    stock = (fold or four_bit) and fusable(layer, adapter, base)  # the base computes what its class computes, unhooked
    if fold and stock:
        dtype = _compute_dtype(x, _base_compute_dtype(base, x, four_bit))
        weight = quantization.dequantize_4bit_no_grad(base, dtype) if four_bit else None
        if weight is None:
            weight = _frozen_weight(base, dtype, layer.fan_in_fan_out)
        a, b = _cast(a, dtype), _cast(b, dtype)
        # A dequantized weight is a fresh tensor: add in place. A float weight is the parameter itself.
        weight = weight.addmm_(b, a, alpha=adapter.scale) if four_bit else torch.addmm(weight, b, a, alpha=adapter.scale)
        bias = member(base, "bias")
        out = F.linear(_cast(x, dtype), weight, None if bias is None else _cast(bias, dtype))
        return _cast(out, x.dtype) if four_bit else out
    # A stock 4-bit base without its forward's Python around bitsandbytes' op (the same result; None: call it).
    out = quantization.linear_4bit_no_grad(base, x) if four_bit and stock else None
    if out is None:
        out = base(x)
    dtype = _compute_dtype(x, out.dtype)
    a, b = _cast(a, dtype), _cast(b, dtype)
    x_lora = dropout(x) if dropout_active else x
    h = torch.mm(_cast(x_lora.reshape(-1, layer.in_features), dtype), a.t())
    # In place only when nothing else can hold the base output (a forward hook may have kept it).
    if out.dtype == dtype and out.is_contiguous() and not out.requires_grad and _unhooked(base):
        out.view(-1, layer.out_features).addmm_(h, b.t(), alpha=adapter.scale)
        return out
    return out + (torch.mm(h, b.t()) * adapter.scale).view(out.shape).to(out.dtype)


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
    def forward(ctx: Any, x: torch.Tensor, x_lora: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, layer: LoRALinear, scale: float) -> torch.Tensor:
        base = member(layer, "base_layer")
        four_bit = quantization.is_4bit(base)
        bias = member(base, "bias")
        dtype = _compute_dtype(x, _base_compute_dtype(base, x, four_bit))
        x2 = _cast(x.reshape(-1, layer.in_features), dtype)
        xl2 = x2 if x_lora is None else _cast(x_lora.reshape(-1, layer.in_features), dtype)
        if four_bit:
            out = quantization.matmul_4bit_frozen(base, x2, None if bias is None else _cast(bias, dtype))
        else:
            weight = _frozen_weight(base, dtype, layer.fan_in_fan_out)
            out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(_cast(bias, dtype), x2, weight.t())
        a_c, b_c = _cast(a, dtype), _cast(b, dtype)
        h = torch.mm(xl2, a_c.t())
        out.addmm_(h, b_c.t(), alpha=scale)
        ctx.layer, ctx.dtype, ctx.x_dtype, ctx.dropout, ctx.scale = layer, dtype, x.dtype, x_lora is not None, scale
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        ctx.save_for_backward(xl2, h, a_c, b_c)
        # Like the base layers themselves: bitsandbytes returns the input dtype, torch's linear the compute dtype.
        return _cast(out.view(*x.shape[:-1], layer.out_features), x.dtype if four_bit else dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl2, h, a_c, b_c = ctx.saved_tensors
        layer = ctx.layer
        needs_x, needs_x_lora, needs_a, needs_b, _, _ = ctx.needs_input_grad
        g = _cast(grad.reshape(-1, layer.out_features), ctx.dtype)
        grad_h = torch.mm(g, b_c).mul_(ctx.scale)  # (tokens, r)
        grad_a = _cast(torch.mm(grad_h.t(), xl2), ctx.a_dtype) if needs_a else None
        grad_b = _cast(torch.mm(g.t(), h).mul_(ctx.scale), ctx.b_dtype) if needs_b else None
        grad_x = grad_x_lora = None
        if needs_x:
            grad_x = torch.mm(g, _frozen_weight(member(layer, "base_layer"), ctx.dtype, layer.fan_in_fan_out))
            if not ctx.dropout:
                grad_x.addmm_(grad_h, a_c)
            grad_x = _cast(grad_x.view(*grad.shape[:-1], layer.in_features), ctx.x_dtype)
        if ctx.dropout and needs_x_lora:
            grad_x_lora = _cast(torch.mm(grad_h, a_c).view(*grad.shape[:-1], layer.in_features), ctx.x_dtype)
        return grad_x, grad_x_lora, grad_a, grad_b, None, None
