"""Checks a review found missing (2026-12-03): PEFT classification files, colliding keys, the merged dtype, and
``LoRACallback(from_backbone=...)``."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lightning_lora import LoRACallback, LoRAConfig, adapter_state_dict, inject_lora, load_adapter, merged_state_dict, save_adapter
from lightning_lora.export import save_merged


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _perturb_trainable(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def test_a_peft_sequence_classification_adapter_loads_and_gives_peft_outputs(tmp_path):
    """PEFT's SEQ_CLS task saves modules_to_save=['classifier', 'score'] for every model: 'score' names Llama's head
    and matches nothing in Bert. PEFT loads the file; so must we, with the trained classifier."""
    from peft import LoraConfig, get_peft_model

    logging.getLogger("peft").setLevel(logging.ERROR)
    peft_model = get_peft_model(_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    _perturb_trainable(peft_model)
    peft_model.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    ours = load_adapter(_bert(), tmp_path).eval()
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, _bert()(input_ids=ids).logits)  # the adapter and the classifier did load


def test_an_unmatched_modules_to_save_name_whose_weights_the_file_holds_is_refused(tmp_path):
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    save_adapter(model, tmp_path)
    other = _llama()
    del other.lm_head  # the saved head has nowhere to go
    with pytest.raises(ValueError, match="lm_head"):
        load_adapter(other, tmp_path)


def test_two_file_keys_for_one_tensor_are_refused(tmp_path):
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _perturb_trainable(model)
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = dict(load_file(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key.replace("lora_A.weight", "lora_A.other.weight")] = torch.zeros_like(tensors[key])
    os.remove(path)
    save_file(tensors, path)  # without our metadata: a third-party file, no checksum to catch it
    with pytest.raises(ValueError, match=r"lora_A\.other\.weight.*both hold"):
        load_adapter(_llama(), tmp_path)


def test_the_same_file_with_only_peft_adapter_names_loads(tmp_path):
    """One adapter whose keys carry PEFT's adapter name (``lora_A.default.weight``) is not a collision."""
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    _perturb_trainable(model)
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in load_file(path).items()}
    os.remove(path)
    save_file(tensors, path)
    loaded = adapter_state_dict(load_adapter(_llama(), tmp_path))
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, "int8", "bf16x", 3])
def test_merged_weights_refuse_a_dtype_that_is_not_real_floating(tmp_path, dtype):
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="`dtype` must be a floating torch dtype"):
        merged_state_dict(model, dtype=dtype)
    with pytest.raises(ValueError, match="`dtype` must be a floating torch dtype"):
        save_merged(model, tmp_path / "merged", dtype=dtype)
    assert not (tmp_path / "merged").exists()


def test_merged_weights_take_a_dtype_name():
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    by_name = merged_state_dict(model, dtype="bfloat16")
    by_dtype = merged_state_dict(model, dtype=torch.bfloat16)
    assert by_name.keys() == by_dtype.keys()
    for key, value in by_dtype.items():
        assert value.dtype == torch.bfloat16 and torch.equal(by_name[key], value), key


@pytest.mark.parametrize("value", ["false", "yes", 1, None])
def test_from_backbone_must_be_a_bool(value):
    with pytest.raises(TypeError, match="`from_backbone` must be True or False"):
        LoRACallback(r=4, target_modules=["q_proj"], from_backbone=value)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("value", ["abc", 5, [], [("q_proj", 4)]])
def test_callback_patterns_that_are_not_dicts_are_refused_by_name(field, value):
    with pytest.raises(TypeError, match=f"`{field}` must be a dict"):
        LoRACallback(r=4, target_modules=["q_proj"], **{field: value})


def test_a_float_rank_in_rank_pattern_is_called_a_rank():
    with pytest.raises(ValueError, match="must be a positive integer"):
        LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 8.0})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_prj"]}, r"`exclude_modules` entry 'v_prj' matches no module"),
        ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*\.v_prj"}, r"`exclude_modules` entry '.*\\\\.v_prj' matches no module"),
        ({"target_modules": ["q_proj"], "rank_pattern": {"q_prj": 2}}, r"`rank_pattern` key 'q_prj' matches no adapted layer"),
        ({"target_modules": ["q_proj"], "alpha_pattern": {"v_proj": 2.0}}, r"`alpha_pattern` key 'v_proj' matches no adapted layer"),
        ({"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["layers.0.self_attn"]}, r"trained in full and get no LoRA"),
    ],
)
def test_names_that_change_nothing_warn(options, message):
    with pytest.warns(UserWarning, match=message):
        inject_lora(_llama(), LoRAConfig(r=4, alpha=8, **options))


def test_names_that_all_take_effect_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_lora(
            _llama(),
            LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=[r"layers.1.self_attn.v_proj"],
                       rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.0\..*": 4.0}, modules_to_save=["lm_head"]),
        )
