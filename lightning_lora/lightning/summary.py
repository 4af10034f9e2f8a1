"""LoRAModelSummary: Lightning's model summary table, with quantized weights counted as parameters.

Lightning's ``ModelSummary`` counts ``param.numel()``: a bitsandbytes 4-bit weight is stored packed, two values
a byte, so its ``numel`` is half the parameters it stands for, and the table disagreed with
``lightning_lora.parameter_summary``. This summary counts the same way as ``parameter_summary`` (a 4-bit
``(out, in)`` weight is ``out * in`` parameters) and gives the size from the bytes actually stored.
``lightning-lora fit`` uses it in place of Lightning's; in Python: ``L.Trainer(callbacks=[LoRAModelSummary()])``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as _Summary
from torch import nn

from lightning_lora.inject import count_parameters


class LoRAModelSummary(ModelSummary):
    """``lightning.pytorch.callbacks.ModelSummary`` whose counts agree with ``parameter_summary``."""

    def _summary(self, trainer: Any, pl_module: Any) -> _Summary:
        return QuantizedAwareSummary(pl_module, max_depth=self._max_depth)


class QuantizedAwareSummary(_Summary):
    """Lightning's summary with per-layer and total counts from ``count_parameters`` and the real stored size."""

    @property
    def param_nums(self) -> list[int]:
        return [count_parameters(layer._module)["total"] for layer in self._layer_summary.values()]

    @property
    def total_parameters(self) -> int:
        return count_parameters(self._model)["total"]

    @property
    def trainable_parameters(self) -> int:
        return count_parameters(self._model)["trainable"]

    @property
    def model_size(self) -> float:
        """Megabytes of parameter storage as held (packed 4-bit weights at their packed size)."""
        return stored_bytes(self._model) / 1e6


def stored_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
