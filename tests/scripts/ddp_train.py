"""Two-process DDP on CPU (gloo), launched by tests/test_ddp_cpu.py: python ddp_train.py OUT_DIR [QUANTIZE[-compiled]]."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from _lightning import LlamaLM, token_loader  # noqa: E402
from lightning_lora import LoRACallback, adapter_state_dict  # noqa: E402


def main() -> None:
    out, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "none")
    quantize = mode.removesuffix("-compiled")
    L.seed_everything(0)
    module = LlamaLM(build_in="configure_model")
    callback = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], backbone="model", quantize=None if quantize == "none" else quantize,
                            export_dir=os.path.join(out, "export"), compile_blocks=mode.endswith("-compiled"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=3, save_top_k=-1, filename="{step}")],
        gradient_clip_val=1.0,
    )
    trainer.fit(module, token_loader(n=48))
    torch.save({k: v.clone() for k, v in adapter_state_dict(module.model).items()}, os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
