"""share_one_gpu: several gloo ranks on one GPU under ModelParallelStrategy (torch's DeviceMesh cannot split a
GPU-bound gloo group). The split itself needs a GPU (tests/gpu run FSDP2 that way); here: what the helper changes."""

import subprocess
import sys
import textwrap

from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lightning_lora.lightning import patches
from lightning_lora.lightning.strategies import share_one_gpu


def test_it_patches_model_parallel_once_and_leaves_other_strategies_alone() -> None:
    strategy = ModelParallelStrategy(process_group_backend="gloo")
    assert share_one_gpu(strategy) is strategy
    patched = strategy._setup_distributed
    assert "share_one_gpu" in getattr(patched, patches.MARKER)
    share_one_gpu(strategy)
    assert strategy._setup_distributed is patched  # twice is once
    ddp = DDPStrategy(process_group_backend="gloo")
    share_one_gpu(ddp)
    assert not any(hasattr(value, patches.MARKER) for value in vars(ddp).values())


def test_it_unbinds_a_gloo_default_group_and_only_that() -> None:
    code = textwrap.dedent(
        """
        import os, torch, torch.distributed as dist
        from lightning_lora.lightning.strategies import _unbind_gloo_default_group
        _unbind_gloo_default_group()  # no group yet: nothing to do
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
        group = dist.distributed_c10d._get_default_group()
        group.bound_device_id = torch.device("cuda", 0)  # what ModelParallelStrategy's device_id does on a GPU
        _unbind_gloo_default_group()
        print(group.bound_device_id)
        dist.destroy_process_group()  # an orderly shutdown: gloo can abort a process that exits with its group alive
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "None"
