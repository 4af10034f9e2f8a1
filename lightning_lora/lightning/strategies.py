"""What lightning_lora does differently under each Lightning strategy: the one file to change to support another.

A strategy is classified once, by ``isinstance`` on Lightning's classes (most specific first), into a kind:

==========  =======================================  ===============================================
kind        strategies                               what differs
==========  =======================================  ===============================================
'fsdp'      ``FSDPStrategy`` (FSDP1)                 4-bit storage must be the flattened dtype; no int8;
                                                     norm clipping through the FSDP root; the adapter is
                                                     gathered from its units; sharded adapter-only resume
'fsdp2'     ``ModelParallelStrategy`` (FSDP2)        no int8; DTensors gathered; sharded adapter-only resume;
                                                     groups that would rewrite 4-bit bytes refused
'ddp'       ``DDPStrategy``                          atomic single-file checkpoints
'single'    ``SingleDeviceStrategy``                 atomic single-file checkpoints
'other'     DeepSpeed, XLA and anything else         nothing: they checkpoint their own way
==========  =======================================  ===============================================

The facts behind the FSDP rows are in ../shared/PRIOR-ART.md: Lightning's ``FSDPPrecision`` raises on
norm clipping (Lightning #19235); FSDP1 cannot flatten uint8 storage; sharded loads ask for every
tensor of the model (Lightning #21124).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from torch import nn

from lightning_lora import quantization, sharding
from lightning_lora.config import LoRAConfig, QuantizationConfig, _dtype_name
from lightning_lora.lightning import patches
from lightning_lora.sharding import full_adapter_state_dict

StrategyKind = Literal["fsdp", "fsdp2", "ddp", "single", "other"]

# Most specific first: DeepSpeed and XLA subclass DDPStrategy / SingleDeviceStrategy but checkpoint their own way.
_KINDS: tuple[tuple[type, StrategyKind], ...] = (
    (DeepSpeedStrategy, "other"),
    (XLAStrategy, "other"),
    (SingleDeviceXLAStrategy, "other"),
    (FSDPStrategy, "fsdp"),
    (ModelParallelStrategy, "fsdp2"),
    (DDPStrategy, "ddp"),
    (SingleDeviceStrategy, "single"),
)


def strategy_kind(trainer_or_strategy: Any) -> StrategyKind:
    """The kind of a trainer's (or a) strategy: 'fsdp', 'fsdp2', 'ddp', 'single' or 'other'."""
    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    for cls, kind in _KINDS:
        if isinstance(strategy, cls):
            return kind
    return "other"


def writes_single_file_checkpoints(strategy: Any) -> bool:
    """Whether the strategy writes its checkpoints as one file through its ``checkpoint_io`` plugin."""
    return strategy_kind(strategy) in ("single", "ddp")


def check_quantization(quantization: QuantizationConfig, pl_module: nn.Module) -> None:
    """Raise before injection if the module's strategy cannot shard ``quantization``."""
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


