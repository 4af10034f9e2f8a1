"""Every name listed in ``target_modules`` must match a module: a typo is an error even when another name matches."""

from __future__ import annotations

import pytest

from _models import assert_unchanged, model_snapshot, tiny_bert_classifier, tiny_gpt2, tiny_llama
from lightning_lora import LoRAConfig, inject_lora
from lightning_lora.layers import lora_layers


def test_a_typo_next_to_a_good_name_is_an_error_naming_it_and_the_closest_real_name() -> None:
    model = tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as err:
        inject_lora(model, LoRAConfig(r=4, target_modules=["q_prj", "v_proj"]))
    message = str(err.value)
    assert "`target_modules`=['q_prj', 'v_proj']: 'q_prj' (closest: 'q_proj'" in message
    assert "'v_proj' (" not in message  # only the unmatched name is reported
    assert "fix the spelling" in message
    assert_unchanged(model, snapshot)  # nothing was wrapped, quantized or frozen


def test_every_unmatched_name_is_listed_with_its_own_suggestions() -> None:
    with pytest.raises(ValueError) as err:
        inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "gate_prj", "dwn_proj", "zzz"]))
    message = str(err.value)
    assert "'gate_prj' (closest: 'gate_proj')" in message
    assert "'dwn_proj' (closest: 'down_proj'" in message
    assert "'zzz' (no close name)" in message
    assert "'q_proj' (" not in message


def test_a_dotted_suffix_is_compared_with_suffixes_of_the_same_depth() -> None:
    with pytest.raises(ValueError, match=r"'attention\.self\.quer' \(closest: 'attention\.self\.query'"):
        inject_lora(tiny_bert_classifier(), LoRAConfig(r=4, target_modules=["attention.self.quer", "value"]))


def test_gpt2_conv1d_names_are_suggested() -> None:
    with pytest.raises(ValueError, match=r"'c_atn' \(closest: 'c_attn'"):
        inject_lora(tiny_gpt2(), LoRAConfig(r=4, target_modules=["c_atn", "c_fc"]))


def test_names_that_all_match_adapt_exactly_those_layers() -> None:
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "self_attn.v_proj"]))
    assert sorted(lora_layers(model)) == sorted(
        f"model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj")
    )


def test_a_name_matched_only_by_excluded_modules_still_counts_as_spelled_right() -> None:
    # exclude_modules removes q_proj everywhere: the typo check passes, then "matches no layer" is about exclusion.
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=["q_proj"]))
    assert sorted(lora_layers(model)) == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]


def test_when_no_name_matches_the_error_lists_every_linear_layer_name() -> None:
    with pytest.raises(ValueError) as err:
        inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_prj"]))
    assert "matches no linear layer of LlamaForCausalLM" in str(err.value)
    assert "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in str(err.value)


def test_a_regex_is_not_checked_name_by_name() -> None:
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=r".*\.(q_proj|nothing_like_this)"))
    assert sorted(lora_layers(model)) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_a_peft_adapter_listing_names_of_other_architectures_still_loads(tmp_path) -> None:
    # PEFT saves target_modules as written and ignores names that match nothing; so does loading here.
    import torch
    from peft import LoraConfig, get_peft_model

    from _models import copy_adapter_into_peft, randomize_adapter, token_batch
    from lightning_lora import load_adapter

    from lightning_lora.inject import lora_state

    ours = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(ours)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "c_attn"]))
    copy_adapter_into_peft(ours, peft_model)
    peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert sorted(lora_layers(loaded)) == sorted(lora_layers(ours))
    assert sorted(lora_state(loaded).config.target_modules) == ["q_proj", "v_proj"]  # 'c_attn' dropped, as PEFT ignores it
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)
