"""Put LoRA into a model: plan it (targets, ranks, what to quantize, which parameters are the adapter),
then quantize, wrap, and freeze everything but the adapter.

Every check runs while planning, before the model is touched, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora import inits, quantization
from lightning_lora import _regex
from lightning_lora._matching import (
    matches_any,
    matches_suffix,
    output_head_names,
    path_under,
    pattern_value,
    replace_modules,
    suffix_regex,
    unwrapped_name,
)
from lightning_lora.config import LoRAConfig, QuantizationConfig, init_changes_base
from lightning_lora.layers import DEFAULT_ADAPTER, LoRALinear, base_features, check_adapter_name, is_supported_base, lora_layers
from lightning_lora.param_lora import ParamLoRA, ParamPlan, find_parameter_targets, plan_parameters
from lightning_lora.tokens import TokenPlan, TrainableTokens, plan_tokens

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
    parameters: dict[str, ParamPlan] = field(default_factory=dict)
    """Targeted parameter path (``target_parameters``) -> its ``ParamLoRA``."""
    tokens: dict[str, TokenPlan] = field(default_factory=dict)
    """Embedding / head path (``trainable_token_indices``) -> the rows its ``TrainableTokens`` trains."""
    adapter_name: str = DEFAULT_ADAPTER
    """The adapter this plan makes ('default' unless several adapters share the model: see ``adapters``)."""
    _layer_tensors: frozenset[str] = field(init=False, repr=False, compare=False)
    _owners: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = LoRALinear.adapter_names(self.config.bias, self.config.use_dora, self.adapter_name)
        tensors = {f"{path}.{name}" for path in self.layers for name in names}
        tensors |= {f"{p.wrapper}.{name}" for p in self.parameters.values() for name in ParamLoRA.adapter_names()}
        tensors |= {f"{path}.trainable_tokens_delta" for path, t in self.tokens.items() if t.tied_to is None}
        self._layer_tensors = frozenset(tensors)
        self._owners = {p.owner: p.depth for p in self.parameters.values()}

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
        if parent in self.layers or parent in self.tokens:
            return f"{parent}.base_layer.{leaf}"
        for owner, depth in self._owners.items():  # a ParamLoRA owner's tensors move under one base_layer per wrapper
            if path_under(parent, owner):
                return owner + ".base_layer" * depth + name[len(owner) :]
        return name

    def adapter_shapes(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """The keys and shapes ``adapter_state_dict`` will hold once ``model`` (not injected yet) follows this plan."""
        shapes: dict[str, tuple[int, ...]] = {}
        for path, layer in self.layers.items():
            for name, shape in LoRALinear.adapter_shapes(layer.in_features, layer.out_features, layer.r, self.config.use_dora, self.adapter_name).items():
                shapes[f"{path}.{name}"] = shape
        for p in self.parameters.values():
            for name, shape in ParamLoRA.adapter_shapes(p.num_experts, p.in_features, p.out_features, p.r).items():
                shapes[f"{p.wrapper}.{name}"] = shape
        for path, tokens in self.tokens.items():
            if tokens.tied_to is None:
                shapes[f"{path}.trainable_tokens_delta"] = (len(tokens.indices), tokens.dim)
        for name, param in model.named_parameters(remove_duplicate=False):  # a tied tensor under every name
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
        return self.plan.quantize  # every adapter's plan lists the layers the first injection quantized

    def is_adapter_param(self, name: str, adapter_name: str | None = None) -> bool:
        """Whether ``name`` (a parameter path, wrappers removed) is a tensor of adapter ``adapter_name``, or of any
        adapter of the model when None (A, B, DoRA's magnitude, trained biases, modules_to_save, ...)."""
        plans = self.plans.values() if adapter_name is None else [self.plans[adapter_name]]
        return any(plan.is_adapter_param(name) for plan in plans)


def lora_state(model: nn.Module) -> LoRAState | None:
    return getattr(model, _STATE_ATTR, None)


def require_lora_state(model: nn.Module, caller: str) -> LoRAState:
    state = lora_state(model)
    if state is None:
        raise ValueError(f"`{caller}` got a model without LoRA: call `inject_lora(model, LoRAConfig(...))` first.")
    return state


def is_adapter_param(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s parameter ``name`` is part of its active adapter (it trains, and ``save_adapter`` writes it).
    ``lora_state(model).is_adapter_param(name)`` asks about every adapter of the model."""
    state = require_lora_state(model, "is_adapter_param")
    return state.is_adapter_param(unwrapped_name(name), state.active)


def plan_injection(
    model: nn.Module, config: LoRAConfig, quantization_config: QuantizationConfig | None = None, adapter_name: str = DEFAULT_ADAPTER
) -> InjectionPlan:
    """The ``InjectionPlan`` for ``model``; validates the config against the model (raises with the candidates).

    On a model that has LoRA already (``adapters.add_adapter``), targets are matched against its base layers,
    as if the LoRA layers were not there.
    """
    to_save = find_modules_to_save(model, config)
    _check_tied(model, to_save)
    layers = {}
    for path in find_targets(model, config, skip=to_save):
        in_features, out_features = base_features(_base_of(model.get_submodule(path)))
        r = int(pattern_value(path, config.rank_pattern, config.r))
        layers[path] = LayerPlan(r, float(pattern_value(path, config.alpha_pattern, config.alpha)), in_features, out_features)
    forbidden = {**dict.fromkeys(layers, "the LoRA layer"), **dict.fromkeys(to_save, "modules_to_save")}
    parameters = plan_parameters(model, config, find_parameter_targets(model, config, forbidden), pattern_value)
    forbidden.update({p.owner: "the target_parameters module" for p in parameters.values()})
    tokens = plan_tokens(model, config.trainable_token_indices, forbidden)
    quantize = []
    if quantization_config is not None:
        skip = output_head_names(model) | {name for name, _ in model.named_modules() if path_under(name, [*to_save, *tokens, *(p.owner for p in parameters.values())])}
        quantize = quantization.quantization_targets(model, quantization_config, skip=skip)
    for path, layer in layers.items():
        base = _base_of(model.get_submodule(path))
        inits.check_init(config.init, path, base, layer.r, (layer.in_features, layer.out_features), will_quantize=path in quantize)
    if adapter_name != DEFAULT_ADAPTER and (parameters or tokens):
        # ParamLoRA and TrainableTokens hold one adapter without a name (PEFT's multi-adapter layout is not implemented for them).
        raise ValueError(
            f"`adapter_name`={adapter_name!r} cannot be used with `target_parameters` / `trainable_token_indices`: "
            "their layers hold a single, unnamed adapter. Use adapter_name='default' and one adapter in the model, "
            "or adapt these parameters / tokens in a model of their own."
        )
    _warn_unused_names(model, config, layers, parameters, to_save)
    return InjectionPlan(config, layers, to_save, quantize, parameters, tokens, adapter_name)


def _warn_unused_names(model: nn.Module, config: LoRAConfig, layers: dict, parameters: dict, to_save: list[str]) -> None:
    """Warn about names that change nothing (a typo, most often), as PEFT does: ``exclude_modules`` entries that match
    no module, ``rank_pattern`` / ``alpha_pattern`` keys that match no adapted layer, and layers ``target_modules``
    names that ``modules_to_save`` takes (trained in full, without LoRA)."""
    modules = {name: module for name, module in _named_base_modules(model) if name}
    exclude = config.exclude_modules
    for entry in [exclude] if isinstance(exclude, str) else (exclude or []):
        if not any(matches_any(path, entry if isinstance(exclude, str) else [entry]) for path in modules):  # str: one regex
            warnings.warn(
                f"`exclude_modules` entry {entry!r} matches no module of {type(model).__name__}: it excludes nothing. "
                "Fix the name (a suffix such as 'v_proj', or one regex) or drop it.",
                UserWarning,
                stacklevel=4,
            )
    adapted = [*layers, *parameters]
    for field_name, pattern_map in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern_map:
            if not any(_regex.fullmatch(suffix_regex(key), path) for path in adapted):
                warnings.warn(
                    f"`{field_name}` key {key!r} matches no adapted layer, so it changes nothing (adapted: "
                    f"{sorted({path.rpartition('.')[2] for path in adapted})}). Fix the key: a suffix of a layer's path "
                    "or a regex that fully matches one.",
                    UserWarning,
                    stacklevel=4,
                )
    if to_save and isinstance(config.target_modules, (list, str)) and config.target_modules != "all-linear":
        taken = [path for path in modules if path_under(path, to_save) and is_supported_base(modules[path]) and matches_any(path, config.target_modules)]
        if taken:
            warnings.warn(
                f"`modules_to_save`={list(to_save)!r} takes layers that `target_modules` names ({taken[:3]!r}"
                f"{' ...' if len(taken) > 3 else ''}): they are trained in full and get no LoRA. Drop them from one of "
                "the two lists.",
                UserWarning,
                stacklevel=4,
            )


def _check_tied(model: nn.Module, to_save: list[str]) -> None:
    """Refuse a ``modules_to_save`` tensor that is tied to one outside them (a tied output head and input embedding):
    training it would change the other, frozen-by-design module, and the adapter would not save that change there."""
    if not to_save:
        return
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(unwrapped_name(name))
    for names in aliases.values():
        inside = [name for name in names if path_under(name, to_save)]
        outside = [name for name in names if name not in inside]
        if inside and outside:
            other = outside[0].rpartition(".")[0]
            raise ValueError(
                f"`modules_to_save` includes {inside[0]!r}, which is tied to {outside[0]!r} (one tensor, e.g. tied input and "
                f"output embeddings): training it would change {other!r} too. Add {other.rpartition('.')[2]!r} to "
                "modules_to_save as well (both are then trained and saved), or untie the weights first "
                "(e.g. `model.config.tie_word_embeddings = False` and give the head its own copy)."
            )


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


def _require_every_name_matches(model: nn.Module, target_modules: list[str] | str, candidates: list[str]) -> None:
    """A list of names: each must match some module, so a typo (``['q_prj', 'v_proj']``) is not silently dropped
    while the other names still match. The error offers the closest real names (difflib)."""
    if isinstance(target_modules, str):
        return  # one regex: "matches nothing" is checked by the caller
    import difflib

    paths = [name for name, _ in _named_base_modules(model) if name]
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
    """``config`` without the ``target_modules`` and ``modules_to_save`` names that match no module of ``model``:
    PEFT's rule, for configs read from adapter files. PEFT saves ``target_modules`` as the user wrote it (e.g. names
    of other architectures), and for a classification task adds every architecture's head to ``modules_to_save``
    (``['classifier', 'score']``), and loads such files anyway. A saved module's weights stay checked: a name
    dropped here whose weights the file holds is refused as an unexpected key. Configs a user writes go through the
    strict checks of ``find_targets`` and ``find_modules_to_save`` instead."""
    changes = {}
    if config.target_modules is not None and not isinstance(config.target_modules, str):  # not experts only, not a pattern
        paths = [name for name, _ in _named_base_modules(model) if name]
        kept = [t for t in config.target_modules if any(matches_suffix(path, t) for path in paths)]
        if kept and len(kept) < len(config.target_modules):  # nothing left: find_targets reports it
            changes["target_modules"] = kept
    if config.modules_to_save:
        names = [name for name, _ in model.named_modules() if name]
        kept = [p for p in config.modules_to_save if any(matches_any(name, [p]) for name in names)]
        if len(kept) < len(config.modules_to_save):
            changes["modules_to_save"] = kept or None
    return dataclasses.replace(config, **changes) if changes else config


def find_targets(model: nn.Module, config: LoRAConfig, skip: list[str] = ()) -> list[str]:
    """Paths of the layers ``config`` adapts, validated: raises with the candidates when nothing fits."""
    if config.target_modules is None:
        return []  # only target_parameters
    heads = output_head_names(model)
    modules = dict(_named_base_modules(model))
    candidates = [name for name, module in modules.items() if name and is_supported_base(module)]
    if config.target_modules == "all-linear":
        matched = [name for name in candidates if name not in heads]
    else:
        _require_every_name_matches(model, config.target_modules, candidates)
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
    refuse_peft_model(model, "inject_lora")
    plan = plan_injection(model, config, quantization_config, adapter_name)
    # All or nothing: every new module (quantized copies, LoRA layers) is built before the model changes;
    # what follows the builds is attribute sets, requires_grad flags and the residuals PiSSA / OLoRA leave
    # in their layers' bases (worked out while building, written after: see ``LoRALinear.apply_pending_init``).
    bases: dict[str, nn.Module] = {}
    if quantization_config is not None:
        quantization.require_bitsandbytes("quantization_config", quantization_config)
        bases = quantization.quantized_copies(model, quantization_config, plan.quantize, device=device)
    layers = {
        path: LoRALinear.from_config(
            bases[path] if path in bases else model.get_submodule(path), config, r=layer.r, alpha=layer.alpha,
            adapter_name=adapter_name, defer_residual=True,
        )
        for path, layer in plan.layers.items()
    }  # fmt: skip
    wrapped: dict[str, nn.Module] = dict(layers)
    for key, target in plan.parameters.items():  # in each owner's registration order: the first one is innermost
        inner = wrapped.get(target.owner) or model.get_submodule(target.owner)
        wrapped[target.owner] = ParamLoRA.from_config(inner, key.rpartition(".")[2], config, r=target.r, alpha=target.alpha)
    for path, tokens in sorted(plan.tokens.items(), key=lambda item: item[1].tied_to is not None):  # sources before tied heads
        source = None if tokens.tied_to is None else wrapped[tokens.tied_to]
        wrapped[path] = TrainableTokens(model.get_submodule(path), tokens.indices, source=source)
    replace_modules(model, {**bases, **wrapped})  # a quantized target goes in inside its LoRA layer
    for layer in layers.values():
        layer.apply_pending_init()
    if quantization_config is not None:
        quantization.mark_quantized(model, quantization_config, bool(bases))
    for name, param in model.named_parameters():
        param.requires_grad_(plan.is_adapter_param(unwrapped_name(name)))
    state = LoRAState({adapter_name: plan}, quantization_config, backbone_fingerprint(model), active=adapter_name)
    setattr(model, _STATE_ATTR, state)
    record_initial_adapter(model, adapter_name)
    return model


def refuse_peft_model(model: nn.Module, caller: str) -> None:
    """Raise if ``model`` is a PEFT model or holds PEFT's layers: LoRA would nest inside them."""
    for name, module in model.named_modules():
        peft_class = next((cls for cls in type(module).__mro__ if cls.__module__.split(".")[0] == "peft"), None)
        if peft_class is not None:
            where = f"{type(module).__name__} at {name!r}" if name else type(module).__name__
            raise ValueError(
                f"`{caller}` got a model wrapped by PEFT ({where}): its LoRA would nest inside PEFT's layers. "
                "Pass the base model, or call `model.merge_and_unload()` (or `model.unload()`) on the PEFT model first."
            )


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapter layer of ``model`` by path: ``LoRALinear``, ``ParamLoRA`` and ``TrainableTokens`` (merge, disable)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, ParamLoRA, TrainableTokens))}


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
    wrappers = (LoRALinear, ParamLoRA, TrainableTokens)  # they own only adapter tensors (and their base layer)
    parts = [(w.lora_a, w.lora_b) for w in model.modules() if isinstance(w, ParamLoRA)]
    parts += [(h.lora_a, h.lora_b, *([] if h is layer else [h])) for layer in lora_layers(model).values() for _, h in layer.adapter_items()]
    adapter = {id(m) for group in parts for part in group for m in part.modules()}
    for module_name, module in model.named_modules():
        if isinstance(module, wrappers) or id(module) in adapter:
            continue
        clean = unwrapped_name(module_name).replace(".base_layer", "")
        for name, param in module.named_parameters(recurse=False):
            shape = (module.out_features, module.in_features) if name == "weight" and quantization.is_4bit(module) else tuple(param.shape)
            digest.update(f"{clean}.{name}:{shape};".encode())
    return digest.hexdigest()[:16]


