"""Sharding a LoRA model with plain PyTorch FSDP: wrap policies, ``fully_shard`` helpers, gathering the adapter.

No Lightning here: ``lightning_lora.lightning.strategies`` applies these under Lightning's strategies.

Facts from ../shared/PRIOR-ART.md ("Measured: Lightning FSDP with nf4 backbones"): FSDP1 flattens
tensors of one dtype only, so packed 4-bit weights must be stored in the dtype FSDP flattens
(``quant_storage='bfloat16'``); a unit mixing frozen and trainable parameters either allocates gradients
for all of it or is refused; under FSDP2 parameters are DTensors and ``full_tensor()`` gathers one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_lora import quantization
from lightning_lora._matching import unwrapped_name
from lightning_lora.adapter_io import adapter_state_dict
from lightning_lora.blocks import block_matcher, class_matcher
from lightning_lora.config import _dtype_name


def _is_trainable_leaf(module: nn.Module) -> bool:
    """A full-precision linear whose parameters all train: a LoRA A or B (quantized layers subclass nn.Linear)."""
    if not isinstance(module, nn.Linear) or quantization.is_quantized(module):
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
    is_block = class_matcher(block_classes)

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
    """FSDP2: ``fully_shard`` each decoder layer, an untied input embedding and output head, then the root.

    Call it in ``configure_model`` after LoRA is injected.

    Raises ``ValueError`` when the all-gathers would change packed 4-bit bytes (``fsdp2_4bit_risks``): a
    group whose tensors are all bf16 on a GPU (FSDP2's copy into the all-gather buffer rewrites NaN bit
    patterns, bitsandbytes #1945), or a mixed-precision ``param_dtype`` that casts them. fp32 LoRA weights
    in the group (``LoRALinear``'s default) keep it safe.

    Example (in a LightningModule run with ``ModelParallelStrategy``)::

        def configure_model(self):
            fully_shard_lora(self.model, {LlamaDecoderLayer}, mesh=self.device_mesh["data_parallel"])
    """
    from torch.distributed.fsdp import fully_shard

    is_block = block_matcher(model, block_classes)
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    blocks = [m for m in model.modules() if is_block(m)]
    if not blocks:
        raise ValueError(f"No module of {type(model).__name__} matches `block_classes`={block_classes!r}: name its decoder layer class.")
    for block in blocks:
        fully_shard(block, **kwargs)
    for module in _embedding_and_head(model, is_block):
        # Own groups, resharded after forward: in the root group they would stay all-gathered from forward to the
        # end of backward (FSDP2 never reshards the root after forward), 7.8 GiB per GPU for a 128k-vocab 405B.
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    check_fsdp2_keeps_4bit_bytes(model)
    return model


def _embedding_and_head(model: nn.Module, is_block: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The input embedding and output head outside the decoder blocks, unless tied (then both stay in the root)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module) and next(module.parameters(recurse=False), None) is not None:
            found.append(module)
    inside = {id(m) for block in model.modules() if is_block(block) for m in block.modules()}
    if len(found) == 2 and any(p is q for p in found[0].parameters() for q in found[1].parameters()):
        return []
    return [m for m in found if id(m) not in inside and m is not model]


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
    risks = []
    for name, mp_policy, fsdp_params in _fsdp2_param_groups(model):
        packed = [p for p in fsdp_params if quantization.is_4bit(p._module_info.module) and p._module_info.param_name == "weight"]
        if not packed:
            continue
        where = name or "<root>"
        stored, gathered = packed[0].sharded_param.dtype, _all_gather_dtype(packed[0], mp_policy)
        if gathered != stored:
            risks.append(
                f"group {where!r}: mixed precision casts the packed 4-bit weights from {_dtype_name(stored)} "
                f"to {_dtype_name(gathered)}"
            )
        gather_dtypes = {_all_gather_dtype(p, mp_policy) for p in fsdp_params}
        device = device_type or packed[0].sharded_param.device.type
        if len(gather_dtypes) == 1 and next(iter(gather_dtypes)) in (torch.bfloat16, torch.float16) and device != "cpu":
            risks.append(f"group {where!r}: every tensor is all-gathered as {_dtype_name(next(iter(gather_dtypes)))} on {device}")
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


@torch.no_grad()
def packed_4bit_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each 4-bit layer's packed weight as bytes on CPU (gathered from every shard under FSDP2).

    For checks that sharding left the quantized weights bit for bit as they were.
    """
    out = {}
    for name, module in model.named_modules():
        if quantization.is_4bit(module):
            weight = module.weight
            if _is_dtensor(weight):
                weight = gather_full_tensor(weight)
            out[name] = weight.detach().reshape(-1).contiguous().view(torch.uint8).cpu()
    return out


def is_sharded_param(param: torch.Tensor) -> bool:
    """An FSDP2 DTensor, or an FSDP1 flat parameter: its local shape is not the parameter's shape."""
    return _is_dtensor(param) or param.dim() == 1 and getattr(param, "_is_flat_param", False)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def gather_full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 DTensor (a collective: every rank of its mesh calls it); other tensors as they are.

    FSDP2's layout (one mesh dimension, rows split in ``torch.chunk`` pieces, or replicated) is gathered with
    ``all_gather_into_tensor`` of the process group; any other layout goes through ``full_tensor()``. The
    process-group call is the one that gloo runs correctly on CUDA tensors: ``full_tensor()``'s functional
    collective crashed gloo ranks sharing one GPU (segmentation fault in ``wait_tensor``, torch 2.11, H200).
    The result is a value, outside autograd (a trainable parameter's too).
    """
    if not _is_dtensor(value):
        return value
    with torch.no_grad():
        return _gather_full_tensor(value)


def _gather_full_tensor(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = value.device_mesh, value.placements
    if mesh.ndim != 1 or len(placements) != 1:
        return value.full_tensor()
    local = value.to_local().detach()
    if isinstance(placements[0], Replicate):
        return local
    if not isinstance(placements[0], Shard) or placements[0].dim != 0 or value.dim() == 0:
        return value.full_tensor()
    group = mesh.get_group(0)
    world, rows = dist.get_world_size(group), value.shape[0]
    piece = -(-rows // world)  # torch.chunk's size: ranks hold rows [r * piece, (r + 1) * piece), the last ones fewer or none
    padded = local.new_zeros((piece, *value.shape[1:]))
    padded[: local.shape[0]].copy_(local)
    gathered = local.new_empty((piece * world, *value.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
    return gathered[:rows]


def full_adapter_state_dict(module: nn.Module, fsdp1_root: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The whole adapter of ``module`` on CPU, gathered from every rank's shard (a collective: every rank calls it).

    ``fsdp1_root``: the FSDP1 root wrapper when ``module`` is sharded with FSDP1; FSDP2 DTensors and
    unsharded tensors need nothing.
    """
    if fsdp1_root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # Unshard only the units that hold trainable tensors (one per LoRA linear under lora_fsdp_policy):
        # summoning the root would gather the whole frozen backbone onto every GPU.
        units = [m for m in FSDP.fsdp_modules(fsdp1_root) if _unit_trains(m)]
        with contextlib.ExitStack() as stack:
            for unit in units:
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False, offload_to_cpu=False))
            return {k: v.detach().to("cpu", copy=True) for k, v in adapter_state_dict(module).items()}
    out = {}
    for key, value in adapter_state_dict(module).items():
        if _is_dtensor(value):
            value = gather_full_tensor(value)
        out[key] = value.detach().to("cpu", copy=True)
    return out


def _unsharded_units(fsdp1_root: nn.Module) -> list[Any]:
    """The flat-parameter handles of ``fsdp1_root``'s units that hold whole tensors (``NO_SHARD``, as on one rank)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    handles = []
    for unit in FSDP.fsdp_modules(fsdp1_root):
        handle = getattr(unit, "_handle", None)
        if handle is None or not handle._use_orig_params:
            continue
        # One rank turns any strategy into NO_SHARD inside the handle; the unit may still report the one asked for.
        if getattr(handle, "uses_sharded_strategy", True) is False or unit.sharding_strategy == ShardingStrategy.NO_SHARD:
            handles.append(handle)
    return handles


def restore_unsharded_params(fsdp1_root: nn.Module) -> int:
    """Register the parameters of FSDP1's unsharded (``NO_SHARD``) frozen units again; returns how many units.

    With ``use_orig_params=True`` a unit's forward swaps its parameters for plain tensor views, and the
    post-backward hook swaps them back; a unit without trainable parameters has no such hook, and under
    ``NO_SHARD`` (FSDPStrategy on one rank) no reshard does it either, so ``state_dict`` afterwards lacks the
    unit's frozen weights and FSDP's own hook fails ("FSDP assumes ... is in the state_dict"). This does the
    reshard the hook would have done: the full-precision flat parameter again (not a mixed-precision copy), its
    views registered as parameters (new ones where FSDP's write-back had already kept the plain views in their
    place). Sharded units are left alone. Call it between steps.
    """
    handles = _unsharded_units(fsdp1_root)
    for handle in handles:
        flat = handle.flat_param
        if not hasattr(flat, "_local_shard"):  # FSDP has not run yet (it sets up lazily): the parameters are as wrapped
            continue
        # The next forward's write-back check then finds the plain views where the parameters were and keeps them
        # as "the parameters" (flat_param._params), so a reshard alone would register plain tensors: make them
        # parameters again first (only frozen units get stuck); a 4-bit weight with its quantization state.
        for i, (tensor, (name, module, _)) in enumerate(zip(flat._params, flat._param_infos)):
            if not isinstance(tensor, nn.Parameter):
                packed = name == "weight" and quantization.is_4bit(module)  # a 4-bit layer's bias is a plain tensor
                flat._params[i] = quantization.as_4bit_parameter(module, tensor) if packed else nn.Parameter(tensor.detach(), requires_grad=False)
        handle.reshard(False)  # NO_SHARD: point at the full-precision local flat parameter, register the views
    return len(handles)


def unsharded_fsdp1_state_dict(fsdp1_root: nn.Module) -> dict[str, Any]:
    """The ``state_dict`` of the module inside ``fsdp1_root`` when every unit holds whole tensors (FSDP1 on one rank).

    Keys as the unwrapped module names them, values detached (not copied), as a one-device ``state_dict``. It
    does not go through FSDP's state-dict hooks, which assume the frozen units' parameters are registered
    (``restore_unsharded_params`` first registers them; anything still unregistered then raises, naming it, rather
    than leaving a checkpoint without it). Raises ``ValueError`` if a unit is sharded (several ranks): use
    FSDP's own state dict there.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    handles = _unsharded_units(fsdp1_root)
    units = [u for u in FSDP.fsdp_modules(fsdp1_root) if getattr(u, "_handle", None) is not None]
    if len(handles) != len(units):
        raise ValueError("unsharded_fsdp1_state_dict: some FSDP units are sharded; this is for FSDP1 on one rank (NO_SHARD) only.")
    restore_unsharded_params(fsdp1_root)
    out: dict[str, Any] = {}
    for path, module in fsdp1_root.named_modules(remove_duplicate=False):
        local: dict[str, Any] = {}
        # A module's own tensors as nn.Module.state_dict saves them (bitsandbytes adds its quantization state here),
        # without the state-dict hooks; FSDP's flat storage is no tensor of the model.
        module._save_to_state_dict(local, path + "." if path else "", False)
        for key, value in local.items():
            if not getattr(value, "_is_flat_param", False):
                out.setdefault(unwrapped_name(key), value)
    expected = {
        unwrapped_name(f"{path}.{fqn}" if path else fqn)
        for path, unit in fsdp1_root.named_modules()
        if getattr(unit, "_handle", None) is not None
        for fqn in unit._handle.flat_param._fqns
    }
    missing = sorted(expected - set(out))
    if missing:
        raise RuntimeError(
            f"FSDP1 on one rank: {len(missing)} parameters are not registered even after a reshard (first: {missing[:3]}); cannot checkpoint them."
        )
    return out


def _unit_trains(unit: nn.Module) -> bool:
    handle = getattr(unit, "_handle", None)
    flat = getattr(handle, "flat_param", None)
    return flat is None or bool(flat.requires_grad)
