"""Adapter tensors and PEFT's on-disk format.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``,
keyed as PEFT keys them (``base_model.model.<path>.lora_A.weight``, DoRA's ``.lora_magnitude_vector``),
so ``PeftModel.from_pretrained`` reads ours and ``load_adapter`` reads PEFT's. Loading checks every key
and shape before it writes anything into the model: it loads all of the adapter or none of it.

A model with several adapters is saved as PEFT's ``save_pretrained`` saves it: the adapter named
'default' in the directory itself, every other one in a subfolder of its name; ``load_adapters``
reads that layout back, ``load_adapter(..., adapter_name=...)`` one adapter of it.

Keys are paths in the transformers model, which is what ``PeftModel.from_pretrained`` is given. A module
that holds one as an attribute (a LightningModule adapted as a whole: ``LoRACallback(backbone=None)``, its
paths ``model.model.layers...``) saves an adapter that lies inside that model keyed from it, and
``load_adapter`` puts such a file back under the attribute (a file keyed from the module itself, as PEFT's
``get_peft_model`` of the whole module writes, still loads there). An adapter with tensors outside the
transformers model is keyed from the module.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import nn

from lightning_lora import inits, serving
from lightning_lora._version import __version__
from lightning_lora._io import atomic_directory, read_files, require_directory_path
from lightning_lora._matching import join_path, matches_suffix, path_under, pattern_value, unwrapped_name
from lightning_lora.adapters import add_adapter, require_adapter
from lightning_lora.config import LoRAConfig, init_changes_base, peft_fields
from lightning_lora.inject import InjectionPlan, backbone_fingerprint, drop_unmatched_names, inject_lora, lora_state, plan_injection, require_lora_state
from lightning_lora.layers import DEFAULT_ADAPTER, LoRALinear, check_adapter_name, is_supported_base, lora_layers, require_unmerged
from lightning_lora.layers import to_adapter_key, to_default_key
from lightning_lora.param_lora import param_lora_layers
from lightning_lora.tokens import token_layers

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# Every field of PEFT 0.21's LoraConfig is one of three kinds (tests/test_adapter_io.py checks the list against
# the installed peft). Implemented: the keys of ``peft_fields()`` (r, lora_alpha, lora_dropout, target_modules,
# exclude_modules, bias, modules_to_save, init_lora_weights, use_rslora, rank_pattern, alpha_pattern,
# target_parameters, trainable_token_indices, use_dora).
# Metadata, which changes nothing this library computes (fan_in_fan_out follows the layer type here, as PEFT
# corrects it; megatron_core / qalora_group_size / runtime_config only matter with the refused fields):
_PEFT_METADATA = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "fan_in_fan_out", "megatron_core", "qalora_group_size", "runtime_config",
})  # fmt: skip
# Features whose math this library does not implement: refused unless at PEFT's default (None, False or empty).
_PEFT_REFUSED = frozenset({
    "layers_to_transform", "layers_pattern", "megatron_config", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "velora_config", "alora_invocation_tokens", "use_qalora",
    "monteclora_config", "layer_replication", "lora_bias", "use_bdlora", "arrow_config",
    "kasa_config", "ensure_weight_tying",
})  # fmt: skip
# init_lora_weights values that only decide the initial A and B (a loaded adapter overwrites both). PiSSA and
# OLoRA ('pissa', 'pissa_niter_<K>', 'olora') are implemented too: they run again on load, since the adapter
# applies to the residual they leave in the base. The others (loftq, corda, eva, orthogonal, ...) rewrite the
# base weights in ways not implemented here, or are data-dependent.
_PLAIN_INITS = (True, False, "gaussian")


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """An adapter's tensors (LoRA A/B, DoRA's magnitude, biases and ``modules_to_save`` per config), keyed by their
    path in the model; ``adapter_name`` defaults to the active adapter.

    Never holds a frozen backbone weight. Tensors are detached but not copied.
    """
    state = require_lora_state(model, "adapter_state_dict")
    plan = state.plans[require_adapter(model, adapter_name, "adapter_state_dict")]
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied tensor under every name
        name = unwrapped_name(name)
        if plan.is_adapter_param(name):  # the rule inject_lora froze everything else by
            out[name] = param.detach()
    return out


def to_peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_PEFT_PREFIX + _to_peft_name(key): value for key, value in state_dict.items()}


def from_peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, sources = {}, {}
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
        name = re.sub(r"\.token_adapter\.trainable_tokens_delta(\.[^.]+)?$", ".trainable_tokens_delta", name)
        name = re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", ".lora_magnitude", name)
        if name in out:
            raise ValueError(
                f"Adapter keys {sources[name]!r} and {key!r} both hold {name!r} (one with PEFT's adapter name in it, "
                "one without, or two adapter names): the file holds more than one adapter's tensors in one file. "
                "Save each adapter in its own folder (PEFT's save_pretrained does), then load them one by one."
            )
        out[name] = value
        sources[name] = key
    return out


def _to_peft_name(name: str) -> str:
    name = name.replace(".lora_a.weight", ".lora_A.weight").replace(".lora_b.weight", ".lora_B.weight")
    if name.endswith(".lora_magnitude"):
        return name[: -len(".lora_magnitude")] + ".lora_magnitude_vector"
    # PEFT keeps trained embedding rows in a `token_adapter` submodule of its wrapper.
    return re.sub(r"\.trainable_tokens_delta$", ".token_adapter.trainable_tokens_delta", name)


def peft_config_dict(
    model: nn.Module, base_model_name_or_path: str | None = None, adapter_name: str | None = None, config: LoRAConfig | None = None,
    *, root: str | None = None,
) -> dict[str, Any]:
    """``adapter_config.json`` content for one of ``model``'s adapters (default: the active one), in PEFT's LoraConfig
    fields; ``config`` stands in for the adapter's own (e.g. a converted one) on the same layers. Module paths are
    those under ``root`` (default: ``peft_root`` of the adapter's tensors), where PEFT matches them."""
    state = require_lora_state(model, "peft_config_dict")
    adapter = require_adapter(model, adapter_name, "peft_config_dict")
    plan = state.plans[adapter]
    config = plan.config if config is None else config
    root = peft_root(model, adapter_state_dict(model, adapter)) if root is None else root
    layers = [m for path, m in model.named_modules() if isinstance(m, LoRALinear) and unwrapped_name(path) in plan.layers]
    base = next((m for path, m in transformers_models(model).items() if _unwrapped_path(path) == root), model) if root else model
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    out: dict[str, Any] = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path}
    for name, (key, _) in peft_fields().items():
        out[key] = copy.deepcopy(getattr(config, name))
    out.update(
        # What the config resolved to on this model, so PEFT picks exactly these layers and modules.
        target_modules=_peft_target_modules(base, [_relative(t, root) for t in plan.targets], [_relative(m, root) for m in plan.modules_to_save]),
        exclude_modules=None,
        modules_to_save=[_relative(m, root) for m in plan.modules_to_save] or None,
        init_lora_weights=True if config.init == "kaiming" else config.init,  # PEFT's names for the others are ours
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers),
        inference_mode=True,
    )
    return out


