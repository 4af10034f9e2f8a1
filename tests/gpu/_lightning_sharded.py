"""One "node" of a two-rank Lightning run on one GPU (gloo): the model is built sharded in configure_model, then trains.

    python -m torch.distributed.run --nnodes 2 --node_rank I --nproc_per_node 1 --master_addr 127.0.0.1 \
        --master_port P tests/gpu/_lightning_sharded.py OUT.pt fsdp1|fsdp2 STEPS

Both nodes use cuda:0 (LOCAL_RANK 0 on each). Rank 0 writes OUT.pt: the packed bytes of every 4-bit
layer after training (gathered from both shards), the adapter, the global step, and per rank the GPU
memory peak while loading (up to on_fit_start: built, sharded and wrapped) and while training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from _lightning import token_loader  # noqa: E402
from _models import tiny_llama  # noqa: E402
from _sharded_worker import LORA, QUANT  # noqa: E402

from lightning_lora import LoRACallback  # noqa: E402
from lightning_lora.distributed import gather_adapter_state_dict, packed_4bit_bytes  # noqa: E402
from lightning_lora.sharded_loading import build_lora_model  # noqa: E402


class BuiltLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = None
        self.load_peak = 0

    def configure_model(self) -> None:
        if self.model is None:
            torch.cuda.reset_peak_memory_stats()
            self.model = build_lora_model(tiny_llama().config, LORA, QUANT, strategy=self.trainer.strategy, seed=5)

    def on_fit_start(self) -> None:
        self.load_peak = torch.cuda.max_memory_allocated()  # FSDP1 builds inside the strategy's wrap: measured here
        torch.cuda.reset_peak_memory_stats()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def main() -> None:
    out, kind, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if kind == "fsdp1":
        strategy = FSDPStrategy(process_group_backend="gloo")  # build_lora_model sets the policy and param_init_fn
    else:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    L.seed_everything(0)
    module = BuiltLM()
    trainer = L.Trainer(accelerator="gpu", devices=1, num_nodes=2, strategy=strategy, precision="bf16-mixed", max_steps=steps,
                        callbacks=[LoRACallback(from_backbone=True, backbone="model")], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, token_loader(n=4 * steps, seq=16, batch_size=2))
    train_peak = torch.cuda.max_memory_allocated()
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            packed = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in packed_4bit_bytes(module.model).items()}
    else:
        packed = packed_4bit_bytes(module.model)
    adapter = gather_adapter_state_dict(trainer, module.model)
    peaks = trainer.strategy.all_gather(torch.tensor([module.load_peak, train_peak], device="cuda", dtype=torch.float64)).cpu()
    if trainer.is_global_zero:
        torch.save({"packed": packed, "adapter": adapter, "step": trainer.global_step, "peaks": peaks.reshape(-1, 2).tolist()}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
