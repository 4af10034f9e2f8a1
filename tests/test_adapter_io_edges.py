"""Adapter files: writing into the working directory, state dicts that are not the model's adapter, pickles."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from _models import randomize_adapter, tiny_llama, token_batch
from lightning_lora import LoRAConfig, adapter_state_dict, inject_lora, load_adapter, save_adapter
from lightning_lora.adapter_io import ADAPTER_WEIGHTS_NAME
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
