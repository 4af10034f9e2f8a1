"""Initialisations of A and B from the base weight (PiSSA, OLoRA), and turning such an adapter into plain LoRA.

Both move the part of the base weight ``W`` (out, in) that A and B now hold out of the base, so the
wrapped layer still computes ``W x`` at init:

- PiSSA (Meng et al., 2024, "PiSSA: Principal Singular values and Singular vectors Adaptation"):
  ``W = U S V^T``; with the top r singular values, ``B = U_r sqrt(S_r / scale)`` and
  ``A = sqrt(S_r / scale) V_r^T``, so ``scale * B @ A`` is W's best rank-r approximation. 'pissa_niter_K'
  takes the factors from a randomized SVD with K subspace iterations (Halko et al., 2011), much faster
  on large layers.
- OLoRA (Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation"): ``W = Q R``; ``B = Q[:, :r]``,
  ``A = R[:r]``.

The base then holds the residual ``W_res = W - scale * B0 @ A0``. A trained adapter (A, B) on ``W_res``
equals plain LoRA on the original W with ``scale * B' @ A' = scale * (B @ A - B0 @ A0)``, i.e.
``A' = [A; A0]`` (2r, in) and ``B' = [B, -B0]`` (out, 2r), at rank 2r with the same scale
(``convert_to_lora``); that adapter applies to the untouched base like any LoRA adapter.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lightning_lora import quantization
from lightning_lora.config import LoRAConfig, init_changes_base, pissa_niter

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_init(init: str, path: str, base: nn.Module, r: int, features: tuple[int, int], will_quantize: bool = False) -> None:
    """Raise a ValueError before anything changes if the base layer at ``path`` ((in, out) ``features``) cannot be
    initialised with ``init`` at rank ``r``. ``will_quantize``: injection is about to quantize this layer."""
    if not init_changes_base(init):
        return
    in_features, out_features = features
    if r > min(in_features, out_features):
        raise ValueError(
            f"`init`={init!r} takes r={r} factors of {path!r}'s weight ({out_features} x {in_features}), which has at "
            f"most {min(in_features, out_features)}: lower `r` (or its `rank_pattern` entry) to at most that."
        )
    quantized = will_quantize or quantization.is_quantized(base)
    if init.startswith("pissa") and quantized:
        raise ValueError(
            f"`init`={init!r} needs the full-precision base weight, but {path!r} is (or is to be) quantized by bitsandbytes: "
            "PiSSA's SVD runs on the float weight, and its residual should be quantized afterwards, not the original. "
            "Initialise on the full-precision model and quantize the residual after, or use init='olora' (which "
            "dequantizes and requantizes) or 'kaiming' on a quantized base."
        )
    if init == "olora" and type(base).__name__ == "Conv1D":
        raise ValueError(
            f"`init`='olora' does not support {path!r}, a transformers Conv1D (weight stored (in, out)): PEFT's OLoRA "
            "factors that layout into A and B of the wrong shapes, so no adapter could match it. Use init='pissa' "
            "(which handles Conv1D) or 'kaiming' for GPT-2 style models."
        )
    weight = getattr(base, "weight", None)
    if not quantized and (weight is None or weight.dtype not in _FLOAT_DTYPES):
        raise ValueError(f"`init`={init!r} needs a float32/float16/bfloat16 base weight; {path!r} holds {getattr(weight, 'dtype', None)}.")


@torch.no_grad()
def init_factors(layer: nn.Module, adapter: nn.Module, init: str) -> None:
    """Set ``adapter``'s A and B from ``layer``'s base weight by ``init`` ('pissa', 'pissa_niter_K', 'olora'); the base
    is not changed yet (``write_residual`` does that). ``layer`` is a ``LoRALinear``, ``adapter`` the module holding A and B."""
    weight = _base_weight(layer)  # (out, in) float32, a copy
    r, scale = adapter.r, adapter.scale
    if init == "olora":
        q, rr = torch.linalg.qr(weight)
        b, a = q[:, :r], rr[:r]
    else:
        niter = pissa_niter(init)
        if niter is None:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # weight = u diag(s) vh
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
            vh = v.t()
        root = torch.sqrt(s / scale)  # so that scale * B @ A = u diag(s) vh
        b, a = u * root, root[:, None] * vh
    adapter.lora_a.weight.data = a.contiguous().to(adapter.lora_a.weight.dtype)
    adapter.lora_b.weight.data = b.contiguous().to(adapter.lora_b.weight.dtype)


@torch.no_grad()
def write_residual(layer: nn.Module, adapter: nn.Module) -> None:
    """After ``init_factors``: the base becomes ``W - scale * B @ A`` for the A and B ``init_factors`` set (requantized
    for bitsandbytes layers), so the layer still computes ``W x``."""
    base = layer.base_layer
    weight = _base_weight(layer)
    residual = weight - adapter.scale * (adapter.lora_b.weight.float() @ adapter.lora_a.weight.float())
    if quantization.is_quantized(base):
        quantization.requantize_weight(base, residual)
    else:
        residual = residual.t() if layer.fan_in_fan_out else residual
        base.weight.data = residual.contiguous().to(base.weight.dtype)


def _base_weight(layer: nn.Module) -> torch.Tensor:
    base = layer.base_layer
    if quantization.is_quantized(base):
        return quantization.dequantize_weight(base)
    weight = base.weight.detach().float().clone()
    return weight.t().contiguous() if layer.fan_in_fan_out else weight


# -- back to plain LoRA -------------------------------------------------------------------------------
def converted_config(config: LoRAConfig) -> LoRAConfig:
    """The config of ``convert_to_lora``'s adapter: rank 2r, the same scale, the default init."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "Converting to plain LoRA is not possible with `use_rslora`=True together with `rank_pattern` / "
            "`alpha_pattern` (as in PEFT): doubling the ranks changes alpha / sqrt(r) per module. Save the adapter "
            "as it is (it applies to the residual base its init left), or train without the patterns."
        )
    if config.use_dora:
        raise ValueError(
            "Converting to plain LoRA is not possible with `use_dora`=True: DoRA rescales the whole adapted weight "
            "by a trained magnitude, which a difference of two low-rank products cannot express. Save the adapter "
            "as it is: it applies to the residual base its init left."
        )
    # alpha / r stays alpha / r at 2r with 2 alpha; with rsLoRA alpha / sqrt(r) needs sqrt(2) alpha.
    factor = 2**0.5 if config.use_rslora else 2
    return dataclasses.replace(
        config,
        r=2 * config.r,
        alpha=config.alpha * factor,
        init="kaiming",
        rank_pattern={key: 2 * value for key, value in config.rank_pattern.items()},
        alpha_pattern={key: 2 * value for key, value in config.alpha_pattern.items()},
    )


def convert_to_lora(config: LoRAConfig, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """A PiSSA / OLoRA adapter as plain LoRA on the original base: ``(converted_config(config), tensors)``.

    ``tensors``: the trained adapter (keys as ``adapter_state_dict``); ``initial``: its A and B right after the
    init, same keys. Every ``*.lora_a.weight`` becomes ``[A; A0]``, every ``*.lora_b.weight`` ``[B, -B0]``;
    other tensors (biases, ``modules_to_save``) are kept as they are.
    """
    new_config = converted_config(config)
    missing = [key for key in tensors if key.endswith((".lora_a.weight", ".lora_b.weight")) and key not in initial]
    if missing:
        raise ValueError(f"The initial adapter lacks {len(missing)} tensors of the trained one (first: {missing[0]!r}): it is another adapter.")
    out = {}
    for key, value in tensors.items():
        if key.endswith(".lora_a.weight"):
            out[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif key.endswith(".lora_b.weight"):
            out[key] = torch.cat([value, -initial[key].to(value)], dim=1)
        else:
            out[key] = value
    return new_config, out
