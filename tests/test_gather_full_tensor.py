"""sharding.gather_full_tensor: FSDP2's DTensors gathered through the process group (not full_tensor's functional
collective, which crashed gloo ranks sharing one GPU), on 3 gloo ranks: uneven rows, fewer rows than ranks, 1-D."""

import sys
import textwrap

from _processes import Queue, free_ports

CODE = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from lightning_lora.sharding import gather_full_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    ok = []
    for shape in [(7, 3), (2, 5), (1, 4), (8,), (3,), (6, 2, 2)]:
        full = torch.randn(shape)
        for placement in (Shard(0), Replicate()):
            gathered = gather_full_tensor(distribute_tensor(full, mesh, [placement]))
            ok.append(type(gathered) is torch.Tensor and gathered.shape == full.shape and torch.equal(gathered, full))
    plain = torch.randn(3)
    ok.append(gather_full_tensor(plain) is plain)
    import os, sys
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w") as f:  # not stdout: the ranks' prints interleave
        f.write(f"RANK {dist.get_rank()} {all(ok)} {ok.count(False)}")
    dist.barrier()
    dist.destroy_process_group()  # an orderly shutdown: gloo can abort a process that exits with its group alive
    """
)


def test_gather_full_tensor_equals_the_full_tensor_on_three_ranks(tmp_path, fork_server) -> None:
    # Each rank a fork of the session's warm process with torchrun's variables (test_multi_node_examples runs torchrun).
    script = tmp_path / "gather.py"
    script.write_text(CODE)
    queue = Queue()
    queue.add_ranks("gather", [sys.executable, str(script), str(tmp_path)], world=3, port=free_ports(1)[0], style="torchrun",
                    forks=fork_server)
    result = queue.run(timeout=300)["gather"]
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted((tmp_path / f"rank{r}.txt").read_text() for r in range(3))
    assert lines == [f"RANK {r} True 0" for r in range(3)]
