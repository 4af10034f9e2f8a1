"""LoRAMixin: the module declares its LoRA config; same checkpoints, save/load/merge helpers."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from _lightning import LlamaLM, MixinLlamaLM, token_loader, trainer
from _models import token_batch
from lightning_lora import LoRAConfig, LoRAMixin, QuantizationConfig, adapter_state_dict

CONFIG = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])


def _trained(max_steps=4, **kwargs):
    L.seed_everything(0)
    module = MixinLlamaLM(CONFIG, **kwargs)
    trainer(max_steps).fit(module, token_loader())
    return module


def test_mixin_save_load_adapter_and_merge(tmp_path):
    module = _trained()
    module.save_adapter(tmp_path / "adapter")
    ids = token_batch()
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        fresh = MixinLlamaLM(CONFIG, build_in="init")
        fresh.model.eval()
        fresh.load_adapter(tmp_path / "adapter")  # injects from the adapter's config
        torch.testing.assert_close(fresh.model(input_ids=ids).logits, expected)
        module.merge_lora()
        torch.testing.assert_close(module.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        module.unmerge_lora()
        torch.testing.assert_close(module.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_mixin_checkpoint_is_adapter_only_and_resumes_bit_exact(tmp_path):
    L.seed_everything(0)
    full = MixinLlamaLM(CONFIG, quantization_config=QuantizationConfig(mode="nf4"))
    trainer(16, [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")], enable_checkpointing=True).fit(
        full, token_loader()
    )
    checkpoint = torch.load(tmp_path / "step=8.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {"model." + k for k in adapter_state_dict(full.model)}
    L.seed_everything(0)
    resumed = MixinLlamaLM(CONFIG, quantization_config=QuantizationConfig(mode="nf4"))
    trainer(16).fit(resumed, token_loader(), ckpt_path=tmp_path / "step=8.ckpt")
    a, b = adapter_state_dict(full.model), adapter_state_dict(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixin_without_lora_config_is_a_clear_error():
    class NoConfig(LoRAMixin, LlamaLM):
        pass

    with pytest.raises(ValueError, match=r"NoConfig.lora_config must be a LoRAConfig, got None"):
        trainer(1).fit(NoConfig(), token_loader())
