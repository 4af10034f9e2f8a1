"""DDP with two CPU processes (gloo): trains, both ranks agree, checkpoints are adapter-only, rank zero exports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from _processes import Queue, free_ports
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
MODES = ["none", "nf4", "nf4-compiled"]  # compiled: compile_blocks=True under DDP


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fork_server) -> dict:
    """One two-process DDP run per mode, each in its own directory, side by side. Each run's ranks are forks of the
    session's warm process, started with the variables Lightning's launcher sets (the launcher itself runs in
    test_dora's two-rank runs)."""
    queue, dirs = Queue(), {mode: tmp_path_factory.mktemp(f"ddp-{mode}") for mode in MODES}
    for mode, port in zip(MODES, free_ports(len(MODES))):
        queue.add_ranks(mode, [sys.executable, str(SCRIPT), str(dirs[mode]), mode], world=2, port=port, style="lightning",
                        forks=fork_server)
    results = queue.run(timeout=600)
    return {mode: (dirs[mode], results[mode]) for mode in MODES}


@pytest.mark.parametrize("quantize", MODES)
def test_ddp_two_cpu_processes_agree_and_export_once(runs, quantize):
    out, result = runs[quantize]
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 8
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(torch.count_nonzero(v) for k, v in rank0.items() if "lora_b" in k)  # it trained
    # 48 samples / 2 ranks / batch 4 = 6 steps an epoch; checkpoints at steps 3 and 6 hold the adapter only.
    checkpoint = torch.load(out / "ckpt" / "step=6.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {"model." + k for k in rank0}
    for key, value in rank0.items():
        assert torch.equal(checkpoint["state_dict"]["model." + key], value)
    export = out / "export" / "adapter"
    assert sorted(p.name for p in export.iterdir()) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    _, tensors, _ = read_adapter(export)
    for key, value in rank0.items():
        assert torch.equal(tensors[key], value)
