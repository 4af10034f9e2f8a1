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
    name = type(strategy).__name__
    if name == "FSDPStrategy":
        return "fsdp"
    if name == "ModelParallelStrategy":
        return "fsdp2"
    if "DDP" in name:
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

    Check the packed 4-bit bytes (``packed_4bit_bytes``) when every tensor of a layer is bf16:
    FSDP2 has been seen to rewrite NaN bit patterns of bf16-stored NF4 weights (bitsandbytes #1945);
    fp32 LoRA weights in the same group (``LoRALinear``'s default) avoided it.

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
    for module in _embedding_and_head(model, is_block):
        # Own groups, resharded after forward: in the root group they would stay all-gathered from forward to the
        # end of backward (FSDP2 never reshards the root after forward), 7.8 GiB per GPU for a 128k-vocab 405B.
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
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
