"""Merge LoRA updates into the base weights, undo it, switch LoRA off, export merged weights."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_lora import quantization
from lightning_lora.config import _DTYPES, _dtype_name
from lightning_lora._matching import join_path, unwrapped_name
from lightning_lora.inject import adapter_modules, require_lora_state
from lightning_lora.layers import lora_layers, require_unmerged
from lightning_lora.param_lora import ParamLoRA, merged_owner_state
from lightning_lora.tokens import TrainableTokens


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (of the active adapter) into its base weight (idempotent); the forward then costs what the base costs.

    Quantized bases are dequantized, updated and quantized again, which rounds the update; a warning
    states the measured relative error. ``unmerge_lora`` restores the original quantized weight exactly.
    """
    require_lora_state(model, "merge_lora")
    _require_mergeable(model)
    errors = [error for layer in adapter_modules(model).values() if (error := layer.merge()) is not None]
    if errors:
        warnings.warn(
            f"Merged LoRA into {len(errors)} quantized layers by dequantize -> add -> requantize. Measured relative "
            f"rounding error of the merged weights (||W_q - (W + dW)|| / ||W + dW||): max {max(errors):.3e}, "
            f"mean {sum(errors) / len(errors):.3e}. For exact merged weights export with `merged_state_dict` instead.",
            stacklevel=2,
        )
    return model


def require_lora_computing(model: nn.Module, caller: str) -> None:
    """Refuse ``caller`` (a merge, or an export of merged weights) inside ``disable_lora`` or ``per_sample_adapters``:
    merged weights hold the active adapter for every sample, which is not the model that computes inside them."""
    if any(not getattr(module, "enabled", True) for module in adapter_modules(model).values()):
        # A disabled layer computes its base alone; a merged base holds the update, so it would no longer be off.
        raise ValueError(
            f"`{caller}` was called inside `disable_lora`, where the model computes without LoRA, but merged weights hold "
            f"the LoRA update: call `{caller}` after the block."
        )
    if any(getattr(layer, "sample_adapters", None) is not None for layer in lora_layers(model).values()):
        # A merged layer computes one adapter for every sample: the others' rows would get the merged one.
        raise ValueError(
            f"`{caller}` was called inside `per_sample_adapters`, where each sample computes with its own adapter, but "
            f"merged weights hold one adapter (the active one) for all: call `{caller}` after the block."
        )


def _require_mergeable(model: nn.Module) -> None:
    """Refuse, before any layer changes, a merge whose merged model would compute something else than the unmerged one."""
    require_lora_computing(model, "merge_lora")
    # A base weight shared with another parameter (a LoRA lm_head tied to the input embedding) would take the update
    # in both places: the embedding would change too. merged_state_dict / save_merged write them apart instead.
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(unwrapped_name(name))
    for path, layer in lora_layers(model).items():
        if layer.merged or layer.get_adapter(layer.active_adapter) is None or quantization.is_quantized(layer.base_layer):
            continue
        own = join_path(unwrapped_name(path), "base_layer.weight")
        others = [name for name in names.get(id(layer.base_layer.weight), []) if name != own]
        if others:
            raise ValueError(
                f"`merge_lora` cannot merge into {unwrapped_name(path)!r}: its weight is tied to {others[0]!r}, which would take "
                "the update too and change what the model computes; nothing was merged. Export merged weights with "
                "`save_merged` / `merged_state_dict` (they write the two apart), or train without LoRA on a tied layer."
            )


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged updates back out of the base weights (idempotent)."""
    require_lora_state(model, "unmerge_lora")
    for layer in adapter_modules(model).values():
        layer.unmerge()
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block: ``with disable_lora(model): base_out = model(x)``."""
    layers = list(adapter_modules(model).values())
    if not layers:
        raise ValueError("`disable_lora` got a model without LoRA layers: call `inject_lora` first.")
    if any(layer.merged for layer in layers):
        raise ValueError("`disable_lora` needs unmerged LoRA layers: call `unmerge_lora(model)` first.")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.enabled = enabled


