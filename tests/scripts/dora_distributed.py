"""Two CPU processes (gloo) train a DoRA adapter on an nf4 tiny Llama through LoRACallback, launched by
tests/test_dora.py: python dora_distributed.py OUT_DIR ddp|fsdp2. Writes OUT_DIR/<kind>.pt from rank zero: the
adapter right after injection, the adapter after training (gathered from every shard) and, under FSDP2, how the
magnitude was sharded."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from _lightning import LlamaLM, token_loader  # noqa: E402
from lightning_lora import LoRACallback, adapter_state_dict  # noqa: E402
from lightning_lora.lightning.strategies import gather_adapter_state_dict  # noqa: E402
from lightning_lora.sharding import fully_shard_lora  # noqa: E402

out, kind = sys.argv[1], sys.argv[2]


class Module(LlamaLM):
    def configure_model(self):
        if getattr(self, "initial", None) is not None:
            return
        # The callback injected in setup (the backbone exists from __init__): keep the initial adapter, then shard.
        self.initial = {k: v.detach().clone() for k, v in adapter_state_dict(self.model).items()}
        if kind == "fsdp2":
            fully_shard_lora(self.model, mesh=self.device_mesh["data_parallel"])
            magnitude = self.model.model.layers[0].self_attn.q_proj.lora_magnitude
            self.layout = (type(magnitude).__name__, tuple(magnitude.to_local().shape), str(magnitude.placements))

    def train_dataloader(self):
        # Rank r takes sequences r, r + 2, ...: step i of the two ranks covers sequences 4i .. 4i + 3.
        dataset = token_loader(n=12, seq=16).dataset
        return DataLoader(Subset(dataset, range(self.global_rank, len(dataset), 2)), batch_size=2)


L.seed_everything(0)
module = Module(build_in="init", lr=1e-2)
callback = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, quantize="nf4", backbone="model")
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2" else "ddp"
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, callbacks=[callback], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, deterministic=True, use_distributed_sampler=False)  # fmt: skip
trainer.fit(module)
adapter = gather_adapter_state_dict(trainer, module.model)
if trainer.is_global_zero:
    torch.save({"initial": module.initial, "adapter": adapter, "layout": getattr(module, "layout", None)}, os.path.join(out, f"{kind}.pt"))
