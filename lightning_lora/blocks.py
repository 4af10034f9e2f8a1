"""Which modules of a model are its repeated blocks (decoder layers): for compiling, sharding and loading."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def class_matcher(block_classes: Iterable[type | str]) -> Callable[[nn.Module], bool]:
    """A test ``module -> bool`` that holds for instances of ``block_classes`` (classes, or class names)."""
    block_classes = list(block_classes)
    classes = tuple(c for c in block_classes if isinstance(c, type))
    names = {c for c in block_classes if isinstance(c, str)}
    if not classes and not names:
        raise ValueError(f"`block_classes` is empty: name the decoder layer class, e.g. {{LlamaDecoderLayer}} or {{'LlamaDecoderLayer'}}.")
    return lambda module: isinstance(module, classes) or type(module).__name__ in names


def block_classes_of(model: nn.Module) -> set[str]:
    """Class names of ``model``'s decoder layers, from transformers' ``_no_split_modules`` (e.g. {'LlamaDecoderLayer'})."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    raise ValueError(
        f"{type(model).__name__} does not list its decoder layer classes (`_no_split_modules`); pass them, "
        "e.g. block_classes={LlamaDecoderLayer}."
    )


def block_matcher(model: nn.Module, block_classes: Iterable[type | str] | None) -> Callable[[nn.Module], bool]:
    """``class_matcher(block_classes)``, defaulting to the model's own decoder layer classes."""
    return class_matcher(block_classes if block_classes is not None else block_classes_of(model))
