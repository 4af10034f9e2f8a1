"""Files the library writes: modes that honour the umask (not mkstemp's 0600), and adapters that are byte-identical."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from _models import tiny_llama
from _processes import run_side_by_side
from lightning_lora import LoRAConfig, inject_lora, load_adapter, save_adapter
from lightning_lora.checkpoint_io import AtomicCheckpointIO
from lightning_lora.export import save_merged

TESTS = Path(__file__).parent


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _model():
    torch.manual_seed(0)
    return inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_gives(umask, tmp_path: Path, mask: int, expected: int) -> None:
    umask(mask)
    model = _model()
    save_adapter(model, tmp_path / "adapter")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    save_merged(model, tmp_path / "merged")
    modes = {str(p.relative_to(tmp_path)): _mode(p) for p in tmp_path.rglob("*") if p.is_file()}
    names = [
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "last.ckpt", "merged/config.json",
        "merged/generation_config.json", "merged/model.safetensors",
    ]
    assert modes == {name: expected for name in names}  # also: no temporary file left behind


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saving_the_same_adapter_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    model = _model()
    digests = set()
    for i in range(4):
        save_adapter(model, tmp_path / str(i))
        digests.add((_digest(tmp_path / str(i) / "adapter_model.safetensors"), _digest(tmp_path / str(i) / "adapter_config.json")))
    assert len(digests) == 1
    with safe_open(tmp_path / "0" / "adapter_model.safetensors", framework="pt") as handle:
        assert handle.metadata()["format"] == "pt" and len(list(handle.keys())) == 8
    fresh = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    load_adapter(fresh, tmp_path / "0")  # still a valid adapter after the header rewrite


_SAVE = (
    "import sys, torch; sys.path.insert(0, sys.argv[2]); from _models import tiny_llama; "
    "from lightning_lora import LoRAConfig, inject_lora, save_adapter; torch.manual_seed(0); "
    "save_adapter(inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=['q_proj', 'v_proj'])), sys.argv[1])"
)


def test_two_processes_write_the_same_adapter_bytes(tmp_path: Path) -> None:
    commands = {name: [sys.executable, "-c", _SAVE, str(tmp_path / name), str(TESTS)] for name in ("a", "b")}
    runs = run_side_by_side(commands, timeout=300)  # each process hashes its maps with another random seed
    assert [r.returncode for r in runs.values()] == [0, 0], [r.stderr[-2000:] for r in runs.values()]
    assert _digest(tmp_path / "a" / "adapter_model.safetensors") == _digest(tmp_path / "b" / "adapter_model.safetensors")
