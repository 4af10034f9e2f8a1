"""lightning_lora.lightning.guards: non-finite values found in plain, DTensor and ShardedTensor values."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lightning_lora.lightning.guards import first_nonfinite


@pytest.fixture(scope="module")
def one_rank_group():
    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_plain_tensors_and_other_values():
    assert first_nonfinite({"a": torch.zeros(3), "step": 7, "b": torch.tensor([1.0, float("nan")])}) == "b"
    assert first_nonfinite({"a": torch.ones(2), "meta": "text"}) is None


def test_sharded_values_are_checked_by_their_local_parts(one_rank_group):
    # FSDP1's sharded state dict holds ShardedTensors, on which torch.isfinite raises (seen on an H200 run).
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    local = torch.ones(4, 3)
    sharded = init_from_local_shards([Shard(local, ShardMetadata([0, 0], [4, 3], "rank:0/cpu"))], [4, 3])
    assert first_nonfinite({"w": sharded}) is None
    local[1, 2] = float("inf")
    assert first_nonfinite({"w": sharded}) == "w"
    mesh = init_device_mesh("cpu", (1,))
    assert first_nonfinite({"ok": DTensor.from_local(torch.ones(2), mesh, [Replicate()])}) is None
    assert first_nonfinite({"d": DTensor.from_local(torch.tensor([0.0, float("nan")]), mesh, [Replicate()])}) == "d"
