"""One "node" of a two-rank Lightning run on one GPU (gloo): the model is built sharded in configure_model, then trains.

    python -m torch.distributed.run --nnodes 2 --node_rank I --nproc_per_node 1 --master_addr 127.0.0.1 \
        --master_port P tests/gpu/_lightning_sharded.py OUT.pt fsdp1|fsdp2 STEPS [SHAPE]

SHAPE is tests' tiny Llama (default) or a shape of ``benchmarks/sharded_loading.py`` (e.g. ``70b``:
then batch 1 x 2048 per rank, activation checkpointing per decoder layer, and the packed bytes are
not gathered, only the memory peaks and the loss are reported).

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
from _models import tiny_llama  # noqa: E402
from _sharded_worker import LORA, QUANT  # noqa: E402

from lightning_lora import LoRACallback  # noqa: E402
from lightning_lora.lightning.strategies import gather_adapter_state_dict, share_one_gpu  # noqa: E402
from lightning_lora.sharding import packed_4bit_bytes  # noqa: E402
from lightning_lora.sharded_loading import build_lora_model  # noqa: E402

CUDA = torch.cuda.is_available()  # without CUDA (ModelParallelStrategy only) the same run checks the launch on CPU


class BuiltLM(L.LightningModule):
    def __init__(self, config, checkpointing: bool = False) -> None:
        super().__init__()
        self.config, self.checkpointing = config, checkpointing
        self.model = None
        self.load_peak = 0
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is None:
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            self.model = build_lora_model(self.config, LORA, QUANT, strategy=self.trainer.strategy, seed=5)
            if self.checkpointing and type(self.trainer.strategy).__name__ != "FSDPStrategy":  # FSDP1: the strategy's policy
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def on_fit_start(self) -> None:
        if CUDA:  # FSDP1 builds inside the strategy's wrap: measured here
            self.load_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def main() -> None:
    out, kind, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    shape = sys.argv[4] if len(sys.argv) > 4 else "tiny"
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if shape == "tiny":
        config, seq, batch, checkpointing = tiny_llama().config, 16, 2, False
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
        from sharded_loading import _configs

        config, seq, batch, checkpointing = _configs(shape)[0], 2048, 1, True
        config.max_position_embeddings = max(config.max_position_embeddings, seq)
        config._attn_implementation = "sdpa"
    if kind == "fsdp1":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # build_lora_model sets the wrap policy (decoder layers and LoRA linears as units) and the param_init_fn
        strategy = FSDPStrategy(process_group_backend="gloo", activation_checkpointing_policy={LlamaDecoderLayer} if checkpointing else None)
    else:
        # two gloo ranks on one GPU: torch's DeviceMesh cannot split a GPU-bound gloo group (see share_one_gpu)
        strategy = share_one_gpu(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"))
    L.seed_everything(0)
    module = BuiltLM(config, checkpointing)
    trainer = L.Trainer(accelerator="gpu" if CUDA else "cpu", devices=1, num_nodes=2, strategy=strategy, precision="bf16-mixed", max_steps=steps,
                        callbacks=[LoRACallback(from_backbone=True, backbone="model")], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, config.vocab_size, (2 * batch * steps, seq), generator=generator))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=batch))
    train_peak = torch.cuda.max_memory_allocated() if CUDA else 0
    packed, adapter = {}, {}
    if shape == "tiny":
        if kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
                packed = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in packed_4bit_bytes(module.model).items()}
        else:
            packed = packed_4bit_bytes(module.model)
        adapter = gather_adapter_state_dict(trainer, module.model)
    peaks = trainer.strategy.all_gather(torch.tensor([module.load_peak, train_peak], device=trainer.strategy.root_device, dtype=torch.float64)).cpu()
    if trainer.is_global_zero:
        torch.save({"packed": packed, "adapter": adapter, "step": trainer.global_step, "peaks": peaks.reshape(-1, 2).tolist(),
                    "losses": module.losses}, out)
        print(f"{kind} {shape}: step {trainer.global_step}, losses {module.losses}, GiB per rank (loading, training): "
              f"{[[round(v / 2**30, 2) for v in p] for p in peaks.reshape(-1, 2).tolist()]}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
