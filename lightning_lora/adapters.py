"""Several named adapters in one model: add, switch, delete, and a different adapter per sample of a batch.

One adapter is active at a time: it computes, it trains (its tensors require grad, the others' do not),
and ``save_adapter`` / checkpoints hold it by default. ``disable_lora`` runs the base model alone; a
different adapter per sample (``per_sample_adapters``) serves several tasks in one batch. Adapters are
loaded by name with ``adapter_io.load_adapter(model, directory, adapter_name=...)``.

Adapters that share a model may train only their own tensors: ``bias`` other than 'none' and
``modules_to_save`` change tensors of the base model that every adapter computes with, so they are
refused once a model holds more than one adapter, as are ``target_parameters`` and ``trainable_token_indices``
(their layers hold a single adapter); and an adapter initialised with PiSSA / OLoRA owns the residual its init left
in the base, so it shares no layer with another adapter.

Example::

    model = load_adapter(base, "adapters/sql", adapter_name="sql")
    load_adapter(model, "adapters/chat", adapter_name="chat")
    set_active_adapter(model, "chat")
    with per_sample_adapters(model, ["sql", "chat", "__base__"]):
        logits = model(input_ids).logits          # row 0 with 'sql', row 1 with 'chat', row 2 without LoRA
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_lora._matching import replace_modules, unwrapped_name
from lightning_lora.config import LoRAConfig, init_changes_base
from lightning_lora.inject import InjectionPlan, LoRAState, plan_injection, record_initial_adapter, require_lora_state
from lightning_lora.layers import BASE_ONLY, LoRALinear, check_adapter_name, lora_layers, require_unmerged


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return list(require_lora_state(model, "adapter_names").plans)


def active_adapter(model: nn.Module) -> str:
    return require_lora_state(model, "active_adapter").active


def add_adapter(model: nn.Module, adapter_name: str, config: LoRAConfig) -> nn.Module:
    """Add adapter ``adapter_name`` by ``config`` to a model that has LoRA already; it is frozen until made active.

    Its targets are matched against the model's base layers (layers of other adapters included). Every check
    runs before the model changes.
    """
    state = require_lora_state(model, "add_adapter")
    check_adapter_name(adapter_name)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"`config` must be a LoRAConfig, got {type(config).__name__}: build one with LoRAConfig(r=..., ...).")
    if adapter_name in state.plans:
        raise ValueError(f"The model already has an adapter named {adapter_name!r} (it has {list(state.plans)}): delete it first or pick another name.")
    _check_shareable(state, adapter_name, config)
    require_unmerged(model, "add_adapter")
    plan = plan_injection(model, config, None, adapter_name)
    _check_base_inits(state, adapter_name, plan)
    plan.quantize = list(state.quantized)  # the layers the first injection quantized, which this adapter sits on too
    # All or nothing, as inject_lora: every adapter and new layer is built first, then attached.
    holders: dict[str, tuple[LoRALinear, nn.Module]] = {}
    new_layers: dict[str, LoRALinear] = {}
    for path, layer_plan in plan.layers.items():
        module = model.get_submodule(path)
        if isinstance(module, LoRALinear):
            holder = module.build_adapter(layer_plan.r, layer_plan.alpha, config.dropout, config.use_rslora, config.init, config.use_dora, defer_residual=True)
            holders[path] = (module, holder)
        else:
            layer = LoRALinear.from_config(module, config, r=layer_plan.r, alpha=layer_plan.alpha, adapter_name=adapter_name, defer_residual=True)
            layer.active_adapter = state.active  # a new layer computes what the rest of the model computes
            new_layers[path] = layer
    for module, holder in holders.values():
        module.attach_adapter(adapter_name, holder)
    replace_modules(model, new_layers)
    for module in (*(m for m, _ in holders.values()), *new_layers.values()):
        module.apply_pending_init()
    state.plans[adapter_name] = plan
    record_initial_adapter(model, adapter_name)
    _apply_trainable(model, state)
    return model


def set_active_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the adapter that computes and trains; every other adapter is frozen."""
    state = require_lora_state(model, "set_active_adapter")
    require_adapter(model, adapter_name, "set_active_adapter", default_active=False)
    require_unmerged(model, "set_active_adapter")
    for layer in lora_layers(model).values():
        layer.active_adapter = adapter_name
    state.active = adapter_name
    _apply_trainable(model, state)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name`` and its tensors. The active adapter and a model's last adapter stay."""
    state = require_lora_state(model, "delete_adapter")
    require_adapter(model, adapter_name, "delete_adapter", default_active=False)
    if adapter_name == state.active:
        others = [name for name in state.plans if name != adapter_name]
        fix = f"make another one active first (set_active_adapter(model, {others[0]!r}))" if others else "it is the model's only adapter"
        raise ValueError(f"`adapter_name`={adapter_name!r} is the active adapter and cannot be deleted: {fix}.")
    require_unmerged(model, "delete_adapter")
    for path in state.plans[adapter_name].layers:
        model.get_submodule(path).delete_adapter(adapter_name)
    del state.plans[adapter_name]
    state.initial.pop(adapter_name, None)
    return model


