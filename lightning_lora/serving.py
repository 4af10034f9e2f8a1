"""Will a serving tool take this adapter, and compute with it what PEFT computes?

``save_adapter(..., serving_targets=["vllm", "llama.cpp"])`` runs these checks on the files it is about to write
(``adapter_config.json`` and the tensor names and shapes) and warns, or with ``strict_serving=True`` raises before
writing anything. ``serving_issues`` and ``adapter_serving_issues`` give the same findings as data. The rules are
read from the consumers' own code; each cites where.

vLLM (``vllm/lora/peft_helper.py``, ``PEFTHelper.validate_legal`` / ``_validate_features``, main as of late 2026;
``vllm/config/lora.py`` for the ranks). It refuses to load:

- ``bias`` other than "none" ("Adapter bias is not supported."; v0.10 and earlier took it with ``--enable-lora-bias``);
- ``modules_to_save`` other than ``classifier`` / ``score`` (allowed since vLLM PR #53555, 2026-08; older releases
  refuse any);
- DoRA (``use_dora``), PEFT's ``lora_bias``;
- inits that change the base weights (PiSSA, OLoRA, CorDA, LoftQ: any ``init_lora_weights`` string but gaussian,
  eva, orthogonal, mica, lora_ga);
- a rank (``r`` or a ``rank_pattern`` value) above ``--max-lora-rank`` (default 16; allowed values 1, 8, 16, 32, 64,
  128, 256, 320, 512);
- ``trainable_token_indices`` ("...token_adapter.trainable_tokens_delta is unsupported LoRA weight", vLLM issue
  #36501; PR #55796, open in 2026-09, adds it behind ``--max-lora-trainable-tokens``).

rsLoRA and ``rank_pattern`` / ``alpha_pattern`` are honoured by vLLM main (``PEFTHelper.get_rank_and_scaling``);
releases whose ``PEFTHelper`` has no pattern fields (v0.11 and before) apply one ``lora_alpha / r`` everywhere.
Fused-expert adapters (``target_parameters``) failed to load with a shape mismatch in vLLM releases up to mid-2026
(vLLM PRs #41384, #52194, #52198): check your version.

llama.cpp (``convert_lora_to_gguf.py`` and ``src/llama-adapter.h`` of ggml-org/llama.cpp, commit 0b03ada, late 2026):

- the converter writes one ``adapter.lora.alpha`` (``lora_alpha``) and llama.cpp scales every layer by
  ``alpha / rank`` (``llama_adapter_lora_weight::get_scale``, rank from the tensor): rsLoRA (PEFT:
  ``alpha / sqrt(r)``) and ``alpha_pattern`` come out mis-scaled; ``rank_pattern`` alone is fine;
- it exits on any tensor that is not ``lora_A`` / ``lora_B`` (or a norm): ``modules_to_save`` weights, biases,
  trained token rows, DoRA magnitudes ("Unexpected name ...: Not a lora_A or lora_B tensor");
- it maps each LoRA pair to one base tensor named after the module, which fused experts do not have
  (``...experts.weight``): ``target_parameters`` adapters do not convert (reading of the converter);
- PiSSA / OLoRA adapters apply to their residual base, not to the original weights llama.cpp loads.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning_lora._matching import pattern_value

CONSUMERS = ("vllm", "llama.cpp")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py, MaxLoRARanks
VLLM_DEFAULT_MAX_LORA_RANK = 16
# init_lora_weights strings vLLM accepts: they only set the initial adapter (PEFTHelper._init_is_supported).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_PEFT_PREFIX = "base_model.model."

Effect = Literal["refuses", "mis-scales", "mis-applies"]


@dataclass(frozen=True)
class ServingIssue:
    """One reason ``consumer`` will refuse the adapter or compute something else with it than PEFT does."""

    consumer: str
    effect: Effect
    key: str
    """The ``adapter_config.json`` key or tensor the finding is about."""
    reason: str
    """Why, and what to do instead."""

    def __str__(self) -> str:
        return f"{self.consumer} {self.effect} it ({self.key}): {self.reason}"


def check_serving_targets(serving_targets: Any) -> tuple[str, ...]:
    """``serving_targets`` validated: None, one consumer name, or a list of them, from ``CONSUMERS``."""
    if serving_targets is None:
        return ()
    targets = [serving_targets] if isinstance(serving_targets, str) else serving_targets
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"`serving_targets` must be a list of consumer names, got {serving_targets!r}. Pass e.g. ['vllm', 'llama.cpp'].")
    unknown = [t for t in targets if t not in CONSUMERS]
    if unknown:
        raise ValueError(f"`serving_targets` holds {unknown!r}; the checks know {list(CONSUMERS)}. Pass e.g. ['vllm', 'llama.cpp'].")
    return tuple(dict.fromkeys(targets))


def check_max_lora_rank(vllm_max_lora_rank: Any) -> int:
    if vllm_max_lora_rank not in VLLM_MAX_LORA_RANKS or isinstance(vllm_max_lora_rank, bool):
        raise ValueError(
            f"`vllm_max_lora_rank` must be one of vLLM's --max-lora-rank values {VLLM_MAX_LORA_RANKS}, got {vllm_max_lora_rank!r}."
        )
    return int(vllm_max_lora_rank)


def serving_issues(
    config: dict[str, Any],
    tensor_shapes: dict[str, tuple[int, ...]],
    serving_targets: Any = CONSUMERS,
    *,
    vllm_max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
) -> list[ServingIssue]:
    """Every finding for an adapter with PEFT config ``config`` and tensors ``tensor_shapes`` (PEFT's file keys)."""
    targets = check_serving_targets(serving_targets)
    max_rank = check_max_lora_rank(vllm_max_lora_rank)
    issues: list[ServingIssue] = []
    if "vllm" in targets:
        issues += _vllm_issues(config, max_rank)
    if "llama.cpp" in targets:
        issues += _llama_cpp_issues(config, tensor_shapes)
    return issues


def _changes_base(config: dict[str, Any]) -> bool:
    init = config.get("init_lora_weights", True)
    return isinstance(init, str) and init.lower() not in _PLAIN_INITS


def _vllm_issues(config: dict[str, Any], max_rank: int) -> list[ServingIssue]:
    out = []

    def refuse(key: str, reason: str) -> None:
        out.append(ServingIssue("vllm", "refuses", key, reason))

    if config.get("bias", "none") != "none":
        refuse("bias", f"bias={config['bias']!r}: vLLM loads no adapter biases (\"Adapter bias is not supported.\"). Train with bias='none'.")
    extra = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if extra:
        refuse("modules_to_save", f"modules_to_save={extra!r}: vLLM takes fully trained modules only for a `classifier` / `score` head. Merge the model, or train those modules with LoRA.")
    if config.get("use_dora"):
        refuse("use_dora", "DoRA (\"vLLM does not yet support DoRA.\"): merge the adapter into the base and serve the merged model.")
    if config.get("lora_bias"):
        refuse("lora_bias", "PEFT's lora_bias is not implemented in vLLM.")
    if _changes_base(config):
        refuse(
            "init_lora_weights",
            f"init_lora_weights={config['init_lora_weights']!r} changes the base weights when PEFT loads the adapter. Convert it "
            "to a plain LoRA against the original base first (PEFT's path_initial_model_for_weight_conversion).",
        )
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        fits = [r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks)]
        fix = f"start vLLM with --max-lora-rank {fits[0]} (and pass vllm_max_lora_rank={fits[0]} here)" if fits else f"vLLM's largest --max-lora-rank is {VLLM_MAX_LORA_RANKS[-1]}: train a smaller rank"
        refuse("r", f"rank {max(ranks)} is above --max-lora-rank {max_rank}: {fix}.")
    if config.get("trainable_token_indices"):
        refuse(
            "trainable_token_indices",
            "trained token rows (`token_adapter.trainable_tokens_delta`) are an unsupported LoRA weight in vLLM (issue #36501). "
            "Serve the merged model, or a vLLM built with PR #55796 (--max-lora-trainable-tokens).",
        )
    return out


