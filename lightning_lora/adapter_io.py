"""Adapter tensors and PEFT's on-disk format.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``,
keyed as PEFT keys them (``base_model.model.<path>.lora_A.weight``, DoRA's ``.lora_magnitude_vector``),
so ``PeftModel.from_pretrained`` reads ours and ``load_adapter`` reads PEFT's. Loading checks every key
and shape before it writes anything into the model: it loads all of the adapter or none of it.

A model with several adapters is saved as PEFT's ``save_pretrained`` saves it: the adapter named
'default' in the directory itself, every other one in a subfolder of its name; ``load_adapters``
reads that layout back, ``load_adapter(..., adapter_name=...)`` one adapter of it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_lora._version import __version__
from lightning_lora._io import atomic_write, atomic_write_bytes
from lightning_lora import inits
from lightning_lora._matching import matches_suffix, path_under, unwrapped_name
from lightning_lora.adapters import add_adapter, require_adapter
from lightning_lora.config import LoRAConfig, peft_fields
from lightning_lora.inject import backbone_fingerprint, inject_lora, lora_state, plan_injection, require_lora_state
from lightning_lora.layers import DEFAULT_ADAPTER, LoRALinear, check_adapter_name, is_supported_base, to_adapter_key, to_default_key

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# PEFT features that change the math; an adapter using one cannot be loaded as plain LoRA.
_UNSUPPORTED_PEFT_FLAGS = ("use_qalora", "lora_bias", "layer_replication", "trainable_token_indices")
# PEFT inits that rewrite the base weight in ways not implemented here: their adapters do not apply to the plain base.
_UNSUPPORTED_BASE_INITS = ("corda", "loftq")


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """An adapter's tensors (LoRA A/B, DoRA's magnitude, biases and ``modules_to_save`` per config), keyed by their
    path in the model; ``adapter_name`` defaults to the active adapter.

    Never holds a frozen backbone weight. Tensors are detached but not copied.
    """
    state = require_lora_state(model, "adapter_state_dict")
    plan = state.plans[require_adapter(model, adapter_name, "adapter_state_dict")]
    out = {}
    for name, param in model.named_parameters():
        name = unwrapped_name(name)
        if plan.is_adapter_param(name):  # the rule inject_lora froze everything else by
            out[name] = param.detach()
    return out


def to_peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_PEFT_PREFIX + _to_peft_name(key): value for key, value in state_dict.items()}


def from_peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"Adapter key {key!r} does not start with {_PEFT_PREFIX!r}: this is not a PEFT LoRA adapter file.")
        name = key[len(_PEFT_PREFIX) :]
        if ".original_module." in name or ".modules_to_save." in name:
            # PEFT's bias="all" also saves the biases inside its modules_to_save wrapper: the frozen original
            # and a duplicate of the trained copy, which it saves unwrapped as well. Keep the unwrapped one.
            continue
        name = re.sub(r"\.lora_A(\.[^.]+)?\.weight$", ".lora_a.weight", name)  # PEFT may keep the adapter name
        name = re.sub(r"\.lora_B(\.[^.]+)?\.weight$", ".lora_b.weight", name)
        name = re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", ".lora_magnitude", name)
        out[name] = value
    return out


def _to_peft_name(name: str) -> str:
    name = name.replace(".lora_a.weight", ".lora_A.weight").replace(".lora_b.weight", ".lora_B.weight")
    return name[: -len(".lora_magnitude")] + ".lora_magnitude_vector" if name.endswith(".lora_magnitude") else name


def peft_config_dict(
    model: nn.Module, base_model_name_or_path: str | None = None, adapter_name: str | None = None, config: LoRAConfig | None = None
) -> dict[str, Any]:
    """``adapter_config.json`` content for one of ``model``'s adapters (default: the active one), in PEFT's LoraConfig
    fields; ``config`` stands in for the adapter's own (e.g. a converted one) on the same layers."""
    state = require_lora_state(model, "peft_config_dict")
    plan = state.plans[require_adapter(model, adapter_name, "peft_config_dict")]
    config = plan.config if config is None else config
    layers = [m for name, m in model.named_modules() if isinstance(m, LoRALinear) and unwrapped_name(name) in plan.layers]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    out: dict[str, Any] = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path}
    for name, (key, _) in peft_fields().items():
        out[key] = copy.deepcopy(getattr(config, name))
    out.update(
        # What the config resolved to on this model, so PEFT picks exactly these layers and modules.
        target_modules=_peft_target_modules(model, plan.targets, plan.modules_to_save),
        exclude_modules=None,
        modules_to_save=plan.modules_to_save or None,
        init_lora_weights=True if config.init == "kaiming" else config.init,  # PEFT's names for the others are ours
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers),
        inference_mode=True,
    )
    return out