def is_transformers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers model (``save_pretrained``, ``config``, ``_from_config``); no import of transformers."""
    return callable(getattr(module, "save_pretrained", None)) and callable(getattr(type(module), "_from_config", None)) and hasattr(module, "config")


def transformers_models(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost transformers models inside ``model``, by their path in it (wrapper parts such as a compiled
    model's ``_orig_mod`` kept); empty when ``model`` is one itself."""
    if is_transformers_model(model):
        return {}
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if path and is_transformers_model(module) and not path_under(path, found):
            found[path] = module
    return found


def peft_root(model: nn.Module, keys: Any) -> str:
    """The path (wrappers removed) that the PEFT file of an adapter with tensor ``keys`` is keyed from: that of the
    transformers model in ``model`` holding all of them, the model PEFT loads it into; ``""`` (``model`` itself) when
    ``model`` is a transformers model or none holds them all."""
    for path in map(_unwrapped_path, transformers_models(model)):
        if not path:  # a wrapper around a transformers model (a compiled model's _orig_mod): keyed from the top
            return ""
        if keys and all(path_under(key, path) for key in keys):
            return path
    return ""


def _unwrapped_path(path: str) -> str:
    return unwrapped_name(path + ".")[:-1] if path else ""


def _relative(path: str, root: str) -> str:
    """``path`` under ``root`` (``root.path``); itself for ``root`` ``""``."""
    return path[len(root) + 1 :] if root else path


