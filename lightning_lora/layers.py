"""The LoRA layer: a frozen base linear plus a trainable low-rank update.

    y = base(x) + scale * B(A(dropout(x)))        A: (r, in), B: (out, r), scale = alpha / r

(Hu et al., 2021, "LoRA", eq. 3). A starts like an ``nn.Linear`` weight (kaiming-uniform, a=sqrt(5)),
B starts at zero, so a freshly wrapped model computes exactly what the base model computes.
The base may be an ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored (in, out)), or a
bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.

A layer can hold several named adapters, one of them active. The one named 'default' lives on the
layer itself (``lora_a``, ``lora_b``, and with DoRA ``lora_magnitude``), so a single-adapter model keeps
the keys it always had; any other lives in a small ``LoRAAdapter`` holder under ``adapters.<name>``.
Both carry the same attributes (``lora_a``, ``lora_b``, ``lora_magnitude``, ``dropout``, ``r``,
``alpha``, ``scale``, ``use_dora``), which is all the forward, the routes and DoRA read.

This file is the reference: what the layer computes, merges and saves. The faster routes its
forward picks (a fused autograd node, the no-grad weight route) and their guards are in ``_routes``;
DoRA's math is in ``dora``, the PiSSA / OLoRA inits in ``inits``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_lora import _routes, dora, inits, quantization
from lightning_lora._members import member
from lightning_lora.config import LoRAConfig, init_changes_base

DEFAULT_ADAPTER = "default"
BASE_ONLY = "__base__"
"""In a per-sample list of adapter names (``adapters.per_sample_adapters``): this sample gets the base model alone."""
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name: object) -> None:
    """Raise a ValueError unless ``name`` can name an adapter: letters, digits, '_' and '-' (it becomes a module
    name and, on disk, a folder name), and not one of nn.ModuleDict's attributes or the base-model marker."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ONLY or hasattr(nn.ModuleDict, name):
        raise ValueError(
            f"`adapter_name` must be letters, digits, '_' or '-' (not {BASE_ONLY!r} or a ModuleDict attribute), got {name!r}. "
            "Name adapters like 'default', 'sql' or 'task-2'."
        )


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if _is_conv1d(base):
        in_features, out_features = base.weight.shape  # Conv1D stores (in, out)
        return in_features, out_features
    return base.in_features, base.out_features


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module) or quantization.is_quantized(module)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so the core needs no transformers import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _add_adapter_parts(
    owner: nn.Module, in_features: int, out_features: int, r: int, alpha: float, dropout: float, use_rslora: bool,
    use_dora: bool, device: torch.device | None, dtype: torch.dtype,
) -> None:
    """Give ``owner`` (a LoRALinear for its default adapter, or a LoRAAdapter) one adapter's tensors and settings."""
    owner.r, owner.alpha, owner.use_dora = r, alpha, use_dora
    owner.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    owner.lora_a = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
    owner.lora_b = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
    # DoRA's magnitude, one per output row (set by dora.init_magnitude once A and B have their init).
    owner.lora_magnitude = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype)) if use_dora else None
    owner.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


def _random_factors(adapter: nn.Module, init: str) -> None:
    """A random, B zero: ``init`` 'gaussian' (std 1 / r) or Kaiming-uniform (PEFT's default)."""
    if init == "gaussian":
        nn.init.normal_(adapter.lora_a.weight, std=1.0 / adapter.r)
    else:
        nn.init.kaiming_uniform_(adapter.lora_a.weight, a=math.sqrt(5))
    nn.init.zeros_(adapter.lora_b.weight)


def _clear_adapter_parts(owner: nn.Module) -> None:
    owner.r = owner.alpha = owner.scale = None
    owner.use_dora = False
    owner.lora_a = owner.lora_b = owner.lora_magnitude = None
    owner.dropout = nn.Identity()


class LoRAAdapter(nn.Module):
    """One named adapter of a ``LoRALinear`` besides its default one: A, B, DoRA's magnitude, dropout, scale.

    Example::

        layer.adapters["sql"] = LoRAAdapter(64, 32, r=4, alpha=8)   # what LoRALinear.add_adapter does
    """

    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        use_dora: bool = False, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _add_adapter_parts(self, in_features, out_features, r, alpha, dropout, use_rslora, use_dora, device, dtype)
        self.pending_init = False  # built with its PiSSA / OLoRA residual not yet written (``LoRALinear.build_adapter``)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, dora={self.use_dora}"


