"""Put LoRA into a model: plan it (targets, ranks, what to quantize, which parameters are the adapter),
then quantize, wrap, and freeze everything but the adapter.

Every check runs while planning, before the model is touched, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora import inits, quantization
from lightning_lora._matching import matches_any, output_head_names, parent_of, path_under, pattern_value, unwrapped_name
from lightning_lora.config import LoRAConfig, QuantizationConfig, init_changes_base
from lightning_lora.layers import DEFAULT_ADAPTER, LoRALinear, base_features, check_adapter_name, is_supported_base, lora_layers

_STATE_ATTR = "_lightning_lora"


@dataclass(frozen=True)
class LayerPlan:
    """One LoRA layer to be: its rank and alpha (after ``rank_pattern`` / ``alpha_pattern``) and its base's features."""

    r: int
    alpha: float
    in_features: int
    out_features: int


@dataclass
class InjectionPlan:
    """What ``inject_lora(model, config, quantization_config)`` does, worked out before anything changes.

    Injection follows it, ``expected_adapter_shapes`` checks files against it, ``peft_config_dict``
    describes it, and ``is_adapter_param`` is the one rule for which parameters are the adapter:
    exactly those train after injection, and exactly those ``adapter_state_dict`` saves.
    """

    config: LoRAConfig
    layers: dict[str, LayerPlan]
    """Target path -> the LoRA layer it gets."""
    modules_to_save: list[str]
    """Paths of the modules trained in full and saved with the adapter."""
    quantize: list[str] = field(default_factory=list)
    """Paths of the linears replaced by bitsandbytes layers before wrapping."""
    adapter_name: str = DEFAULT_ADAPTER
    """The adapter this plan makes ('default' unless several adapters share the model: see ``adapters``)."""
    _layer_tensors: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = LoRALinear.adapter_names(self.config.bias, self.config.use_dora, self.adapter_name)
        self._layer_tensors = frozenset(f"{path}.{name}" for path in self.layers for name in names)

    @property
    def targets(self) -> list[str]:
        return list(self.layers)

    def is_adapter_param(self, name: str) -> bool:
        """Whether the parameter at ``name`` (its path in the injected model, wrappers removed) is part of the adapter."""
        if name in self._layer_tensors or path_under(name, self.modules_to_save):
            return True
        return self.config.bias == "all" and name.rpartition(".")[2] == "bias"

    def injected_name(self, name: str) -> str:
        """The path the parameter ``name`` of the model gets by injection: a wrapped layer's own move under ``.base_layer``."""
        parent, _, leaf = name.rpartition(".")
        return f"{parent}.base_layer.{leaf}" if parent in self.layers else name

    def adapter_shapes(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """The keys and shapes ``adapter_state_dict`` will hold once ``model`` (not injected yet) follows this plan."""
        shapes: dict[str, tuple[int, ...]] = {}
        for path, layer in self.layers.items():
            for name, shape in LoRALinear.adapter_shapes(layer.in_features, layer.out_features, layer.r, self.config.use_dora, self.adapter_name).items():
                shapes[f"{path}.{name}"] = shape
        for name, param in model.named_parameters():
            injected = self.injected_name(unwrapped_name(name))
            if self.is_adapter_param(injected):
                shapes[injected] = tuple(param.shape)
        return shapes


@dataclass
class LoRAState:
    """What ``inject_lora`` (and ``adapters.add_adapter``) did to a model; kept on the model for saving, merging and checks.

    ``plan`` and ``config`` are those of the active adapter: the one that computes, trains and is saved by default.
    """

    plans: dict[str, InjectionPlan]
    """Every adapter of the model by name, in the order they were added."""
    quantization: QuantizationConfig | None
    fingerprint: str = ""
    """``backbone_fingerprint`` taken at injection, before any strategy wrapped the model."""
    active: str = DEFAULT_ADAPTER
    initial: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per adapter with a PiSSA / OLoRA init: its A and B right after the init (CPU copies), for ``convert_to_lora``."""

    @property
    def plan(self) -> InjectionPlan:
        return self.plans[self.active]

    @property
    def config(self) -> LoRAConfig:
        return self.plan.config

    @property
    def targets(self) -> list[str]:
        return self.plan.targets

    @property
    def modules_to_save(self) -> list[str]:
        return self.plan.modules_to_save

    @property
    def quantized(self) -> list[str]:
        return next(iter(self.plans.values())).quantize  # the first adapter's injection quantized the model


def lora_state(model: nn.Module) -> LoRAState | None:
    return getattr(model, _STATE_ATTR, None)


def require_lora_state(model: nn.Module, caller: str) -> LoRAState:
    state = lora_state(model)
    if state is None:
        raise ValueError(f"`{caller}` got a model without LoRA: call `inject_lora(model, LoRAConfig(...))` first.")
    return state


def is_adapter_param(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s parameter ``name`` is part of its adapter (it trains, and ``save_adapter`` writes it)."""
    return require_lora_state(model, "is_adapter_param").plan.is_adapter_param(unwrapped_name(name))


def plan_injection(
    model: nn.Module, config: LoRAConfig, quantization_config: QuantizationConfig | None = None, adapter_name: str = DEFAULT_ADAPTER
) -> InjectionPlan:
    """The ``InjectionPlan`` for ``model``; validates the config against the model (raises with the candidates).

    On a model that has LoRA already (``adapters.add_adapter``), targets are matched against its base layers,
    as if the LoRA layers were not there.
    """
    to_save = find_modules_to_save(model, config)
    layers = {}
    for path in find_targets(model, config, skip=to_save):
        in_features, out_features = base_features(_base_of(model.get_submodule(path)))
        r = int(pattern_value(path, config.rank_pattern, config.r))
        layers[path] = LayerPlan(r, float(pattern_value(path, config.alpha_pattern, config.alpha)), in_features, out_features)
    quantize = []
    if quantization_config is not None:
        skip = output_head_names(model) | {name for name, _ in model.named_modules() if path_under(name, to_save)}
        quantize = quantization.quantization_targets(model, quantization_config, skip=skip)
    for path, layer in layers.items():
        base = _base_of(model.get_submodule(path))
        inits.check_init(config.init, path, base, layer.r, (layer.in_features, layer.out_features), will_quantize=path in quantize)
    return InjectionPlan(config, layers, to_save, quantize, adapter_name)


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoRALinear) else module