def _patterns_under(config: LoRAConfig, plan: InjectionPlan, root: str) -> LoRAConfig:
    """``config`` with a ``rank_pattern`` / ``alpha_pattern`` that give every layer the same value at its path under
    ``root`` (where PEFT matches them) as at its path in the model: a key naming the module's own path
    (``model.model.layers.1...``) matches nothing under the transformers model. ``config`` itself where they agree."""
    paths = [*plan.layers, *plan.parameters]
    ranks = {path: pattern_value(path, config.rank_pattern, config.r) for path in paths}
    alphas = {path: pattern_value(path, config.alpha_pattern, config.alpha) for path in paths}
    if all(
        ranks[path] == pattern_value(_relative(path, root), config.rank_pattern, config.r)
        and alphas[path] == pattern_value(_relative(path, root), config.alpha_pattern, config.alpha)
        for path in paths
    ):
        return config
    return dataclasses.replace(
        config,
        rank_pattern={re.escape(_relative(path, root)): r for path, r in ranks.items() if r != config.r},
        alpha_pattern={re.escape(_relative(path, root)): alpha for path, alpha in alphas.items() if alpha != config.alpha},
    )


def _config_under(config: LoRAConfig, root: str) -> LoRAConfig:
    """The config of a file keyed from the transformers model at ``root``, for the module that holds it: a regex
    ``target_modules`` / ``exclude_modules`` full-matches a path, so it gets ``root`` in front (a list of names
    matches path suffixes, and rank / alpha patterns are suffixes too)."""
    under = {
        name: rf"{re.escape(root)}\.(?:{value})"
        for name in ("target_modules", "exclude_modules")
        if isinstance(value := getattr(config, name), str) and value != "all-linear"
    }
    return dataclasses.replace(config, **under) if under else config


def _placed_in(
    model: nn.Module, config: LoRAConfig, tensors: dict[str, torch.Tensor], adapter_name: str, exists: bool, source: str
) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """(config, tensors keyed by path in ``model``, the shapes ``model`` expects) for a file's adapter: keyed from the
    transformers model inside ``model`` where it fits, else from ``model`` itself (see the module docstring). Where
    none fits, the first try's, whose error names the mismatch; where several fit, a ValueError."""
    roots = dict.fromkeys(path for path in map(_unwrapped_path, transformers_models(model)) if path)
    tries: list[tuple[str, Any]] = []
    for root in (*roots, ""):
        candidate = config if exists or not root else _config_under(config, root)
        placed = {join_path(root, key): value for key, value in tensors.items()}
        try:
            tries.append((root, (candidate, placed, expected_adapter_shapes(model, candidate, adapter_name))))
        except ValueError as err:  # e.g. its target_modules match nothing there
            tries.append((root, err))
    fits = [(root, found) for root, found in tries if not isinstance(found, ValueError) and found[2].keys() == found[1].keys()]
    if len(fits) > 1:
        where = [repr(root) if root else "the module itself" for root, _ in fits]
        raise ValueError(
            f"The adapter in {source} fits {type(model).__name__} in {len(fits)} places ({', '.join(where)}): its keys do "
            "not say which model it belongs to. Inject LoRA into that one first (a target_modules regex on its path), "
            "then load: the model's adapter says where it goes. Nothing was loaded."
        )
    if fits:
        return fits[0][1]
    first = tries[0][1]
    if isinstance(first, ValueError):
        raise first
    return first