def merged_state_dict(model: nn.Module, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain (LoRA-free, unquantized) model with every update merged in.

    Keys are those of the original model, so the result loads with ``strict=True`` into a fresh
    copy of the architecture. Quantized layers are dequantized; the update is added in float32 to
    the dequantized weight, so no second rounding happens. ``dtype`` casts floating tensors (default:
    the dtype of the model's first floating parameter that is not a LoRA or quantized weight).
    A tied tensor with LoRA on one of its layers (an lm_head tied to the embedding) differs between
    its names once merged: a warning says so, since a tied copy of the architecture keeps only one.
    Refused inside ``disable_lora`` / ``per_sample_adapters``, where the model computes without the merged update.
    """
    require_lora_computing(model, "merged_state_dict")
    state = _merged_state(model, dtype)
    warn_diverged_ties(model, state, "merged_state_dict")
    return state


def diverged_ties(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(key, key) pairs of ``state`` that are one tied tensor in ``model`` but hold different merged values."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        # ``state`` is keyed as the model's state_dict: with wrapper parts (a compiled model's ``_orig_mod.``) or
        # without them (FSDP's state-dict hooks drop theirs); a LoRA layer's weight under the layer's own key.
        key = next((k for k in (name, unwrapped_name(name)) if k.replace(".base_layer.", ".") in state), None)
        if key is not None:
            groups.setdefault(id(param), []).append(key.replace(".base_layer.", "."))
    return [(keys[0], other) for keys in groups.values() for other in keys[1:] if not torch.equal(state[keys[0]], state[other])]


def warn_diverged_ties(model: nn.Module, state: dict[str, torch.Tensor], caller: str) -> None:
    pairs = diverged_ties(model, state)
    if pairs:
        first, second = pairs[0]
        warnings.warn(
            f"`{caller}`: {first!r} and {second!r} are one tied tensor in this model, but differ once merged (LoRA on a "
            "tied layer). Load the weights into a model built untied (e.g. tie_word_embeddings=False): a tied one keeps "
            "only one of them.",
            UserWarning,
            stacklevel=3,
        )


def float_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` (a floating torch dtype or its name, e.g. 'bfloat16') as a torch dtype; anything else raises. The
    ``dtype`` argument of ``cast_adapters``, ``merged_state_dict`` and ``save_merged``."""
    if isinstance(dtype, str):
        dtype = _DTYPES.get(_dtype_name(dtype), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:  # complex dtypes are not floating here
        raise ValueError(f"`dtype` must be a floating torch dtype such as torch.bfloat16, got {dtype!r}.")
    return dtype


@torch.no_grad()
def _merged_state(model: nn.Module, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    is_adapter = require_lora_state(model, "merged_state_dict").is_adapter_param  # any adapter's tensor
    layers = lora_layers(model)
    quantized = {name: module for name, module in model.named_modules() if quantization.is_quantized(module)}
    # ParamLoRA (outermost per owner) and TrainableTokens give their module's merged state themselves.
    wrapped = {
        name: module
        for name, module in adapter_modules(model).items()
        if isinstance(module, TrainableTokens) or (isinstance(module, ParamLoRA) and not name.endswith(".base_layer"))
    }
    if dtype is not None:
        dtype = float_dtype(dtype)
    else:
        dtype = next(
            (p.dtype for n, p in model.named_parameters() if p.is_floating_point() and not is_adapter(unwrapped_name(n))),
            torch.float32,
        )
    out: dict[str, torch.Tensor] = {}
    skip_prefixes = tuple(f"{name}." for name in (*layers, *quantized, *wrapped))
    for key, value in model.state_dict().items():
        if key.startswith(skip_prefixes):
            continue
        out[key] = value.to(dtype) if value.is_floating_point() else value
    for name, layer in layers.items():
        out[f"{name}.weight"] = layer.merged_weight().to(dtype)
        if layer.base_layer.bias is not None:
            out[f"{name}.bias"] = layer.base_layer.bias.detach().to(dtype)
    for name, module in wrapped.items():
        state = merged_owner_state(module) if isinstance(module, ParamLoRA) else module.merged_state()
        for key, value in state.items():
            out[join_path(name, key)] = value.to(dtype) if value.is_floating_point() else value
    for name, module in quantized.items():
        if name.endswith(".base_layer") and name[: -len(".base_layer")] in layers:
            continue
        out[f"{name}.weight"] = quantization.dequantize_weight(module).to(dtype)
        if module.bias is not None:
            out[f"{name}.bias"] = module.bias.detach().to(dtype)
    return out



def cast_adapters(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """Store every LoRA A and B in ``dtype`` (e.g. bf16 for serving an unmerged adapter); returns ``model``.

    Training keeps adapters in float32 and casts them to the compute dtype on each forward, two small
    kernels per layer; an adapter served unmerged in the compute dtype needs no cast. Cast back to
    float32 (``cast_adapters(model, torch.float32)``) before training again: optimizer states do not
    follow the new tensors.

    Example::

        model = cast_adapters(load_adapter(model, "adapter/"), torch.bfloat16).eval()
    """
    require_lora_state(model, "cast_adapters")
    require_unmerged(model, "cast_adapters")  # a rounded delta would not subtract what merge added
    dtype = float_dtype(dtype)
    for layer in lora_layers(model).values():
        for _, adapter in layer.adapter_items():
            adapter.lora_a.to(dtype)
            adapter.lora_b.to(dtype)
            if adapter.lora_magnitude is not None:
                adapter.lora_magnitude.data = adapter.lora_magnitude.data.to(dtype)
    for layer in (m for m in adapter_modules(model).values() if isinstance(m, ParamLoRA)):
        layer.lora_a.to(dtype)
        layer.lora_b.to(dtype)
    return model
