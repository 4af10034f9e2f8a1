"""Every change lightning_lora makes to objects it does not own, in one place.

What is patched, and by whom:

- the user's LightningModule instance: ``configure_model`` (inject right after it) and
  ``on_load_checkpoint`` (check the checkpoint first), by ``controller.LoRAController.setup``;
  ``configure_gradient_clipping`` under FSDP1 and ``configure_optimizers`` under FSDP2 (check the
  4-bit bytes first), by ``strategies.install``;
- the strategy instance: ``load_checkpoint`` (the file checked first where the strategy reads it itself;
  adapter-only sharded resume), by ``strategies.install``;
- ``torch.distributed.checkpoint.load``, only while that wrapped ``load_checkpoint`` runs;
- with LoRA+, the user's ``configure_optimizers`` (by ``controller.LoRAController.setup``) and, only while it runs,
  ``torch.optim.Optimizer.add_param_group`` (``lora_plus_groups``), which splits each group as it is added.

Each patch sets one attribute of one object to a function carrying the ``MARKER`` attribute;
patching an attribute that already carries it does nothing, so every patch is idempotent (``setup``
runs once per stage). Wrappers are deliberately not ``functools.wraps``: Lightning unwraps
``__wrapped__`` to decide whether a hook is overridden, and must see these as overridden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

MARKER = "_lightning_lora_patched"


def is_patched(function: Any) -> bool:
    return bool(getattr(function, MARKER, False))


def replace(obj: Any, name: str, replacement: Callable[..., Any], purpose: str | None = None) -> bool:
    """Set ``obj.name = replacement`` (marked) unless ``obj.name`` carries a patch for ``purpose`` already;
    returns whether it did.

    The marker is the set of purposes the chain of patches on ``obj.name`` serves, so two different patches of
    one attribute (LoRA+'s split and FSDP2's byte check, both on ``configure_optimizers``) both apply, and the
    same patch applied twice (``setup`` runs once per stage) applies once. ``purpose`` defaults to ``name``.
    """
    purpose = name if purpose is None else purpose
    present = getattr(getattr(obj, name, None), MARKER, None) or frozenset()
    if purpose in present:
        return False
    setattr(replacement, MARKER, frozenset(present) | {purpose})
    replacement.__name__ = name
    setattr(obj, name, replacement)
    return True


def run_before(obj: Any, name: str, extra: Callable[..., Any], purpose: str | None = None) -> None:
    """Make ``obj.name(...)`` call ``extra(...)`` before the original; once per instance and purpose."""
    original = getattr(obj, name)

    def before(*args: Any, **kwargs: Any) -> Any:
        extra(*args, **kwargs)
        return original(*args, **kwargs)

    replace(obj, name, before, purpose)


def run_after(obj: Any, name: str, extra: Callable[..., Any], purpose: str | None = None) -> None:
    """Make ``obj.name(...)`` call ``extra(...)`` after the original; once per instance and purpose."""
    original = getattr(obj, name)

    def after(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        extra(*args, **kwargs)
        return result

    replace(obj, name, after, purpose)


def run_inside(obj: Any, name: str, context: Callable[[], contextlib.AbstractContextManager[Any]], purpose: str | None = None) -> None:
    """Make ``obj.name(...)`` run the original inside ``with context():``; once per instance and purpose."""
    original = getattr(obj, name)

    def inside(*args: Any, **kwargs: Any) -> Any:
        with context():
            return original(*args, **kwargs)

    replace(obj, name, inside, purpose)


@contextlib.contextmanager
def swapped(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Inside the block, ``owner.name`` is ``make(original)`` (marked); afterwards the original again.

    A block nested in another that swapped the same attribute leaves it as it is.
    """
    original = getattr(owner, name)
    if is_patched(original):
        yield
        return
    replacement = make(original)
    setattr(replacement, MARKER, True)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def lora_plus_groups(fast: set[int], lr_ratio: float) -> contextlib.AbstractContextManager[None]:
    """Inside the block, every optimizer built gets its B-side tensors (ids in ``fast``) in groups of their own at
    ``lr_ratio`` x the group's learning rate (``lightning_lora.lora_plus.split_param_group``)."""
    from lightning_lora.lora_plus import split_param_group

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def add_param_group(optimizer: torch.optim.Optimizer, param_group: dict[str, Any]) -> None:
            for group in split_param_group(param_group, fast, lr_ratio, optimizer.defaults.get("lr")):
                original(optimizer, group)

        return add_param_group

    return swapped(torch.optim.Optimizer, "add_param_group", make)
