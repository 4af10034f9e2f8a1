"""Train a tiny Llama with LoRACallback on CPU, checkpointing every step; the fault tests kill and resume it.

    python tests/scripts/fault_train.py OUT_DIR [--resume] [--step-delay SECONDS] [--nan-steps 3,5]

Writes OUT_DIR/ckpt/last.ckpt after every optimizer step and, when fit ends, the adapter to
OUT_DIR/adapter and the number of skipped (non-finite) steps to OUT_DIR/skipped.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from _lightning import LlamaLM, trainer  # noqa: E402
from _models import VOCAB  # noqa: E402
from lightning_lora import LoRACallback, save_adapter  # noqa: E402
from lightning_lora.data._resumable import ResumableDataLoader  # noqa: E402

BATCHES_PER_EPOCH = 6
EPOCHS = 2


class _Slow(Callback):
    """Sleeps after each step so a test can kill the run between two known checkpoints."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.delay)


class _NaNLM(LlamaLM):
    def __init__(self, nan_steps: set[int]) -> None:
        super().__init__(build_in="init")
        self.nan_steps = nan_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--nan-steps", default="")
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, VOCAB, (BATCHES_PER_EPOCH * 4, 16), generator=g))
    loader = ResumableDataLoader(data, batch_size=4, shuffle=True, seed=7)
    nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
    module = _NaNLM(nan_steps)
    lora = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], backbone="model", dropout=args.dropout, max_nonfinite_steps=3)
    checkpoint = ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_last=True, every_n_train_steps=1, save_top_k=-1)
    callbacks = [lora, checkpoint] + ([_Slow(args.step_delay)] if args.step_delay else [])
    t = trainer(-1, callbacks, max_epochs=EPOCHS, enable_checkpointing=True)
    t.fit(module, loader, ckpt_path="last" if args.resume else None)
    save_adapter(module.model, os.path.join(args.out, "adapter"))
    with open(os.path.join(args.out, "skipped.txt"), "w") as f:
        f.write(str(lora.controller.skipped_steps))


if __name__ == "__main__":
    main()
