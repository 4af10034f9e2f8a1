"""LoRA on a weight stored as a bare ``nn.Parameter``: the fused 3-D expert weights of MoE models.

transformers v5 keeps the experts of Mixtral, Qwen3-MoE, GPT-OSS and others as one parameter per projection,
``gate_up_proj`` (experts, 2 * intermediate, hidden) and ``down_proj`` (experts, hidden, intermediate), used by
indexing (``weight[expert]``) or grouped matmuls rather than through ``nn.Linear``: module-level LoRA cannot reach
them. ``ParamLoRA`` wraps the module that owns such a parameter and, for the duration of that module's forward,
hands it ``W + scale * delta`` in place of ``W``, so any experts implementation (eager loop, ``grouped_mm``,
``batched_mm``) computes with the adapted weight and gradients flow into A and B.

Layout (PEFT's ``target_parameters`` / ``lora.ParamWrapper``, so files match both ways):

    A: (E * r, in)    B: (out, E * r)
    expert e: A_e = A[e*r:(e+1)*r]  and  B_e = B[:, e::E]  (B's columns are interleaved by expert)
    W[e] += scale * B_e @ A_e                   W of shape (E, out, in), the default layout
    W[e] += scale * (B_e @ A_e).T               W of shape (E, in, out), owners with ``is_transposed=True``

A 2-D parameter (out, in) is one "expert". Several targeted parameters of one module nest: the wrapper of the
parameter registered first is innermost (``experts.base_layer`` for ``gate_up_proj``, ``experts`` for
``down_proj``), as PEFT nests them, so the adapter keys are PEFT's. Dropout cannot apply (the update is folded
into the weight, there is no LoRA input), so ``LoRAConfig`` refuses it with ``target_parameters``.

Memory: like PEFT, the forward materialises the adapted weight (the size of the parameter) once per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_lora._matching import matches_suffix, path_under
from lightning_lora.config import LoRAConfig


@dataclass(frozen=True)
class ParamPlan:
    """One targeted parameter: rank and alpha (after the patterns), its layout, and where its wrapper will sit."""

    r: int
    alpha: float
    num_experts: int
    in_features: int
    out_features: int
    owner: str
    """Path of the module that owns the parameter, in the original model."""
    wrapper: str
    """Path of this parameter's ``ParamLoRA`` in the injected model (``owner`` plus one ``.base_layer`` per wrapper outside it)."""
    depth: int
    """How many wrappers the owner gets in all (the owner's own tensors move under ``.base_layer`` that many times)."""


def parameter_layout(owner: nn.Module, name: str) -> tuple[int, int, int]:
    """(num_experts, in_features, out_features) of ``owner.<name>`` as LoRA sees it."""
    shape = tuple(getattr(owner, name).shape)
    if len(shape) == 3:
        experts, first, second = shape
        # (E, out, in) like a stack of nn.Linear weights, unless the owner says it stores (E, in, out).
        return (experts, first, second) if getattr(owner, "is_transposed", False) else (experts, second, first)
    if len(shape) == 2:
        return 1, shape[1], shape[0]
    raise ValueError(f"`target_parameters` matched a {len(shape)}-D parameter {name!r} of shape {shape}: only 2-D and 3-D weights can get LoRA.")


