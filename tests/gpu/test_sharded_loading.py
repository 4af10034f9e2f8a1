"""Sharded building on one GPU with several gloo ranks (``pytest -m gpu tests/gpu/test_sharded_loading.py``).

- Two gloo ranks on cuda:0 build FSDP2 and FSDP1 models (random init and a sharded safetensors
  checkpoint) with the 1-rank GPU build's per-layer packed-byte hashes, logits and adapter, each
  holding half the parameter bytes and reading only the checkpoint tensors of the parts it owns.
- Lightning, two "nodes" on localhost both on cuda:0 (``torchrun --nnodes 2``), gloo:
  ``FSDPStrategy`` (FSDP1, built unit by unit through the param_init_fn ``build_lora_model`` installs)
  and ``ModelParallelStrategy`` (FSDP2) train three steps through ``LoRACallback(from_backbone=True)``,
  the NF4 bytes each layer holds afterwards are the 1-rank build's, the adapter trained.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/gpu)")]


def test_two_gloo_ranks_on_one_gpu_build_like_one_rank(tmp_path):
    from test_loading_sharded import check_sharded_builds

    check_sharded_builds(tmp_path, world=2, layers=2, device="cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_lightning_two_nodes_on_one_gpu_build_sharded_and_train(tmp_path, kind):
    from _sharded_worker import LORA, QUANT
    from _models import tiny_llama
    from lightning_lora.sharding import packed_4bit_bytes
    from lightning_lora.sharded_loading import build_lora_model

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", str(TESTS / "gpu" / "_lightning_sharded.py"),
               str(tmp_path / "out.pt"), kind, "3"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)

    got = torch.load(tmp_path / "out.pt", weights_only=True)
    expected = packed_4bit_bytes(build_lora_model(tiny_llama().config, LORA, QUANT, device="cuda", seed=5))
    assert got["step"] == 3 and got["packed"].keys() == expected.keys() and len(expected) == 14
    for name, value in expected.items():
        assert torch.equal(got["packed"][name], value), name
    assert len(got["adapter"]) == 28 and all(torch.count_nonzero(v) for k, v in got["adapter"].items() if "lora_b" in k)
    assert len(got["peaks"]) == 2 and all(load > 0 for load, _ in got["peaks"])
