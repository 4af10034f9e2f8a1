"""Configuration of LoRA adapters and of backbone quantization.

Both are plain dataclasses: jsonargparse turns the field docstrings into ``--help`` text and YAML
keys, and every cross-field check lives in ``__post_init__`` so a bad value fails where it is set.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

import torch

from lightning_lora import _regex
from lightning_lora._matching import suffix_regex

BiasMode = Literal["none", "all", "lora_only"]
InitMode = str
"""'kaiming', 'gaussian', 'pissa', 'pissa_niter_<K>' or 'olora' (a string: the PiSSA form carries a number)."""
QuantMode = Literal["nf4", "fp4", "int8"]

_BIAS_MODES = ("none", "all", "lora_only")
_INIT_MODES = ("kaiming", "gaussian", "pissa", "olora")  # and 'pissa_niter_<K>'
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
_QUANT_MODES = ("nf4", "fp4", "int8")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_patterns(name: str, patterns: list[str] | str | None, suffix_keys: bool = False) -> None:
    """A list of names, or one regex string; ``suffix_keys``: every entry is a regex matched as a path suffix
    (``rank_pattern`` keys). Every regex must be one that matching can bound in time (see ``_regex``)."""
    if patterns is None:
        return
    regexes = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(regexes, (list, tuple)) or not all(isinstance(p, str) for p in regexes):
        raise TypeError(f"`{name}` must be a list of module names or one regex string, got {patterns!r}. Pass e.g. ['q_proj', 'v_proj'].")
    for pattern in regexes:
        try:
            if suffix_keys:
                _regex.check(suffix_regex(pattern))  # first: it refuses an overlong pattern before re compiles it
            elif isinstance(patterns, str):
                _regex.check(pattern)
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as err:
            raise ValueError(f"`{name}` entry {pattern[:200]!r} is not a valid regex ({err}). Escape special characters.") from None
        except _regex.RegexTooComplex as err:
            raise ValueError(
                f"`{name}` entry {pattern[:200]!r} cannot be matched in bounded time ({err}): Python's re would backtrack "
                "for ages on it. Simplify it (no quantifier inside a repeated group next to a lookaround or backreference)."
            ) from None


@dataclass
class LoRAConfig:
    """What to adapt and how.

    Example::

        config = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
        inject_lora(model, config)
    """

    # Each field's metadata says what it is called in PEFT's adapter_config.json ("peft", with "peft_default"
    # when PEFT's default differs from ours) and whether it changes which adapter tensors exist or what they
    # compute ("adapter": a checkpoint must match it to resume). adapter_io and the checkpoint checks read it.
    r: int = field(default=8, metadata={"peft": "r", "adapter": True})
    """Rank of the update ``B @ A``."""
    alpha: float = field(default=16.0, metadata={"peft": "lora_alpha", "peft_default": 8, "adapter": True})
    """Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    dropout: float = field(default=0.0, metadata={"peft": "lora_dropout"})
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: list[str] | str | None = field(default="all-linear", metadata={"peft": "target_modules", "adapter": True})
    """Module names matched as a dotted-path suffix, one regex matched against the full path, or 'all-linear': every
    linear layer but the output head (the output embeddings, and modules named lm_head, classifier, score, qa_outputs
    or embed_out, whatever the task). None: no module, when ``target_parameters`` names what to adapt."""
    exclude_modules: list[str] | str | None = field(default=None, metadata={"peft": "exclude_modules", "adapter": True})
    """Modules never adapted, in the same forms as ``target_modules``."""
    bias: BiasMode = field(default="none", metadata={"peft": "bias", "adapter": True})
    """Which biases train and are saved: 'none', 'all', or 'lora_only' (those of adapted layers)."""
    modules_to_save: list[str] | None = field(default=None, metadata={"peft": "modules_to_save", "adapter": True})
    """Modules trained in full and saved with the adapter, e.g. a classifier head (dotted-path suffixes)."""
    init: InitMode = field(default="kaiming", metadata={"peft": "init_lora_weights"})
    """Init of A and B: 'kaiming' (A uniform, a=sqrt(5), as nn.Linear) or 'gaussian' (A with std 1/r), B at zero;
    or from the base weight, which then holds the residual: 'pissa' (its top-r singular vectors), 'pissa_niter_K'
    (the same by a randomized SVD with K subspace iterations) or 'olora' (its QR decomposition)."""
    use_rslora: bool = field(default=False, metadata={"peft": "use_rslora", "adapter": True})
    """Scale by alpha / sqrt(r) (rank-stabilized LoRA) instead of alpha / r."""
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"peft": "rank_pattern", "adapter": True})
    """Per-module rank overrides: regex (matched as a path suffix) -> r."""
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"peft": "alpha_pattern", "adapter": True})
    """Per-module alpha overrides: regex (matched as a path suffix) -> alpha."""
    target_parameters: list[str] | None = field(default=None, metadata={"peft": "target_parameters", "adapter": True})
    """Parameters (not modules) to adapt, as ``module.param`` path suffixes, e.g. ``['experts.gate_up_proj',
    'experts.down_proj']`` for the fused 3-D expert weights of transformers' MoE models (PEFT's ``target_parameters``)."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata={"peft": "trainable_token_indices", "adapter": True}
    )
    """Embedding rows to train (e.g. new tokens): a list of token ids for the input embedding, or
    ``{module suffix: ids}``; only those rows train and are saved (PEFT's ``trainable_token_indices``)."""
    use_dora: bool = field(default=False, metadata={"peft": "use_dora", "adapter": True})
    """DoRA (weight-decomposed LoRA): a trained magnitude per output row rescales the adapted weight ``W + scale * B @ A``."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}. Set it to e.g. 8. Typical values are 4 to 64.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"`alpha` must be a finite positive number, got {self.alpha!r}. Set it to a positive number. A common choice is 2 * r.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}. Use 0.0 to disable it.")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"`bias` must be one of {_BIAS_MODES}, got {self.bias!r}.")
        if not isinstance(self.init, str) or not (self.init in _INIT_MODES or _PISSA_NITER.fullmatch(self.init)):
            raise ValueError(f"`init` must be one of {(*_INIT_MODES, 'pissa_niter_<K>')}, got {self.init!r}. K is a positive integer, e.g. 'pissa_niter_4'.")
        if not isinstance(self.use_rslora, bool):  # "false" is truthy: a string must not switch rsLoRA on
            raise TypeError(f"`use_rslora` must be True or False, got {self.use_rslora!r}.")
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"`use_dora` must be True or False, got {self.use_dora!r}.")
        self.target_parameters = _check_target_parameters(self.target_parameters, self.dropout, self.use_dora, self.init)
        self.trainable_token_indices = _check_token_indices(self.trainable_token_indices)
        if self.target_modules is None or (isinstance(self.target_modules, (list, tuple)) and len(self.target_modules) == 0):
            if not self.target_parameters:
                raise ValueError(
                    f"`target_modules` is empty (got {self.target_modules!r}): name at least one module, e.g. ['q_proj', 'v_proj'], "
                    "or use 'all-linear' (None is for adapting parameters only, with `target_parameters`)."
                )
            self.target_modules = None
        elif self.target_modules != "all-linear":
            _check_patterns("target_modules", self.target_modules)
        _check_patterns("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not isinstance(self.modules_to_save, (list, tuple)):
                raise TypeError(f"`modules_to_save` must be a list of module names, got {self.modules_to_save!r}. Pass e.g. ['classifier'].")
            _check_patterns("modules_to_save", list(self.modules_to_save))
        for name, pattern_map, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            if not isinstance(pattern_map, dict):
                raise TypeError(f"`{name}` must be a dict of regex -> value, got {pattern_map!r}. Pass e.g. {{'q_proj': 16}}.")
            _check_patterns(name, list(pattern_map), suffix_keys=True)
            for key, value in pattern_map.items():
                if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                    what = "a positive integer (a rank)" if kind is int else "a positive number"
                    raise ValueError(f"`{name}[{key!r}]` must be {what}, got {value!r}.")
                if not math.isfinite(value):
                    raise ValueError(f"`{name}[{key!r}]` must be finite, got {value!r}. Set it to a positive number such as 16.")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as a call on plain values, which torch.load(weights_only=True) allows (see _rebuild_config).
        return (_rebuild_config, ("LoRAConfig", self.to_dict()))


def _check_target_parameters(value: Any, dropout: float, use_dora: bool, init: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(
            f"`target_parameters` must be a list of parameter paths, got {value!r}. Pass e.g. ['experts.gate_up_proj', "
            "'experts.down_proj'] (suffixes of `module.parameter` paths; regexes are not supported, as in PEFT)."
        )
    if not value:
        raise ValueError("`target_parameters` is an empty list: name at least one parameter, e.g. ['experts.down_proj'], or pass None.")
    if dropout:
        # The update of a parameter is folded into the weight, so there is no LoRA input to drop (PEFT refuses this too).
        raise ValueError(f"`dropout`={dropout!r} cannot be used with `target_parameters`: set `dropout`=0.0.")
    if use_dora:
        # DoRA's magnitude is a per-row norm of a 2-D layer weight; PEFT's ParamWrapper refuses it as well.
        raise ValueError(f"`use_dora`=True cannot be used with `target_parameters`={list(value)!r}: set `use_dora`=False, or drop target_parameters.")
    if init_changes_base(init):
        # PiSSA / OLoRA factor a layer's 2-D weight and leave a residual in it; a ParamLoRA has no such init.
        raise ValueError(
            f"`init`={init!r} cannot be used with `target_parameters`={list(value)!r}: PiSSA / OLoRA factor the weight of "
            "a linear layer, not a raw (expert) parameter. Use init='kaiming' or 'gaussian', or drop target_parameters."
        )
    return list(value)


def _check_token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    if value is None:
        return None
    example = "Pass e.g. [32000, 32001] (rows of the input embedding) or {'embed_tokens': [32000, 32001]}."

    def ids(name: str, items: Any) -> list[int]:
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)) or not items:
            raise TypeError(f"`{name}` must be a non-empty list of token ids, got {items!r}. {example}")
        bad = [i for i in items if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise ValueError(f"`{name}` holds {bad[:3]!r}, which are not token ids (non-negative integers). {example}")
        if len(set(items)) != len(items):
            repeated = sorted({i for i in items if list(items).count(i) > 1})
            raise ValueError(f"`{name}` lists token ids {repeated} more than once: give each row once.")
        return list(items)

    if isinstance(value, dict):
        if not value or not all(isinstance(key, str) and key for key in value):
            raise TypeError(f"`trainable_token_indices` as a dict must map module names to token ids, got {value!r}. {example}")
        return {key: ids(f"trainable_token_indices[{key!r}]", items) for key, items in value.items()}
    return ids("trainable_token_indices", value)


def init_changes_base(init: str) -> bool:
    """Whether ``init`` rewrites the base weight into a residual (PiSSA, OLoRA): a resume must then use the same init."""
    return init == "olora" or init.startswith("pissa")


def pissa_niter(init: str) -> int | None:
    """K of 'pissa_niter_K' (a randomized SVD with K subspace iterations); None for the exact SVD or other inits."""
    match = _PISSA_NITER.fullmatch(init)
    return int(match.group(1)) if match else None


ADAPTER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LoRAConfig) if f.metadata.get("adapter"))
"""The LoRAConfig fields that change which adapter tensors exist or what they compute (dropout and init do not)."""


def peft_fields() -> dict[str, tuple[str, Any]]:
    """LoRAConfig field -> (its key in PEFT's ``adapter_config.json``, the value to assume when a file lacks the key)."""
    out = {}
    for f in fields(LoRAConfig):
        if "peft" in f.metadata:
            default = f.metadata.get("peft_default", f.default_factory() if f.default is MISSING else f.default)
            out[f.name] = (f.metadata["peft"], default)
    return out


@dataclass
class QuantizationConfig:
    """How to quantize the frozen backbone with bitsandbytes.

    Example::

        inject_lora(model, LoRAConfig(r=16), QuantizationConfig(mode="nf4"))
    """

    mode: QuantMode = "nf4"
    """'nf4' or 'fp4' (4-bit, QLoRA) or 'int8' (LLM.int8()). ``double_quant``, ``compute_dtype`` and
    ``quant_storage`` are 4-bit only: with int8 they must keep their defaults (another value would change nothing)."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (saves ~0.37 bit per parameter)."""
    compute_dtype: str | None = None
    """Matmul dtype of 4-bit layers: 'bfloat16', 'float16' or 'float32'. Default: bfloat16 on CUDA, float32 on CPU."""
    skip_modules: list[str] | None = None
    """Linear layers kept in full precision (dotted-path suffixes), besides the output head."""
    quant_storage: str = "uint8"
    """Storage dtype of packed 4-bit weights; set it to the FSDP dtype ('bfloat16') when sharding with FSDP1."""

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in _FOUR_BIT_ONLY}  # as written, for the messages
        check_quant_mode(self.mode, "mode")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"`double_quant` must be True or False, got {self.double_quant!r}.")
        if self.compute_dtype is not None and _dtype_name(self.compute_dtype) not in tuple(_DTYPES):
            raise ValueError(f"`compute_dtype` must be one of {sorted(_DTYPES)} or None, got {self.compute_dtype!r}.")
        if self.compute_dtype is not None:
            self.compute_dtype = _dtype_name(self.compute_dtype)
        if _dtype_name(self.quant_storage) not in (*_DTYPES, "uint8"):
            raise ValueError(f"`quant_storage` must be 'uint8', 'bfloat16', 'float16' or 'float32', got {self.quant_storage!r}.")
        self.quant_storage = _dtype_name(self.quant_storage)
        if isinstance(self.skip_modules, str):
            self.skip_modules = [self.skip_modules]
        _check_patterns("skip_modules", self.skip_modules)
        _refuse_unused(self, given, self.mode, "mode")

    def resolved_compute_dtype(self, device: torch.device | str | None) -> torch.dtype:
        if self.compute_dtype is not None:
            return _DTYPES[self.compute_dtype]
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda else torch.float32

    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quant_storage == "uint8" else _DTYPES[self.quant_storage]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_config, ("QuantizationConfig", self.to_dict()))


