"""DDP / FSDP specifics: how to wrap a LoRA model for FSDP1 and FSDP2, which quantization a strategy
can shard, norm clipping under FSDP, and gathering every rank's adapter shard before a rank-zero write.

Facts from ../shared/PRIOR-ART.md ("Measured: Lightning FSDP with nf4 backbones"): FSDP1 flattens
tensors of one dtype only, so packed 4-bit weights must be stored in the dtype FSDP flattens
(``quant_storage='bfloat16'``); Lightning's FSDPPrecision raises on norm clipping; FSDP1 root modules
have ``clip_grad_norm_``; under FSDP2 parameters are DTensors and ``full_tensor()`` gathers one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_lora.adapter_io import adapter_state_dict
from lightning_lora.config import QuantizationConfig


def strategy_kind(trainer_or_strategy: Any) -> str:
    """'fsdp' (FSDP1), 'fsdp2' (ModelParallelStrategy), 'ddp', or 'single'."""
    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    names = [cls.__name__ for cls in type(strategy).__mro__]  # subclasses count as their base (no Lightning import here)
    if "FSDPStrategy" in names:
        return "fsdp"
    if "ModelParallelStrategy" in names:
        return "fsdp2"
    if any("DDP" in name for name in names):
        return "ddp"
    return "single"


def class_matcher(block_classes: Iterable[type | str]) -> Callable[[nn.Module], bool]:
    classes = tuple(c for c in block_classes if isinstance(c, type))
    names = {c for c in block_classes if isinstance(c, str)}
    if not classes and not names:
        raise ValueError(f"`block_classes` is empty: name the decoder layer class, e.g. {{LlamaDecoderLayer}} or {{'LlamaDecoderLayer'}}.")
    return lambda module: isinstance(module, classes) or type(module).__name__ in names


def block_classes_of(model: nn.Module) -> set[str]:
    """Class names of ``model``'s decoder layers, from transformers' ``_no_split_modules`` (e.g. {'LlamaDecoderLayer'})."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    raise ValueError(
        f"{type(model).__name__} does not list its decoder layer classes (`_no_split_modules`); pass them, "
        "e.g. block_classes={LlamaDecoderLayer}."
    )


def _is_trainable_leaf(module: nn.Module) -> bool:
    """A full-precision linear whose parameters all train: a LoRA A or B (quantized layers subclass nn.Linear)."""
    from lightning_lora.quantization import is_quantized

    if not isinstance(module, nn.Linear) or is_quantized(module):
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.requires_grad for p in params)


def lora_fsdp_policy(block_classes: Iterable[type | str]) -> Callable[[nn.Module, bool, int], bool]:
    """An FSDP1 ``auto_wrap_policy``: one unit per decoder layer, and one per LoRA A / B linear.

    LoRA linears get their own units so that no unit mixes frozen and trainable parameters: with
    ``use_orig_params=True`` a mixed unit allocates gradients for its whole flat parameter (the frozen
    4-bit storage too), and with ``False`` FSDP refuses it; and so that fp32 LoRA weights never share a
    flat parameter with bf16-stored 4-bit weights ("Must flatten tensors with uniform dtype").

    Example::

        strategy = FSDPStrategy(auto_wrap_policy=lora_fsdp_policy({LlamaDecoderLayer}),
                                activation_checkpointing_policy={LlamaDecoderLayer})
    """
    is_block = class_matcher(list(block_classes))

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if recurse:
            return True
        return is_block(module) or _is_trainable_leaf(module)

    return policy


