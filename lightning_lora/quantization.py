"""Everything that touches bitsandbytes. The only module that imports it, lazily.

Facts this relies on (bitsandbytes 0.50): a ``Params4bit`` / ``Int8Params`` built with
``requires_grad=False`` quantizes itself inside ``.to(device)``, on CPU as on CUDA; the 4-bit
``quant_state`` is neither a parameter nor a buffer.
"""

from __future__ import annotations

import copy
import re
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_lora import nf4_kernel
from lightning_lora._members import member
from lightning_lora._matching import matches_any, output_head_names, replace_modules
from lightning_lora.config import QuantizationConfig

if TYPE_CHECKING:
    from types import ModuleType


_BNB: ModuleType | None = None


def _bnb() -> ModuleType:
    # A plain global rather than functools.cache: torch.compile traces this without a warning.
    global _BNB
    if _BNB is None:
        try:
            import bitsandbytes
        except Exception as err:  # ImportError, or a broken native library
            raise RuntimeError(
                f"Quantization needs a working bitsandbytes, but importing it failed: {err}. "
                "Install it with `pip install bitsandbytes>=0.45`, or pass `quantization=None` / `quantize=None`."
            ) from err
        _BNB = bitsandbytes
    return _BNB


def require_bitsandbytes(parameter: str, value: object) -> None:
    """Raise a ValueError naming the argument that asked for quantization when bitsandbytes is unusable."""
    try:
        _bnb()
    except RuntimeError as err:
        raise ValueError(
            f"`{parameter}`={value!r} asks for bitsandbytes quantization, but importing bitsandbytes failed: "
            f"{err.__cause__!r}. Install it with `pip install bitsandbytes>=0.45`, or pass `{parameter}=None` to train "
            "in full precision."
        ) from err.__cause__


def bitsandbytes_available() -> bool:
    try:
        _bnb()
    except RuntimeError:
        return False
    return True


_CLASSES: list[tuple[type, ...]] = []  # [(Linear4bit, Linear8bitLt, Params4bit)] once bitsandbytes is imported


def _bnb_classes() -> tuple[type, ...]:
    """The quantized layer classes and bitsandbytes' 4-bit parameter class (``Linear4bit, Linear8bitLt, Params4bit``),
    or () while bitsandbytes was never imported (then no model has them). Looked up once: the checks of the layers'
    per-call routes make it."""
    if _CLASSES:
        return _CLASSES[0]
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not hasattr(bnb, "nn"):
        return ()
    _CLASSES.append((bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, bnb.nn.Params4bit))
    return _CLASSES[0]