def _peft_target_modules(model: nn.Module, targets: list[str], to_save: list[str]) -> list[str] | str:
    """Target names PEFT will resolve to exactly ``targets``: the short names if they suffice, else one regex."""
    wrapped = set(targets)
    inside_lora = tuple(f"{t}." for t in targets)
    candidates = [
        name
        for name, module in model.named_modules()
        # The wrapped layers are LoRALinear now; their base layers are not PEFT targets.
        if name
        and (isinstance(module, LoRALinear) or is_supported_base(module))
        and not name.startswith(inside_lora)
        and not path_under(name, to_save)
    ]
    short = sorted({t.rpartition(".")[2] for t in targets})
    if {c for c in candidates if any(matches_suffix(c, s) for s in short)} == wrapped:
        return short
    return "|".join(re.escape(t) for t in sorted(targets))


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    adapter_names: list[str] | None = None,
    convert_to_lora: bool = False,
) -> Path:
    """Write ``model``'s adapters to ``directory`` in PEFT's format, each file atomically: 'default' in ``directory``,
    any other adapter in ``directory/<name>`` (PEFT's layout); ``adapter_names`` picks some (default: all).

    ``state_dict`` overrides the tensors of the one adapter saved (default: the active one), e.g. gathered from
    FSDP shards; keys as in ``adapter_state_dict``. ``convert_to_lora``: write adapters initialised with PiSSA /
    OLoRA as plain LoRA that applies to the original base weights (``inits.convert_to_lora``: rank 2r, PEFT's
    ``path_initial_model_for_weight_conversion``) instead of to the residual the init left in the model.
    """
    state = require_lora_state(model, "save_adapter")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"`directory`={str(directory)!r} is a file; save_adapter needs a directory path.")
    if adapter_names is None:
        adapter_names = [state.active] if state_dict is not None else list(state.plans)
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise TypeError(f"`adapter_names` must be a non-empty list of adapter names or None, got {adapter_names!r}.")
    names = [require_adapter(model, name, "save_adapter") for name in adapter_names]
    if state_dict is not None and len(names) != 1:
        raise ValueError(f"`state_dict` holds the tensors of one adapter, but `adapter_names`={adapter_names!r} names {len(names)}: save one at a time.")
    if convert_to_lora:
        lacking = [name for name in names if name not in state.initial]
        if lacking:
            raise ValueError(
                f"`convert_to_lora`=True converts adapters initialised with init='pissa' / 'pissa_niter_K' / 'olora', but "
                f"{lacking} have init={[state.plans[n].config.init for n in lacking]}: they apply to the original base "
                "already. Save them without convert_to_lora."
            )
    for name in names:
        tensors = adapter_state_dict(model, name) if state_dict is None else state_dict
        tensors = {to_default_key(key, name): value for key, value in tensors.items()}
        config = state.plans[name].config
        if convert_to_lora:
            initial = {to_default_key(key, name): value for key, value in state.initial[name].items()}
            config, tensors = inits.convert_to_lora(config, tensors, initial)
        _write_adapter(model, directory if name == DEFAULT_ADAPTER else directory / name, tensors,
                       peft_config_dict(model, base_model_name_or_path, name, config), config)  # fmt: skip
    return directory


def _write_adapter(model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any], config: LoRAConfig) -> None:
    state = lora_state(model)
    peft_tensors = {key: value.detach().to("cpu").contiguous() for key, value in to_peft_keys(tensors).items()}
    metadata = {
        "format": "pt",
        "lightning_lora_version": __version__,
        "backbone_fingerprint": backbone_fingerprint(model),
        "quantization": json.dumps(state.quantization.to_dict() if state.quantization else None),
        "lora_config": json.dumps(config.to_dict()),
    }
    atomic_write(directory / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(peft_tensors, tmp, metadata=metadata))
    atomic_write_bytes(directory / ADAPTER_CONFIG_NAME, (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode())


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(PEFT config dict, tensors keyed by module path, safetensors metadata) of a saved adapter."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            named = sorted(sub.name for sub in directory.iterdir() if (sub / ADAPTER_CONFIG_NAME).is_file()) if directory.is_dir() else []
            hint = f" Its subfolders {named} hold named adapters: load them with load_adapters(model, directory)." if named else ""
            raise FileNotFoundError(
                f"`directory`={str(directory)!r} has no {path.name}: an adapter directory holds "
                f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} (as written by save_adapter or PEFT's save_pretrained).{hint}"
            )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({err}); the file is corrupted: re-export the adapter.") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{str(config_path)!r} describes peft_type={config.get('peft_type') if isinstance(config, dict) else config!r}; only LoRA adapters load here.")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{str(weights_path)!r} cannot be read as safetensors ({err}): the file is truncated or corrupted. "
            "Re-export the adapter or restore it from a checkpoint."
        ) from None
    return config, from_peft_keys(tensors), metadata