def _module_of(key: str) -> str | None:
    """The module path of a PEFT lora_A key (prefix and suffix removed), or None for other tensors."""
    if not key.endswith(".lora_A.weight"):
        return None
    return key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")


def _llama_cpp_issues(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[ServingIssue]:
    out = []
    # The converter's own test (convert_lora_to_gguf.py, LoraModel.get_tensors): LoRA pairs, skipped base weights, norms.
    rejected = [
        key
        for key in shapes
        if not any(part in key for part in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"))
        and ".base_layer.weight" not in key
        and not ("_layernorm" in key or ".norm" in key)
    ]
    if rejected:
        out.append(
            ServingIssue(
                "llama.cpp",
                "refuses",
                rejected[0].removeprefix(_PEFT_PREFIX),
                f"convert_lora_to_gguf.py exits on tensors that are not lora_A / lora_B ({len(rejected)} here, first "
                f"{[k.removeprefix(_PEFT_PREFIX) for k in rejected[:3]]}: modules_to_save, biases, token rows or DoRA "
                "magnitudes). Export merged weights for llama.cpp (convert_hf_to_gguf.py on `lightning-lora export --merged`).",
            )
        )
    if config.get("target_parameters"):
        out.append(
            ServingIssue(
                "llama.cpp",
                "refuses",
                "target_parameters",
                f"target_parameters={config['target_parameters']!r}: the converter maps each LoRA pair to one base tensor "
                "named after its module, and fused experts have none (`...experts.weight`). Export merged weights instead.",
            )
        )
    if _changes_base(config):
        out.append(
            ServingIssue(
                "llama.cpp",
                "mis-applies",
                "init_lora_weights",
                f"init_lora_weights={config['init_lora_weights']!r}: the adapter belongs to the residual base PEFT builds, "
                "llama.cpp applies it to the original weights. Convert it to a plain LoRA first.",
            )
        )
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora"))
    wrong: list[tuple[str, float]] = []
    for key, shape in shapes.items():
        module = _module_of(key)
        if module is None or len(shape) != 2:
            continue
        rank = shape[0]
        module_alpha = float(pattern_value(module, config.get("alpha_pattern") or {}, alpha))
        peft_scale = module_alpha / math.sqrt(rank) if rslora else module_alpha / rank
        ours = alpha / rank  # llama_adapter_lora_weight::get_scale with the one alpha the converter writes
        if not math.isclose(ours, peft_scale, rel_tol=1e-6):
            wrong.append((module, ours / peft_scale))
    if wrong:
        factors = sorted({round(f, 6) for _, f in wrong})
        why = "rsLoRA scales by alpha / sqrt(r)" if rslora else "alpha_pattern gives these modules their own alpha"
        out.append(
            ServingIssue(
                "llama.cpp",
                "mis-scales",
                "use_rslora" if rslora else "alpha_pattern",
                f"{len(wrong)} LoRA layers (first {wrong[0][0]!r}) get llama.cpp's alpha / rank, {factors[:3]} x what PEFT "
                f"applies: {why}, but the GGUF holds one alpha. Train without it, or export merged weights.",
            )
        )
    return out


def report(issues: list[ServingIssue], strict: bool, where: str) -> None:
    """Warn about ``issues`` (one warning listing all), or with ``strict`` raise a ValueError before anything is written."""
    if not issues:
        return
    lines = "\n".join(f"  - {issue}" for issue in issues)
    if strict:
        raise ValueError(
            f"{where}: the adapter does not suit its serving targets, nothing was written (strict_serving=True):\n{lines}\n"
            "Change the LoRA config, drop the target from serving_targets, or set strict_serving=False to write it anyway."
        )
    warnings.warn(f"{where}: serving consumers will refuse or mis-apply this adapter:\n{lines}", UserWarning, stacklevel=3)


def adapter_serving_issues(
    directory: str | os.PathLike, serving_targets: Any = CONSUMERS, *, vllm_max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK
) -> list[ServingIssue]:
    """``serving_issues`` for an adapter already on disk (ours or PEFT's)."""
    from safetensors import safe_open

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return serving_issues(config, shapes, serving_targets, vllm_max_lora_rank=vllm_max_lora_rank)