def packed_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight as a plain tensor on the same storage: ``Params4bit`` defines ``__torch_function__``, so every
    op and attribute read on it (``.shape``, ``.dim()``, an op's argument) runs Python; ``as_subclass`` itself does
    not (about 5 such calls saved per layer call on the no-grad routes). Inside a compiled graph the weight itself:
    dynamo cannot trace ``as_subclass`` of a tensor subclass (every layer would break the graph), and no Python runs
    per call there anyway."""
    classes = _bnb_classes()
    if classes and type(weight) is classes[2] and not torch.compiler.is_compiling():
        return weight.as_subclass(torch.Tensor)
    return weight


def is_4bit(module: nn.Module) -> bool:
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes[0])


def is_8bit(module: nn.Module) -> bool:
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes[1])


def is_quantized(module: nn.Module) -> bool:
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes[:2])


def quantize_linear(linear: nn.Linear, config: QuantizationConfig, device: torch.device | str | None = None) -> nn.Module:
    """A bitsandbytes copy of ``linear`` on ``device`` (default: where ``linear`` lives)."""
    bnb = _bnb()
    device = torch.device(device) if device is not None else linear.weight.device
    if device.type == "meta":
        raise ValueError(
            "`quantize_linear` got a layer on the meta device: its weights do not exist yet. "
            "Materialize the model (e.g. `model.to_empty(device=...)` and load weights) before quantizing."
        )
    has_bias = linear.bias is not None
    weight = linear.weight.detach()
    if config.mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta")
        # Int8Params quantizes when it moves off the CPU (or to it), never from one GPU place to another: staged on
        # the CPU, the final `.to(device)` quantizes wherever the layer lives (a model already on the GPU included).
        layer.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        compute_dtype = config.resolved_compute_dtype(device)
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.mode,
            quant_storage=config.storage_dtype(),
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            compress_statistics=config.double_quant,
            quant_type=config.mode,
            quant_storage=config.storage_dtype(),
            module=layer,  # quantizing sets layer.quant_state, which forward re-attaches when FSDP drops it
        )
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.train(linear.training)
    keep_standard_layout(layer)
    if config.mode != "int8":
        load_4bit_state(layer)
    layer = layer.to(device)  # quantization happens here, one layer at a time
    if config.mode == "int8" and (layer.weight.dtype != torch.int8 or getattr(layer.weight, "SCB", None) is None):
        raise RuntimeError(f"bitsandbytes left the int8 weight of a {linear.in_features}->{linear.out_features} layer unquantized on {device}.")
    return layer


def load_4bit_state(layer: nn.Module) -> None:
    """Let ``layer.load_state_dict`` restore a 4-bit weight exactly (idempotent).

    bitsandbytes' ``Linear4bit`` saves its quant state beside the packed weight (``weight.absmax``,
    ``weight.quant_map``, ...) but has no loader for it: loading its own state dict fails on those keys, and
    copying the packed bytes alone would pair them with this layer's scales. The hook copies the saved quant
    state into the layer's own, in place, and leaves the packed bytes to the default loader (also in place), so
    the weight stays the parameter FSDP's flat storage and the optimizer hold, and a full checkpoint of a 4-bit
    model resumes, with or without FSDP. A layer without a quant state yet gets its weight rebuilt from the bytes.
    """
    if not getattr(layer, "_lightning_lora_loads_4bit", False):
        layer.register_load_state_dict_pre_hook(_load_4bit_pre_hook)
        layer._lightning_lora_loads_4bit = True


def _load_4bit_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "weight"
    names = [n for n in state_dict if n.startswith(key + ".")]
    if not names or key not in state_dict:
        return  # nothing to rebuild: the default loader reports the keys as usual
    stats = {name[len(key) + 1 :]: _materialized(state_dict.pop(name), name) for name in names}
    # bitsandbytes' parameter class does not let a lazy placeholder copy itself in: the default loader gets a tensor.
    data = state_dict[key] = _materialized(state_dict[key], key)
    bnb = _bnb()
    current = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if current is None:
        # The default loader then copies the same packed bytes into the rebuilt weight.
        module.weight = bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device=module.weight.device, module=module)
        return
    saved = bnb.functional.QuantState.from_dict(qs_dict=stats, device=current.absmax.device)
    _copy_quant_state(current, saved, key)


def _materialized(value: Any, key: str) -> torch.Tensor:
    """``value`` as a tensor: Lightning's lazy checkpoint loader hands out placeholders that load on first use."""
    if isinstance(value, torch.Tensor):
        return value
    if callable(getattr(value, "_load_tensor", None)):
        return value._load_tensor()
    raise TypeError(f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor: the file is not a state dict of this model.")


def _copy_quant_state(current: Any, saved: Any, key: str) -> None:
    """Copy ``saved`` (a bitsandbytes QuantState read from a checkpoint) into ``current``, refusing another layout."""

    def layout(state: Any) -> tuple:
        nested = getattr(state, "nested", False)
        inner = (state.state2.blocksize, tuple(state.state2.absmax.shape), tuple(state.state2.code.shape)) if nested else None
        return (state.quant_type, state.blocksize, state.dtype, tuple(state.shape), nested, tuple(state.absmax.shape), state.absmax.dtype,
                tuple(state.code.shape), inner)

    if layout(current) != layout(saved):
        raise ValueError(
            f"Checkpoint entry {key!r} holds a 4-bit weight quantized as {layout(saved)} (quant_type, blocksize, dtype, shape, "
            f"double quant, ...), but this layer is {layout(current)}: the checkpoint was written with another "
            "quantization config. Load it with the QuantizationConfig it was trained with."
        )
    with torch.no_grad():
        current.absmax.copy_(saved.absmax)
        current.code.copy_(saved.code)
        if getattr(current, "nested", False):
            if isinstance(current.offset, torch.Tensor):
                current.offset.copy_(saved.offset)
            else:
                current.offset = saved.offset
            current.state2.absmax.copy_(saved.state2.absmax)
            current.state2.code.copy_(saved.state2.code)


def as_4bit_parameter(layer: nn.Module, tensor: torch.Tensor) -> nn.Parameter:
    """``tensor`` (the packed bytes of ``layer``'s 4-bit weight, e.g. a view FSDP left in place of the parameter) as
    the layer's weight parameter again, with the layer's quant state; raises if neither holds one."""
    state = getattr(tensor, "quant_state", None) or getattr(layer, "quant_state", None)
    if not is_4bit(layer) or state is None:
        raise RuntimeError(
            f"The packed weight of this {type(layer).__name__} lost its parameter object and carries no quantization state; it "
            "cannot be restored."
        )
    return _bnb().nn.Params4bit(
        tensor.detach(), requires_grad=False, quant_state=state, blocksize=state.blocksize, compress_statistics=bool(getattr(state, "nested", False)),
        quant_type=state.quant_type, quant_storage=tensor.dtype, module=layer, bnb_quantized=True,
    )


def keep_standard_layout(layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight in place on CPU.

    On CPUs with AVX512-BF16, an eval-mode forward under no_grad rewrites the packed weight into a
    kernel-specific layout; a later training step on the same layer then fails ("a view of a leaf
    Variable ... in-place operation") and dequantization reads the wrong layout. Keeping the one
    standard layout makes eval and training agree and costs only CPU inference speed.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def quantize_model(
    model: nn.Module,
    quantization: QuantizationConfig,
    *,
    skip: set[str] | frozenset[str] = frozenset(),
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace each ``nn.Linear`` of ``model`` by its bitsandbytes version, in place; returns ``model``.

    Layers are converted one at a time, and the full-precision weight of each is dropped as soon as
    its quantized copy exists, so peak memory stays near the quantized size. The output head(s) stay
    in full precision, as transformers keeps them; ``skip`` holds more full module paths to leave alone
    (``modules_to_save``); ``quantization.skip_modules`` adds suffix patterns. ``quantized_paths(model)``
    lists the quantized layers afterwards.

    Example::

        model = inject_lora(quantize_model(model, QuantizationConfig(mode="nf4")), LoRAConfig(r=16))
    """
    require_bitsandbytes("quantization", quantization)
    paths = quantization_targets(model, quantization, skip=set(skip) | output_head_names(model))
    quantize_modules(model, quantization, paths, device=device)
    return model


def quantization_targets(model: nn.Module, config: QuantizationConfig, skip: set[str] | frozenset[str] = frozenset(), among: list[str] | None = None) -> list[str]:
    """Paths of the layers that quantizing with ``config`` replaces: every plain ``nn.Linear`` (of ``among``, default
    all modules) except the paths in ``skip`` and those matching ``config.skip_modules``."""
    names = [name for name, _ in model.named_modules()] if among is None else among
    return [
        name
        for name in names
        if name and type(model.get_submodule(name)) is nn.Linear and name not in skip and not matches_any(name, config.skip_modules)
    ]


def quantize_modules(model: nn.Module, config: QuantizationConfig, paths: list[str], device: torch.device | str | None = None) -> list[str]:
    """Replace the ``nn.Linear`` at each of ``paths`` by its bitsandbytes copy, all or nothing; returns ``paths``.

    Every copy is built before the first one is swapped in, so a failure (a layer bitsandbytes cannot
    pack, out of memory) leaves the model as it was. The full-precision layers are therefore freed only
    at the end: quantizing onto another device (``device="cuda"`` from a CPU model) keeps the peak at
    what the model already held, on the same device the quantized copies come on top of it.
    """
    copies = quantized_copies(model, config, paths, device)
    replace_modules(model, copies)
    mark_quantized(model, config, bool(copies))
    return list(paths)


def quantized_copies(model: nn.Module, config: QuantizationConfig, paths: list[str], device: torch.device | str | None = None) -> dict[str, nn.Module]:
    """path -> the bitsandbytes copy of the ``nn.Linear`` there, one layer at a time; the model is not changed.

    The one quantize loop: ``quantize_model``, ``inject_lora`` and block-by-block loading all go through it.
    """
    return {path: quantize_linear(model.get_submodule(path), config, device) for path in paths}


def mark_quantized(model: nn.Module, config: QuantizationConfig, quantized: bool = True) -> None:
    if quantized and hasattr(model, "config"):
        # PEFT and transformers look at these flags to pick their quantized code paths.
        model.is_loaded_in_4bit = config.mode != "int8"
        model.is_loaded_in_8bit = config.mode == "int8"


def quantized_paths(model: nn.Module) -> list[str]:
    """Paths of ``model``'s bitsandbytes layers (inside LoRA layers they end in ``.base_layer``)."""
    return [name for name, module in model.named_modules() if is_quantized(module)]


def dequantize_weight(module: nn.Module, snapshot: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight a quantized layer computes with (or that of a ``snapshot_quantized``), in ``dtype``."""
    bnb = _bnb()
    weight = snapshot["weight"] if snapshot else module.weight
    if is_4bit(module):
        quant_state = _quant_state(module, weight, snapshot)
        data, quant_state = _standard_4bit_layout(weight.data, quant_state)
        return bnb.functional.dequantize_4bit(data, quant_state).to(dtype)
    if is_8bit(module):
        scales = snapshot["SCB"] if snapshot else None
        if scales is None:
            scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).to(dtype)
    raise TypeError(f"`dequantize_weight` expects a bitsandbytes Linear4bit or Linear8bitLt, got {type(module).__name__}.")


def _quant_state(module: nn.Module, weight: torch.Tensor, snapshot: dict[str, Any] | None = None) -> Any:
    # The Params4bit carries its own quant_state (a snapshot's weight too); the module's copy is only
    # a fallback for when FSDP dropped it from the weight, and is None on layers built without `module=`.
    return getattr(weight, "quant_state", None) or (snapshot["quant_state"] if snapshot else module.quant_state)


def has_stock_forward(module: nn.Module) -> bool:
    """Whether a 4-bit layer computes with bitsandbytes' own ``Linear4bit.forward`` (no subclass override)."""
    return type(module).forward is _bnb().nn.Linear4bit.forward


def matmul_4bit_frozen(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a 4-bit layer, without autograd, in x's dtype, as its own forward computes it.

    This goes through bitsandbytes' ``gemm_4bit`` op, which picks its fused kernel or dequantize +
    matmul by shape. The dequantized weight never appears as a value of its own, so a compiled
    graph cannot keep it alive until backward (which dequantizes again).
    """
    if torch.is_grad_enabled():  # (inside an autograd node's forward it is not: no mode to switch there)
        with torch.no_grad():
            return matmul_4bit_frozen(module, x, bias)
    weight = member(module, "weight")
    return _bnb().matmul_4bit(x, weight, bias=bias, quant_state=_quant_state(module, weight))


def linear_4bit_no_grad(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """What a stock ``Linear4bit``'s forward returns for ``x`` when no gradient is taken, with less Python; None
    (call the layer itself) wherever its forward would do more than that one computation.

    ``Linear4bit.forward`` and ``bnb.matmul_4bit`` are, without autograd, casts and checks around one call of the
    ``bitsandbytes::gemm_4bit`` op, which picks bitsandbytes' fused kernel or dequantize + matmul by shape. At small
    batch those Python layers are a large part of the layer's host time (``benchmarks/call_overhead.py``). Here the op
    is called directly with the arguments ``matmul_4bit`` gives it, so the result is the layer's, bit for bit
    (``tests/test_lean_4bit.py`` compares them). None when: the layer has not run once (it sets its compute
    dtype then), its weight lost its quant state (FSDP: the layer restores it), the CPU's eval-mode repack applies
    or has happened, the bias needs the cast the layer writes into it, a gradient would flow to ``x`` or the bias,
    the weight was quantized transposed, or the scales are nested other than in 256-blocks.
    """
    op = _gemm_4bit_op()
    weight = member(module, "weight")
    state = getattr(weight, "quant_state", None)
    dtype = module.compute_dtype
    if op is None or state is None or not module.compute_type_is_set or dtype is None or x.numel() == 0:
        return None
    weight = packed_tensor(weight)
    if x.device.type == "cpu" and (not module.training or getattr(state, "packing_format_for_cpu", False)):
        return None
    bias = member(module, "bias")
    if bias is not None and bias.dtype != dtype:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    shape = state.shape
    if len(shape) != 2 or x.shape[-1] != shape[1]:
        return None
    if state.nested:
        if state.state2.blocksize != 256:
            return None
        nested = dict(absmax_8bit=state.absmax, absmax_code=state.state2.code, absmax_offset=state.offset)
        absmax = state.state2.absmax
    else:
        nested, absmax = {}, state.absmax
    x_c = x if x.dtype == dtype else x.to(dtype)  # (a no-op .to costs about 1 us of host time)
    out = op(x_c, weight.view(-1, 1), shape, absmax, state.blocksize, state.quant_type, bias=bias, **nested)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def dequantize_4bit_no_grad(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The (out, in) weight a stock 4-bit layer computes with, dequantized straight into ``dtype`` by bitsandbytes'
    ops called directly, as its ``gemm_4bit`` does before its matmul: ``bnb.functional.dequantize_4bit`` with the
    quant state's dtype set to ``dtype``, bit for bit (``dequantize_weight`` rounds through the quant state's own
    dtype first: the same where ``dtype`` is that one), with less Python around the same two or three kernels (on
    CUDA bitsandbytes' own functions behind the ops: ``_cuda_dequantize_impls``; ``tests/test_host_fold.py`` and
    ``tests/gpu/test_gpu_lean_4bit.py`` compare them). A fresh tensor: the caller may write into it. None (use ``dequantize_weight``) where the weight lost its quant state (FSDP),
    the CPU's eval-mode repack applies or has happened, the weight was quantized transposed, ``dtype`` is not a
    float bitsandbytes writes, or bitsandbytes lacks the ops.
    """
    ops = _dequantize_ops()
    weight = member(module, "weight")
    state = getattr(weight, "quant_state", None)
    if ops is None or state is None or dtype not in _DEQUANTIZE_DTYPES:
        return None
    weight = packed_tensor(weight)
    if weight.device.type == "cpu" and (not module.training or getattr(state, "packing_format_for_cpu", False)):
        return None
    shape = state.shape
    if tuple(shape) != (module.out_features, module.in_features) or weight.dim() != 2 or weight.shape[-1] != 1:
        return None  # quantized transposed, or not the layer's (out, in) matrix
    # Not inside a compiled graph: dynamo cannot trace bitsandbytes' ctypes calls (a graph break); its ops it can.
    impls = _cuda_dequantize_impls() if weight.is_cuda and not torch.compiler.is_compiling() else None
    absmax = state.absmax
    if state.nested:
        nested = state.state2
        code = nested.code if nested.code.device == absmax.device else nested.code.to(absmax.device)
        if impls is not None:
            scales = torch.empty_like(absmax, dtype=torch.float32)
            impls[1](absmax, nested.absmax, code, nested.blocksize, torch.float32, out=scales)
        else:
            scales = ops[1](absmax, nested.absmax, code, nested.blocksize, torch.float32)
        absmax = scales.add_(state.offset)
    if impls is None:
        return ops[0](weight, absmax, state.blocksize, state.quant_type, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=weight.device)
    impls[0](weight, absmax, state.blocksize, state.quant_type, dtype, out=out)
    return out


def gemm_4bit_dequantizes(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes computes a 4-bit layer's no-grad forward of ``x`` (cast to ``dtype``: the layer's
    ``compute_dtype``, which autocast leaves alone) by dequantizing the whole weight then multiplying, rather than
    with a kernel that reads the 4-bit weight itself.

    bitsandbytes 0.50's ``gemm_4bit`` asks its own per-GPU heuristic for up to 1,536 rows (one H200, a 4096 x
    4096 weight in bf16: its kernel at up to 7 rows, dequantize + matmul from 8); that heuristic is asked here too
    (``_gemm_4bit_heuristic``). Where bitsandbytes does not expose it (other releases, other backends), only one row
    is taken to skip the dequantize (``matmul_4bit``'s GEMV kernel).
    """
    rows = x.numel() // x.shape[-1]
    if rows <= 1:
        return False
    heuristic = _gemm_4bit_heuristic(x)
    if heuristic is None:
        return True
    custom, max_rows, device_index = heuristic
    state = getattr(member(module, "weight"), "quant_state", None)
    blocksize = state.blocksize if state is not None else getattr(member(module, "weight"), "blocksize", 64)
    out_features, in_features = module.out_features, module.in_features
    if rows > max_rows or in_features % blocksize:
        return True
    try:
        return not custom(device_index, dtype, rows, out_features, in_features)
    except Exception:  # a heuristic of another signature: assume the fused kernel, which leaves the output route
        return False


def _gemm_4bit_heuristic(x: torch.Tensor) -> tuple[Any, int, int] | None:
    """``(use_custom(device_index, dtype, rows, out, in), max_rows, device_index)`` of bitsandbytes' CUDA ``gemm_4bit``
    for ``x``'s device, or None (not CUDA, or a bitsandbytes without them)."""
    if not x.is_cuda:
        return None
    ops = sys.modules.get("bitsandbytes.backends.cuda.ops")
    custom = getattr(ops, "_gemm_4bit_use_custom_fn", None)
    max_rows = getattr(ops, "_gemm_4bit_custom_max_m", None)
    if not callable(custom) or type(max_rows) is not int:
        return None
    return custom, max_rows, x.device.index if x.device.index is not None else torch.cuda.current_device()


_DEQUANTIZE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEQUANTIZE: list[Any] = []  # [the two ops, or None where bitsandbytes lacks them], once looked up


_CUDA_IMPLS: list[Any] = []  # [(dequantize_4bit, dequantize_blockwise) CUDA implementations, or None], once looked up
_IMPL_PARAMETERS = (["A", "absmax", "blocksize", "quant_type", "dtype", "out"], ["A", "absmax", "code", "blocksize", "dtype", "out"])


def _cuda_dequantize_impls() -> tuple[Any, Any] | None:
    """The CUDA functions behind bitsandbytes' two dequantize ops, which its own ``gemm_4bit`` calls directly
    (``_dequantize_4bit_impl``, ``_dequantize_blockwise_impl`` in ``bitsandbytes.backends.cuda.ops``), or None.

    Calling them skips the op dispatcher's Python (torch.library and torch._dynamo's disable wrapper: about eight
    Python calls per op). They are bitsandbytes' private functions, so they are taken only where their parameters
    are the ones read here (as in 0.50); elsewhere the ops are called.
    """
    if not _CUDA_IMPLS:
        import inspect

        module = sys.modules.get("bitsandbytes.backends.cuda.ops")
        if module is None:  # not loaded yet: the ops for now, look again next call
            return None
        found = tuple(getattr(module, name, None) for name in ("_dequantize_4bit_impl", "_dequantize_blockwise_impl"))
        try:
            ok = all(callable(fn) and list(inspect.signature(fn).parameters) == params for fn, params in zip(found, _IMPL_PARAMETERS))
        except (TypeError, ValueError):
            ok = False
        _CUDA_IMPLS.append(found if ok else None)
    return _CUDA_IMPLS[0]


def _dequantize_ops() -> tuple[Any, Any] | None:
    """``(dequantize_4bit, dequantize_blockwise)`` of ``torch.ops.bitsandbytes`` (their ``default`` overloads), or None."""
    if not _DEQUANTIZE:
        _bnb()  # importing bitsandbytes registers its ops
        try:
            ops = (torch.ops.bitsandbytes.dequantize_4bit.default, torch.ops.bitsandbytes.dequantize_blockwise.default)
        except (AttributeError, RuntimeError):  # torch raises either for an op nobody registered
            ops = None
        _DEQUANTIZE.append(ops)
    return _DEQUANTIZE[0]


def frozen_nf4_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Inside a compiled graph: what a stock, frozen nf4 ``Linear4bit`` computes for ``x`` on CUDA, with its gradient
    to ``x``, dequantizing with one Triton kernel (``nf4_kernel``) instead of bitsandbytes' three Python-launched
    ones; None (call the layer) where it does not apply.

    The same computation as ``bnb.matmul_4bit``'s autograd path at the sizes where that dequantizes then multiplies
    (more than 1,536 rows: training): forward ``x @ W^T (+ bias)`` with ``W`` dequantized in the compute dtype,
    backward ``grad @ W`` with ``W`` dequantized again (in the weight's own dtype, then cast, as bitsandbytes
    does), nothing of ``W`` kept between the two. Inside a compiled graph the kernel is part of the generated code:
    no Python runs per call (one H200, 16-layer 7B QLoRA step compiled: 127.7 ms against 151.4 with bitsandbytes'
    dequantize, the same peak). Eagerly the kernel's launch costs more host time than bitsandbytes' (about 110 us a
    call on the H200's host against 40-90 us: ``benchmarks/step_levers.py``), so eager code keeps bitsandbytes'.
    None when not compiling, when ``nf4_kernel.usable`` says no, the layer has not run once, the bias needs the
    cast the layer writes into it or takes a gradient, the weight was quantized transposed, or there are at most
    1,536 rows (bitsandbytes' own fused kernel may compute those).
    """
    layer = kernel_layer(module, x)
    if layer is None:
        return None
    weight, state, bias, dtype = layer
    return _FrozenNF4Linear.apply(x.to(dtype), weight, bias, state).to(x.dtype)


def kernel_layer(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor | None, torch.dtype] | None:
    """``(weight, quant_state, bias, compute dtype)`` of a frozen nf4 layer whose compiled forward for ``x`` the
    kernel can compute (``frozen_nf4_linear`` says when), else None. ``_routes.frozen_nf4_lora_linear`` asks it too."""
    if not torch.compiler.is_compiling():
        return None
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    dtype = module.compute_dtype
    if state is None or not module.compute_type_is_set or dtype is None or not nf4_kernel.usable(weight, state):
        return None
    bias = module.bias
    if bias is not None and (bias.dtype != dtype or bias.requires_grad):
        return None
    if x.shape[-1] != state.shape[1] or x.numel() // x.shape[-1] <= 1536:
        return None
    return weight, state, bias, dtype


class _FrozenNF4Linear(torch.autograd.Function):
    """``x @ dequantize(W)^T (+ bias)`` for a frozen nf4 weight; the weight is dequantized again in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: Any) -> torch.Tensor:
        ctx.state = state
        ctx.save_for_backward(weight)  # the packed parameter itself: no memory
        return nn.functional.linear(x, nf4_kernel.dequantize(weight, state, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        w = nf4_kernel.dequantize(weight, ctx.state, ctx.state.dtype, pass_id=1).to(grad.dtype)
        return torch.matmul(grad, w), None, None, None


_GEMM_4BIT: list[Any] = []  # [the op, or None where bitsandbytes lacks it], once looked up


def _gemm_4bit_op() -> Any:
    """``torch.ops.bitsandbytes.gemm_4bit.default`` with the signature ``matmul_4bit`` of bitsandbytes 0.50 calls it
    with, or None (older releases: the layer's own forward then)."""
    if not _GEMM_4BIT:
        version = tuple(int(p) for p in re.findall(r"\d+", _bnb().__version__)[:2])
        try:
            packet = torch.ops.bitsandbytes.gemm_4bit if version >= (0, 50) else None
        except (AttributeError, RuntimeError):  # torch raises either for an op nobody registered
            packet = None
        _GEMM_4BIT.append(None if packet is None else packet.default)
    return _GEMM_4BIT[0]


def _standard_4bit_layout(data: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """``(data, quant_state)`` in bitsandbytes' standard 4-bit layout, without touching the layer.

    On CPUs with AVX512-BF16, a ``Linear4bit`` forward in eval mode without grad repacks its weight
    in place (and turns the block scales into bf16); ``dequantize_4bit`` cannot read that layout.
    Here the packing is undone on copies, keeping the bf16 scales the layer now computes with.
    """
    if not getattr(quant_state, "packing_format_for_cpu", False):
        return data, quant_state
    bnb = _bnb()
    state = copy.copy(quant_state)  # the inverse below reassigns the state's fields: keep the layer's intact
    state.original_nested = False  # do not re-quantize the scales: dequantize with those forward uses
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
    # Packed scales are (in / blocksize, out) bf16; the standard layout is one float per block, row-major.
    state.absmax = quant_state.absmax.t().reshape(-1).float()
    state.dtype = torch.float32
    return data, state


def requantize_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize the full-precision ``weight`` (out, in) into ``module``, keeping its format."""
    bnb = _bnb()
    device = module.weight.device
    if is_4bit(module):
        old = module.weight
        new = bnb.nn.Params4bit(
            weight.to(torch.float32).cpu() if device.type == "cpu" else weight.to(torch.float32),
            requires_grad=False,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            blocksize=old.blocksize,
        )
        module.weight = new.to(device)
        module.quant_state = module.weight.quant_state
    elif is_8bit(module):
        module.weight = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        module.state.CB = None  # forward moves the new CB/SCB from the weight into the state
        module.state.SCB = None
    else:
        raise TypeError(f"`requantize_weight` expects a bitsandbytes layer, got {type(module).__name__}.")


def snapshot_quantized(module: nn.Module) -> dict[str, Any]:
    """Everything needed to restore a quantized layer's weight bit for bit (see ``restore_quantized``)."""
    if is_8bit(module):
        return {"weight": module.weight, "CB": module.state.CB, "SCB": module.state.SCB}
    return {"weight": module.weight, "quant_state": getattr(module, "quant_state", None)}


def restore_quantized(module: nn.Module, snapshot: dict[str, Any]) -> None:
    module.weight = snapshot["weight"]
    if is_8bit(module):
        module.state.CB, module.state.SCB = snapshot["CB"], snapshot["SCB"]
    else:
        module.quant_state = snapshot["quant_state"]


def quantized_numel(module: nn.Module) -> int:
    """Parameters a quantized layer's weight stands for (packed 4-bit storage holds several per element)."""
    weight = module.weight
    if is_4bit(module):
        return module.in_features * module.out_features
    return weight.numel()