# The options only bitsandbytes' 4-bit layers (Linear4bit / Params4bit) read, and why the 8-bit ones ignore each.
_FOUR_BIT_ONLY = {
    "double_quant": "it quantizes the block scales of 4-bit weights, and LLM.int8() keeps one float scale per row",
    "compute_dtype": "Linear8bitLt computes in the dtype of its input",
    "quant_storage": "int8 weights are always stored as int8",
}


def check_quant_mode(value: Any, parameter: str, allow_none: bool = False) -> None:
    """Refuse a quantization mode other than 'nf4', 'fp4', 'int8' (and None when ``allow_none``). Matching is exact, as
    for every other option of this library: 'NF4' is refused with the spelling to use rather than taken."""
    if (value is None and allow_none) or (isinstance(value, str) and value in _QUANT_MODES):
        return
    hint = ""
    if isinstance(value, str) and value.strip().lower() in _QUANT_MODES:
        hint = f" Use {value.strip().lower()!r}: mode names are lowercase."
    raise ValueError(f"`{parameter}` must be one of {_QUANT_MODES}{' or None' if allow_none else ''}, got {value!r}.{hint}")


def quantization_from_options(
    quantize: Any, double_quant: Any = True, compute_dtype: Any = None, quant_storage: Any = "uint8", parameter: str = "quantize"
) -> QuantizationConfig | None:
    """The QuantizationConfig of flat options (``LoRACallback``'s), None when ``quantize`` (named ``parameter``) is None.

    Every option is checked whether or not it is used, and one set away from its default where it would change nothing
    is refused: a 4-bit option with int8 (as ``QuantizationConfig`` does), or any of them without quantization.
    """
    check_quant_mode(quantize, parameter, allow_none=True)
    given = {"double_quant": double_quant, "compute_dtype": compute_dtype, "quant_storage": quant_storage}
    checked = QuantizationConfig(mode="nf4", **given)  # the type and value checks, named by the same fields
    _refuse_unused(checked, given, quantize, parameter)
    return None if quantize is None else QuantizationConfig(mode=quantize, **given)


