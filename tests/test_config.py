"""LoRAConfig / QuantizationConfig: defaults, normalisation, and errors a user can act on."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_lora import LoRAConfig, QuantizationConfig


def test_lora_config_defaults_and_to_dict():
    config = LoRAConfig()
    assert config.to_dict() == {
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": "all-linear",
        "exclude_modules": None,
        "bias": "none",
        "modules_to_save": None,
        "init": "kaiming",
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_parameters": None,
        "trainable_token_indices": None,
        "use_dora": False,
    }
    assert LoRAConfig(**config.to_dict()) == config


def test_lora_config_normalises_containers():
    config = LoRAConfig(target_modules=("q_proj", "v_proj"), modules_to_save="classifier")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.modules_to_save == ["classifier"]


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("r", 0, "Typical values are 4 to 64"),
        ("r", -4, "Typical values are 4 to 64"),
        ("r", 2.5, "Typical values are 4 to 64"),
        ("r", True, "Typical values are 4 to 64"),
        ("alpha", 0, "A common choice is 2 * r"),
        ("alpha", -1.0, "A common choice is 2 * r"),
        ("alpha", "16", "A common choice is 2 * r"),
        ("dropout", -0.1, "Use 0.0 to disable it"),
        ("dropout", 1.0, "Use 0.0 to disable it"),
        ("dropout", 1.5, "Use 0.0 to disable it"),
    ],
)
def test_lora_config_rejects_bad_numbers(field, value, hint):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**{field: value})
    message = str(info.value)
    assert f"`{field}`" in message
    assert f"got {value!r}" in message
    assert hint in message


@pytest.mark.parametrize("dropout", [0.0, 0.5, 0.999])
def test_lora_config_accepts_dropout_in_half_open_unit_interval(dropout):
    assert LoRAConfig(dropout=dropout).dropout == dropout


@pytest.mark.parametrize(
    ("field", "value", "choices"),
    [
        ("bias", "some", "('none', 'all', 'lora_only')"),
        ("init", "xavier", "('kaiming', 'gaussian', 'pissa', 'olora', 'pissa_niter_<K>')"),
        ("init", "pissa_niter_0", "('kaiming', 'gaussian', 'pissa', 'olora', 'pissa_niter_<K>')"),
        ("init", "pissa_niter_", "('kaiming', 'gaussian', 'pissa', 'olora', 'pissa_niter_<K>')"),
        ("init", True, "('kaiming', 'gaussian', 'pissa', 'olora', 'pissa_niter_<K>')"),
    ],
)
def test_lora_config_rejects_unknown_modes(field, value, choices):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**{field: value})
    assert str(info.value).startswith(f"`{field}` must be one of {choices}, got {value!r}.")


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa", "pissa_niter_4", "pissa_niter_16", "olora"])
def test_lora_config_accepts_every_init(init):
    assert LoRAConfig(init=init, use_dora=True).init == init


def test_lora_config_rejects_a_non_bool_use_dora():
    with pytest.raises(TypeError, match=re.escape("`use_dora` must be True or False, got 'yes'.")):
        LoRAConfig(use_dora="yes")


def test_lora_config_rejects_empty_and_invalid_patterns():
    with pytest.raises(ValueError, match=re.escape("`target_modules` is empty")) as info:
        LoRAConfig(target_modules=[])
    assert "'all-linear'" in str(info.value)
    with pytest.raises(ValueError, match=re.escape("`target_modules` entry 'q_proj(' is not a valid regex")):
        LoRAConfig(target_modules="q_proj(")
    with pytest.raises(ValueError, match=re.escape("`exclude_modules` entry '[' is not a valid regex")):
        LoRAConfig(exclude_modules=["["])
    with pytest.raises(TypeError, match=re.escape("`target_modules` must be a list of module names or one regex string, got [3]")):
        LoRAConfig(target_modules=[3])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank_pattern", {"q_proj": 0}, "`rank_pattern['q_proj']` must be a positive integer (a rank), got 0."),
        ("rank_pattern", {"q_proj": 2.0}, "`rank_pattern['q_proj']` must be a positive integer (a rank), got 2.0."),
        ("alpha_pattern", {"v_proj": -8}, "`alpha_pattern['v_proj']` must be a positive number, got -8."),
    ],
)
def test_lora_config_rejects_bad_patterns(field, value, message):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**{field: value})
    assert str(info.value) == message


def test_quantization_config_defaults_and_normalisation():
    config = QuantizationConfig(compute_dtype="bf16", quant_storage=torch.bfloat16, skip_modules="lm_head")
    assert config.to_dict() == {
        "mode": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
        "skip_modules": ["lm_head"],
        "quant_storage": "bfloat16",
    }
    assert config.resolved_compute_dtype("cpu") is torch.bfloat16
    assert config.storage_dtype() is torch.bfloat16
    default = QuantizationConfig()
    assert default.resolved_compute_dtype("cpu") is torch.float32
    assert default.resolved_compute_dtype(None) is torch.float32
    assert default.resolved_compute_dtype("cuda") is torch.bfloat16
    assert default.storage_dtype() is torch.uint8


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("mode", "nf3", "`mode` must be one of ('nf4', 'fp4', 'int8'), got 'nf3'."),
        ("compute_dtype", "int4", "`compute_dtype` must be one of ['bfloat16', 'float16', 'float32'] or None, got 'int4'."),
        ("quant_storage", "int32", "`quant_storage` must be 'uint8', 'bfloat16', 'float16' or 'float32', got 'int32'."),
    ],
)
def test_quantization_config_rejects_bad_values(field, value, fragment):
    with pytest.raises(ValueError) as info:
        QuantizationConfig(**{field: value})
    assert str(info.value) == fragment


def test_quantization_config_rejects_non_bool_double_quant():
    with pytest.raises(TypeError, match=re.escape("`double_quant` must be True or False, got 'yes'.")):
        QuantizationConfig(double_quant="yes")
