"""Faults lose nothing: killed writers, killed training, NaN steps, a full disk; untrusted files run no code."""

from __future__ import annotations

import errno
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _lightning import LlamaLM, token_loader, trainer
from _processes import ForkServer
from _models import assert_unchanged, model_snapshot, randomize_adapter, tiny_llama
from lightning_lora import LoRACallback, LoRAConfig, adapter_state_dict, inject_lora, load_adapter, save_adapter
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.lightning import AtomicCheckpointIO

TESTS = Path(__file__).parent
SCRIPT = TESTS / "scripts" / "fault_train.py"
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"}


def _wait_for(path: Path, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the writer exited ({proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _train(forks: ForkServer, out: Path, *args: str):
    """``fault_train.py OUT args`` as a fork of the session's warm process (Popen's pid/poll/wait), its output in
    the file ``proc.log``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.{next(_RUNS)}.log"
    proc = forks.start([sys.executable, str(SCRIPT), str(out), *args], str(log))  # the server's environment
    proc.log = log
    return proc


_RUNS = itertools.count()


def _log(proc) -> str:
    return proc.log.read_text()[-2000:]


def test_sigkill_mid_epoch_then_resume_gives_the_bit_identical_adapter(tmp_path, fork_server):
    reference = _train(fork_server, tmp_path / "reference")
    killed = _train(fork_server, tmp_path / "killed", "--step-delay", "0.5")
    # 6 batches per epoch. last.ckpt is written after each step's own file, so once step 4's file exists
    # last.ckpt holds step 3 or 4: a kill now is mid-epoch whatever the timing.
    _wait_for(tmp_path / "killed" / "ckpt" / "epoch=0-step=4.ckpt", killed)
    _kill(killed)
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # plain tensors and types: no pickled code needed
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["epoch"] == 0
    assert 3 <= checkpoint["global_step"] < 6
    resumed = _train(fork_server, tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, _log(resumed)
    assert reference.wait(timeout=300) == 0, _log(reference)
    want = load_file(tmp_path / "reference" / "adapter" / ADAPTER_WEIGHTS_NAME)
    got = load_file(tmp_path / "killed" / "adapter" / ADAPTER_WEIGHTS_NAME)
    assert want.keys() == got.keys() and len(want) == 8
    for key in want:
        assert torch.equal(want[key], got[key]), key


_ADAPTER_WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from lightning_lora import LoRAConfig, adapter_state_dict, inject_lora, save_adapter
    model = inject_lora(nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]), LoRAConfig(r=256, target_modules="all-linear"))
    version = 0
    while True:
        version += 1
        with torch.no_grad():
            for tensor in adapter_state_dict(model).values():
                tensor.fill_(version)
        save_adapter(model, sys.argv[1])
        print(version, flush=True)
    """
)


def test_sigkill_during_save_adapter_leaves_a_complete_adapter(tmp_path):
    out = tmp_path / "adapter"
    proc = subprocess.Popen([sys.executable, "-c", _ADAPTER_WRITER, str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(3):  # a few complete saves, then kill mid-way through a later one
        assert proc.stdout.readline(), proc.stderr.read().decode()[-2000:]
    time.sleep(0.03)
    _kill(proc)
    tensors = load_file(out / ADAPTER_WEIGHTS_NAME)
    assert len(tensors) == 16
    versions = {float(v) for t in tensors.values() for v in t.unique()}
    assert len(versions) == 1  # every tensor from the same save: old or new, never a mix
    model = inject_lora(nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]), LoRAConfig(r=256, target_modules="all-linear"))
    load_adapter(model, out)  # loadable: the config and weights are complete files
    assert {float(v) for t in adapter_state_dict(model).values() for v in t.unique()} == versions


_CHECKPOINT_WRITER = textwrap.dedent(
    """
    import sys, torch
    from lightning_lora.lightning import AtomicCheckpointIO
    io, version = AtomicCheckpointIO(), 0
    while True:
        version += 1
        io.save_checkpoint({"version": version, "state_dict": {"w": torch.full((4_000_000,), float(version))}}, sys.argv[1])
        print(version, flush=True)
    """
)


def test_sigkill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _CHECKPOINT_WRITER, str(path)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(2):
        assert proc.stdout.readline(), proc.stderr.read().decode()[-2000:]
    time.sleep(0.02)
    _kill(proc)
    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    assert checkpoint["version"] >= 2
    assert torch.equal(checkpoint["state_dict"]["w"], torch.full((4_000_000,), float(checkpoint["version"])))


def test_callback_installs_atomic_checkpoint_io_and_checkpoints_load_weights_only(tmp_path):
    module = LlamaLM(build_in="init")
    t = trainer(2, [LoRACallback(r=4, target_modules=["q_proj"], backbone="model")])
    t.fit(module, token_loader())
    assert type(t.strategy.checkpoint_io) is AtomicCheckpointIO
    t.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert checkpoint["lightning_lora"]["lora_config"]["r"] == 4
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]


def test_only_some_nan_steps_are_skipped_exactly_and_training_finishes_finite():
    module = LlamaLM(build_in="init")
    original = module.training_step
    nan_steps = {1, 3, 4}

    def step(batch, batch_idx):
        loss = original(batch, batch_idx)
        return loss * float("nan") if batch_idx in nan_steps else loss

    module.training_step = step
    callback = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], backbone="model", max_nonfinite_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(8, [callback])
        t.fit(module, token_loader())  # 8 batches: steps 1, 3, 4 are NaN, never 3 in a row
    assert t.global_step == 8
    assert callback.controller.skipped_steps == 3
    adapter = adapter_state_dict(module.model)
    assert all(torch.isfinite(v).all() for v in adapter.values())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_b" in k)  # the finite steps trained


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_disk_full_during_save_adapter_keeps_the_previous_files(tmp_path, monkeypatch):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    before = _files(tmp_path)
    randomize_adapter(model, seed=3)
    monkeypatch.setattr("lightning_lora._io.os.fsync", _enospc)
    with pytest.raises(OSError, match="No space left on device"):
        save_adapter(model, tmp_path)
    assert _files(tmp_path) == before  # same names (no temp file left), same bytes


