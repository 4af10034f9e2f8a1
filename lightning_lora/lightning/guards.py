"""Non-finite values: skip optimizer steps whose gradients hold NaN/Inf, and never write non-finite adapters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn


def first_nonfinite(tensors: Mapping[str, Any]) -> str | None:
    """The first key whose tensor holds a NaN or Inf (non-tensor values are skipped), or None.

    Sharded values are checked where they live: a DTensor (FSDP2) by its local shard, a ShardedTensor
    (FSDP1's sharded state dict) by this rank's shards, so each rank checks what it writes.
    """
    return next((key for key, value in tensors.items() if any(not bool(torch.isfinite(part).all()) for part in _local_parts(value))), None)


def _local_parts(value: Any) -> list[torch.Tensor]:
    if hasattr(value, "local_shards") and callable(value.local_shards):  # torch.distributed._shard ShardedTensor
        return [shard.tensor for shard in value.local_shards()]
    if hasattr(value, "to_local") and callable(value.to_local):  # DTensor
        return [value.to_local()]
    return [value] if isinstance(value, torch.Tensor) else []


class NonFiniteGuard:
    """Drops a step's gradients when any is NaN/Inf (on any rank); stops after ``max_steps`` such steps in a row."""

    def __init__(self, enabled: bool = True, max_steps: int = 10) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.streak = 0
        self.skipped = 0

    def check_gradients(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
        """Call before ``optimizer.step()``: clears every gradient of a non-finite step, so the step changes nothing."""
        if not self.enabled:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # One device->host sync per step, not one per tensor: a NaN/Inf anywhere makes that tensor's norm non-finite.
        norms = torch._foreach_norm([p.grad for p in params]) if params else []
        local_bad = bool(norms) and not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if not bad:
            self.streak = 0
            return
        self.streak += 1
        self.skipped += 1
        for p in params:
            p.grad = None  # the optimizer skips parameters without gradients: the weights stay finite
        if self.streak >= self.max_steps:
            raise RuntimeError(
                f"{self.streak} optimizer steps in a row had NaN/Inf gradients (global step {trainer.global_step}); "
                "stopping. Lower the learning rate, enable gradient clipping (gradient_clip_val), or check the data."
            )
        rank_zero_warn(f"Skipped optimizer step at global step {trainer.global_step}: NaN/Inf gradients ({self.streak} in a row).")