def _peft_target_modules(model: nn.Module, targets: list[str], to_save: list[str]) -> list[str] | str:
    """Target names PEFT will resolve to exactly ``targets``: the short names if they suffice, else one regex."""
    wrapped = set(targets)
    # Inside a wrapper are its base layer and adapter linears, none of which PEFT sees in the original model.
    inside_lora = tuple(f"{t}." for t in (*targets, *lora_layers(model), *param_lora_layers(model), *token_layers(model)))
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
    serving_targets: list[str] | str | None = None,
    strict_serving: bool = False,
    vllm_max_lora_rank: int = serving.VLLM_DEFAULT_MAX_LORA_RANK,
    adapter_names: list[str] | None = None,
    convert_to_lora: bool = False,
) -> Path:
    """Write ``model``'s adapters to ``directory`` in PEFT's format; the directory changes as a whole or not at all.

    Keys are paths in the transformers model (the model itself, or the one a LightningModule holds: see the module
    docstring), so ``PeftModel.from_pretrained(transformers_model, directory)`` loads them.

    'default' goes in ``directory`` itself, any other adapter in ``directory/<name>`` (PEFT's layout);
    ``adapter_names`` picks some (default: all). ``state_dict`` overrides the tensors of the one adapter saved
    (default: the active one), e.g. gathered from FSDP shards; keys as in ``adapter_state_dict``.
    Refuses, before writing anything, an adapter with a non-floating or non-finite tensor. The weights'
    metadata carries the LoRA config and a checksum of the tensors, which ``read_adapter`` checks.
    ``serving_targets`` (``"vllm"``, ``"llama.cpp"``) says first which of those will refuse or mis-scale each adapter
    and why (``lightning_lora.serving``): a warning, or with ``strict_serving=True`` a ValueError before any write.
    ``convert_to_lora``: write adapters initialised with PiSSA / OLoRA as plain LoRA that applies to the original
    base weights (``inits.convert_to_lora``: rank 2r, PEFT's ``path_initial_model_for_weight_conversion``) instead
    of to the residual the init left in the model.
    """
    state = require_lora_state(model, "save_adapter")
    targets = serving.check_serving_targets(serving_targets)
    for name, flag in (("strict_serving", strict_serving), ("convert_to_lora", convert_to_lora)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be True or False, got {flag!r}.")
    directory = require_directory_path(directory, "directory")
    if adapter_names is None:
        adapter_names = [state.active] if state_dict is not None else list(state.plans)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) or not adapter_names:
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
    # Every adapter's files are made (and checked) before the directory changes.
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str], bytes]] = {}
    if state_dict is not None:
        _check_state_dict_keys(state_dict, adapter_state_dict(model, names[0]), state.plans[names[0]].is_adapter_param, names[0])
    for name in names:
        tensors = adapter_state_dict(model, name) if state_dict is None else state_dict
        source = "the adapter to save" if name == DEFAULT_ADAPTER else f"adapter {name!r} to save"
        check_adapter_values(tensors, source, what="Refusing to write it; nothing was written")
        tensors = {to_default_key(key, name): value for key, value in tensors.items()}
        config = state.plans[name].config
        if convert_to_lora:
            initial = {to_default_key(key, name): value for key, value in state.initial[name].items()}
            config, tensors = inits.convert_to_lora(config, tensors, initial)
        root = peft_root(model, tensors)  # keyed as PEFT finds them in the transformers model (see the module docstring)
        config = _patterns_under(config, state.plans[name], root)
        peft_config = peft_config_dict(model, base_model_name_or_path, name, config, root=root)
        tensors = {_relative(key, root): value for key, value in tensors.items()}
        if targets:
            shapes = {key: tuple(value.shape) for key, value in to_peft_keys(tensors).items()}
            issues = serving.serving_issues(peft_config, shapes, targets, vllm_max_lora_rank=vllm_max_lora_rank)
            where = str(directory if name == DEFAULT_ADAPTER else directory / name)
            serving.report(issues, strict_serving, f"save_adapter({where!r})")
        peft_tensors = _cpu_tensors(to_peft_keys(tensors))
        metadata = {
            "format": "pt",
            "lightning_lora_version": __version__,
            "backbone_fingerprint": backbone_fingerprint(model),
            "quantization": json.dumps(state.quantization.to_dict() if state.quantization else None),
            "lora_config": json.dumps(config.to_dict()),
            _CHECKSUM_KEY: _tensors_digest(peft_tensors),
        }
        files[name] = (peft_tensors, metadata, (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode())
    # This writer owns the files it writes: the default adapter's (an adapter_model.bin of an older save would be
    # stale next to them: every adapter_model.*) and the folders of the named ones it saves; the rest carries over.
    owned = [pattern for name in names for pattern in (("adapter_model.*", ADAPTER_CONFIG_NAME) if name == DEFAULT_ADAPTER else (name,))]
    with atomic_directory(directory, owned=owned) as tmp:
        for name, (peft_tensors, metadata, config_bytes) in files.items():
            where = tmp if name == DEFAULT_ADAPTER else tmp / name
            where.mkdir(exist_ok=True)
            (where / ADAPTER_CONFIG_NAME).write_bytes(config_bytes)
            save_file(peft_tensors, str(where / ADAPTER_WEIGHTS_NAME), metadata=metadata)
            _sort_safetensors_header(str(where / ADAPTER_WEIGHTS_NAME))  # byte-identical files for identical adapters
    return directory


def _check_state_dict_keys(state_dict: Any, own: dict[str, torch.Tensor], is_adapter: Any, adapter_name: str) -> None:
    """Refuse a ``save_adapter(state_dict=...)`` that is not keyed as ``adapter_state_dict``: its file would name
    modules PEFT does not find (it would load the base model alone) or lack some of the adapter. A key is judged by
    the adapter's rule (``is_adapter``), not only by ``own``: under FSDP1 without ``use_orig_params`` the model's own
    parameters are flat and name none of the adapter's tensors."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise TypeError(f"`state_dict` must map adapter keys to tensors (as `adapter_state_dict(model)` does), got {type(state_dict).__name__}.")
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own and not (isinstance(key, str) and is_adapter(key))]
    if missing or unexpected:
        raise ValueError(
            f"`state_dict` is not adapter {adapter_name!r} of this model: {len(missing)} missing keys (first: {missing[:3]}) and "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:3]}); nothing was written. Pass it keyed as "
            "`adapter_state_dict(model)` keys it (module paths without wrapper prefixes such as `_orig_mod.`)."
        )


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies for safetensors, a tied tensor (saved under each of its names) cloned: it refuses shared storage."""
    out, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def _sort_safetensors_header(path: str) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, so the same tensors and metadata give the same bytes.

    safetensors serializes the header from hash maps, whose order changes from call to call; the tensor data
    (laid out by dtype and name) and its offsets do not depend on that order.
    """
    with open(path, "r+b") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
        header = {key: dict(sorted(value.items())) if key == "__metadata__" else value for key, value in sorted(header.items())}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # not expected: the same JSON in another order has the same length
            raise RuntimeError(f"{path!r}: the sorted safetensors header ({len(text)} bytes) outgrew the original ({size}).")
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(PEFT config dict, tensors keyed by module path, safetensors metadata) of a saved adapter.

    Both files are read from one version of the directory (see ``_io.read_files``). When the weights
    carry lightning_lora's metadata, their checksum and LoRA config are checked against the tensors
    and against ``adapter_config.json``: a corrupted file or a directory mixing two saves raises.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    try:
        files = read_files(directory, (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME))
    except (FileNotFoundError, NotADirectoryError) as err:
        missing = Path(err.filename or directory).name if isinstance(err, FileNotFoundError) and err.filename else None
        named = sorted(sub.name for sub in directory.iterdir() if (sub / ADAPTER_CONFIG_NAME).is_file()) if directory.is_dir() else []
        hint = f" Its subfolders {named} hold named adapters: load them with load_adapters(model, directory)." if named else ""
        if missing == ADAPTER_WEIGHTS_NAME and (directory / "adapter_model.bin").is_file():
            hint = (
                " It holds adapter_model.bin, a pickle, which lightning_lora does not read (unpickling can run code): "
                "re-save the adapter with PEFT's save_pretrained(..., safe_serialization=True)."
            )
        raise FileNotFoundError(
            f"`directory`={str(directory)!r} has no {missing if missing in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) else 'adapter'}: "
            f"an adapter directory holds {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} (as written by save_adapter or "
            f"PEFT's save_pretrained).{hint}"
        ) from None
    try:
        config = json.loads(files[ADAPTER_CONFIG_NAME].decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({str(err)[:200]}); the file is corrupted: re-export the adapter.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} holds a JSON {type(config).__name__}, not an object of LoraConfig fields; the file is corrupted: re-export the adapter.")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{str(config_path)!r} describes peft_type={config.get('peft_type')!r}; only LoRA adapters load here.")
    lora_config_from_peft(config)  # the config on its own first: its errors name the field and the fix
    tensors, metadata = _parse_safetensors(files[ADAPTER_WEIGHTS_NAME], weights_path)
    _check_saved_together(config, tensors, metadata, config_path, weights_path)
    return config, from_peft_keys(tensors), metadata


_CHECKSUM_KEY = "tensors_sha256"
_OUR_METADATA = frozenset({"lightning_lora_version", "backbone_fingerprint", "quantization", "lora_config", _CHECKSUM_KEY})
# The fields that fix what the adapter computes, written to both files (target_modules and modules_to_save are
# resolved to paths in adapter_config.json, and the tensors' keys check them).
_CROSS_CHECKED = ("r", "alpha", "dropout", "bias", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora")


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _parse_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    problem = None
    try:
        tensors = safetensors_load(data)
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, OverflowError, MemoryError, UnicodeDecodeError, AttributeError) as err:
        problem = f"{type(err).__name__}: {str(err)[:200]}"
    else:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            problem = "its metadata is not a map of strings"
    if problem is not None:
        raise ValueError(
            f"{str(path)!r} cannot be read as safetensors ({problem}): the file is truncated or corrupted. "
            "Re-export the adapter or restore it from a checkpoint."
        ) from None
    return tensors, metadata


def _check_saved_together(config: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, str], config_path: Path, weights_path: Path) -> None:
    """The checks that lightning_lora's metadata allows: tensors against their checksum, the two files against each other."""
    if not _OUR_METADATA & set(metadata):
        return  # written by PEFT or another tool: nothing to check against
    damaged = sorted(set(metadata) - _OUR_METADATA - {"format"}) or [k for k in ("lightning_lora_version", "lora_config") if k not in metadata]
    if damaged:
        raise ValueError(f"{str(weights_path)!r} has damaged metadata (`{damaged[0]}`): the file is corrupted. Re-export the adapter.")
    if _CHECKSUM_KEY in metadata and metadata[_CHECKSUM_KEY] != _tensors_digest(tensors):
        raise ValueError(
            f"{str(weights_path)!r} is corrupted: its tensors do not match the checksum (`{_CHECKSUM_KEY}`) written with them. "
            "Re-export the adapter or restore it from a checkpoint."
        )
    try:
        saved = json.loads(metadata["lora_config"])
    except (KeyError, json.JSONDecodeError, RecursionError):
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"{str(weights_path)!r} has damaged metadata (`lora_config`): the file is corrupted. Re-export the adapter.")
    keys = peft_fields()
    for field in _CROSS_CHECKED:
        key, default = keys[field]
        value = default if config.get(key) is None else config[key]  # as lora_config_from_peft reads it
        if field in saved and value != saved[field]:
            raise ValueError(
                f"{str(config_path)!r} has `{key}`={config.get(key)!r}, but {ADAPTER_WEIGHTS_NAME} was saved with {key}={saved[field]!r}: "
                "the two files come from different saves, or one was edited. Re-save the adapter (or restore both files together)."
            )