def check_lora_config(config: LoRAConfig, pl_module: nn.Module) -> None:
    """Raise before injection if the module's strategy cannot run ``config``'s adapter."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is not None and config.use_dora and strategy_kind(trainer) == "fsdp":
        raise ValueError(
            "`use_dora`=True is not supported under FSDPStrategy (FSDP1): DoRA reads A, B and its magnitude as whole "
            "tensors, which FSDP1 units hold only inside their own forward. Use ModelParallelStrategy (FSDP2, with "
            "lightning_lora.sharding.fully_shard_lora) or DDP, or use_dora=False."
        )


def _packed_4bit_storage(model: nn.Module) -> dict[torch.dtype, str]:
    """Floating-point storage dtypes of the packed 4-bit weights -> the first layer stored so (quoted).

    uint8 storage is left out: ``Module.to(dtype)`` casts floating-point tensors only.
    """
    found: dict[torch.dtype, str] = {}
    for name, module in model.named_modules():
        if quantization.is_4bit(module) and module.weight.dtype.is_floating_point:
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
                    other = f"`quant_storage`={_dtype_name(new)!r}"
                else:
                    other = "a precision FSDPStrategy can shard 4-bit weights with ('bf16-true')"
                raise ValueError(
                    f"`precision`={getattr(trainer, 'precision', None)!r} casts every floating-point weight to {_dtype_name(new)}, "
                    f"which would turn the packed 4-bit weights of {stored[dtype]} (stored as {_dtype_name(dtype)}) into "
                    "other bytes: the model would compute with garbage. Use precision='bf16-mixed' (4-bit layers compute in their "
                    f"`compute_dtype` anyway), or {other}."
                )
    if strategy_kind(strategy) == "fsdp":
        mixed = getattr(strategy, "mixed_precision_config", None)
        param_dtype = getattr(mixed, "param_dtype", None)
        for dtype, layer in stored.items():
            if param_dtype is not None and param_dtype != dtype:
                raise ValueError(
                    f"FSDPStrategy's mixed precision casts every parameter to {_dtype_name(param_dtype)} before its "
                    f"all-gather (`precision`={getattr(trainer, 'precision', None)!r}), which would turn the packed 4-bit weights of "
                    f"{layer} (stored as {_dtype_name(dtype)}) into other bytes. Use precision='bf16-mixed' or "
                    "'bf16-true' with `quant_storage`='bfloat16' (or a `mixed_precision` whose param_dtype is the storage dtype)."
                )


def install(
    trainer: Any,
    pl_module: nn.Module,
    adapter_keys: Callable[[], set[str]] | None,
    check_file: Callable[[Any], None] | None = None,
) -> None:
    """What the strategy needs patched, once per module and strategy (see ``patches``).

    FSDP1: ``configure_gradient_clipping`` clips by norm through the FSDP root; on one rank (NO_SHARD)
    ``lightning_module_state_dict`` works around FSDP's missing frozen weights (``_one_rank_fsdp1_state_dict``). FSDP1 and FSDP2 with
    ``adapter_keys`` (adapter-only checkpoints): ``strategy.load_checkpoint`` resumes sharded checkpoints
    that hold only the adapter. With ``check_file`` (strategies that read checkpoints without the
    checked reader, e.g. FSDP's unrestricted unpickler): ``strategy.load_checkpoint`` calls it on the
    path first. FSDP2: ``configure_optimizers`` first refuses parameter groups whose
    all-gathers would change packed 4-bit bytes (``sharding.check_fsdp2_keeps_4bit_bytes``).
    """
    kind = strategy_kind(trainer)
    if kind == "fsdp":

        def configure_gradient_clipping(optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
            _clip_gradients(pl_module, optimizer, gradient_clip_val, gradient_clip_algorithm)

        patches.replace(pl_module, "configure_gradient_clipping", configure_gradient_clipping)
        _one_rank_fsdp1_state_dict(trainer.strategy, pl_module, adapter_keys)
    sharded_adapter = adapter_keys is not None and kind in ("fsdp", "fsdp2")
    if sharded_adapter or check_file is not None:
        _wrap_load_checkpoint(trainer.strategy, adapter_keys if sharded_adapter else None, check_file)
    if kind == "fsdp2":
        # After configure_model sharded the model and the precision plugin converted it, before any step.
        patches.run_before(
            pl_module, "configure_optimizers", lambda *_: sharding.check_fsdp2_keeps_4bit_bytes(pl_module), purpose="fsdp2_4bit_bytes"
        )


def _one_rank_fsdp1_state_dict(strategy: Any, pl_module: nn.Module, adapter_keys: Callable[[], set[str]] | None) -> None:
    """FSDPStrategy on one rank runs NO_SHARD, whose frozen units leave their weights out of ``state_dict`` after a
    step (FSDP's own hook then fails: "FSDP assumes ... is in the state_dict"). There every tensor is whole on the
    rank, so the state dict is the module's own, taken without FSDP's hooks after the frozen units are resharded
    (``sharding.unsharded_fsdp1_state_dict``): whole-model checkpoints get every weight, adapter-only ones the
    adapter (the checkpoint filter drops the rest). More ranks: Lightning's state dict, unchanged."""
    original = strategy.lightning_module_state_dict

    def lightning_module_state_dict(*args: Any, **kwargs: Any) -> Any:
        if strategy.world_size != 1:
            return original(*args, **kwargs)
        found = sharding.unsharded_fsdp1_state_dict(strategy.model)
        missing = sorted(adapter_keys() - set(found)) if adapter_keys is not None else []
        if missing:
            raise RuntimeError(f"FSDP1 on one rank: the adapter tensors {missing[:3]} are not in the module's state dict; cannot checkpoint them.")
        return found

    patches.replace(strategy, "lightning_module_state_dict", lightning_module_state_dict, purpose="fsdp1_one_rank")


# -- several gloo ranks on one GPU ------------------------------------------------------------------
def share_one_gpu(strategy: Any) -> Any:
    """``strategy``, made able to run several ranks on one GPU through gloo; returns it.

    ``ModelParallelStrategy`` binds its default process group to the GPU, and torch's ``DeviceMesh`` then
    splits that group for each mesh dimension, deep-copying the backend's options, which gloo's cannot be
    ("cannot pickle 'torch._C._distributed_c10d._Options' object", torch 2.11 on an H200). This unbinds a
    gloo default group right after the strategy makes it, so the mesh makes its groups with ``new_group``
    as it does on CPU. NCCL groups, CPU runs and other strategies are left alone. ``lightning-lora fit``
    applies it to every strategy it builds.
    """
    if isinstance(strategy, ModelParallelStrategy):
        patches.run_after(strategy, "_setup_distributed", _unbind_gloo_default_group, purpose="share_one_gpu")
    return strategy


def _unbind_gloo_default_group(*_: Any) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    group = dist.distributed_c10d._get_default_group()
    backends = {part.rsplit(":", 1)[-1] for part in str(dist.get_backend(group)).split(",")}
    if backends == {"gloo"} and getattr(group, "bound_device_id", None) is not None:
        group.bound_device_id = None


# -- clipping --------------------------------------------------------------------------------------
def _clip_gradients(pl_module: nn.Module, optimizer: Any, gradient_clip_val: Any, gradient_clip_algorithm: Any) -> None:
    """``configure_gradient_clipping`` for FSDP1: norm clipping through the FSDP root instead of FSDPPrecision."""
    if not gradient_clip_val:
        return
    if str(gradient_clip_algorithm) in ("norm", "GradClipAlgorithmType.NORM"):
        clip_grad_norm(pl_module.trainer, pl_module, float(gradient_clip_val))
    else:
        pl_module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def clip_grad_norm(trainer: Any, pl_module: nn.Module, max_norm: float) -> torch.Tensor:
    """Norm clipping that works under every strategy (Lightning's FSDPPrecision raises for FSDP1)."""
    if strategy_kind(trainer) == "fsdp":
        root = trainer.strategy.model  # the FSDP root wrapper; its clip_grad_norm_ reduces over all shards
        return root.clip_grad_norm_(max_norm)
    params = [p for p in pl_module.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


# -- the adapter under a trainer -------------------------------------------------------------------
def gather_adapter_state_dict(trainer: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The full adapter on CPU. Under FSDP every rank must call this (the gathers are collectives)."""
    fsdp1 = trainer is not None and strategy_kind(trainer) == "fsdp"
    return full_adapter_state_dict(module, fsdp1_root=trainer.strategy.model if fsdp1 else None)


# -- resuming sharded adapter-only checkpoints ------------------------------------------------------
def allow_adapter_only_sharded_load(strategy: Any, adapter_keys: Callable[[], set[str]]) -> None:
    """Let ``strategy.load_checkpoint`` resume a sharded (distributed-checkpoint) checkpoint that holds only the adapter."""
    _wrap_load_checkpoint(strategy, adapter_keys, None)


def _wrap_load_checkpoint(strategy: Any, adapter_keys: Callable[[], set[str]] | None, check_file: Callable[[Any], None] | None) -> None:
    """One patch of ``strategy.load_checkpoint``: check the file first, load sharded adapter-only checkpoints."""
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        if check_file is not None:
            check_file(checkpoint_path)
        context = _adapter_only_dcp_load(adapter_keys) if adapter_keys is not None else contextlib.nullcontext()
        with context:
            return original(checkpoint_path, *args, **kwargs)

    patches.replace(strategy, "load_checkpoint", load_checkpoint)


def _adapter_only_dcp_load(adapter_keys: Callable[[], set[str]]) -> contextlib.AbstractContextManager[None]:
    """While the strategy loads, ``torch.distributed.checkpoint.load`` asks only for the tensors the checkpoint holds.

    Lightning's FSDPStrategy (``state_dict_type='sharded'``) and ModelParallelStrategy ask
    ``torch.distributed.checkpoint.load`` for every tensor of the model, so a checkpoint without the
    frozen backbone fails with "Missing key in checkpoint state_dict" (Lightning #21124). The request is
    cut to the tensors the checkpoint holds; the model then loads only those (``strict_loading`` is
    False for adapter-only checkpoints). A missing adapter tensor is still an error. Full-state-dict
    checkpoints are not touched.
    """
    import torch.distributed.checkpoint as dcp

    def make(real_load: Callable[..., Any]) -> Callable[..., Any]:
        def partial_load(state_dict: dict[str, Any], *args: Any, checkpoint_id: Any = None, storage_reader: Any = None, **kwargs: Any) -> Any:
            reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(checkpoint_id)
            saved = set(reader.read_metadata().state_dict_metadata)
            dropped = _drop_unsaved(state_dict, saved)
            required = adapter_keys()
            missing = sorted(key for key in dropped if any(key == r or key.endswith("." + r) for r in required))
            if missing:
                raise ValueError(f"The sharded checkpoint lacks {len(missing)} adapter tensors (first: {missing[0]!r}); it is incomplete or corrupted.")
            return real_load(state_dict, *args, checkpoint_id=checkpoint_id, storage_reader=storage_reader, **kwargs)

        return partial_load

    return patches.swapped(dcp, "load", make)


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