def find_parameter_targets(model: nn.Module, config: LoRAConfig, forbidden: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Parameter path -> (owner path, parameter name) for every parameter ``config.target_parameters`` matches.

    A key ``module.param`` matches when it equals a target or ends with ``"." + target`` (PEFT's rule). ``forbidden``
    maps paths that may hold no targeted parameter (LoRA layers, modules_to_save) to what they are.
    """
    if not config.target_parameters:
        return {}
    found: dict[str, tuple[str, str]] = {}
    for owner_path, owner in model.named_modules():
        if not owner_path:
            continue  # the root module has no parent to hold its wrapper
        for name, param in owner.named_parameters(recurse=False):
            key = f"{owner_path}.{name}"
            if any(matches_suffix(key, target) for target in config.target_parameters):
                if not param.is_floating_point() or type(param).__name__ in ("Params4bit", "Int8Params"):
                    raise ValueError(
                        f"`target_parameters` matches {key!r}, a {param.dtype} {type(param).__name__}: only floating-point "
                        "(unquantized) parameters can get LoRA this way. Keep it out of quantization or of target_parameters."
                    )
                found[key] = (owner_path, name)
    if not found:
        candidates = sorted({f"{owner.rpartition('.')[2]}.{name}" for owner, module in model.named_modules() for name, p in module.named_parameters(recurse=False) if p.dim() == 3})
        raise ValueError(
            f"`target_parameters`={config.target_parameters!r} matches no parameter of {type(model).__name__}. "
            f"Its 3-D (expert) parameters are {candidates or 'none'}; name them as `module.parameter` suffixes, e.g. 'experts.down_proj'."
        )
    for key, (owner_path, _) in found.items():
        for path, what in forbidden.items():
            if path_under(owner_path, path) or path_under(path, owner_path):
                raise ValueError(
                    f"`target_parameters` matches {key!r}, inside or around {what} {path!r}: a module cannot be adapted "
                    "both ways. Drop it from target_modules / modules_to_save, or narrow target_parameters."
                )
        owner = model.get_submodule(owner_path)
        if any(True for child in owner.children() for _ in child.parameters()):
            raise ValueError(
                f"`target_parameters` matches {key!r}, whose module {type(owner).__name__} also holds submodules with weights: "
                "only modules whose weights are their own parameters (e.g. fused experts) are supported. "
                "Adapt its linear layers with target_modules instead."
            )
    return found


def plan_parameters(model: nn.Module, config: LoRAConfig, found: dict[str, tuple[str, str]], pattern_value) -> dict[str, ParamPlan]:
    """The ``ParamPlan`` of each found parameter, with nesting in the owner's registration order (first = innermost)."""
    by_owner: dict[str, list[str]] = {}
    for key, (owner_path, name) in found.items():
        by_owner.setdefault(owner_path, []).append(name)
    plans: dict[str, ParamPlan] = {}
    for owner_path, names in by_owner.items():
        owner = model.get_submodule(owner_path)
        order = [name for name, _ in owner.named_parameters(recurse=False) if name in names]
        for index, name in enumerate(order):
            key = f"{owner_path}.{name}" if owner_path else name
            experts, in_features, out_features = parameter_layout(owner, name)
            outside = len(order) - 1 - index  # wrappers of later parameters sit outside this one
            wrapper = ".".join(part for part in (owner_path, *(["base_layer"] * outside)) if part)
            plans[key] = ParamPlan(
                r=int(pattern_value(key, config.rank_pattern, config.r)),
                alpha=float(pattern_value(key, config.alpha_pattern, config.alpha)),
                num_experts=experts,
                in_features=in_features,
                out_features=out_features,
                owner=owner_path,
                wrapper=wrapper,
                depth=len(order),
            )
    return plans


class ParamLoRA(nn.Module):
    """Wraps the module owning ``parameter_name`` and adds ``scale * delta`` to that parameter during its forward.

    Example::

        experts = model.model.layers[0].mlp.experts            # gate_up_proj: (E, 2 * I, H)
        wrapped = ParamLoRA(experts, "gate_up_proj", r=4, alpha=8)
        assert wrapped.lora_a.weight.shape == (E * 4, H)        # B is zero: outputs equal the base's at init
    """

    def __init__(
        self,
        base_layer: nn.Module,
        parameter_name: str,
        r: int,
        alpha: float,
        use_rslora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        param = self.base_parameter()
        if not isinstance(param, nn.Parameter) or not param.is_floating_point():
            raise TypeError(f"ParamLoRA needs a floating-point nn.Parameter {parameter_name!r} on {type(self.owner()).__name__}, got {type(param).__name__}.")
        self.num_experts, self.in_features, self.out_features = parameter_layout(self.owner(), parameter_name)
        self.transposed = param.dim() == 3 and bool(getattr(self.owner(), "is_transposed", False))
        self.r = r
        self.alpha = alpha
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        rows = r * self.num_experts
        self.lora_a = nn.Linear(self.in_features, rows, bias=False, device=param.device, dtype=dtype)
        self.lora_b = nn.Linear(rows, self.out_features, bias=False, device=param.device, dtype=dtype)
        self.merged = False
        self.enabled = True
        self.reset_lora_parameters(init)

    @classmethod
    def from_config(cls, base_layer: nn.Module, parameter_name: str, config: LoRAConfig, r: int, alpha: float) -> ParamLoRA:
        return cls(base_layer, parameter_name, r=r, alpha=alpha, use_rslora=config.use_rslora, init=config.init)

    # -- the adapter protocol (as LoRALinear's) -------------------------------------------------------
    @staticmethod
    def adapter_names() -> tuple[str, ...]:
        return ("lora_a.weight", "lora_b.weight")

    @staticmethod
    def adapter_shapes(num_experts: int, in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_a.weight": (r * num_experts, in_features), "lora_b.weight": (out_features, r * num_experts)}

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_a.weight, std=1.0 / self.r)  # std 1/r, not 1/(E*r): PEFT's choice
        else:
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    # -- the wrapped parameter -----------------------------------------------------------------------
    def owner(self) -> nn.Module:
        """The module the parameter belongs to (below any other ``ParamLoRA`` wrapping the same module)."""
        module = self.base_layer
        while isinstance(module, ParamLoRA):
            module = module.base_layer
        return module

    def base_parameter(self) -> torch.Tensor:
        return getattr(self.owner(), self.parameter_name)

    def _path_in_base(self) -> str:
        """The parameter's path relative to ``base_layer`` (through the inner wrappers)."""
        depth, module = 0, self.base_layer
        while isinstance(module, ParamLoRA):
            depth, module = depth + 1, module.base_layer
        return ".".join(["base_layer"] * depth + [self.parameter_name])

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert (lhs, rhs) with ``delta[e] = lhs[e] @ rhs[e]`` in the parameter's layout, in ``dtype``."""
        experts = self.num_experts
        a = self.lora_a.weight.reshape(experts, -1, self.in_features)  # (E, r, in)
        b = self.lora_b.weight.reshape(self.out_features, -1, experts).permute(2, 0, 1)  # (E, out, r)
        lhs, rhs = (a.transpose(-2, -1), b.transpose(-2, -1)) if self.transposed else (b, a)
        return lhs.to(dtype), rhs.to(dtype)

    def adapted_weight(self) -> torch.Tensor:
        """``W + scale * delta`` in the parameter's dtype and layout; differentiable in A and B."""
        weight = self.base_parameter()
        if self.num_experts == 1:
            delta = (self.lora_b.weight @ self.lora_a.weight) * self.scale
            return weight + delta.to(weight.dtype)
        lhs, rhs = self._factors(weight.dtype)
        with torch.autocast(device_type=weight.device.type, enabled=False):  # the weight keeps its dtype
            return torch.baddbmm(weight, lhs, rhs, alpha=self.scale)

    def delta_weight(self) -> torch.Tensor:
        """``scale * delta`` as float32, in the parameter's layout."""
        if self.num_experts == 1:
            return (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scale
        lhs, rhs = self._factors(torch.float32)
        return torch.bmm(lhs, rhs) * self.scale

    def forward(self, *args, **kwargs):
        if self.merged or not self.enabled:
            return self.base_layer(*args, **kwargs)
        # The owner computes with the adapted weight in place of its parameter for this call only.
        return torch.func.functional_call(self.base_layer, {self._path_in_base(): self.adapted_weight()}, args, kwargs, strict=False)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_parameter()
        weight += self.delta_weight().to(device=weight.device, dtype=weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_parameter()
        weight -= self.delta_weight().to(device=weight.device, dtype=weight.dtype)
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """The parameter plus the update, float32; the layer is left as it is."""
        weight = self.base_parameter().detach().float()
        return weight if self.merged else weight + self.delta_weight().to(weight.device)

    def extra_repr(self) -> str:
        return (
            f"parameter={self.parameter_name!r}, experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
            f"r={self.r}, scale={self.scale:g}, merged={self.merged}"
        )


def param_lora_layers(model: nn.Module) -> dict[str, ParamLoRA]:
    """Every ``ParamLoRA`` of ``model`` by its module path (nested ones included)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ParamLoRA)}


def merged_owner_state(wrapper: ParamLoRA) -> dict[str, torch.Tensor]:
    """The owner's state dict with every targeted parameter merged, keyed as in the original model (relative to the owner).

    ``wrapper`` is the outermost ``ParamLoRA`` of the owner.
    """
    merged = {}
    module = wrapper
    while isinstance(module, ParamLoRA):
        merged[module.parameter_name] = module.merged_weight()
        module = module.base_layer
    state = {key: value.detach() for key, value in module.state_dict().items()}
    state.update(merged)
    return state