def lora_config_from_peft(config: dict[str, Any]) -> LoRAConfig:
    """The LoRAConfig an ``adapter_config.json`` stands for; rejects PEFT features plain LoRA lacks."""
    implemented = {key: name for name, (key, _) in peft_fields().items()}
    for key, value in config.items():
        if key in implemented or key in _PEFT_METADATA or _is_default(value):
            continue
        if key in _PEFT_REFUSED:
            raise ValueError(f"The adapter uses PEFT's `{key}`={value!r}, which lightning_lora does not implement; export it from PEFT without it.")
        raise ValueError(
            f"The adapter's config has `{key}`={value!r}, which is not a field of PEFT 0.21's LoraConfig: it may change the "
            "adapter's math (a newer PEFT?), which lightning_lora does not implement. Remove it if it is only metadata."
        )
    init = config.get("init_lora_weights", True)
    # PiSSA / OLoRA run again when the adapter is injected: it applies to the residual they leave in the base.
    base_init = "olora" if isinstance(init, str) and init.lower() == "olora" else init if isinstance(init, str) and init.startswith("pissa") else None
    if not any(init is plain or (isinstance(init, str) and init == plain) for plain in _PLAIN_INITS) and base_init is None:
        raise ValueError(
            f"The adapter uses PEFT's `init_lora_weights`={init!r}, which rewrites the base weights in a way lightning_lora does "
            "not implement (or depends on data), so it does not apply to the plain base model. Convert it to plain LoRA in PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that, or use an adapter "
            "initialized with True / 'gaussian' / 'pissa' / 'pissa_niter_<K>' / 'olora'."
        )
    # A key the file lacks, or holds as null, means PEFT's default.
    values = {name: default if config.get(key) is None else config[key] for name, (key, default) in peft_fields().items()}
    values.update(
        # An empty or null target_modules with target_parameters means "parameters only" (PEFT's convention).
        target_modules=values["target_modules"] or (None if values.get("target_parameters") else "all-linear"),
        init=base_init or ("gaussian" if init == "gaussian" else "kaiming"),
    )
    try:
        return LoRAConfig(**values)
    except (ValueError, TypeError) as err:
        # LoRAConfig names its own field (`alpha`); say which key of the file holds it (`lora_alpha`).
        field = re.match(r"`(\w+)", str(err))
        to_key = {name: key for name, (key, _) in peft_fields().items()}
        key = to_key.get(field.group(1), field.group(1)) if field else None
        where = f"`{key}`={config.get(key)!r} in {ADAPTER_CONFIG_NAME}: " if key in config else f"{ADAPTER_CONFIG_NAME}: "
        raise type(err)(where + str(err)) from None


