"""YAML for the CLI, bounded: a small file with nested aliases (a "billion laughs") is refused before it expands.

PyYAML resolves ``*alias`` to the anchored object itself, so loading such a file is cheap; but
jsonargparse then walks, copies and validates the configuration as a tree, in which every alias is a
full copy: nine levels of ten aliases are a kilobyte of text and a billion nodes, tens of seconds and
gigabytes before anything fails. ``install()`` puts ``bounded_load`` in front of jsonargparse's YAML
loader (the one every ``--config`` file and YAML value of the ``lightning-lora`` command goes through):
it composes the document (linear in its length), counts the nodes of the tree it stands for, aliases
expanded, and refuses more than ``MAX_NODES`` or nesting deeper than ``MAX_DEPTH``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MAX_NODES = 100_000
"""Nodes of a config tree with every alias expanded; the shipped configs have a few hundred."""
MAX_DEPTH = 100
MAX_CHARS = 10_000_000


class ConfigTooLarge(ValueError):
    """A YAML config that expands beyond the bounds; ``lightning-lora`` reports it in one line."""


_original: Callable[..., Any] | None = None


def install() -> None:
    """Make jsonargparse's YAML loader ``bounded_load`` (idempotent)."""
    global _original
    from jsonargparse import get_loader, set_loader

    current = get_loader("yaml")
    if current is bounded_load:
        return
    import yaml

    _original = current
    set_loader("yaml", bounded_load, exceptions=(yaml.YAMLError,))


def bounded_load(stream: str) -> Any:
    """jsonargparse's YAML load of ``stream`` after ``check(stream)``."""
    check(stream)
    assert _original is not None
    return _original(stream)


def check(stream: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``ConfigTooLarge`` if the YAML in ``stream`` stands for more than ``max_nodes`` nodes (aliases
    expanded) or nests deeper than ``max_depth``. Invalid YAML is left to the loader to report."""
    import yaml
    from jsonargparse._loaders_dumpers import get_yaml_default_loader

    if not isinstance(stream, str):
        return
    if len(stream) > MAX_CHARS:
        raise ConfigTooLarge(f"the YAML config has {len(stream):,} characters (at most {MAX_CHARS:,}); pass a smaller config.")
    try:
        root = yaml.compose(stream, Loader=get_yaml_default_loader())
    except yaml.YAMLError:
        return
    except RecursionError:
        raise ConfigTooLarge(f"the YAML config nests deeper than Python can follow (at most {max_depth} levels); flatten it.") from None
    sizes: dict[int, int] = {}

    def size(node: Any, depth: int, path: tuple[int, ...]) -> int:
        if depth > max_depth:
            raise ConfigTooLarge(f"the YAML config nests more than {max_depth} levels deep; flatten it.")
        key = id(node)
        if key in path:
            raise ConfigTooLarge("the YAML config refers to itself through an alias (an endless tree); remove the cycle.")
        if key in sizes:
            return sizes[key]
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child, depth + 1, (*path, key))
            if total > max_nodes:
                raise ConfigTooLarge(
                    f"the YAML config stands for more than {max_nodes:,} values once its aliases (*name) are expanded; "
                    "it would take minutes and gigabytes to read. Write the values out, or use fewer nested aliases."
                )
        sizes[key] = total
        return total

    if root is not None:
        size(root, 0, ())
