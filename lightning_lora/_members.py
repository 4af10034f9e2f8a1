"""Reading a module's registered parameters and submodules without ``nn.Module.__getattr__``, for per-call code.

``layer.base_layer`` or ``base.weight`` reaches ``nn.Module.__getattr__`` only after Python's own attribute lookup
has failed and raised inside, about 1 us of host time a read against 0.2 us for the dict reads here
(``benchmarks/host_overhead.py``). A LoRA layer's forward made 10 to 15 such reads a call, which at small batch on a
GPU is time the GPU waits for.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def member(module: nn.Module, name: str) -> Any:
    """``getattr(module, name, None)``, read from ``module._parameters`` / ``_modules`` where they hold ``name``.

    The same object getattr returns, for names that are no attribute of the module's class (the ones read here:
    ``weight``, ``bias``, ``base_layer``, ``lora_a``, ``lora_b``, ``dropout``, ``adapters``): ``nn.Module`` keeps a
    registered name out of the instance's ``__dict__`` (assigning a parameter or module removes the attribute,
    assigning anything else but None to a registered name is refused). Every other case (FSDP1's plain tensors in
    place of parameters, a parametrized weight, a plain attribute, a missing name) goes through getattr.
    """
    parameters = module._parameters
    if name in parameters:
        return parameters[name]
    modules = module._modules
    if name in modules:
        return modules[name]
    return getattr(module, name, None)
