"""One Triton kernel that dequantizes an nf4 weight (double-quantized scales included), bit for bit as bitsandbytes.

bitsandbytes dequantizes a double-quantized nf4 weight in three steps, each a kernel launched from Python: the
8-bit block scales to float32 (``dequantize_blockwise``), plus their offset, then the 4-bit values to the compute
dtype. Here the three are one kernel registered as a ``torch.library.triton_op``: a compiled graph launches it from
its own generated code, with none of the Python that each bitsandbytes op costs per call. Each output value is
``nf4_code[v] * scale`` in float32, rounded once to the output dtype; ``scale`` is ``code2[q] * absmax2 + offset``
with the multiply and the add rounded separately, as bitsandbytes' separate kernels do (the product goes through
``mul.rn.f32``, which the compiler never fuses into an FMA). ``tests/gpu/test_gpu_nf4_kernel.py`` compares it with
bitsandbytes on CUDA.

Next to it, two opaque ops with no Triton in them, for ``_routes.frozen_nf4_lora_linear`` (a compiled nf4 layer
with its LoRA update): ``linear_plus_update``, ``x @ W^T (+ bias) + scale * (x @ A^T) @ B^T`` (and ``x @ A^T`` for
the backward), and ``matmul_sum``, the input gradient ``g @ W + grad_h @ A``. Each writes the small product first
and lets the large one accumulate into it in cuBLAS's epilogue (``beta=1``), so the output is written once and
never read back by a separate pass. In a functional graph the same accumulation would first copy the buffer
(``addmm`` is out of place there: one device-to-device copy per LoRA layer and step), and a sum of two products
costs one more read of each.

``LIGHTNING_LORA_NF4_KERNEL=0`` in the environment (or ``nf4_kernel.ENABLED = False`` before the first compiled
step) turns it off. On one H200 it took a compiled 16-layer 7B QLoRA step from 151.4 to 127.7 ms at the same peak
memory (``benchmarks/results/2026-12-02-step-levers-h200/``). Only CUDA tensors with Triton importable, the nf4 code, an even number of values
and fewer than 2**31 of them; ``usable`` says whether a quant state qualifies, and callers fall back to
bitsandbytes' own dequantize otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# LIGHTNING_LORA_NF4_KERNEL=0 turns it off: bitsandbytes dequantizes everywhere then.
ENABLED = os.environ.get("LIGHTNING_LORA_NF4_KERNEL", "1") != "0"
_OP: list[Any] = []  # the registered op, built on first use (Triton is imported then, not at import time)
_UNAVAILABLE: list[bool] = []  # [True] once building failed
_LINEAR: list[Any] = []  # ``{name: op}`` of the LoRA ops below, registered by ``prepare`` (they need no Triton)
# The ``torch.library.Library`` fragments that define them: an op lives as long as its fragment object, so a reload of
# this module keeps the list it had (a fresh one would drop the ops until ``prepare`` defined them again).
_LIBRARY: list[Any] = globals().get("_LIBRARY") or []
_BLOCK = [1024]  # packed bytes per program (2,048 output values); a list so that benchmarks can try others


def prepare() -> bool:
    """Register the LoRA ops (``linear_plus_update``, ``matmul_sum``), import Triton and register the kernel's op, each
    once; whether the kernel's worked. ``compile_blocks`` calls it, so that a compiled graph finds the ops registered
    (registering one while dynamo traces would break the graph)."""
    if not _LINEAR:
        try:
            _LINEAR.append(_build_linear())
        except Exception:  # a torch whose custom-op API refuses it: the compiled route keeps the functional addmm
            _LINEAR.append(None)
    if not _OP and not _UNAVAILABLE:
        try:
            _OP.append(_build())
        except Exception:  # no Triton, or one that cannot build: bitsandbytes dequantizes
            _UNAVAILABLE.append(True)
    return len(_OP) > 0  # not bool(): dynamo cannot trace bool() of a list (a graph break)


def usable(packed: torch.Tensor, quant_state: Any) -> bool:
    """Whether ``dequantize`` can stand in for bitsandbytes' dequantize of this packed weight and quant state."""
    shape = getattr(quant_state, "shape", None)
    if not ENABLED or not packed.is_cuda or getattr(quant_state, "quant_type", None) != "nf4" or shape is None or len(shape) != 2:
        return False
    values = shape[0] * shape[1]
    if values % 2 or values >= 2**31 or packed.numel() * packed.element_size() != values // 2 or not packed.is_contiguous():
        return False
    if quant_state.nested and (quant_state.state2 is None or quant_state.offset is None):
        return False
    if not _OP and torch.compiler.is_compiling():
        return False  # not registered before the trace began: bitsandbytes' path, no graph break
    return prepare()


