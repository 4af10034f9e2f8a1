"""Module paths: how they are matched against user patterns, joined, split and unwrapped.

A list of names matches a path when the path equals a name or ends with ``"." + name``
(``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``). A single string other than
``"all-linear"`` is a regex matched against the whole path. These are PEFT's rules too, so an
adapter config means the same thing here and there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from torch import nn

# Last path components of classification / LM heads that "all-linear" and quantization leave alone.
_HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "embed_out"})


def path_under(path: str, roots: str | Iterable[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or inside one (``"a.b.c"`` is under ``"a.b"``, ``"a.bc"`` is not)."""
    if isinstance(roots, str):
        roots = (roots,)
    return any(path == root or path.startswith(root + ".") for root in roots)


def join_path(prefix: str, name: str) -> str:
    """``prefix.name``; either may be empty (the root module's path is ``""``)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module holding the submodule at ``path``, the submodule's attribute name there)."""
    parent_name, _, child = path.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def matches_suffix(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def matches_any(path: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return _compiled(patterns).fullmatch(path) is not None
    return any(matches_suffix(path, name) for name in patterns)


def pattern_value(path: str, pattern_map: dict[str, int | float], default: int | float) -> int | float:
    """The value of the first key of ``pattern_map`` that matches ``path`` as a suffix regex."""
    for pattern, value in pattern_map.items():
        if _compiled(rf"(.*\.)?(?:{pattern})").fullmatch(path):
            return value
    return default


def output_head_names(model: nn.Module) -> set[str]:
    """Module paths of the output head(s): the model's output embeddings and the usual head names."""
    heads = {name for name, _ in model.named_modules() if name.rpartition(".")[2] in _HEAD_NAMES}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            out = get_output()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads.update(name for name, module in model.named_modules() if module is out)
    return heads


# Path components that FSDP, activation checkpointing and torch.compile insert when they wrap a submodule.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """``name`` as it was before any wrapper was inserted, so paths compare across strategies."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name
