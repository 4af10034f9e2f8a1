"""merge_lora and merged_state_dict in states where merging would silently give another model than the one that computes."""

from __future__ import annotations

import pytest
import torch

from _models import randomize_adapter, tiny_gpt2, tiny_llama, tiny_llama_tied, token_batch
from lightning_lora import LoRAConfig, add_adapter, disable_lora, inject_lora, merge_lora, merged_state_dict, per_sample_adapters, unmerge_lora
from lightning_lora.layers import lora_layers


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def base_weights(model):
    return {name: layer.base_layer.weight.detach().clone() for name, layer in lora_layers(model).items()}


def test_merge_inside_disable_lora_is_refused_and_changes_nothing():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8))
    randomize_adapter(model)
    x = token_batch()
    base = logits(tiny_llama(), x)
    weights = base_weights(model)
    with disable_lora(model):
        with pytest.raises(ValueError, match=r"merge_lora.*disable_lora"):
            merge_lora(model)
        torch.testing.assert_close(logits(model, x), base, rtol=0, atol=1e-6)  # still the base model
    assert not any(layer.merged for layer in lora_layers(model).values())
    assert all(torch.equal(w, base_weights(model)[n]) for n, w in weights.items())


def test_merge_inside_per_sample_adapters_is_refused():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8))
    randomize_adapter(model)
    add_adapter(model, "sql", LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    x = token_batch()
    base = logits(tiny_llama(), x)
    with per_sample_adapters(model, ["__base__", "default"]):
        with pytest.raises(ValueError, match=r"merge_lora.*per_sample_adapters"):
            merge_lora(model)
        torch.testing.assert_close(logits(model, x)[0], base[0], rtol=0, atol=1e-6)  # row 0 is still the base alone
    assert not any(layer.merged for layer in lora_layers(model).values())


@pytest.mark.parametrize("build", [tiny_llama_tied, tiny_gpt2], ids=["llama-tied", "gpt2"])
def test_merge_refuses_a_lora_head_whose_weight_is_tied_to_the_embedding(build):
    targets = ["q_proj", "lm_head"] if build is tiny_llama_tied else ["c_attn", "lm_head"]
    model = inject_lora(build(), LoRAConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapter(model)
    x = token_batch()
    expected = logits(model, x)
    weights = base_weights(model)
    with pytest.raises(ValueError, match=r"lm_head.*tied.*wte|lm_head.*tied.*embed_tokens"):
        merge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())  # no layer merged, not even q_proj
    assert all(torch.equal(w, base_weights(model)[n]) for n, w in weights.items())
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=0)
    unmerge_lora(model)  # a no-op, still allowed


def test_merge_of_a_tied_model_without_lora_on_the_head_still_works():
    model = inject_lora(tiny_llama_tied(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    x = token_batch()
    expected = logits(model, x)
    merge_lora(model)
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context", ["disable_lora", "per_sample_adapters"])
def test_merged_state_dict_inside_a_block_that_switches_lora_off_is_refused(context):
    # Inside the block the model computes without LoRA (or with another adapter per sample), while merged_state_dict
    # folds the active adapter into every weight: its result would not be the model that runs there.
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8))
    randomize_adapter(model)
    outside = merged_state_dict(model)
    block = disable_lora(model) if context == "disable_lora" else per_sample_adapters(model, ["__base__", "default"])
    with block:
        with pytest.raises(ValueError, match=rf"`merged_state_dict` was called inside `{context}`.*call `merged_state_dict` after the block"):
            merged_state_dict(model)
    after = merged_state_dict(model)  # after the block: the merged weights, as before it
    assert after.keys() == outside.keys()
    assert all(torch.equal(after[key], outside[key]) for key in outside)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], tiny_llama().model.layers[0].self_attn.q_proj.weight)