def _build_linear() -> dict[str, Any]:
    """The registered ops by name (``linear_plus_update``, ``matmul_sum``), defined here unless registered already
    (by this module before a reload, whose fragment ``_LIBRARY`` keeps); one registered with another schema is
    refused."""
    schemas = {"linear_plus_update": _LINEAR_SCHEMA, "matmul_sum": _SUM_SCHEMA}
    kernels = {"linear_plus_update": (_linear_plus_update, _linear_plus_update_fake), "matmul_sum": (_matmul_sum, _matmul_sum_fake)}
    ops = {}
    for name, schema in schemas.items():
        try:
            op = getattr(torch.ops.lightning_lora, name).default
        except (AttributeError, RuntimeError):
            op = None
        if op is not None:
            if str(op._schema) != "lightning_lora::" + schema:
                raise RuntimeError(f"`lightning_lora::{name}` is registered with another schema: {op._schema}")
            ops[name] = op
            continue
        # Defined through a plain ``torch.library.Library`` fragment, not ``torch.library.custom_op``: a compiled
        # graph calls the op once per LoRA layer and pass, and custom_op's Python wrapper costs more host time per
        # call (39 against 20 us for the same body on the development VM's CPU).
        library = torch.library.Library("lightning_lora", "FRAGMENT")
        library.define(schema)
        kernel, fake = kernels[name]
        library.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake("lightning_lora::" + name, fake, lib=library)
        _LIBRARY.append(library)  # the registration lives as long as the fragment object
        ops[name] = getattr(torch.ops.lightning_lora, name).default
    return ops


_LINEAR_SCHEMA = "linear_plus_update(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, float scale) -> (Tensor, Tensor)"
_SUM_SCHEMA = "matmul_sum(Tensor g, Tensor weight, Tensor h, Tensor a) -> Tensor"


def _linear_plus_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    # The adapter's casts and ``x @ A^T`` are here rather than in the graph, where each is one more launch from the
    # graph's Python per layer (a cast is a Triton kernel there).
    a_c, b_c = a.to(x.dtype), b.to(x.dtype)  # no-ops where A and B are in x's dtype already
    h = torch.mm(x, a_c.t())  # (tokens, r)
    # The update first (beta=0: the new buffer's contents are never read), then the base product accumulated into
    # it by the matmul's own epilogue: the output is written by the small product and read once by the large one,
    # rather than written by the large one and read and written again by an update pass.
    if bias is None:
        out = x.new_empty((x.shape[0], weight.shape[0])).addmm_(h, b_c.t(), beta=0, alpha=scale)
    else:
        out = torch.addmm(bias, h, b_c.t(), alpha=scale)
    return out.addmm_(x, weight.t()), h  # in place: the buffer is the op's own


def _linear_plus_update_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], a.shape[0]))


