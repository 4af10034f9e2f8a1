"""The package's shape: the core imports without Lightning, `import lightning_lora` is light, old paths still work."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import lightning_lora
from _processes import run_side_by_side

# Top-level modules of lightning_lora that import Lightning: the wing, the CLI and its ready-made modules,
# and the deprecated paths of moved wing modules. Everything else is the core.
LIGHTNING_SIDE = {"lightning", "data", "callback", "mixin", "checkpoint_io", "_glue"}
# These import without Lightning and load it only when a command or a task module is used.
LAZY_SIDE = {"cli", "tasks"}


@pytest.fixture(scope="module")
def fresh_runs() -> dict:
    """Each script below in its own fresh interpreter, started side by side (each is mostly imports, on one core)."""
    return run_side_by_side({name: [sys.executable, "-c", textwrap.dedent(code)] for name, code in FRESH.items()}, timeout=300)


def _run(fresh_runs: dict, name: str) -> dict:
    """What script ``name`` printed: one JSON object as its last line."""
    result = fresh_runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


CORE_WITHOUT_LIGHTNING = (
    """
    import sys
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        sys.modules[name] = None  # `import lightning` now raises ImportError
    import importlib, json, pkgutil, tempfile, warnings
    import torch
    from torch import nn
    import lightning_lora

    side = %r
    names = sorted(m.name for m in pkgutil.iter_modules(lightning_lora.__path__))
    imported, refused = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in names:
            try:
                importlib.import_module("lightning_lora." + name)
                imported.append(name)
            except ImportError:
                refused.append(name)

    from lightning_lora import LoRAConfig, QuantizationConfig, adapter_state_dict, inject_lora, load_adapter, save_adapter

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))

    config = LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], modules_to_save=["4"])
    model = inject_lora(build(), config, QuantizationConfig(mode="nf4"))
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.add_(torch.randn(tensor.shape) * 0.1)
    x = torch.randn(3, 32)
    loss = model(x).square().sum()
    loss.backward()
    grads = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    directory = tempfile.mkdtemp()
    save_adapter(model, directory)
    fresh = inject_lora(build(), config, QuantizationConfig(mode="nf4"))
    load_adapter(fresh, directory)
    same = torch.equal(fresh(x), model(x))
    print(json.dumps({"imported": imported, "refused": refused, "grads": grads, "same": same,
                      "lightning_loaded": sorted(k for k, v in sys.modules.items() if k.startswith("lightning.") and v is not None)}))
    """
    % sorted(LIGHTNING_SIDE)
)


def test_the_core_imports_and_works_without_lightning(fresh_runs):
    out = _run(fresh_runs, "core_without_lightning")
    core = {"_io", "_matching", "_routes", "adapter_io", "blocks", "compiling", "config", "export", "inject", "layers", "merge",
            "quantization", "sharding", "loading", "estimate"}  # fmt: skip
    assert core <= set(out["imported"])
    assert set(out["refused"]) == LIGHTNING_SIDE  # the blocking works, and only the Lightning side needs Lightning
    assert LAZY_SIDE <= set(out["imported"])  # the CLI answers --help without Lightning
    assert out["lightning_loaded"] == []
    assert out["grads"] == ["0.lora_a.weight", "0.lora_b.weight", "2.lora_a.weight", "2.lora_b.weight", "4.bias", "4.weight"]
    assert out["same"] is True


LIGHT_IMPORT = """
    import json, sys, time
    start = time.perf_counter()
    import lightning_lora
    seconds = time.perf_counter() - start
    heavy = ("torch", "lightning", "bitsandbytes", "transformers", "safetensors", "jsonargparse")
    print(json.dumps({"loaded": sorted(m for m in heavy if m in sys.modules), "seconds": seconds,
                      "own": sorted(m for m in sys.modules if m.startswith("lightning_lora"))}))
    """


def test_import_lightning_lora_imports_no_heavy_module(fresh_runs):
    out = _run(fresh_runs, "light_import")
    assert out["loaded"] == []
    assert out["own"] == ["lightning_lora", "lightning_lora._version"]


def test_every_public_name_resolves_and_is_listed():
    assert lightning_lora.__all__ == sorted(lightning_lora.__all__)
    assert set(lightning_lora.__all__) <= set(dir(lightning_lora))
    namespace: dict = {}
    exec(f"from lightning_lora import {', '.join(lightning_lora.__all__)}", namespace)
    assert all(namespace[name] is getattr(lightning_lora, name) for name in lightning_lora.__all__)
    from lightning_lora.lightning import LoRACallback, LoRAMixin

    assert (lightning_lora.LoRACallback, lightning_lora.LoRAMixin) == (LoRACallback, LoRAMixin)
    try:
        lightning_lora.no_such_name  # noqa: B018
    except AttributeError as err:
        assert str(err) == "module 'lightning_lora' has no attribute 'no_such_name'"
    else:
        raise AssertionError("an unknown name must raise AttributeError")


# old module -> {old name: "new.module:new_name"}
MOVED = {
    "lightning_lora.callback": {"LoRACallback": "lightning_lora.lightning.callback:LoRACallback"},
    "lightning_lora.mixin": {"LoRAMixin": "lightning_lora.lightning.mixin:LoRAMixin"},
    "lightning_lora.checkpoint_io": {
        "AtomicCheckpointIO": "lightning_lora.lightning.checkpoints:AtomicCheckpointIO",
        "install_atomic_checkpoint_io": "lightning_lora.lightning.checkpoints:install_atomic_checkpoint_io",
    },
    "lightning_lora._glue": {
        "CHECKPOINT_KEY": "lightning_lora.lightning.checkpoints:CHECKPOINT_KEY",
        "LoRAController": "lightning_lora.lightning.controller:LoRAController",
        "run_after": "lightning_lora.lightning.patches:run_after",
        "run_before": "lightning_lora.lightning.patches:run_before",
    },
    "lightning_lora.distributed": {
        "allow_adapter_only_sharded_load": "lightning_lora.lightning.strategies:allow_adapter_only_sharded_load",
        "block_classes_of": "lightning_lora.blocks:block_classes_of",
        "check_quantization_for_strategy": "lightning_lora.lightning.strategies:check_quantization",
        "class_matcher": "lightning_lora.blocks:class_matcher",
        "clip_grad_norm": "lightning_lora.lightning.strategies:clip_grad_norm",
        "fully_shard_lora": "lightning_lora.sharding:fully_shard_lora",
        "gather_adapter_state_dict": "lightning_lora.lightning.strategies:gather_adapter_state_dict",
        "is_sharded_checkpoint": "lightning_lora.lightning.checkpoints:is_sharded_checkpoint",
        "is_sharded_param": "lightning_lora.sharding:is_sharded_param",
        "lora_fsdp_policy": "lightning_lora.sharding:lora_fsdp_policy",
        "packed_4bit_bytes": "lightning_lora.sharding:packed_4bit_bytes",
        "strategy_kind": "lightning_lora.lightning.strategies:strategy_kind",
    },
}


DEPRECATED_PATHS = (
    """
    import importlib, json, warnings
    moved = %r
    report = {}
    for old, names in moved.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        ours = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning) and old in str(w.message)]
        same = {}
        for name, target in names.items():
            new_module, new_name = target.split(":")
            same[name] = getattr(module, name) is getattr(importlib.import_module(new_module), new_name)
        report[old] = {"warnings": ours, "same": same, "all": sorted(getattr(module, "__all__", []))}
    print(json.dumps(report))
    """
    % MOVED
)
FRESH = {"core_without_lightning": CORE_WITHOUT_LIGHTNING, "light_import": LIGHT_IMPORT, "deprecated_paths": DEPRECATED_PATHS}


def test_deprecated_paths_warn_and_give_the_same_objects(fresh_runs):
    out = _run(fresh_runs, "deprecated_paths")
    for old, names in MOVED.items():
        assert len(out[old]["warnings"]) == 1, (old, out[old]["warnings"])
        assert out[old]["warnings"][0].startswith(f"`{old}` is deprecated: import from `lightning_lora.")
        assert out[old]["same"] == {name: True for name in names}
        assert out[old]["all"] == sorted(names)


def test_the_model_parameter_count_has_its_own_name():
    import pytest
    import torch
    from torch import nn

    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.inject import count_parameters, parameter_counts

    torch.manual_seed(0)
    model = inject_lora(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)), LoRAConfig(r=4, target_modules=["0"]))
    expected = {"trainable": 4 * 32 + 64 * 4, "total": 32 * 64 + 64 + 64 * 32 + 32 + 4 * 32 + 64 * 4}
    assert parameter_counts(model) == expected
    with pytest.warns(DeprecationWarning, match="call `parameter_counts`"):
        assert count_parameters(model) == expected