@contextmanager
def per_sample_adapters(model: nn.Module, names: list[str]) -> Iterator[nn.Module]:
    """Inside the block, sample ``i`` of each batch (the first dimension of every LoRA layer's input) runs through
    adapter ``names[i]``, or through the base model alone where ``names[i]`` is ``'__base__'`` (PEFT's
    ``adapter_names`` argument). For serving several adapters at once; the active adapter is unchanged after.

    ``with per_sample_adapters(model, ["sql", "__base__"]): out = model(ids)  # ids: (2, seq)``
    """
    state = require_lora_state(model, "per_sample_adapters")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(name, str) for name in names):
        raise TypeError(f"`names` must be a non-empty list with one adapter name per sample, got {names!r}.")
    unknown = sorted({name for name in names if name not in state.plans and name != BASE_ONLY})
    if unknown:
        raise ValueError(f"`names` holds {unknown}, which are not adapters of this model: use {list(state.plans)} or {BASE_ONLY!r}.")
    require_unmerged(model, "per_sample_adapters")
    for name, plan in state.plans.items():
        shared = {"bias": plan.config.bias != "none", "modules_to_save": plan.modules_to_save, "target_parameters": plan.parameters,
                  "trainable_token_indices": plan.tokens}  # fmt: skip
        if any(shared.values()):
            raise ValueError(
                f"`per_sample_adapters` cannot mix samples: adapter {name!r} has {[k for k, v in shared.items() if v]}, whose "
                "tensors (trained biases, modules, expert parameters or embedding rows) every sample of the batch computes "
                "with, not only that adapter's. Run the batches of each adapter apart (set_active_adapter) instead."
            )
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name, []).append(index)
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.sample_adapters = list(groups.items())
    try:
        yield model
    finally:
        for layer in layers:
            layer.sample_adapters = None


def _apply_trainable(model: nn.Module, state: LoRAState) -> None:
    """The active adapter's tensors train; every other adapter's are frozen (tensors of no adapter are left alone)."""
    for name, param in model.named_parameters():
        name = unwrapped_name(name)
        owners = [adapter for adapter, plan in state.plans.items() if plan.is_adapter_param(name)]
        if owners:
            param.requires_grad_(state.active in owners)


def _check_shareable(state: LoRAState, new_name: str, new_config: LoRAConfig) -> None:
    for name, config in [*((n, p.config) for n, p in state.plans.items()), (new_name, new_config)]:
        if config.target_parameters or config.trainable_token_indices:
            raise ValueError(
                f"Adapter {name!r} has `target_parameters`={config.target_parameters!r} / `trainable_token_indices`="
                f"{config.trainable_token_indices!r}: their layers (ParamLoRA, TrainableTokens) hold a single adapter, so "
                "several adapters cannot share one model with them. Keep such an adapter in a model of its own."
            )
        if config.bias != "none" or config.modules_to_save:
            raise ValueError(
                f"Adapter {name!r} has `bias`={config.bias!r} / `modules_to_save`={config.modules_to_save!r}: those train "
                "tensors of the base model itself, which every adapter of the model computes with, so several adapters "
                "cannot share one model with them. Use bias='none' and no modules_to_save for every adapter, or one model per adapter."
            )


def _check_base_inits(state: LoRAState, new_name: str, new_plan: InjectionPlan) -> None:
    """PiSSA / OLoRA rewrite the base weight into a residual that belongs to their adapter: such an adapter cannot
    share a layer with another one (the other would then compute on the residual)."""
    for name, plan in state.plans.items():
        shared = sorted(set(plan.layers) & set(new_plan.layers))
        changer = next((n for n, p in ((new_name, new_plan), (name, plan)) if init_changes_base(p.config.init)), None)
        if shared and changer is not None:
            raise ValueError(
                f"Adapter {changer!r} was initialised with init={state.plans.get(changer, new_plan).config.init!r}, which leaves a "
                f"residual of the base weights that belongs to it, and adapters {name!r} and {new_name!r} share layers "
                f"(first: {shared[0]!r}). Give the new adapter other target_modules, or convert the PiSSA / OLoRA adapter "
                "to plain LoRA (save_adapter(..., convert_to_lora=True)) and load that on the original base."
            )


def require_adapter(model: nn.Module, adapter_name: str | None, caller: str, default_active: bool = True) -> str:
    """``adapter_name``, or the active adapter when None (and ``default_active``); a ValueError naming the model's
    adapters if it has no such one."""
    state = require_lora_state(model, caller)
    if adapter_name is None and default_active:
        return state.active
    if adapter_name not in state.plans:
        raise ValueError(f"`{caller}` got `adapter_name`={adapter_name!r}, which is not an adapter of this model; it has {list(state.plans)}.")
    return adapter_name