class LoRALinear(nn.Module):
    """Wraps a base linear layer and adds ``scale * lora_b(lora_a(dropout(x)))`` of its active adapter to its output.

    Example::

        layer = LoRALinear(nn.Linear(64, 32), r=4, alpha=8)
        assert torch.equal(layer(x), layer.base_layer(x))  # B is zero at init
        layer.add_adapter("sql", r=8, alpha=16, use_dora=True)
        layer.active_adapter = "sql"  # models switch all layers with adapters.set_active_adapter
    """

    #: Inference on a GPU, 4-bit base: up to this many ``tokens * in_features * out_features`` multiply-adds the
    #: update is added to the weight bitsandbytes dequantizes anyway, saving a kernel launch where the host, not the
    #: GPU, sets the pace (``_routes.folds``). The default covers 512 tokens through every Llama-2-7B projection
    #: (measured on an H200, where that forward is host-bound); the fold adds a pass over the weight, so lower it where
    #: the GPU rather than the host bounds small batches. 0 turns it off (set it on the class, or on one layer).
    fold_below_macs: int = 2**35

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype = torch.float32,
        use_dora: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
        defer_residual: bool = False,
    ) -> None:
        super().__init__()
        if not is_supported_base(base_layer):
            raise TypeError(
                f"LoRALinear cannot wrap {type(base_layer).__name__}: supported bases are nn.Linear, "
                "transformers Conv1D and bitsandbytes Linear4bit / Linear8bitLt."
            )
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r!r}. Set it to e.g. 8.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"`alpha` must be a finite positive number, got {alpha!r}. Set it to e.g. 2 * r.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}. Use 0.0 to disable it.")
        if not isinstance(use_rslora, bool):
            raise TypeError(f"`use_rslora` must be True or False, got {use_rslora!r}.")
        if quantization.is_4bit(base_layer):
            quantization.keep_standard_layout(base_layer)  # also for layers quantized by transformers
            quantization.load_4bit_state(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_features(base_layer)
        self.fan_in_fan_out = _is_conv1d(base_layer)
        _clear_adapter_parts(self)  # the default adapter's slot; add_adapter fills it
        self.adapters = nn.ModuleDict()  # the named adapters besides the default one
        self.active_adapter = adapter_name
        self.sample_adapters: list[tuple[str, list[int]]] | None = None  # per-sample adapters of a mixed batch
        self.merged = False
        self.enabled = True
        self.fused = True  # train through the fused node where it applies (``fused_training`` switches it)
        self._quantized_snapshot: dict[str, Any] | None = None
        self._dora_factor: torch.Tensor | None = None  # m / ||W + dW|| at merge time, to unmerge a float DoRA weight
        self._pending_init: list[str] = []  # adapters whose PiSSA / OLoRA residual is still to be written into the base
        self.add_adapter(
            adapter_name, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=use_dora, dtype=dtype,
            defer_residual=defer_residual,
        )  # fmt: skip
        self.train(base_layer.training)  # a wrapped eval-mode model stays in eval mode

    @classmethod
    def from_config(
        cls, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float, adapter_name: str = DEFAULT_ADAPTER, defer_residual: bool = False
    ) -> LoRALinear:
        """The layer ``config`` asks for around ``base_layer``, with this layer's rank and alpha (after the patterns)."""
        return cls(base_layer, r=r, alpha=alpha, dropout=config.dropout, use_rslora=config.use_rslora, init=config.init,
                   use_dora=config.use_dora, adapter_name=adapter_name, defer_residual=defer_residual)  # fmt: skip

    # -- the adapter protocol: which of the layer's tensors are the adapter ------------------------------
    @staticmethod
    def adapter_names(bias: str = "none", use_dora: bool = False, adapter_name: str = DEFAULT_ADAPTER) -> tuple[str, ...]:
        """Names, relative to the layer, of its tensors that train and are saved for adapter ``adapter_name``: A and B,
        DoRA's magnitude, and with ``bias='lora_only'`` the base layer's bias (``inject.InjectionPlan`` turns these
        into the model's rule)."""
        prefix = adapter_prefix(adapter_name)
        names = [f"{prefix}lora_a.weight", f"{prefix}lora_b.weight"] + ([f"{prefix}lora_magnitude"] if use_dora else [])
        return (*names, "base_layer.bias") if bias == "lora_only" else tuple(names)

    @staticmethod
    def adapter_shapes(in_features: int, out_features: int, r: int, use_dora: bool = False, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, tuple[int, ...]]:
        """Shapes of A, B (and DoRA's magnitude) for a base of ``in_features`` -> ``out_features`` at rank ``r``."""
        prefix = adapter_prefix(adapter_name)
        shapes = {f"{prefix}lora_a.weight": (r, in_features), f"{prefix}lora_b.weight": (out_features, r)}
        return shapes | ({f"{prefix}lora_magnitude": (out_features,)} if use_dora else {})

    # -- adapters by name ------------------------------------------------------------------------------
    def get_adapter(self, name: str) -> nn.Module | None:
        """The module holding adapter ``name`` (the layer itself for 'default'), or None if this layer lacks it."""
        if name == DEFAULT_ADAPTER:
            return self if member(self, "lora_a") is not None else None
        adapters = member(self, "adapters")
        return adapters[name] if name in adapters else None

    def adapter_items(self) -> list[tuple[str, nn.Module]]:
        """(name, holder) of every adapter of this layer, the default one first."""
        default = [(DEFAULT_ADAPTER, self)] if self.lora_a is not None else []
        return default + list(self.adapters.items())

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming",
        use_dora: bool = False, dtype: torch.dtype = torch.float32, defer_residual: bool = False,
    ) -> nn.Module:
        """Add adapter ``name`` (not active until ``active_adapter`` names it) and initialise it; returns its holder.

        ``defer_residual``: a PiSSA / OLoRA init takes A and B from the base weight now but leaves the base as it is
        until ``apply_pending_init`` (so that building every layer first changes nothing: ``inject_lora``)."""
        return self.attach_adapter(name, self.build_adapter(r, alpha, dropout, use_rslora, init, use_dora, dtype, defer_residual))

    def build_adapter(
        self, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming",
        use_dora: bool = False, dtype: torch.dtype = torch.float32, defer_residual: bool = False,
    ) -> LoRAAdapter:
        """A new adapter for this layer, initialised from its base but not attached: nothing of the layer changes
        (a PiSSA / OLoRA residual is then always deferred when ``defer_residual``, see ``add_adapter``)."""
        device = self.base_layer.weight.device
        # Made on the CPU and moved, as PEFT makes its adapters: a seed then gives PEFT's A on any device, and the
        # device's random stream is left as PEFT leaves it for randomized inits (PiSSA's svd_lowrank draws from it).
        staged = device.type not in ("cpu", "meta")
        adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora, use_dora, "cpu" if staged else device, dtype)
        if staged:
            if not init_changes_base(init):
                _random_factors(adapter, init)
            adapter.to(device)
        adapter.pending_init = self._init_adapter(adapter, init, defer_residual, random_done=staged)
        return adapter

    def attach_adapter(self, name: str, adapter: LoRAAdapter) -> nn.Module:
        """Make ``adapter`` (from ``build_adapter``) this layer's adapter ``name``; returns its holder ('default' is
        held by the layer itself). A deferred residual is written by the next ``apply_pending_init``."""
        check_adapter_name(name)
        if self.get_adapter(name) is not None:
            raise ValueError(f"This layer already has an adapter named {name!r}: delete it first or pick another name.")
        pending, adapter.pending_init = adapter.pending_init, False
        if name == DEFAULT_ADAPTER:
            self.r, self.alpha, self.scale, self.use_dora = adapter.r, adapter.alpha, adapter.scale, adapter.use_dora
            self.lora_a, self.lora_b, self.dropout = adapter.lora_a, adapter.lora_b, adapter.dropout
            self.lora_magnitude = adapter.lora_magnitude
            adapter = self
        else:
            self.adapters[name] = adapter
        if pending:
            self._pending_init.append(name)
        return adapter

    def apply_pending_init(self) -> None:
        """Write the residuals that deferred PiSSA / OLoRA inits left to write into the base (then DoRA's magnitude,
        which is taken on the residual base)."""
        for name in self._pending_init:
            adapter = self.get_adapter(name)
            inits.write_residual(self, adapter)
            if adapter.use_dora:
                dora.init_magnitude(self, adapter)
        self._pending_init = []

    def delete_adapter(self, name: str) -> None:
        if self.get_adapter(name) is None:
            raise ValueError(f"This layer has no adapter named {name!r}; it has {[n for n, _ in self.adapter_items()]}.")
        if name == DEFAULT_ADAPTER:
            _clear_adapter_parts(self)
        else:
            del self.adapters[name]

    def reset_lora_parameters(self, init: str = "kaiming", adapter_name: str = DEFAULT_ADAPTER) -> None:
        """Initialise adapter ``adapter_name``: A and B by ``init`` (PiSSA / OLoRA also rewrite the base weight into
        the residual), then DoRA's magnitude to the row norms of the adapted weight."""
        self._init_adapter(self.get_adapter(adapter_name), init, defer_residual=False)

    def _init_adapter(self, adapter: nn.Module, init: str, defer_residual: bool, random_done: bool = False) -> bool:
        """Initialise ``adapter``'s tensors for this layer's base; True if a PiSSA / OLoRA residual was left to write
        (``defer_residual``), in which case DoRA's magnitude waits for it too. ``random_done``: A and B already have
        their random init (``build_adapter`` draws it on the CPU)."""
        if init_changes_base(init):
            inits.init_factors(self, adapter, init)
            if defer_residual:
                return True
            inits.write_residual(self, adapter)
        elif not random_done:
            _random_factors(adapter, init)
        if adapter.use_dora:
            dora.init_magnitude(self, adapter)
        return False

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        if self.sample_adapters is not None:
            return self._mixed_batch_forward(x)
        adapter = self.get_adapter(self.active_adapter)
        if adapter is None:  # the active adapter does not reach this layer
            return self.base_layer(x)
        lora_a, lora_b = member(adapter, "lora_a"), member(adapter, "lora_b")  # adapter.lora_a, with less host time
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            # Wrapped adapters (e.g. FSDP1 units) hold their full weights only inside their own forward.
            if adapter.use_dora:
                raise RuntimeError("DoRA reads A and B as weights, which FSDP1 units do not hold outside their forward: use FSDP2 (ModelParallelStrategy) or DDP.")
            out = self.base_layer(x)
            return out + (lora_b(lora_a(adapter.dropout(x))) * adapter.scale).to(out.dtype)
        if adapter.use_dora:  # plain ops: every route below is for the additive update only
            return dora.output(self, adapter, x, self.base_layer(x))
        a, b = member(lora_a, "weight"), member(lora_b, "weight")
        if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad):
            return _routes.no_grad(self, adapter, x, a, b)
        # Compiled graphs get the plain ops: inductor fuses them itself, and the custom autograd node
        # traced into a compiled graph on CUDA lost gradients (benchmarks/profile_step.py checks this). A compiled nf4
        # base takes its own small node instead (``unfused_training`` says when; its gradients are checked on CUDA).
        if not torch.compiler.is_compiling() and _routes.fusable(self, adapter):
            return _routes.fused_training(self, adapter, x, a, b)
        return _routes.unfused_training(self, adapter, x, a, b)

    def _mixed_batch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample (first dimension of ``x``) through its own adapter, as ``sample_adapters`` assigns them."""
        count = sum(len(index) for _, index in self.sample_adapters)
        if x.shape[0] != count:
            raise ValueError(f"The batch has {x.shape[0]} samples but the per-sample adapter list names {count}: pass one name per sample.")
        base_out = self.base_layer(x)
        out = base_out.clone()
        for name, index in self.sample_adapters:
            adapter = self.get_adapter(name) if name != BASE_ONLY else None
            if adapter is None:
                continue
            rows = torch.tensor(index, device=x.device)
            sub_x, sub_base = x[rows], base_out[rows]
            if adapter.use_dora:
                out[rows] = dora.output(self, adapter, sub_x, sub_base)
            else:
                a, b = adapter.lora_a.weight.to(sub_x.dtype), adapter.lora_b.weight.to(sub_x.dtype)
                update = torch.nn.functional.linear(torch.nn.functional.linear(adapter.dropout(sub_x), a), b) * adapter.scale
                out[rows] = sub_base + update.to(sub_base.dtype)
        return out

    # -- merging ---------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``scale * B @ A`` of an adapter (default: the active one) as float32, laid out like ``nn.Linear.weight``: (out, in)."""
        return dora.lora_delta(self.get_adapter(adapter_name or self.active_adapter))

    def _adapted(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The (out, in) float32 ``weight`` with ``adapter`` folded in: ``W + dW``, or DoRA's ``m / ||W + dW|| (W + dW)``."""
        if adapter.use_dora:
            return dora.adapted_weight(weight, adapter)[0]
        return weight + dora.lora_delta(adapter).to(weight.device)

    @torch.no_grad()
    def merge(self) -> float | None:
        """Fold the active adapter into the base weight. Returns the relative rounding error for quantized bases."""
        adapter = self.get_adapter(self.active_adapter)
        if self.merged or adapter is None:
            return None
        error = None
        base = self.base_layer
        if quantization.is_quantized(base):
            self._quantized_snapshot = quantization.snapshot_quantized(base)
            target = self._adapted(adapter, quantization.dequantize_weight(base))
            quantization.requantize_weight(base, target)
            rounded = quantization.dequantize_weight(base)
            error = ((rounded - target).norm() / target.norm().clamp_min(1e-12)).item()
        elif adapter.use_dora:
            new, self._dora_factor = dora.adapted_weight(dora.base_weight(self), adapter)
            base.weight.copy_((new.t() if self.fan_in_fan_out else new).to(base.weight.dtype))
        else:
            delta = dora.lora_delta(adapter)
            base.weight += (delta.t() if self.fan_in_fan_out else delta).to(base.weight.dtype)
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``. Quantized bases get their original quantized weight back, bit for bit."""
        if not self.merged:
            return
        base = self.base_layer
        adapter = self.get_adapter(self.active_adapter)
        if quantization.is_quantized(base):
            quantization.restore_quantized(base, self._quantized_snapshot)
            self._quantized_snapshot = None
        else:
            delta = dora.lora_delta(adapter)
            if adapter.use_dora:  # W' = f (W + dW)  ->  W = W' / f - dW, with f from merge time
                original = dora.base_weight(self) / self._dora_factor[:, None] - delta
                base.weight.copy_((original.t() if self.fan_in_fan_out else original).to(base.weight.dtype))
                self._dora_factor = None
            else:
                base.weight -= (delta.t() if self.fan_in_fan_out else delta).to(base.weight.dtype)
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the active adapter folded in, float32, in the base layer's own layout; the layer is left as is.

        For quantized bases the update is added to the dequantized original weight, so the result
        carries no second rounding (unlike the weight ``merge`` writes back).
        """
        base = self.base_layer
        adapter = self.get_adapter(self.active_adapter)
        if not quantization.is_quantized(base):
            weight = base.weight.detach().float()
            if self.merged or adapter is None:
                return weight
            weight = weight.t() if self.fan_in_fan_out else weight
            adapted = self._adapted(adapter, weight)
            return adapted.t() if self.fan_in_fan_out else adapted
        weight = quantization.dequantize_weight(base, self._quantized_snapshot if self.merged else None)
        return weight if adapter is None else self._adapted(adapter, weight)

    def extra_repr(self) -> str:
        names = [f"{name}(r={a.r}, scale={a.scale:g}{', dora' if a.use_dora else ''})" for name, a in self.adapter_items()]
        return f"in={self.in_features}, out={self.out_features}, adapters=[{', '.join(names)}], active={self.active_adapter!r}, merged={self.merged}"


def adapter_prefix(adapter_name: str) -> str:
    """Where adapter ``adapter_name``'s tensors sit inside a LoRALinear: '' for the default one, else 'adapters.<name>.'."""
    return "" if adapter_name == DEFAULT_ADAPTER else f"adapters.{adapter_name}."


_LAYER_TENSORS = ("lora_a.weight", "lora_b.weight", "lora_magnitude")


def to_adapter_key(key: str, adapter_name: str) -> str:
    """A layer tensor's key as the default adapter names it (``x.lora_a.weight``, as in adapter files) -> as adapter
    ``adapter_name`` holds it in the model (``x.adapters.<name>.lora_a.weight``); other keys are returned as they are."""
    for leaf in _LAYER_TENSORS:
        if key.endswith("." + leaf):
            return key[: -len(leaf)] + adapter_prefix(adapter_name) + leaf
    return key


def to_default_key(key: str, adapter_name: str) -> str:
    """The inverse of ``to_adapter_key``."""
    prefix = adapter_prefix(adapter_name)
    for leaf in _LAYER_TENSORS:
        if key.endswith("." + prefix + leaf):
            return key[: -len(prefix + leaf)] + leaf
    return key


@contextmanager
def fused_training(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Inside the block, every LoRA layer of ``model`` trains through the fused node (``enabled``) or plain ops.

    The fused node is the default wherever it applies; benchmarks and tests turn it off to compare.
    ``with fused_training(model, False): loss = model(x).sum()``
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    previous = [layer.fused for layer in layers]
    for layer in layers:
        layer.fused = bool(enabled)
    try:
        yield model
    finally:
        for layer, fused in zip(layers, previous):
            layer.fused = fused


def require_unmerged(model: nn.Module, caller: str) -> None:
    """Raise if any LoRA layer of ``model`` is merged: changing A or B then would make ``unmerge`` subtract
    another update than the one merged in, corrupting the frozen base weight."""
    merged = [name for name, layer in lora_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(
            f"`{caller}` got a model whose LoRA is merged into the base weights ({len(merged)} layers, first: {merged[0]!r}): "
            "changing the adapter now would corrupt the base at the next unmerge. Call `unmerge_lora(model)` first "
            "(and `merge_lora(model)` again afterwards)."
        )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of ``model`` by its module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}
