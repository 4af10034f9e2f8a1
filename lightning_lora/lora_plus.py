"""LoRA+: train the B matrices at ``lr_ratio`` times the learning rate of the A matrices.

Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models" (arXiv:2402.12354): with A and B at one
learning rate, B learns too slowly for wide models; the paper sets lr_B = 16 * lr_A as a default. The groups follow
PEFT's ``create_loraplus_optimizer`` (PEFT 0.21), so the same run gets the same per-parameter learning rates:

    at ``lr``:               A matrices and every other trained matrix (modules_to_save weights, trained token rows)
    at ``lr * lr_ratio``:    B matrices and every trained 1-D tensor (biases, norm weights, DoRA's magnitude)
    weight decay:            ``weight_decay`` everywhere except biases and ``nn.LayerNorm`` weights (no decay)

Two ways in: ``lora_plus_param_groups(model, lr, lr_ratio)`` builds the groups for ``configure_optimizers``;
``split_param_group`` splits a group an optimizer is being built with, which is how ``LoRACallback(lora_plus_ratio=...)``
/ ``LoRAMixin.lora_plus_ratio`` apply LoRA+ to the user's own optimizer, before any scheduler sees it.
Every group made here carries ``"lora_plus_ratio"`` (1.0 for the A side), so a group is never split twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_lora.layers import LoRAAdapter, LoRALinear
from lightning_lora.param_lora import ParamLoRA

RATIO_KEY = "lora_plus_ratio"


def _check(name: str, value: Any, minimum_exclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0):
        bound = "positive" if minimum_exclusive else "non-negative"
        raise ValueError(f"`{name}` must be a {bound} finite number, got {value!r}. LoRA+ uses e.g. lr_ratio=16.")
    return float(value)


def check_lr_ratio(lr_ratio: Any) -> float:
    """``lr_ratio`` validated (a positive finite number)."""
    return _check("lr_ratio", lr_ratio)


def b_side_parameters(model: nn.Module) -> set[int]:
    """ids of the trainable tensors LoRA+ speeds up: every LoRA B matrix (of every named adapter), and every trainable
    1-D tensor (DoRA's magnitude too, as in PEFT)."""
    trainable = _trainable(model)
    holders = (LoRALinear, LoRAAdapter, ParamLoRA)
    ids = {id(m.lora_b.weight) for m in model.modules() if isinstance(m, holders) and m.lora_b is not None}
    ids |= {id(p) for p in trainable if p.dim() == 1}
    return ids & {id(p) for p in trainable}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _no_decay(model: nn.Module) -> set[int]:
    """ids of the parameters PEFT (through transformers' ``get_parameter_names``) leaves without weight decay."""
    in_layer_norm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    return in_layer_norm | {id(p) for name, p in model.named_parameters() if "bias" in name}


def lora_plus_param_groups(model: nn.Module, lr: float, lr_ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ over ``model``'s trainable parameters.

    Example::

        def configure_optimizers(self):
            return torch.optim.AdamW(lora_plus_param_groups(self, lr=2e-4, lr_ratio=16))
    """
    lr = _check("lr", lr)
    lr_ratio = check_lr_ratio(lr_ratio)
    weight_decay = _check("weight_decay", weight_decay, minimum_exclusive=False)
    fast = b_side_parameters(model)
    if not any(isinstance(m, (LoRALinear, ParamLoRA)) for m in model.modules()):
        raise ValueError(f"`model` ({type(model).__name__}) has no LoRA layers: call `inject_lora` (or let the callback inject) before building LoRA+ groups.")
    no_decay = _no_decay(model)
    slow, fast_decay, fast_plain = [], [], []
    for param in _trainable(model):
        if id(param) not in fast:
            slow.append(param)
        elif id(param) in no_decay:
            fast_plain.append(param)
        else:
            fast_decay.append(param)
    groups = [
        {"params": slow, "lr": lr, "weight_decay": weight_decay, RATIO_KEY: 1.0},
        {"params": fast_decay, "lr": lr * lr_ratio, "weight_decay": weight_decay, RATIO_KEY: lr_ratio},
        {"params": fast_plain, "lr": lr * lr_ratio, "weight_decay": 0.0, RATIO_KEY: lr_ratio},
    ]
    return [group for group in groups if group["params"]]


def split_param_group(group: dict[str, Any], fast: set[int], lr_ratio: float, default_lr: Any) -> list[dict[str, Any]]:
    """``group`` as one or two groups: its B-side tensors (ids in ``fast``) apart, at ``lr_ratio`` x its learning rate.

    Every other setting of the group is kept for both halves. A group that LoRA+ made already, or that holds no
    B-side tensor, comes back as it is.
    """
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if RATIO_KEY in group or not any(id(p) in fast for p in params):
        return [group]
    lr = group.get("lr", default_lr)
    slow = [p for p in params if id(p) not in fast]
    quick = [p for p in params if id(p) in fast]
    halves = [{**group, "params": slow, RATIO_KEY: 1.0}] if slow else []
    halves.append({**group, "params": quick, "lr": lr * lr_ratio, RATIO_KEY: lr_ratio})
    return halves


def groups_missing_ratio(optimizers: Iterable[torch.optim.Optimizer], fast: set[int], lr_ratio: float) -> list[str]:
    """What keeps LoRA+ from holding in ``optimizers``: B-side tensors in a group without the ratio, or a scheduler
    that gave both halves of a split group the same starting learning rate. Empty when all is well."""
    problems = []
    optimizers = list(optimizers)
    held = {id(p) for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]}
    if optimizers and fast and not fast & held:
        problems.append("no optimizer holds a LoRA B matrix as its own tensor (flattened parameters, e.g. FSDP with use_orig_params=False)")
    for index, optimizer in enumerate(optimizers):
        groups = optimizer.param_groups
        unsplit = sum(1 for g in groups if g.get(RATIO_KEY) is None for p in g["params"] if id(p) in fast)
        if unsplit:
            problems.append(f"optimizer {index} ({type(optimizer).__name__}) holds {unsplit} B-side tensors in groups LoRA+ did not split")
        for slow, quick in zip(groups, groups[1:]):
            if slow.get(RATIO_KEY) == 1.0 and quick.get(RATIO_KEY) == lr_ratio and "initial_lr" in slow and "initial_lr" in quick:
                expected = slow["initial_lr"] * lr_ratio
                if not math.isclose(float(quick["initial_lr"]), float(expected), rel_tol=1e-6):
                    problems.append(
                        f"optimizer {index}: a scheduler set the B group's starting lr to {quick['initial_lr']!r}, not "
                        f"{lr_ratio} x {slow['initial_lr']!r} (schedulers such as OneCycleLR with one max_lr overwrite every group)"
                    )
    return problems
