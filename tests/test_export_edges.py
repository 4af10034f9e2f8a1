"""save_merged where the merged weights no longer fit the model that computes: a tied head with LoRA, a block that switches LoRA off."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from _models import randomize_adapter, tiny_gpt2, tiny_llama, tiny_llama_tied, token_batch
from lightning_lora import LoRAConfig, disable_lora, inject_lora, merged_state_dict, per_sample_adapters
from lightning_lora.export import save_merged


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def merged_and_reloaded(base, targets, folder):
    """LoRA on ``targets`` with a random adapter, ``save_merged`` into ``folder`` and loaded back by transformers:
    (the LoRA model, the loaded one, the saved config's tie_word_embeddings); the two give the same logits."""
    model = inject_lora(base, LoRAConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapter(model)
    x = token_batch()
    expected = logits(model, x)
    save_merged(model, folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder).train()
    torch.testing.assert_close(logits(loaded, x), expected, rtol=1e-5, atol=1e-5)
    return model, loaded, json.loads((folder / "config.json").read_text())["tie_word_embeddings"]


@pytest.mark.parametrize("build", [tiny_llama_tied, tiny_gpt2], ids=["llama-tied", "gpt2"])
def test_a_lora_head_tied_to_the_embedding_is_written_untied(tmp_path, build):
    targets = ["q_proj", "lm_head"] if build is tiny_llama_tied else ["c_attn", "lm_head"]
    model, loaded, tied = merged_and_reloaded(build(), targets, tmp_path / "merged")
    assert tied is False and loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    # The embedding is the base one, the head the merged one.
    with pytest.warns(UserWarning, match="one tied tensor"):
        state = merged_state_dict(model)
    torch.testing.assert_close(loaded.get_input_embeddings().weight, build().get_input_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.lm_head.weight, state["lm_head.weight"], rtol=0, atol=0)
    assert model.config.tie_word_embeddings is True  # the model itself is left as it was


def test_a_tied_model_without_lora_on_the_head_stays_tied(tmp_path):
    _, loaded, tied = merged_and_reloaded(tiny_llama_tied(), ["q_proj"], tmp_path / "merged")
    assert tied is True and loaded.lm_head.weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
def test_merged_state_dict_warns_that_a_tied_copy_would_lose_the_head(compiled):
    model = inject_lora(tiny_llama_tied(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    randomize_adapter(model)
    # A compiled model's state dict keys carry `_orig_mod.`: the tie is still found under them.
    prefix = "_orig_mod." if compiled else ""
    model = torch.compile(model) if compiled else model
    keys = f"'{prefix}model.embed_tokens.weight' and '{prefix}lm_head.weight'"
    with pytest.warns(UserWarning, match=re.escape(keys) + r" are one tied tensor.*tie_word_embeddings=False"):
        state = merged_state_dict(model)
    assert not torch.equal(state[f"{prefix}lm_head.weight"], state[f"{prefix}model.embed_tokens.weight"])


@pytest.mark.parametrize("context", ["disable_lora", "per_sample_adapters"])
def test_save_merged_inside_a_block_that_switches_lora_off_is_refused_before_writing(tmp_path, context):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8))
    randomize_adapter(model)
    block = disable_lora(model) if context == "disable_lora" else per_sample_adapters(model, ["__base__", "default"])
    with block:
        with pytest.raises(ValueError, match=rf"`save_merged` was called inside `{context}`.*call `save_merged` after the block"):
            save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()  # nothing was written
    save_merged(model, tmp_path / "merged")  # after the block it writes the merged model
    x = token_batch()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").train()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_a_module_holding_its_transformers_model_is_written_as_that_model(tmp_path):
    # A LightningModule adapted as a whole (paths "model.model...") and a compiled model (paths "_orig_mod.model...")
    # were written as model.safetensors under those paths: from_pretrained found none of its weights in it.
    from _lightning import LlamaLM

    x = token_batch()
    module = inject_lora(LlamaLM(build_in="init"), LoRAConfig(r=4, alpha=8))
    randomize_adapter(module)
    compiled = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8))
    randomize_adapter(compiled)
    for name, model, computes in (("module", module, module.model), ("compiled", torch.compile(compiled), compiled)):
        save_merged(model, tmp_path / name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).train()
        assert loaded.state_dict().keys() == tiny_llama().state_dict().keys()
        torch.testing.assert_close(logits(loaded, x), logits(computes, x), rtol=1e-5, atol=1e-5)
