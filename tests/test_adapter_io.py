"""Adapter tensors and PEFT's on-disk format: exact contents, round trips with PEFT, errors, atomic writes."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from _models import (
    assert_unchanged,
    model_snapshot,
    randomize_adapter,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)
from lightning_lora import (
    LoRAConfig,
    QuantizationConfig,
    __version__,
    adapter_state_dict,
    backbone_fingerprint,
    inject_lora,
    load_adapter,
    quantize_model,
    save_adapter,
)
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.inject import lora_state
from lightning_lora.layers import lora_layers

QUANT_STATE_WORDS = ("absmax", "quant_map", "quant_state", "nested", "bitsandbytes", "SCB", "weight_format")
CASES = {
    "llama-qv": (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    "llama-patterns-rslora": (
        tiny_llama,
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {r"layers\.1\.mlp\.down_proj": 3.0},
            "use_rslora": True,
        },
    ),
    "llama-regex": (tiny_llama, {"target_modules": r".*\.layers\.0\.self_attn\.(k|o)_proj"}),
    "gpt2-conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"]}),
    "bert-classifier-bias-all": (tiny_bert_classifier, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "bias": "all"}),
    "bert-lora-only": (tiny_bert_classifier, {"target_modules": ["query", "value"], "bias": "lora_only"}),
}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def file_keys(directory: Path) -> set[str]:
    with safe_open(str(directory / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
        return set(handle.keys())


def lora_keys(paths: set[str]) -> set[str]:
    return {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}


def saved_model(tmp_path: Path, case: str = "llama-qv", r: int = 4) -> tuple[nn.Module, Path]:
    builder, kwargs = CASES[case]
    model = inject_lora(builder(), LoRAConfig(r=r, alpha=8, **kwargs))
    randomize_adapter(model)
    directory = tmp_path / "adapter"
    save_adapter(model, directory)
    return model, directory


# --- contents ----------------------------------------------------------------------------------------


def test_adapter_state_dict_holds_exactly_the_lora_tensors():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = adapter_state_dict(model)
    paths = {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")}
    assert set(adapter) == {f"{p}.lora_{ab}.weight" for p in paths for ab in "ab"}
    params = dict(model.named_parameters())
    assert all(adapter[key].data_ptr() == params[key].data_ptr() for key in adapter)  # detached, not copied


def test_saved_adapter_has_exact_keys_config_and_metadata(tmp_path):
    model, directory = saved_model(tmp_path)
    assert sorted(os.listdir(directory)) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    paths = {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")}
    assert file_keys(directory) == lora_keys(paths)
    tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
    for key, value in adapter_state_dict(model).items():
        peft_key = "base_model.model." + key.replace("lora_a", "lora_A").replace("lora_b", "lora_B")
        assert torch.equal(tensors[peft_key], value)
    config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save", "use_rslora", "fan_in_fan_out", "init_lora_weights")} == {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "modules_to_save": None,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    with safe_open(str(directory / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
        metadata = handle.metadata()
    assert set(metadata) == {"format", "lightning_lora_version", "backbone_fingerprint", "quantization", "lora_config", "tensors_sha256"}
    assert metadata["lightning_lora_version"] == __version__
    assert metadata["backbone_fingerprint"] == backbone_fingerprint(model)
    assert json.loads(metadata["lora_config"]) == lora_state(model).config.to_dict()
    assert json.loads(metadata["quantization"]) is None


def test_quantized_adapter_holds_no_backbone_and_no_quant_state(tmp_path):
    model = inject_lora(
        tiny_bert_classifier(),
        LoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"),
        QuantizationConfig(mode="nf4"),
    )
    assert any(word in key for key in model.state_dict() for word in ("absmax", "quant_map"))  # the model has them ...
    save_adapter(model, tmp_path)
    paths = {f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")}
    expected = lora_keys(paths) | {f"base_model.model.{p}.base_layer.bias" for p in paths} | {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    keys = file_keys(tmp_path)
    assert keys == expected  # ... the adapter does not
    assert not [key for key in keys if any(word in key for word in QUANT_STATE_WORDS)]
    assert {value.dtype for value in load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME)).values()} == {torch.float32}
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
        assert json.loads(handle.metadata()["quantization"])["mode"] == "nf4"


# --- round trips with PEFT ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_adapter_loads_into_peft(tmp_path, case):
    builder, _ = CASES[case]
    model, directory = saved_model(tmp_path, case)
    peft = PeftModel.from_pretrained(builder(), str(directory))
    peft_params = dict(peft.named_parameters())
    to_save = lora_state(model).modules_to_save
    for key, value in adapter_state_dict(model).items():
        if any(key.startswith(root + ".") for root in to_save):
            root = next(root for root in to_save if key.startswith(root + "."))
            peft_key = f"base_model.model.{root}.modules_to_save.default.{key[len(root) + 1:]}"
        else:
            peft_key = "base_model.model." + key.replace(".lora_a.", ".lora_A.default.").replace(".lora_b.", ".lora_B.default.")
        assert torch.equal(peft_params[peft_key], value), key
    model.eval()
    peft.eval()
    x = token_batch()
    assert_close_scaled(logits(peft, x), logits(model, x))


@torch.no_grad()
def _randomize_peft(peft: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft.named_parameters():
        if param.requires_grad:
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise) if ".lora_B." in name else param.add_(noise)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_into_ours(tmp_path, case):
    builder, kwargs = CASES[case]
    config = LoRAConfig(r=4, alpha=8, **kwargs)
    peft = get_peft_model(
        builder(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=config.target_modules,
            bias=config.bias,
            modules_to_save=config.modules_to_save,
            rank_pattern=config.rank_pattern,
            alpha_pattern=config.alpha_pattern,
            use_rslora=config.use_rslora,
            fan_in_fan_out=builder is tiny_gpt2,
        ),
    )
    _randomize_peft(peft)
    peft.save_pretrained(str(tmp_path))
    model = load_adapter(builder(), tmp_path)  # injects from adapter_config.json
    state = lora_state(model)
    assert (state.config.r, state.config.alpha, state.config.bias, state.config.use_rslora) == (4, 8, config.bias, config.use_rslora)
    peft_targets = {name for name, _ in peft.base_model.model.named_modules() if name.endswith(".lora_A")}
    assert set(lora_layers(model)) == {name[: -len(".lora_A")] for name in peft_targets}
    for name, layer in lora_layers(model).items():
        peft_layer = peft.base_model.model.get_submodule(name)
        assert (layer.r, layer.scale) == (peft_layer.r["default"], peft_layer.scaling["default"])
    model.eval()
    peft.eval()
    x = token_batch()
    assert_close_scaled(logits(model, x), logits(peft, x))


def test_quantized_round_trip_into_a_prequantized_base(tmp_path):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), QuantizationConfig(mode="nf4"))
    randomize_adapter(model)
    save_adapter(model, tmp_path)
    fresh = tiny_llama()
    quantize_model(fresh, QuantizationConfig(mode="nf4"))
    load_adapter(fresh, tmp_path)
    x = token_batch()  # train mode: the same bitsandbytes path in both
    assert torch.equal(logits(fresh, x), logits(model, x))
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value)


def test_load_into_an_injected_model_replaces_the_adapter(tmp_path):
    model, directory = saved_model(tmp_path)
    other = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert load_adapter(other, directory) is other
    x = token_batch()
    assert torch.equal(logits(other, x), logits(model, x))


# --- errors leave the model as it was ----------------------------------------------------------------


def _rewrite_weights(directory: Path, edit) -> None:
    path = directory / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("injected", [False, True], ids=["fresh-base", "injected"])
def test_wrong_shape_names_the_key_and_both_shapes(tmp_path, injected):
    _, directory = saved_model(tmp_path)
    _rewrite_weights(directory, lambda t: t.__setitem__(Q0_A, torch.zeros(4, 96)))
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])) if injected else tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, directory)
    assert str(info.value) == (
        f"The adapter in {str(directory)!r} does not fit this model: 'model.layers.0.self_attn.q_proj.lora_a.weight' "
        "has shape (4, 96) in the file, (4, 64) in the model."
    )
    assert_unchanged(model, snapshot)
    assert (lora_state(model) is None) is not injected


def test_another_rank_is_explained(tmp_path):
    _, directory = saved_model(tmp_path, r=8)
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, directory)
    message = str(info.value)
    assert "'model.layers.0.self_attn.q_proj.lora_a.weight' has shape (8, 64) in the file, (4, 64) in the model." in message
    assert "The adapter has rank r=8 here, the model r=4: build the model with the adapter's r." in message
    assert_unchanged(model, snapshot)
    # A model without LoRA takes the rank from the adapter's config.
    fresh = load_adapter(tiny_llama(), directory)
    assert {layer.r for layer in lora_layers(fresh).values()} == {8}


@pytest.mark.parametrize("injected", [False, True], ids=["fresh-base", "injected"])
def test_missing_key(tmp_path, injected):
    _, directory = saved_model(tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])) if injected else tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, directory)
    assert (
        "does not fit this model: 1 missing keys (first: ['model.layers.1.self_attn.v_proj.lora_b.weight']) "
        "and 0 unexpected keys (first: [])" in str(info.value)
    )
    assert "load it into the model it was trained on" in str(info.value)
    assert_unchanged(model, snapshot)


def test_extra_key(tmp_path):
    _, directory = saved_model(tmp_path)
    _rewrite_weights(directory, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 64)))
    model = tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, directory)
    assert "0 missing keys (first: []) and 1 unexpected keys (first: ['model.layers.0.mlp.up_proj.lora_a.weight'])" in str(info.value)
    assert_unchanged(model, snapshot)
    assert not lora_layers(model)


def test_bad_last_key_writes_nothing(tmp_path):
    # All or nothing: earlier keys fit, the last one does not; no adapter tensor may change.
    _, directory = saved_model(tmp_path)
    last = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite_weights(directory, lambda t: t.__setitem__(last, t[last].to(torch.int64)))
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=re.escape("holds 'model.layers.1.self_attn.v_proj.lora_b.weight' as torch.int64; adapter tensors must be floating point.")):
        load_adapter(model, directory)
    assert_unchanged(model, snapshot)


def test_truncated_weights_file(tmp_path):
    _, directory = saved_model(tmp_path)
    path = directory / ADAPTER_WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, directory)
    message = str(info.value)
    assert message.startswith(f"{str(path)!r} cannot be read as safetensors (")
    assert "the file is truncated or corrupted. Re-export the adapter or restore it from a checkpoint." in message
    assert_unchanged(model, snapshot)


def test_invalid_json_config(tmp_path):
    _, directory = saved_model(tmp_path)
    (directory / ADAPTER_CONFIG_NAME).write_text('{"r": 4, "lora_alpha": ')
    model = tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, directory)
    assert str(info.value).startswith(f"{str(directory / ADAPTER_CONFIG_NAME)!r} is not valid JSON (")
    assert "the file is corrupted: re-export the adapter." in str(info.value)
    assert_unchanged(model, snapshot)


def test_invalid_values_in_config(tmp_path):
    _, directory = saved_model(tmp_path)
    config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
    for key, value, message in (
        ("r", 0, "`r` must be a positive integer, got 0."),
        ("lora_bias", True, "The adapter uses PEFT's `lora_bias`=True, which lightning_lora does not implement"),
        ("init_lora_weights", "corda", "`init_lora_weights`='corda', which rewrites the base weights in a way"),
        ("use_dora", True, "has `use_dora`=True, but adapter_model.safetensors was saved with use_dora=False"),  # the files disagree
        ("peft_type", "IA3", "describes peft_type='IA3'; only LoRA adapters load here."),
    ):
        (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config | {key: value}))
        model = tiny_llama()
        snapshot = model_snapshot(model)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_adapter(model, directory)
        assert_unchanged(model, snapshot)


def test_missing_files(tmp_path):
    _, directory = saved_model(tmp_path)
    (directory / ADAPTER_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"has no {ADAPTER_CONFIG_NAME}: an adapter directory holds")):
        load_adapter(tiny_llama(), directory)


def test_save_needs_lora_and_a_directory(tmp_path):
    with pytest.raises(ValueError, match=re.escape("`save_adapter` got a model without LoRA")):
        save_adapter(tiny_llama(), tmp_path)
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"`directory`={str(tmp_path / 'file')!r} is a file")):
        save_adapter(model, tmp_path / "file")


# --- atomic save -------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model, directory = saved_model(tmp_path)
    before = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.weight.add_(1.0)  # what a new save would write

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 1000)  # a partial file ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr("lightning_lora.adapter_io.save_file", full_disk)
    with pytest.raises(OSError) as info:
        save_adapter(model, directory)
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(directory)) == sorted(before)  # no temporary file left behind
    for name, data in before.items():
        assert (directory / name).read_bytes() == data
    monkeypatch.undo()
    save_adapter(model, directory)  # and a later save succeeds
    assert (directory / ADAPTER_WEIGHTS_NAME).read_bytes() != before[ADAPTER_WEIGHTS_NAME]
    assert sorted(os.listdir(directory)) == sorted(before)


# --- every PEFT field: implemented, metadata, or refused ---------------------------------------------


def test_every_field_of_the_installed_peft_lora_config_is_classified():
    import dataclasses

    from lightning_lora.adapter_io import _PEFT_METADATA, _PEFT_REFUSED
    from lightning_lora.config import peft_fields

    implemented = {key for key, _ in peft_fields().values()}
    peft = {f.name for f in dataclasses.fields(LoraConfig)}
    assert implemented == {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "modules_to_save", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern", "target_parameters", "trainable_token_indices", "use_dora"}
    assert peft == implemented | _PEFT_METADATA | _PEFT_REFUSED  # a new PEFT field fails here until it is classified
    assert not (implemented & _PEFT_METADATA or implemented & _PEFT_REFUSED or _PEFT_METADATA & _PEFT_REFUSED)


@pytest.mark.parametrize("field", ["fan_in_fan_out", "inference_mode", "task_type", "revision", "peft_version", "megatron_core", "qalora_group_size"])
def test_metadata_fields_load_exactly_what_was_saved(tmp_path, field):
    model, directory = saved_model(tmp_path)
    config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
    config[field] = {"fan_in_fan_out": True, "inference_mode": False, "task_type": "CAUSAL_LM", "revision": "v2", "peft_version": "9.9", "megatron_core": "x", "qalora_group_size": 64}[field]
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    loaded = load_adapter(tiny_llama(), directory)
    want, got = adapter_state_dict(model), adapter_state_dict(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [layer.scale for layer in lora_layers(loaded).values()] == [layer.scale for layer in lora_layers(model).values()]


def test_tied_modules_to_save_train_and_save_under_both_names(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))

    model = inject_lora(tied(), LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]))
    assert model.lm_head.weight.requires_grad and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # what training the shared tensor does
    saved = adapter_state_dict(model)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(saved)
    loaded = load_adapter(tied(), save_adapter(model, tmp_path / "a"))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