def _refuse_unused(config: QuantizationConfig, given: dict[str, Any], mode: str | None, mode_parameter: str) -> None:
    """Refuse a 4-bit-only option away from its default when ``mode`` ('int8', or None: nothing is quantized) ignores
    it. ``config`` holds the options checked and normalised ('bf16' -> 'bfloat16'), ``given`` them as written."""
    if mode not in (None, "int8"):
        return
    for name, reason in _FOUR_BIT_ONLY.items():
        default = _QUANT_DEFAULTS[name]
        if getattr(config, name) == default:
            continue
        if mode is None:
            raise ValueError(
                f"`{name}`={given[name]!r} has no effect with `{mode_parameter}`=None: nothing is quantized. Drop it "
                f"(leave it at {default!r}), or set `{mode_parameter}` to 'nf4' or 'fp4' to quantize the backbone."
            )
        raise ValueError(
            f"`{name}`={given[name]!r} has no effect for int8 (`{mode_parameter}`='int8'): {reason}. Drop it "
            f"(leave it at {default!r}), or use `{mode_parameter}`='nf4' / 'fp4' for 4-bit quantization."
        )


_QUANT_DEFAULTS = {f.name: f.default for f in fields(QuantizationConfig)}


def _rebuild_config(kind: str, fields: dict[str, Any]) -> LoRAConfig | QuantizationConfig:
    """Unpickle a LoRAConfig / QuantizationConfig from plain values, through ``__init__`` so every check runs again.

    A LightningModule that calls ``save_hyperparameters()`` with a config among its arguments puts the
    config in its checkpoints; this function is on torch's ``weights_only`` allowlist (registered below),
    so those checkpoints load with ``weights_only=True``. A dataclass pickled field by field would need
    the class itself allowlisted, and would skip ``__post_init__``'s checks.
    """
    classes = {"LoRAConfig": LoRAConfig, "QuantizationConfig": QuantizationConfig}
    if kind not in classes or not isinstance(fields, dict):
        raise ValueError(f"A pickled lightning_lora config names {kind!r} with {type(fields).__name__} fields; the checkpoint is corrupted.")
    return classes[kind](**fields)


torch.serialization.add_safe_globals([_rebuild_config])


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str):
        return dtype  # the caller's check then names the bad value
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