def _is_default(value: Any) -> bool:
    """None, False or empty: the default of every refused PEFT field, and what a newer PEFT writes for an unused one."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


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
            "LoRA config (target_modules, exclude_modules, bias, modules_to_save); load it into the model it was trained on."
        )
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            hint = ""
            if key.endswith((".lora_a.weight", ".lora_b.weight")) and len(got) == len(shape) == 2:
                rank_dim = 0 if key.endswith(".lora_a.weight") else 1
                if got[1 - rank_dim] == shape[1 - rank_dim]:
                    hint = f" The adapter has rank r={got[rank_dim]} here, the model r={shape[rank_dim]}: build the model with the adapter's r. (Per-layer ranks come from rank_pattern.)"
            raise ValueError(f"The adapter in {source} does not fit this model: {key!r} has shape {got} in the file, {shape} in the model.{hint}")
    check_adapter_values({key: tensors[key] for key in expected}, f"the adapter in {source}")


def check_adapter_values(tensors: Mapping[str, torch.Tensor], source: str, what: str = "Nothing was loaded") -> None:
    """Raise a ValueError naming the first tensor of ``tensors`` that is not floating point or holds NaN/Inf."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"{source[0].upper()}{source[1:]} holds {key!r} as {value.dtype}; adapter tensors must be floating point. {what}.")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source[0].upper()}{source[1:]} holds NaN/Inf values in {key!r}. {what}: restore the adapter from an earlier checkpoint.")


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
    require_unmerged(model, "load_adapter")
    return load_read_adapter(model, read_adapter(directory), source=repr(str(directory)), adapter_name=adapter_name)