def _matmul_sum(g: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # ``h @ A`` (A cast to h's dtype, a no-op in the same) written first, ``g @ W`` accumulated into it in place.
    return torch.mm(h, a.to(h.dtype)).addmm_(g, weight)


def _matmul_sum_fake(g: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return g.new_empty((g.shape[0], weight.shape[1]))


def linear_plus_update_ready() -> bool:
    """Whether the LoRA ops (``linear_plus_update``, ``matmul_sum``) are registered (``prepare`` registers them)."""
    return len(_LINEAR) > 0 and _LINEAR[0] is not None


def linear_plus_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(x @ weight^T (+ bias) + scale * h @ b^T, h)`` with ``h = x @ a^T``, for 2-D ``x`` (tokens, in) and
    ``weight`` (out, in) of one dtype, ``a`` (r, in) and ``b`` (out, r) of any (cast to ``x``'s), with no autograd
    (call it inside an ``autograd.Function``); ``prepare`` first. ``h`` is what the backward needs of the forward."""
    if not linear_plus_update_ready():
        raise RuntimeError("Call `nf4_kernel.prepare()` before `linear_plus_update` (compile_blocks does); "
                           "check `linear_plus_update_ready()`.")  # fmt: skip
    return _LINEAR[0]["linear_plus_update"](x, weight, bias, a, b, scale)


def matmul_sum(g: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``g @ weight + h @ a`` for 2-D ``g`` (tokens, out), ``weight`` (out, in) in ``g``'s dtype, ``h`` (tokens, r)
    and ``a`` (r, in) of any dtype (cast to ``h``'s): a LoRA layer's input gradient, with no autograd (call it in
    an ``autograd.Function``'s backward); ``prepare`` first (``linear_plus_update_ready`` covers both ops)."""
    if not linear_plus_update_ready():
        raise RuntimeError("Call `nf4_kernel.prepare()` before `matmul_sum` (compile_blocks does); "
                           "check `linear_plus_update_ready()`.")  # fmt: skip
    return _LINEAR[0]["matmul_sum"](g, weight, h, a)


def _build() -> Any:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def nf4_dequantize_kernel(packed, absmax, code2, absmax2, offset, code, out, n_bytes,
                              BLOCK: tl.constexpr, BYTES_PER_SCALE: tl.constexpr, SCALES_PER_SCALE2: tl.constexpr,
                              NESTED: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(packed + offs, mask=mask, other=0).to(tl.int32)
        block = offs // BYTES_PER_SCALE
        if NESTED:
            q = tl.load(absmax + block, mask=mask, other=0).to(tl.int32)
            c2 = tl.load(code2 + q, mask=mask, other=0.0)
            a2 = tl.load(absmax2 + block // SCALES_PER_SCALE2, mask=mask, other=0.0)
            product = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [c2, a2], dtype=tl.float32, is_pure=True, pack=1)
            scale = product + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=mask, other=0.0)
        high = tl.load(code + (byte >> 4)) * scale  # the first value of a byte is its high nibble
        low = tl.load(code + (byte & 15)) * scale
        values = tl.interleave(high, low).to(out.dtype.element_ty)
        out_offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out + out_offs, values, mask=out_offs < 2 * n_bytes)

    @triton_op("lightning_lora::dequantize_nf4", mutates_args=())
    def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, code2: torch.Tensor | None,
                       absmax2: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, blocksize2: int,
                       rows: int, cols: int, dtype: torch.dtype, pass_id: int) -> torch.Tensor:  # fmt: skip
        out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
        n_bytes = rows * cols // 2
        nested = code2 is not None
        block = _BLOCK[0]
        wrap_triton(nf4_dequantize_kernel)[(triton.cdiv(n_bytes, block),)](
            packed, absmax, code2 if nested else absmax, absmax2 if nested else absmax, offset if nested else absmax, code,
            out, n_bytes, BLOCK=block, BYTES_PER_SCALE=blocksize // 2, SCALES_PER_SCALE2=max(blocksize2, 1), NESTED=nested,
            num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip
        return out

    return dequantize_nf4


def dequantize(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype, pass_id: int = 0) -> torch.Tensor:
    """The (out, in) weight of a packed nf4 tensor in ``dtype``, as ``bitsandbytes.functional.dequantize_4bit``
    gives it then ``.to(dtype)`` (check ``usable`` first).

    ``pass_id`` tells calls apart that would otherwise be identical: a frozen layer dequantizes in forward
    (0) and again in backward (1), and without it AOT autograd merges the two into one and keeps the
    forward's weight alive until backward (the memory that recomputing it saves)."""
    if not _OP and not prepare():
        raise RuntimeError("The nf4 dequantize kernel needs Triton: check `nf4_kernel.usable` before calling `dequantize`.")
    rows, cols = quant_state.shape
    flat = packed.view(torch.uint8).reshape(-1)  # bitsandbytes may store the packed bytes as another dtype
    if quant_state.nested:
        state2 = quant_state.state2
        return _OP[0](flat, quant_state.absmax, quant_state.code, state2.code, state2.absmax, quant_state.offset.reshape(1),
                      quant_state.blocksize, state2.blocksize, rows, cols, dtype, pass_id)  # fmt: skip
    return _OP[0](flat, quant_state.absmax, quant_state.code, None, None, None, quant_state.blocksize, 0, rows, cols, dtype, pass_id)