def test_disk_full_during_checkpoint_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    module = LlamaLM(build_in="init")
    t = trainer(2, [LoRACallback(r=4, target_modules=["q_proj"], backbone="model")])
    t.fit(module, token_loader())
    t.save_checkpoint(tmp_path / "last.ckpt")
    before = _files(tmp_path)
    monkeypatch.setattr("lightning_lora._io.os.fsync", _enospc)
    with pytest.raises(OSError, match="No space left on device"):
        t.save_checkpoint(tmp_path / "last.ckpt")
    assert _files(tmp_path) == before


def test_load_adapter_checks_everything_before_writing(tmp_path):
    source = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(source)
    save_adapter(source, tmp_path)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    last = sorted(tensors)[-1]  # the bad tensor comes after good ones: nothing may be copied first
    tensors[last] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS_NAME)
    target = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    snapshot = model_snapshot(target)
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(target, tmp_path)
    assert_unchanged(target, snapshot)
    assert (tmp_path / ADAPTER_CONFIG_NAME).is_file()


# -- all or nothing: a failure in the middle of inject_lora / quantize_model changes nothing ----------
def _fail_on_call(n: int, real):
    calls = {"count": 0}

    def wrapper(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            raise RuntimeError(f"injected fault in call {n}")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("where", ["3rd-lora-layer", "3rd-quantized-layer", "last-lora-layer"])
def test_a_failing_inject_lora_leaves_the_model_as_it_was_and_a_retry_works(monkeypatch, where):
    from lightning_lora import QuantizationConfig, quantization
    from lightning_lora.inject import lora_state
    from lightning_lora.layers import LoRALinear, lora_layers

    model = tiny_llama()
    snapshot = model_snapshot(model)
    quant = QuantizationConfig(mode="nf4", compute_dtype="float32") if where == "3rd-quantized-layer" else None
    if where == "3rd-quantized-layer":
        monkeypatch.setattr(quantization, "quantize_linear", _fail_on_call(3, quantization.quantize_linear))
    else:
        real = LoRALinear.from_config.__func__
        fail = _fail_on_call(3 if where == "3rd-lora-layer" else 4, lambda *a, **k: real(LoRALinear, *a, **k))
        monkeypatch.setattr(LoRALinear, "from_config", classmethod(lambda cls, *a, **k: fail(*a, **k)))
    with pytest.raises(RuntimeError, match="injected fault"):
        inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), quant)
    assert_unchanged(model, snapshot)  # tensors, module types and requires_grad flags
    assert lora_state(model) is None and not hasattr(model, "is_loaded_in_4bit")
    monkeypatch.undo()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), quant)  # the retry is not refused
    assert len(lora_layers(model)) == 4
    assert len(quantization.quantized_paths(model)) == (14 if quant else 0)


def test_a_failing_quantize_model_leaves_the_model_as_it_was(monkeypatch):
    from lightning_lora import QuantizationConfig, quantization, quantize_model

    model = tiny_llama()
    snapshot = model_snapshot(model)
    monkeypatch.setattr(quantization, "quantize_linear", _fail_on_call(5, quantization.quantize_linear))
    with pytest.raises(RuntimeError, match="injected fault"):
        quantize_model(model, QuantizationConfig(mode="nf4", compute_dtype="float32"))
    assert_unchanged(model, snapshot)
    assert quantization.quantized_paths(model) == []
    monkeypatch.undo()
    quantize_model(model, QuantizationConfig(mode="nf4", compute_dtype="float32"))
    assert len(quantization.quantized_paths(model)) == 14 and model.is_loaded_in_4bit
