"""Adapter files: writing into the working directory, state dicts that are not the model's adapter, pickles, and an
adapter of a module that holds its transformers model as an attribute (a LightningModule's ``self.model``)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from _lightning import LlamaLM
from _models import randomize_adapter, tiny_llama, token_batch
from lightning_lora import LoRAConfig, adapter_state_dict, inject_lora, load_adapter, save_adapter
from lightning_lora.adapter_io import ADAPTER_WEIGHTS_NAME, to_peft_keys
from lightning_lora.export import save_merged


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("writer", ["save_adapter", "save_merged"])
@pytest.mark.parametrize("where", [".", "sub"], ids=["cwd", "cwd-inside"])
def test_writing_the_working_directory_keeps_the_process_in_it(tmp_path, monkeypatch, writer, where):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    monkeypatch.chdir(out / "sub" if where == "sub" else out)
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8))
    randomize_adapter(model)
    target = "." if where == "." else ".."
    save_adapter(model, target) if writer == "save_adapter" else save_merged(model, target)
    assert os.getcwd() == str(out / "sub" if where == "sub" else out)  # not a deleted directory
    assert (out / "notes.txt").read_text() == "mine"
    if writer == "save_adapter":
        x = token_batch()
        torch.testing.assert_close(logits(load_adapter(tiny_llama(), target), x), logits(model, x), rtol=0, atol=0)
    else:
        assert (tmp_path / "out" / "model.safetensors").is_file() and os.path.isfile(os.path.join(target, "config.json"))


def test_a_state_dict_with_other_keys_is_refused_before_writing(tmp_path):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    tensors = adapter_state_dict(model)
    compiled = {f"_orig_mod.{key}": value for key, value in tensors.items()}  # keys of a compiled model's state_dict
    with pytest.raises(ValueError, match=r"`state_dict`.*_orig_mod\.model\.layers\.0\.self_attn\.q_proj\.lora_a\.weight"):
        save_adapter(model, tmp_path / "a", state_dict=compiled)
    missing = dict(list(tensors.items())[1:])
    with pytest.raises(ValueError, match=r"`state_dict`.*1 missing.*model\.layers\.0\.self_attn\.q_proj\.lora_a\.weight"):
        save_adapter(model, tmp_path / "a", state_dict=missing)
    assert not (tmp_path / "a").exists()
    save_adapter(model, tmp_path / "a", state_dict={key: value.clone() for key, value in tensors.items()})  # its own keys: written
    assert (tmp_path / "a" / ADAPTER_WEIGHTS_NAME).is_file()


def test_a_pickled_peft_adapter_is_refused_by_name(tmp_path):
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    peft.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin.*pickle.*safe_serialization=True"):
        load_adapter(tiny_llama(), tmp_path)


WRAPPED = {
    "names": {"target_modules": ["q_proj", "v_proj"]},
    # A regex over the module's own paths: PEFT full-matches the file's target_modules against the backbone's paths.
    "regex": {"target_modules": r"model\.model\.layers\.0\.self_attn\.(q|v)_proj"},
    # A pattern keyed by the module's path: PEFT matches the file's patterns against the backbone's paths too.
    "alpha-pattern": {"target_modules": ["q_proj", "v_proj"], "alpha_pattern": {"model.model.layers.1.self_attn.v_proj": 32}},
    "modules-to-save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("case", list(WRAPPED))
def test_an_adapter_of_a_lightning_module_loads_in_peft_on_the_bare_backbone(tmp_path, case):
    # inject_lora on the whole LightningModule (LoRACallback(backbone=None)): its paths start with "model.", but PEFT
    # loads the file into the transformers model itself, where they do not. It warned of missing keys and ran the base.
    module = LlamaLM(build_in="init")
    inject_lora(module, LoRAConfig(r=4, alpha=8, **WRAPPED[case]))
    tensors = randomize_adapter(module)
    save_adapter(module, tmp_path / "adapter")
    assert set(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME)) == set(to_peft_keys({k.removeprefix("model."): v for k, v in tensors.items()}))
    x = token_batch()
    expected = logits(module.model, x)
    assert not torch.allclose(expected, logits(tiny_llama(), x), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter"), x), expected, rtol=1e-5, atol=1e-6)
    # Ours loads it into the bare backbone, into a fresh module (injected from the file) and into one with LoRA already.
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path / "adapter"), x), expected, rtol=0, atol=0)
    fresh = load_adapter(LlamaLM(build_in="init"), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh.model, x), expected, rtol=0, atol=0)
    assert adapter_state_dict(fresh).keys() == tensors.keys()
    injected = inject_lora(LlamaLM(build_in="init"), LoRAConfig(r=4, alpha=8, **WRAPPED[case]))
    torch.testing.assert_close(logits(load_adapter(injected, tmp_path / "adapter").model, x), expected, rtol=0, atol=0)


def test_a_peft_adapter_of_the_whole_module_still_loads_into_the_module(tmp_path):
    # PEFT can wrap the LightningModule itself (and lightning_lora wrote such files before): keys from the module.
    torch.manual_seed(3)
    peft_model = get_peft_model(LlamaLM(build_in="init"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    peft_model.save_pretrained(str(tmp_path))
    assert all(key.startswith("base_model.model.model.model.layers.") for key in load_file(tmp_path / ADAPTER_WEIGHTS_NAME))
    x = token_batch()
    expected = logits(peft_model.base_model.model.model, x)
    torch.testing.assert_close(logits(load_adapter(LlamaLM(build_in="init"), tmp_path).model, x), expected, rtol=1e-5, atol=1e-6)


class _TwoModels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher, self.student = tiny_llama(), tiny_llama()


def test_an_adapter_that_fits_two_transformers_models_of_a_module_is_refused_unless_its_lora_says_where(tmp_path):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    randomize_adapter(model)
    save_adapter(model, tmp_path)  # its target_modules: a regex, which fits either model of _TwoModels
    with pytest.raises(ValueError, match=r"fits _TwoModels in 2 places \('teacher', 'student'\).*Inject LoRA into that one first"):
        load_adapter(_TwoModels(), tmp_path)
    two = inject_lora(_TwoModels(), LoRAConfig(r=4, alpha=8, target_modules=r"student\.model\.layers\.0\.self_attn\.q_proj"))
    load_adapter(two, tmp_path)
    x = token_batch()
    torch.testing.assert_close(logits(two.student, x), logits(model, x), rtol=0, atol=0)
    torch.testing.assert_close(logits(two.teacher, x), logits(tiny_llama(), x), rtol=0, atol=0)
