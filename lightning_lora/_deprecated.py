"""Old import paths kept working: each old module re-exports the names from where they live now, and warns."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old: str, new: str) -> None:
    """Warn that module ``old`` moved to ``new`` (call at the top of the old module)."""
    warnings.warn(
        f"`{old}` is deprecated: import from `{new}` instead (or from `lightning_lora`). The old path will be removed.",
        DeprecationWarning,
        stacklevel=3,
    )


def lazy_names(old: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for module ``old`` that resolve each of ``names`` on first use.

    ``names`` maps a name to its new module, or to ``"module:new_name"`` where it was renamed.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        module, _, new_name = names[name].partition(":")
        return getattr(importlib.import_module(module), new_name or name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