@torch.no_grad()
def load_read_adapter(
    model: nn.Module, read: tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]], source: str, adapter_name: str | None = None
) -> nn.Module:
    """``load_adapter`` for what ``read_adapter`` returned: for callers that look at the files first and must load
    exactly what they looked at (a second read could see a newer save)."""
    require_unmerged(model, "load_adapter")
    peft_config, tensors, _ = read
    state = lora_state(model)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    name = adapter_name if adapter_name is not None else (state.active if state is not None else DEFAULT_ADAPTER)
    exists = state is not None and name in state.plans
    file_config = lora_config_from_peft(peft_config)
    config = state.plans[name].config if exists else drop_unmatched_names(model, file_config)
    tensors = {to_adapter_key(key, name): value for key, value in tensors.items()}
    config, tensors, expected = _placed_in(model, config, tensors, name, exists, source)
    check_adapter_tensors(expected, tensors, source=source)
    if exists:
        check_adapter_scales(model, file_config, source, name)
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


def check_adapter_scales(model: nn.Module, config: LoRAConfig, source: str, adapter_name: str | None = None) -> None:
    """Raise if an adapter saved with ``config`` would run at another scale in the layers of ``model``'s adapter
    ``adapter_name`` (default: the active one) than it was trained at (``lora_alpha``, ``use_rslora`` or
    ``alpha_pattern`` differ), on another base (a PiSSA / OLoRA adapter into one of another init), or without its
    DoRA magnitudes (``use_dora`` differs: a PEFT file need not hold them): shapes alone do not show that."""
    name = require_adapter(model, adapter_name, "check_adapter_scales")
    own = require_lora_state(model, "check_adapter_scales").plans[name].config
    if config.use_dora != own.use_dora:
        raise ValueError(
            f"The adapter in {source} has `use_dora`={config.use_dora}, this model's adapter {name!r} has use_dora={own.use_dora}: "
            "it would compute another update. Load it into a model without LoRA (it is injected from the adapter's config), "
            f"or inject LoRA with use_dora={config.use_dora}."
        )
    if init_changes_base(config.init) != init_changes_base(own.init):
        raise ValueError(
            f"The adapter in {source} was trained with init={config.init!r}, this model's adapter {name!r} has init={own.init!r}: "
            "a PiSSA / OLoRA adapter applies to the residual its init leaves in the base, any other to the original "
            "base, so it would compute on the wrong weights. Load it into a model without LoRA (it is injected from the "
            "adapter's config), or under another adapter_name."
        )
    for path, layer in lora_layers(model).items():
        path, adapter = unwrapped_name(path), layer.get_adapter(name)
        if adapter is None:
            continue
        r = int(pattern_value(path, config.rank_pattern, config.r))
        alpha = float(pattern_value(path, config.alpha_pattern, config.alpha))
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        if not math.isclose(scale, adapter.scale, rel_tol=1e-6):
            raise ValueError(
                f"The adapter in {source} was trained at scale {scale:g} in {path!r} (lora_alpha={alpha:g}, r={r}, "
                f"use_rslora={config.use_rslora}), but this model's LoRA layer there has scale {adapter.scale:g} (alpha={adapter.alpha:g}, "
                f"r={adapter.r}): it would compute another update. Inject LoRA with the adapter's lora_alpha / use_rslora / "
                "alpha_pattern, or load it into a model without LoRA (it is injected from the adapter's config)."
            )


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "the state dict", adapter_name: str | None = None) -> None:
    """Copy adapter tensors (keys as in ``adapter_state_dict``) into ``model``'s adapter ``adapter_name`` (default: the
    active one), after checking all of them."""
    require_unmerged(model, "load_adapter_state_dict")
    params = adapter_state_dict(model, adapter_name)
    check_adapter_tensors({key: tuple(value.shape) for key, value in params.items()}, tensors, source)
    first_name: dict[int, str] = {}
    for key, param in params.items():  # a tied tensor appears under each of its names: they must agree
        other = first_name.setdefault(id(param), key)
        if other != key and not torch.equal(tensors[key].to(tensors[other].dtype), tensors[other]):
            raise ValueError(f"The adapter in {source} holds different values for {other!r} and {key!r}, which are one tied tensor in this model. Nothing was loaded.")
    for key, param in params.items():
        param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