def fully_shard_lora(
    model: nn.Module,
    block_classes: Iterable[type | str] | None = None,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root; call it in ``configure_model`` after LoRA is injected.

    Raises ``ValueError`` when the all-gathers would change packed 4-bit bytes: a group whose tensors
    are all bf16 on a GPU (FSDP2's copy into the all-gather buffer rewrites NaN bit patterns,
    bitsandbytes #1945), or a mixed-precision ``param_dtype`` that casts them. fp32 LoRA weights in the
    group (``LoRALinear``'s default) keep it safe.

    Example (in a LightningModule run with ``ModelParallelStrategy``)::

        def configure_model(self):
            fully_shard_lora(self.model, {LlamaDecoderLayer}, mesh=self.device_mesh["data_parallel"])
    """
    from torch.distributed.fsdp import fully_shard

    is_block = class_matcher(list(block_classes) if block_classes is not None else block_classes_of(model))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    blocks = [m for m in model.modules() if is_block(m)]
    if not blocks:
        raise ValueError(f"No module of {type(model).__name__} matches `block_classes`={block_classes!r}: name its decoder layer class.")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    check_fsdp2_keeps_4bit_bytes(model)
    return model


@torch.no_grad()
def packed_4bit_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each 4-bit layer's packed weight as bytes on CPU (gathered from every shard under FSDP2).

    For checks that sharding left the quantized weights bit for bit as they were.
    """
    from lightning_lora.quantization import is_4bit

    out = {}
    for name, module in model.named_modules():
        if is_4bit(module):
            weight = module.weight
            if type(weight).__name__ == "DTensor":
                weight = weight.full_tensor()
            out[name] = weight.detach().reshape(-1).contiguous().view(torch.uint8).cpu()
    return out


def check_quantization_for_strategy(quantization: QuantizationConfig, pl_module: nn.Module) -> None:
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:
        return
    kind = strategy_kind(trainer)
    if kind == "fsdp" and quantization.mode != "int8" and quantization.quant_storage == "uint8":
        raise ValueError(
            "FSDPStrategy cannot flatten packed 4-bit weights stored as uint8 (`quant_storage`='uint8'). "
            "Set `quant_storage`='bfloat16' (the dtype FSDP flattens) in LoRACallback/QuantizationConfig."
        )
    if kind in ("fsdp", "fsdp2") and quantization.mode == "int8":
        raise ValueError(
            "`quantize`='int8' cannot be sharded with FSDP: bitsandbytes keeps int8 scales outside the parameters. "
            "Use 'nf4' with FSDP, or DDP for int8."
        )


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def _packed_4bit_storage(model: nn.Module) -> dict[torch.dtype, str]:
    """Floating-point storage dtypes of the packed 4-bit weights -> the first layer stored so (quoted).

    uint8 storage is left out: ``Module.to(dtype)`` casts floating-point tensors only.
    """
    from lightning_lora.quantization import is_4bit

    found: dict[torch.dtype, str] = {}
    for name, module in model.named_modules():
        if is_4bit(module) and module.weight.dtype.is_floating_point:
            found.setdefault(module.weight.dtype, repr(name))
    return found


def check_precision_keeps_4bit_bytes(trainer: Any, model: nn.Module, planned: QuantizationConfig | None = None) -> None:
    """Refuse a precision / strategy set-up that would cast the packed 4-bit weights by value.

    Packed NF4/FP4 bytes stored in a floating dtype are not numbers: a precision plugin that converts
    the module (``'16-true'``, ``'bf16-true'``, ``'64-true'``, FSDPStrategy's ``'32-true'``) or FSDP1's
    mixed precision ``param_dtype`` (cast before every all-gather) turns them into other bytes, and the
    layers then compute with garbage, without an error. Called before injection: ``model``'s 4-bit layers
    and those ``planned`` will create.
    """
    stored = _packed_4bit_storage(model)
    if planned is not None and planned.mode in ("nf4", "fp4") and planned.storage_dtype().is_floating_point:
        stored.setdefault(planned.storage_dtype(), f"the layers `quantize`={planned.mode!r} creates")
    strategy = getattr(trainer, "strategy", None)
    if not stored or strategy is None:
        return
    plugin = getattr(strategy, "precision_plugin", None)
    if plugin is not None:
        probe = nn.Module()  # one tensor per storage dtype: what does this plugin turn it into?
        for index, dtype in enumerate(stored):
            probe.register_parameter(f"p{index}", nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False))
        try:
            converted = plugin.convert_module(probe)
        except Exception:  # a plugin that cannot convert a bare module: nothing learned, nothing refused
            converted = probe
        for index, dtype in enumerate(stored):
            new = getattr(converted, f"p{index}").dtype
            if new != dtype:
                if strategy_kind(strategy) != "fsdp":
                    other = "`quant_storage`='uint8', which no precision casts"
                elif new in (torch.float32, torch.bfloat16, torch.float16):
                    other = f"`quant_storage`={_DTYPE_NAMES[new]!r}"
                else:
                    other = "a precision FSDPStrategy can shard 4-bit weights with ('bf16-true')"
                raise ValueError(
                    f"`precision`={getattr(trainer, 'precision', None)!r} casts every floating-point weight to {_DTYPE_NAMES.get(new, new)}, "
                    f"which would turn the packed 4-bit weights of {stored[dtype]} (stored as {_DTYPE_NAMES.get(dtype, dtype)}) into "
                    "other bytes: the model would compute with garbage. Use precision='bf16-mixed' (4-bit layers compute in their "
                    f"`compute_dtype` anyway), or {other}."
                )
    if strategy_kind(strategy) == "fsdp":
        mixed = getattr(strategy, "mixed_precision_config", None)
        param_dtype = getattr(mixed, "param_dtype", None)
        for dtype, layer in stored.items():
            if param_dtype is not None and param_dtype != dtype:
                raise ValueError(
                    f"FSDPStrategy's mixed precision casts every parameter to {_DTYPE_NAMES.get(param_dtype, param_dtype)} before its "
                    f"all-gather (`precision`={getattr(trainer, 'precision', None)!r}), which would turn the packed 4-bit weights of "
                    f"{layer} (stored as {_DTYPE_NAMES.get(dtype, dtype)}) into other bytes. Use precision='bf16-mixed' or "
                    "'bf16-true' with `quant_storage`='bfloat16' (or a `mixed_precision` whose param_dtype is the storage dtype)."
                )


def _fsdp2_param_groups(model: nn.Module) -> list[tuple[str, Any, list[Any]]]:
    """(module name, mixed-precision policy, FSDPParams) of every FSDP2 parameter group in ``model`` (torch's private state)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    groups = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        param_groups = getattr(state, "_fsdp_param_groups", None)
        if param_groups is None:
            single = getattr(state, "_fsdp_param_group", None)
            param_groups = [single] if single is not None else []
        for group in param_groups:
            groups.append((name, getattr(group, "mp_policy", None), list(group.fsdp_params)))
    return groups


def _all_gather_dtype(fsdp_param: Any, mp_policy: Any) -> torch.dtype:
    # What FSDP2 gathers a parameter as: its dtype, or the policy's param_dtype for floating ones (FSDPParam.init_dtype_attrs).
    dtype = fsdp_param.sharded_param.dtype
    param_dtype = getattr(mp_policy, "param_dtype", None)
    return dtype if param_dtype is None or not dtype.is_floating_point else param_dtype


def fsdp2_4bit_risks(model: nn.Module, device_type: str | None = None) -> list[str]:
    """Why FSDP2's all-gathers would change packed 4-bit bytes in ``model``, one line per group at risk.

    Two causes, both silent:

    - a mixed-precision ``param_dtype`` other than the storage dtype casts the packed weight by value;
    - a group whose all-gather inputs all share one 16-bit dtype is copied into the all-gather buffer
      with ``torch._foreach_copy_``, whose CUDA kernel goes through float32 and back, rewriting every
      NaN bit pattern to the canonical NaN (bitsandbytes #1945: ~0.1% of NF4 bytes). A group with
      mixed dtypes (fp32 LoRA next to bf16-stored NF4, the default) is gathered as raw bytes; on CPU
      the copy is a plain memcpy. ``device_type`` overrides the groups' device (for tests).
    """
    from lightning_lora.quantization import is_4bit

    risks = []
    for name, mp_policy, fsdp_params in _fsdp2_param_groups(model):
        packed = [p for p in fsdp_params if is_4bit(p._module_info.module) and p._module_info.param_name == "weight"]
        if not packed:
            continue
        where = name or "<root>"
        stored, gathered = packed[0].sharded_param.dtype, _all_gather_dtype(packed[0], mp_policy)
        if gathered != stored:
            risks.append(
                f"group {where!r}: mixed precision casts the packed 4-bit weights from {_DTYPE_NAMES.get(stored, stored)} "
                f"to {_DTYPE_NAMES.get(gathered, gathered)}"
            )
        gather_dtypes = {_all_gather_dtype(p, mp_policy) for p in fsdp_params}
        device = device_type or packed[0].sharded_param.device.type
        if len(gather_dtypes) == 1 and next(iter(gather_dtypes)) in (torch.bfloat16, torch.float16) and device != "cpu":
            risks.append(f"group {where!r}: every tensor is all-gathered as {_DTYPE_NAMES[next(iter(gather_dtypes))]} on {device}")
    return risks


def check_fsdp2_keeps_4bit_bytes(model: nn.Module) -> None:
    """Raise if FSDP2 (``fully_shard``) would change packed 4-bit bytes (see ``fsdp2_4bit_risks``)."""
    risks = fsdp2_4bit_risks(model)
    if risks:
        raise ValueError(
            f"FSDP2 would silently change the packed 4-bit weights of {len(risks)} parameter groups ({risks[0]}"
            f"{'; ...' if len(risks) > 1 else ''}). Keep the LoRA weights in float32 (LoRALinear's default) so each group "
            "mixes dtypes and is all-gathered as raw bytes: use precision='bf16-mixed' rather than 'bf16-true', do not cast the "
            "model to bfloat16 after injection, and give `fully_shard` no mixed-precision param_dtype; or store the 4-bit weights "
            "as `quant_storage`='float32'. (bitsandbytes #1945)"
        )


def is_sharded_param(param: torch.Tensor) -> bool:
    return type(param).__name__ == "DTensor" or param.dim() == 1 and getattr(param, "_is_flat_param", False)


def is_sharded_checkpoint(checkpoint: dict[str, Any]) -> bool:
    # Lightning's sharded FSDP checkpoints restore the model state inside the strategy, not from this dict.
    return "state_dict" not in checkpoint or not checkpoint["state_dict"]


def clip_grad_norm(trainer: Any, pl_module: nn.Module, max_norm: float) -> torch.Tensor:
    """Norm clipping that works under every strategy (Lightning's FSDPPrecision raises for FSDP1)."""
    kind = strategy_kind(trainer)
    if kind == "fsdp":
        root = trainer.strategy.model  # the FSDP root wrapper; its clip_grad_norm_ reduces over all shards
        return root.clip_grad_norm_(max_norm)
    params = [p for p in pl_module.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def gather_adapter_state_dict(trainer: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The full adapter on CPU. Under FSDP every rank must call this (the gathers are collectives)."""
    kind = strategy_kind(trainer) if trainer is not None else "single"
    if kind == "fsdp":
        import contextlib

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # Unshard only the units that hold trainable tensors (one per LoRA linear under lora_fsdp_policy):
        # summoning the root would gather the whole frozen backbone onto every GPU.
        units = [m for m in FSDP.fsdp_modules(trainer.strategy.model) if _unit_trains(m)]
        with contextlib.ExitStack() as stack:
            for unit in units:
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False, offload_to_cpu=False))
            return {k: v.detach().to("cpu", copy=True) for k, v in adapter_state_dict(module).items()}
    out = {}
    for key, value in adapter_state_dict(module).items():
        if type(value).__name__ == "DTensor":
            value = value.full_tensor()
        out[key] = value.detach().to("cpu", copy=True)
    return out


def _unit_trains(unit: nn.Module) -> bool:
    handle = getattr(unit, "_handle", None)
    flat = getattr(handle, "flat_param", None)
    return flat is None or bool(flat.requires_grad)


def allow_adapter_only_sharded_load(strategy: Any, adapter_keys: Callable[[], set[str]]) -> None:
    """Let ``strategy.load_checkpoint`` resume a sharded (distributed-checkpoint) adapter-only checkpoint.

    Lightning's FSDPStrategy (``state_dict_type='sharded'``) and ModelParallelStrategy ask
    ``torch.distributed.checkpoint.load`` for every tensor of the model, so a checkpoint without the
    frozen backbone fails with "Missing key in checkpoint state_dict" (Lightning #21124). While the
    strategy loads, the request is cut to the tensors the checkpoint holds; the model then loads only
    those (``strict_loading`` is False for adapter-only checkpoints). A missing adapter tensor is still
    an error. Installed once per strategy instance; full-state-dict checkpoints are not touched.
    """
    original = strategy.load_checkpoint
    if getattr(original, "_lightning_lora_wrapped", False):
        return

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        real_load = dcp.load

        def partial_load(state_dict: dict[str, Any], *load_args: Any, checkpoint_id: Any = None, storage_reader: Any = None, **load_kwargs: Any) -> Any:
            reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(checkpoint_id)
            saved = set(reader.read_metadata().state_dict_metadata)
            dropped = _drop_unsaved(state_dict, saved)
            required = adapter_keys()
            missing = sorted(key for key in dropped if any(key == r or key.endswith("." + r) for r in required))
            if missing:
                raise ValueError(f"The sharded checkpoint lacks {len(missing)} adapter tensors (first: {missing[0]!r}); it is incomplete or corrupted.")
            return real_load(state_dict, *load_args, checkpoint_id=checkpoint_id, storage_reader=storage_reader, **load_kwargs)

        dcp.load = partial_load
        try:
            return original(checkpoint_path, *args, **kwargs)
        finally:
            dcp.load = real_load

    load_checkpoint._lightning_lora_wrapped = True
    strategy.load_checkpoint = load_checkpoint


def _drop_unsaved(state: dict[str, Any], saved: set[str], prefix: str = "") -> list[str]:
    """Remove, in place, the tensors of a nested state dict that the checkpoint (flat keys ``saved``) lacks."""
    dropped = []
    for key in list(state):
        fqn = f"{prefix}{key}"
        value = state[key]
        if isinstance(value, dict):
            dropped += _drop_unsaved(value, saved, fqn + ".")
        elif isinstance(value, torch.Tensor) and fqn not in saved:
            del state[key]
            dropped.append(fqn)
    return dropped
