"""Put LoRA into a model: pick the target layers, quantize, wrap, freeze the rest.

Every check runs before the model is touched, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora import quantization
from lightning_lora._matching import matches_any, matches_suffix, output_head_names, pattern_value, unwrapped_name
from lightning_lora.config import LoRAConfig, QuantizationConfig
from lightning_lora.layers import LoRALinear, is_supported_base, lora_layers

_STATE_ATTR = "_lightning_lora"


@dataclass
class LoRAState:
    """What ``inject_lora`` did to a model; kept on the model for saving, merging and checks."""

    config: LoRAConfig
    quantization: QuantizationConfig | None
    targets: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    fingerprint: str = ""
    """``backbone_fingerprint`` taken at injection, before any strategy wrapped the model."""


def lora_state(model: nn.Module) -> LoRAState | None:
    return getattr(model, _STATE_ATTR, None)


def require_lora_state(model: nn.Module, caller: str) -> LoRAState:
    state = lora_state(model)
    if state is None:
        raise ValueError(f"`{caller}` got a model without LoRA: call `inject_lora(model, LoRAConfig(...))` first.")
    return state


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root + ".") for root in roots)


def find_modules_to_save(model: nn.Module, config: LoRAConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [name for name, _ in model.named_modules() if name]
    found = []
    for pattern in config.modules_to_save:
        hits = [name for name in names if matches_any(name, [pattern])]
        if not hits:
            raise ValueError(
                f"`modules_to_save` entry {pattern!r} matches no module of {type(model).__name__}. "
                f"Top-level modules are {[n for n in names if '.' not in n]}; name one by its path suffix, e.g. 'classifier'."
            )
        found.extend(hit for hit in hits if not _under(hit, found))
    return found


def _require_every_name_matches(model: nn.Module, target_modules: list[str] | str, candidates: list[str]) -> None:
    """A list of names: each must match some module, so a typo (``['q_prj', 'v_proj']``) is not silently dropped
    while the other names still match. The error offers the closest real names (difflib)."""
    if isinstance(target_modules, str):
        return  # one regex: "matches nothing" is checked by the caller
    import difflib

    paths = [name for name, _ in model.named_modules() if name]
    unmatched = [t for t in target_modules if not any(matches_suffix(path, t) for path in paths)]
    if not unmatched or len(unmatched) == len(target_modules):
        return  # all match; or none does, and the caller's "matches no linear layer" error lists the real names
    problems = []
    for name in unmatched:
        depth = name.count(".") + 1  # compare 'self_attn.q_prj' with two-part suffixes, 'q_prj' with last parts
        pool = sorted({".".join(path.split(".")[-depth:]) for path in (candidates or paths)})
        close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
        problems.append(f"{name!r} (closest: {', '.join(map(repr, close))})" if close else f"{name!r} (no close name)")
    suffixes = sorted({name.rpartition(".")[2] for name in candidates})
    raise ValueError(
        f"`target_modules`={target_modules!r}: {'; '.join(problems)} {'matches' if len(unmatched) == 1 else 'match'} no "
        f"module of {type(model).__name__}. Every listed name must match at least one module: fix the spelling. "
        f"Linear layers here are named {suffixes}; use those, or 'all-linear'."
    )


def drop_unmatched_names(model: nn.Module, config: LoRAConfig) -> LoRAConfig:
    """``config`` without the ``target_modules`` names that match no module of ``model``: PEFT's rule, for configs
    read from adapter files (PEFT saves the list as the user wrote it, e.g. names of other architectures, and
    loads it anyway). Configs a user writes go through the strict check of ``find_targets`` instead."""
    if isinstance(config.target_modules, str):
        return config
    paths = [name for name, _ in model.named_modules() if name]
    kept = [t for t in config.target_modules if any(matches_suffix(path, t) for path in paths)]
    if not kept or len(kept) == len(config.target_modules):
        return config  # nothing to drop, or nothing left: find_targets reports it
    return dataclasses.replace(config, target_modules=kept)


def find_targets(model: nn.Module, config: LoRAConfig, skip: list[str] = ()) -> list[str]:
    """Paths of the layers ``config`` adapts, validated: raises with the candidates when nothing fits."""
    heads = output_head_names(model)
    candidates = [name for name, module in model.named_modules() if name and is_supported_base(module)]
    if config.target_modules == "all-linear":
        matched = [name for name in candidates if name not in heads]
    else:
        _require_every_name_matches(model, config.target_modules, candidates)
        matched = [name for name, _ in model.named_modules() if name and matches_any(name, config.target_modules)]
        unsupported = [name for name in matched if not is_supported_base(model.get_submodule(name))]
        if unsupported:
            kinds = {name: type(model.get_submodule(name)).__name__ for name in unsupported[:3]}
            raise ValueError(
                f"`target_modules`={config.target_modules!r} matches modules that are not linear layers: {kinds}. "
                "LoRA wraps nn.Linear, Conv1D, Linear4bit and Linear8bitLt; narrow the pattern to those."
            )
    matched = [name for name in matched if not matches_any(name, config.exclude_modules) and not _under(name, list(skip))]
    if not matched:
        suffixes = sorted({name.rpartition(".")[2] for name in candidates})
        raise ValueError(
            f"`target_modules`={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no "
            f"linear layer of {type(model).__name__}. Linear layers here are named {suffixes}; "
            "pick from those, or use 'all-linear'."
        )
    if any(isinstance(model.get_submodule(name), LoRALinear) for name in matched):
        raise ValueError("The model already has LoRA layers: `inject_lora` was called twice. Inject once, or call it on a fresh model.")
    return matched


def inject_lora(
    model: nn.Module,
    config: LoRAConfig,
    quantization_config: QuantizationConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Wrap the targeted layers of ``model`` in LoRA layers and freeze everything else, in place.

    ``device`` is where quantized layers go (default: where each layer is); quantizing straight onto
    the GPU keeps host memory low, since bitsandbytes packs a weight as it moves.

    With ``quantization_config``, the model's ``nn.Linear`` layers (except the output head and
    ``modules_to_save``) are first replaced by bitsandbytes layers, one at a time.

    Example::

        model = inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
        print(parameter_summary(model))
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"`config` must be a LoRAConfig, got {type(config).__name__}: build one with LoRAConfig(r=..., ...).")
    if quantization_config is not None and not isinstance(quantization_config, QuantizationConfig):
        raise TypeError(f"`quantization_config` must be a QuantizationConfig or None, got {type(quantization_config).__name__} {quantization_config!r}; pass e.g. QuantizationConfig(mode='nf4').")
    if lora_state(model) is not None or lora_layers(model):
        raise ValueError("The model already has LoRA layers: `inject_lora` was called twice. Inject once, or call it on a fresh model.")
    to_save = find_modules_to_save(model, config)
    targets = find_targets(model, config, skip=to_save)
    quantized: list[str] = []
    if quantization_config is not None:
        quantization.require_bitsandbytes("quantization_config", quantization_config)  # fail before anything changes
        skip = output_head_names(model) | {name for name, _ in model.named_modules() if _under(name, to_save)}
        quantized = quantization.quantize_model(model, quantization_config, skip=skip, device=device)

    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoRALinear(
            base,
            r=int(pattern_value(name, config.rank_pattern, config.r)),
            alpha=float(pattern_value(name, config.alpha_pattern, config.alpha)),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
        )
        setattr(parent, child, layer)
    _unfreeze_extras(model, config, to_save)
    setattr(model, _STATE_ATTR, LoRAState(config, quantization_config, targets, to_save, quantized, backbone_fingerprint(model)))
    return model


def _unfreeze_extras(model: nn.Module, config: LoRAConfig, to_save: list[str]) -> None:
    for name, param in model.named_parameters():
        leaf = name.rpartition(".")[2]
        if ".lora_a." in f".{name}" or ".lora_b." in f".{name}":
            param.requires_grad_(True)
        elif _under(name, to_save):
            param.requires_grad_(True)
        elif leaf == "bias" and config.bias == "all":
            param.requires_grad_(True)
        elif leaf == "bias" and config.bias == "lora_only" and name.endswith(".base_layer.bias"):
            param.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train, for ``configure_optimizers``: ``AdamW(trainable_parameters(model))``."""
    return [param for param in model.parameters() if param.requires_grad]


def _numel(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            count = param.numel()
            if name == "weight" and quantization.is_4bit(module):
                count = quantization.quantized_numel(module)  # packed storage holds two 4-bit values a byte
            total += count
            trainable += count if param.requires_grad else 0
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    """One line: trainable / total parameters and the trainable percentage."""
    trainable, total = _numel(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable, total = _numel(model)
    return {"trainable": trainable, "total": total}


def backbone_fingerprint(model: nn.Module) -> str:
    """A hash of the frozen backbone's module paths, parameter shapes and layer types.

    Two models with the same architecture and size share it; the adapter does not affect it.
    """
    import hashlib

    digest = hashlib.sha256()
    for module_name, module in model.named_modules():
        if isinstance(module, LoRALinear) or ".lora_a" in module_name or ".lora_b" in module_name:
            continue
        clean = unwrapped_name(module_name).replace(".base_layer", "")
        for name, param in module.named_parameters(recurse=False):
            shape = (module.out_features, module.in_features) if name == "weight" and quantization.is_4bit(module) else tuple(param.shape)
            digest.update(f"{clean}.{name}:{shape};".encode())
    return digest.hexdigest()[:16]


