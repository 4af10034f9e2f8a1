"""merge_lora / unmerge_lora / disable_lora / merged_state_dict on float and quantized bases.

Quantized models run in train mode throughout (see test_quantization.py for why).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from _models import randomize_adapter, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch
from lightning_lora import (
    LoRAConfig,
    QuantizationConfig,
    disable_lora,
    inject_lora,
    merge_lora,
    merged_state_dict,
    quantize_model,
    unmerge_lora,
)
from lightning_lora.layers import lora_layers
from lightning_lora.quantization import dequantize_weight, is_4bit, is_quantized

FLOAT_CASES = {
    "llama": (tiny_llama, {"target_modules": "all-linear"}),
    "gpt2-conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"]}),
    "bert-classifier-bias": (tiny_bert_classifier, {"target_modules": ["query", "value", "dense"], "modules_to_save": ["classifier"], "bias": "all"}),
}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "") -> None:
    """assert_close with rtol, and atol = rtol x the largest magnitude of ``expected``."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(), msg=lambda m: f"{name}: {m}")


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in lora_layers(model).items()}


def float_model(case: str) -> tuple[nn.Module, nn.Module]:
    builder, kwargs = FLOAT_CASES[case]
    model = inject_lora(builder(), LoRAConfig(r=4, alpha=8, **kwargs))
    randomize_adapter(model)
    return builder, model


@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_float_merge_unmerge(case):
    builder, model = float_model(case)
    x = token_batch()
    unmerged = logits(model, x)
    original = base_weights(model)
    assert not torch.equal(unmerged, logits(builder(), x))  # the adapter does change the output

    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert_close_scaled(logits(model, x), unmerged, name="merged vs unmerged")
    merged = base_weights(model)
    for name, layer in lora_layers(model).items():
        delta = layer.delta_weight()
        assert_close_scaled(merged[name], original[name] + (delta.T if layer.fan_in_fan_out else delta), name=name)

    merge_lora(model)  # idempotent: nothing is added twice
    assert all(torch.equal(base_weights(model)[name], merged[name]) for name in merged)

    unmerge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(weight, original[name], rtol=0, atol=1e-7)
    unmerge_lora(model)  # idempotent
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(weight, original[name], rtol=0, atol=1e-7)
    assert_close_scaled(logits(model, x), unmerged, name="after unmerge")


@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
@pytest.mark.parametrize("merge_first", [False, True], ids=["unmerged", "merged"])
def test_merged_state_dict_loads_strictly_into_the_plain_model(case, merge_first):
    builder, model = float_model(case)
    x = token_batch()
    expected = logits(model, x)
    if merge_first:
        merge_lora(model)
    state = merged_state_dict(model)
    plain = builder(seed=9)  # other weights: everything must come from the state dict
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state, strict=True)
    assert_close_scaled(logits(plain, x), expected, name="plain model with merged weights")
    assert all(layer.merged is merge_first for layer in lora_layers(model).values())  # the model is left as it was
    half = merged_state_dict(model, dtype=torch.bfloat16)
    assert {value.dtype for value in half.values() if value.is_floating_point()} == {torch.bfloat16}


def test_disable_lora_gives_the_base_output():
    _, model = float_model("llama")
    x = token_batch()
    with_lora = logits(model, x)
    with disable_lora(model) as same:
        assert same is model
        assert torch.equal(logits(model, x), logits(tiny_llama(), x))
    assert torch.equal(logits(model, x), with_lora)
    with pytest.raises(KeyError), disable_lora(model):
        raise KeyError("boom")
    assert all(layer.enabled for layer in lora_layers(model).values())  # restored on error too


def test_disable_lora_refuses_merged_and_plain_models():
    _, model = float_model("llama")
    merge_lora(model)
    with pytest.raises(ValueError, match=re.escape("`disable_lora` needs unmerged LoRA layers: call `unmerge_lora(model)` first.")):
        with disable_lora(model):
            pass
    with pytest.raises(ValueError, match=re.escape("`disable_lora` got a model without LoRA layers: call `inject_lora` first.")):
        with disable_lora(tiny_llama()):
            pass


@pytest.mark.parametrize("function", [merge_lora, unmerge_lora, merged_state_dict])
def test_merge_functions_need_lora(function):
    with pytest.raises(ValueError, match=re.escape(f"`{function.__name__}` got a model without LoRA: call `inject_lora(model, LoRAConfig(...))` first.")):
        function(tiny_llama())


# --- quantized bases ---------------------------------------------------------------------------------


def packed_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The stored bytes of a quantized layer's weight and its scales."""
    if is_4bit(module):
        tensors = {"data": module.weight.data}
        tensors |= {k: v for k, v in module.weight.quant_state.as_dict(packed=True).items() if isinstance(v, torch.Tensor)}
    else:
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        tensors = {"data": module.weight.data, "SCB": scales}
    return {key: value.detach().clone() for key, value in tensors.items()}