def _named_base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` as if no LoRA layer were there: a LoRA layer stands for its base, nothing inside it shows."""
    out, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, LoRALinear):
            inside = (f"{name}.",) if name else ("",)
            module = module.base_layer
        out.append((name, module))
    return out


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
        found.extend(hit for hit in hits if not path_under(hit, found))
    return found


def find_targets(model: nn.Module, config: LoRAConfig, skip: list[str] = ()) -> list[str]:
    """Paths of the layers ``config`` adapts, validated: raises with the candidates when nothing fits."""
    heads = output_head_names(model)
    modules = dict(_named_base_modules(model))
    candidates = [name for name, module in modules.items() if name and is_supported_base(module)]
    if config.target_modules == "all-linear":
        matched = [name for name in candidates if name not in heads]
    else:
        matched = [name for name in modules if name and matches_any(name, config.target_modules)]
        unsupported = [name for name in matched if not is_supported_base(modules[name])]
        if unsupported:
            kinds = {name: type(modules[name]).__name__ for name in unsupported[:3]}
            raise ValueError(
                f"`target_modules`={config.target_modules!r} matches modules that are not linear layers: {kinds}. "
                "LoRA wraps nn.Linear, Conv1D, Linear4bit and Linear8bitLt; narrow the pattern to those."
            )
    matched = [name for name in matched if not matches_any(name, config.exclude_modules) and not path_under(name, skip)]
    if not matched:
        suffixes = sorted({name.rpartition(".")[2] for name in candidates})
        raise ValueError(
            f"`target_modules`={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no "
            f"linear layer of {type(model).__name__}. Linear layers here are named {suffixes}; "
            "pick from those, or use 'all-linear'."
        )
    return matched


def inject_lora(
    model: nn.Module,
    config: LoRAConfig,
    quantization_config: QuantizationConfig | None = None,
    *,
    device: torch.device | str | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Wrap the targeted layers of ``model`` in LoRA layers and freeze everything else, in place.

    ``device`` is where quantized layers go (default: where each layer is); quantizing straight onto
    the GPU keeps host memory low, since bitsandbytes packs a weight as it moves. ``adapter_name`` names
    this first adapter (more are added with ``lightning_lora.adapters.add_adapter``).

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
    check_adapter_name(adapter_name)
    if lora_state(model) is not None or lora_layers(model):
        raise ValueError(
            "The model already has LoRA layers: `inject_lora` was called twice. Inject once, or call it on a fresh model; "
            "to add a second adapter, call `lightning_lora.adapters.add_adapter(model, name, config)`."
        )
    plan = plan_injection(model, config, quantization_config, adapter_name)
    if quantization_config is not None:
        quantization.require_bitsandbytes("quantization_config", quantization_config)  # fail before anything changes
        quantization.quantize_modules(model, quantization_config, plan.quantize, device=device)

    for param in model.parameters():
        param.requires_grad_(False)
    for path, layer in plan.layers.items():
        parent, child = parent_of(model, path)
        setattr(parent, child, LoRALinear.from_config(getattr(parent, child), config, r=layer.r, alpha=layer.alpha, adapter_name=adapter_name))
    for name, param in model.named_parameters():
        if plan.is_adapter_param(unwrapped_name(name)):
            param.requires_grad_(True)
    state = LoRAState({adapter_name: plan}, quantization_config, backbone_fingerprint(model), active=adapter_name)
    setattr(model, _STATE_ATTR, state)
    record_initial_adapter(model, adapter_name)
    return model


def record_initial_adapter(model: nn.Module, adapter_name: str) -> None:
    """Keep a CPU copy of adapter ``adapter_name``'s A and B right after a base-changing init (PiSSA / OLoRA), for
    ``inits.convert_to_lora``. Other inits need none: their adapters apply to the untouched base."""
    state = lora_state(model)
    plan = state.plans[adapter_name]
    if init_changes_base(plan.config.init):
        state.initial[adapter_name] = {
            unwrapped_name(name): param.detach().to("cpu", copy=True)
            for name, param in model.named_parameters()
            if plan.is_adapter_param(unwrapped_name(name)) and name.endswith((".lora_a.weight", ".lora_b.weight"))
        }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train, for ``configure_optimizers``: ``AdamW(trainable_parameters(model))``.

    The one trainable-parameter filter (the mixin and the optimizer checks use it too).
    """
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


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"trainable": ..., "total": ...}`` parameters of a model (4-bit weights counted as the values they hold).

    Not ``estimate.count_parameters``, which works out counts from a config without building the model.
    """
    trainable, total = _numel(model)
    return {"trainable": trainable, "total": total}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Deprecated name of ``parameter_counts`` (``estimate.count_parameters`` is another function)."""
    warnings.warn("`lightning_lora.inject.count_parameters` is deprecated: call `parameter_counts`.", DeprecationWarning, stacklevel=2)
    return parameter_counts(model)


def backbone_fingerprint(model: nn.Module) -> str:
    """A hash of the frozen backbone's module paths, parameter shapes and layer types.

    Two models with the same architecture and size share it; the adapter does not affect it.
    """
    import hashlib

    digest = hashlib.sha256()
    adapter = {
        id(m) for layer in lora_layers(model).values() for _, holder in layer.adapter_items()
        for part in (holder.lora_a, holder.lora_b, *([] if holder is layer else [holder])) for m in part.modules()
    }  # fmt: skip
    for module_name, module in model.named_modules():
        if isinstance(module, LoRALinear) or id(module) in adapter:
            continue
        clean = unwrapped_name(module_name).replace(".base_layer", "")
        for name, param in module.named_parameters(recurse=False):
            shape = (module.out_features, module.in_features) if name == "weight" and quantization.is_4bit(module) else tuple(param.shape)
            digest.update(f"{clean}.{name}:{shape};".encode())
    return digest.hexdigest()[:16]


