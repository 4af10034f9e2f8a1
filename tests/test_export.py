"""save_merged: the one writer of merged weights (transformers models through save_pretrained, others as safetensors)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

from _models import randomize_adapter, tiny_llama, token_batch
from lightning_lora import LoRAConfig, QuantizationConfig, inject_lora, merged_state_dict
from lightning_lora.export import save_merged


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_transformers_model_is_written_with_save_pretrained_and_loads_back(tmp_path):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), QuantizationConfig(mode="nf4"))
    randomize_adapter(model)
    dtype_before = model.config.dtype
    save_merged(model, tmp_path, dtype=torch.bfloat16)
    assert {"config.json", "model.safetensors"} <= set(_files(tmp_path))
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]  # no temp dir left
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).train()
    assert "quantization_config" not in loaded.config.to_dict()
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = merged_state_dict(model, dtype=torch.bfloat16)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert model.config.dtype == dtype_before != torch.bfloat16  # the exported model's own config is left alone
    ids = token_batch()
    with torch.no_grad():
        assert loaded(ids).logits.shape == (2, 8, 128)


def test_plain_module_is_written_as_safetensors(tmp_path):
    torch.manual_seed(0)
    model = inject_lora(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)), LoRAConfig(r=4, target_modules=["0", "1"]))
    randomize_adapter(model)
    save_merged(model, tmp_path)
    assert sorted(_files(tmp_path)) == ["model.safetensors"]
    plain = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


def test_disk_full_during_a_merged_export_keeps_the_previous_files(tmp_path, monkeypatch):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    save_merged(model, tmp_path / "merged")
    before = _files(tmp_path / "merged")
    randomize_adapter(model, seed=3)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_lora._io.os.fsync", enospc)
    with pytest.raises(OSError, match="No space left on device"):
        save_merged(model, tmp_path / "merged")
    assert _files(tmp_path / "merged") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the temp directory is gone
