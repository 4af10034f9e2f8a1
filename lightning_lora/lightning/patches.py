"""Every change lightning_lora makes to objects it does not own, in one place.

What is patched, and by whom:

- the user's LightningModule instance: ``configure_model`` (inject right after it) and
  ``on_load_checkpoint`` (check the checkpoint first), by ``controller.LoRAController.setup``;
  ``configure_gradient_clipping`` under FSDP1 and ``configure_optimizers`` under FSDP2 (check the
  4-bit bytes first), by ``strategies.install``;
- the strategy instance: ``load_checkpoint`` (adapter-only sharded resume), by ``strategies.install``;
- ``torch.distributed.checkpoint.load``, only while that wrapped ``load_checkpoint`` runs.

Each patch sets one attribute of one object to a function carrying the ``MARKER`` attribute;
patching an attribute that already carries it does nothing, so every patch is idempotent (``setup``
runs once per stage). Wrappers are deliberately not ``functools.wraps``: Lightning unwraps
``__wrapped__`` to decide whether a hook is overridden, and must see these as overridden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

MARKER = "_lightning_lora_patched"


def is_patched(function: Any) -> bool:
    return bool(getattr(function, MARKER, False))


def replace(obj: Any, name: str, replacement: Callable[..., Any]) -> bool:
    """Set ``obj.name = replacement`` (marked) unless ``obj.name`` is one of ours already; returns whether it did."""
    if is_patched(getattr(obj, name, None)):
        return False
    setattr(replacement, MARKER, True)
    replacement.__name__ = name
    setattr(obj, name, replacement)
    return True


def run_before(obj: Any, name: str, extra: Callable[..., Any]) -> None:
    """Make ``obj.name(...)`` call ``extra(...)`` before the original; once per instance."""
    original = getattr(obj, name)

    def before(*args: Any, **kwargs: Any) -> Any:
        extra(*args, **kwargs)
        return original(*args, **kwargs)

    replace(obj, name, before)


def run_after(obj: Any, name: str, extra: Callable[..., Any]) -> None:
    """Make ``obj.name(...)`` call ``extra(...)`` after the original; once per instance."""
    original = getattr(obj, name)

    def after(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        extra(*args, **kwargs)
        return result

    replace(obj, name, after)


def run_inside(obj: Any, name: str, context: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
    """Make ``obj.name(...)`` run the original inside ``with context():``; once per instance."""
    original = getattr(obj, name)

    def inside(*args: Any, **kwargs: Any) -> Any:
        with context():
            return original(*args, **kwargs)

    replace(obj, name, inside)


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