def lora_config_from_peft(config: dict[str, Any]) -> LoRAConfig:
    """The LoRAConfig an ``adapter_config.json`` stands for; rejects PEFT features plain LoRA lacks."""
    for flag in _UNSUPPORTED_PEFT_FLAGS:
        if config.get(flag):
            raise ValueError(f"The adapter uses PEFT's `{flag}`={config[flag]!r}, which lightning_lora does not implement; export it from PEFT without it.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in _UNSUPPORTED_BASE_INITS:
        raise ValueError(
            f"The adapter was made with PEFT's `init_lora_weights`={init!r}, which rewrites the base weights in a way "
            "lightning_lora does not implement, so it does not apply to the plain base model. Convert it to plain LoRA in "
            "PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that."
        )
    # A key the file lacks, or holds as null, means PEFT's default.
    values = {name: default if config.get(key) is None else config[key] for name, (key, default) in peft_fields().items()}
    # PiSSA / OLoRA must run again: the adapter applies to the residual they leave in the base. The other inits
    # only set starting values that the loaded tensors replace.
    base_init = isinstance(init, str) and (init == "olora" or init.startswith("pissa"))
    values.update(
        target_modules=values["target_modules"] or "all-linear",
        init=init if base_init or init == "gaussian" else "kaiming",
    )
    return LoRAConfig(**values)


def expected_adapter_shapes(model: nn.Module, config: LoRAConfig, adapter_name: str | None = None) -> dict[str, tuple[int, ...]]:
    """The keys and shapes ``adapter_state_dict(model, adapter_name)`` holds, or would hold once ``config`` makes the
    adapter (``inject_lora`` or ``add_adapter``), without changing the model. ``adapter_name``: default the active one."""
    state = lora_state(model)
    if state is not None and (adapter_name is None or adapter_name in state.plans):
        return {key: tuple(value.shape) for key, value in adapter_state_dict(model, adapter_name).items()}
    return plan_injection(model, config, None, adapter_name or DEFAULT_ADAPTER).adapter_shapes(model)


def check_adapter_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming the first problem if ``tensors`` is not exactly the ``expected`` keys and shapes."""
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"The adapter in {source} does not fit this model: {len(missing)} missing keys (first: {missing[:3]}) and "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:3]}). It was saved from another architecture or "
            "LoRA config (target_modules, bias, modules_to_save); load it into the model it was trained on."
        )
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            hint = ""
            if key.endswith((".lora_a.weight", ".lora_b.weight")):
                rank_dim = 0 if key.endswith(".lora_a.weight") else 1
                if got[1 - rank_dim] == shape[1 - rank_dim]:
                    hint = f" The adapter has rank r={got[rank_dim]} here, the model r={shape[rank_dim]}: build the model with the adapter's r."
            raise ValueError(f"The adapter in {source} does not fit this model: {key!r} has shape {got} in the file, {shape} in the model.{hint}")
        if not tensors[key].is_floating_point():
            raise ValueError(f"The adapter in {source} holds {key!r} as {tensors[key].dtype}; adapter tensors must be floating point.")


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load a saved adapter (ours or PEFT's) into ``model``, all or nothing.

    ``adapter_name``: the adapter it becomes. A model without LoRA gets it injected from the adapter's config
    first; a model with LoRA gets it added (``adapters.add_adapter``, frozen until made active) unless it has an
    adapter of that name already, whose tensors are then replaced in place (no new parameters: a compiled model
    runs on without recompiling). Default: into the active adapter, or 'default' on a model without LoRA. Every
    key and shape is checked before anything is written.

    Example::

        model = load_adapter(AutoModelForCausalLM.from_pretrained(path), "adapters/run1")
        load_adapter(model, "adapters/run2", adapter_name="run2")
    """
    peft_config, tensors, _ = read_adapter(directory)
    state = lora_state(model)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    name = adapter_name if adapter_name is not None else (state.active if state is not None else DEFAULT_ADAPTER)
    exists = state is not None and name in state.plans
    config = state.plans[name].config if exists else lora_config_from_peft(peft_config)
    tensors = {to_adapter_key(key, name): value for key, value in tensors.items()}
    source = repr(str(directory))
    check_adapter_tensors(expected_adapter_shapes(model, config, name), tensors, source=source)
    if state is None:
        inject_lora(model, config, adapter_name=name)
    elif not exists:
        add_adapter(model, name, config)
    load_adapter_state_dict(model, tensors, source=source, adapter_name=name)
    return model


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load every adapter of a directory in PEFT's layout (what ``save_adapter`` / ``save_pretrained`` write for a
    model with several adapters): the one in ``directory`` itself as 'default', each subfolder holding an adapter
    under its folder's name. The first one loaded into a model without LoRA becomes the active adapter."""
    directory = Path(directory)
    found = [(DEFAULT_ADAPTER, directory)] if (directory / ADAPTER_CONFIG_NAME).is_file() else []
    if directory.is_dir():
        found += [(sub.name, sub) for sub in sorted(directory.iterdir()) if sub.is_dir() and (sub / ADAPTER_CONFIG_NAME).is_file()]
    if not found:
        raise FileNotFoundError(
            f"`directory`={str(directory)!r} holds no adapter: neither it nor a subfolder has {ADAPTER_CONFIG_NAME} "
            "(as written by save_adapter or PEFT's save_pretrained)."
        )
    for name, path in found:
        load_adapter(model, path, adapter_name=name)
    return model


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "the state dict", adapter_name: str | None = None) -> None:
    """Copy adapter tensors (keys as in ``adapter_state_dict``) into ``model``, after checking all of them."""
    params = adapter_state_dict(model, adapter_name)
    check_adapter_tensors({key: tuple(value.shape) for key, value in params.items()}, tensors, source)
    for key, param in params.items():
        param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