def quantized_model(mode: str) -> nn.Module:
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), QuantizationConfig(mode=mode))
    randomize_adapter(model)
    return model


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_merge_reports_its_error_and_unmerge_is_bit_exact(mode):
    model = quantized_model(mode)
    x = token_batch()
    layers = lora_layers(model)
    unmerged = logits(model, x)
    before = {name: packed_state(layer.base_layer) for name, layer in layers.items()}
    targets = {name: dequantize_weight(layer.base_layer) + layer.delta_weight() for name, layer in layers.items()}
    inputs = {name: torch.randn(512, layer.in_features, generator=torch.Generator().manual_seed(3)) for name, layer in layers.items()}
    with torch.no_grad():
        layer_outputs = {name: layer(inputs[name]) for name, layer in layers.items()}

    with pytest.warns(UserWarning) as record:
        merge_lora(model)
    message = str(record[0].message)
    assert message.startswith(f"Merged LoRA into {len(layers)} quantized layers by dequantize -> add -> requantize.")
    reported = re.search(r"max (\S+), mean (\S+)\.", message)
    reported_max, reported_mean = float(reported.group(1)), float(reported.group(2))
    errors = {name: ((dequantize_weight(layer.base_layer) - targets[name]).norm() / targets[name].norm()).item() for name, layer in layers.items()}
    assert reported_max == pytest.approx(max(errors.values()), rel=1e-3)
    assert reported_mean == pytest.approx(sum(errors.values()) / len(errors), rel=1e-3)
    assert 0 < reported_max < (0.15 if mode == "nf4" else 0.02)
    # Each merged layer's output is off by about its weight error (isotropic inputs), within the reported max.
    with torch.no_grad():
        for name, layer in layers.items():
            expected = layer_outputs[name]
            relative = ((layer(inputs[name]) - expected).norm() / expected.norm()).item()
            assert relative <= 1.2 * errors[name], name
            assert relative <= 1.2 * reported_max, name
    merged = logits(model, x)
    assert not torch.equal(merged, unmerged)
    after_first = {name: packed_state(layer.base_layer) for name, layer in layers.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_lora(model)  # idempotent: no second rounding, no warning
    for name, layer in layers.items():
        assert all(torch.equal(v, after_first[name][k]) for k, v in packed_state(layer.base_layer).items())

    unmerge_lora(model)
    unmerge_lora(model)
    for name, layer in layers.items():
        now = packed_state(layer.base_layer)
        assert now.keys() == before[name].keys()
        for key, value in before[name].items():
            assert now[key].dtype == value.dtype and torch.equal(now[key], value), f"{name}.{key}"
    assert torch.equal(logits(model, x), unmerged)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("merge_first", [False, True], ids=["unmerged", "merged"])
def test_quantized_merged_state_dict_is_exact_lora_on_dequantized_weights(mode, merge_first):
    model = quantized_model(mode)
    x = token_batch()
    expected = logits(model, x)
    dequantized = {name: dequantize_weight(module) for name, module in model.named_modules() if is_quantized(module)}
    if merge_first:
        with pytest.warns(UserWarning, match="Merged LoRA into 6 quantized layers"):
            merge_lora(model)
    state = merged_state_dict(model)
    plain = tiny_llama(seed=9)
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state, strict=True)
    assert not any(is_quantized(module) for module in plain.modules())
    # From the original quantized weights, not the requantized merge: no second rounding.
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(state[f"{name}.weight"], dequantized[f"{name}.base_layer"] + layer.delta_weight(), rtol=0, atol=0)
    torch.testing.assert_close(state["model.layers.0.self_attn.k_proj.weight"], dequantized["model.layers.0.self_attn.k_proj"], rtol=0, atol=0)
    assert_close_scaled(logits(plain, x), expected, 1e-5 if mode == "nf4" else 1e-4, "plain model vs quantized LoRA")


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_disable_lora_on_quantized_base(mode):
    base = tiny_llama()
    quantize_model(base, QuantizationConfig(mode=mode))
    reference = copy.deepcopy(base)
    model = inject_lora(base, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    x = token_batch()
    with disable_lora(model):
        assert torch.equal(logits(model, x), logits(reference, x))
    assert not torch.equal(logits(model, x), logits(reference, x))


def test_cast_adapters_serves_unmerged_in_bf16():
    from lightning_lora import cast_adapters

    model = inject_lora(tiny_llama().to(torch.bfloat16), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits.float()
    assert cast_adapters(model, "bfloat16") is model
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    with torch.no_grad():
        after = model(ids).logits.float()
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2 * before.abs().max().item())
    with pytest.raises(ValueError, match=r"`dtype` must be a floating torch dtype such as torch.bfloat16, got 'int8'"):
        cast_adapters(model, "int8")
    with pytest.raises(ValueError, match="`cast_adapters` got a model without LoRA"):
        cast_adapters(tiny_llama(), torch.bfloat16)
