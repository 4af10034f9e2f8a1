"""QLoRA on real bitsandbytes layers (it runs on CPU here; its math is never mocked).

Numerics on CPU: in train mode (or with grad enabled) bitsandbytes' 4-bit layer dequantizes and
multiplies in the compute dtype (float32 here), so 4-bit results are compared at rtol 1e-5 (they
come out bit-identical). The int8 layer rescales its int8 weight in another order than
``dequantize_weight`` and sends the input gradient through float16: measured ~1e-6, asserted at
rtol 1e-4. In eval mode under no_grad, a 4-bit layer repacks its weight for a bf16 kernel (~0.4%
off), so comparisons across models stay in train mode.
"""

from __future__ import annotations

import copy
import sys

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
from peft.tuners.lora.bnb import Linear8bitLt as PeftLinear8bitLt
from torch import nn

from _models import copy_adapter_into_peft, peft_param_name, randomize_adapter, tiny_bert_classifier, tiny_llama, token_batch
from lightning_lora import LoRAConfig, LoRALinear, QuantizationConfig, inject_lora, merge_lora, merged_state_dict, quantize_model
from lightning_lora import quantization
from lightning_lora.inject import lora_state
from lightning_lora.layers import lora_layers
from lightning_lora.quantization import dequantize_weight, is_quantized, quantize_linear, quantized_paths

RTOL = {"nf4": 1e-5, "fp4": 1e-5, "int8": 1e-4}
LLAMA_LAYERS = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """assert_close with rtol, and atol = rtol x the largest magnitude of ``expected``."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(), msg=lambda m: f"{name}: {m}")


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose bitsandbytes layers are nn.Linear holding ``dequantize_weight`` of them."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if is_quantized(module):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantize_weight(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, linear)
    return reference


def output_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x).logits
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_quantize_model_replaces_every_linear_but_the_head():
    model = tiny_llama()
    assert quantize_model(model, QuantizationConfig(mode="nf4")) is model  # chains like inject_lora
    quantized = quantized_paths(model)
    expected = {f"model.layers.{i}.{name}" for i in range(2) for name in LLAMA_LAYERS}
    assert set(quantized) == expected
    assert all(isinstance(model.get_submodule(name), bnb.nn.Linear4bit) for name in expected)
    assert model.get_submodule(quantized[0]).weight.quant_type == "nf4"
    assert type(model.lm_head) is nn.Linear
    assert (model.is_loaded_in_4bit, model.is_loaded_in_8bit) == (True, False)

    bert = tiny_bert_classifier()
    quantized = quantized_paths(quantize_model(bert, QuantizationConfig(mode="int8", skip_modules=["pooler.dense"])))
    assert len(quantized) == 2 * 6
    assert type(bert.classifier) is nn.Linear and type(bert.bert.pooler.dense) is nn.Linear
    assert (bert.is_loaded_in_4bit, bert.is_loaded_in_8bit) == (False, True)


def test_inject_with_quantization_quantizes_all_but_head_and_modules_to_save():
    model = inject_lora(
        tiny_bert_classifier(), LoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]), QuantizationConfig(mode="nf4")
    )
    state = lora_state(model)
    assert len(state.quantized) == 2 * 6 + 1  # six linears per layer + pooler.dense
    assert type(model.classifier) is nn.Linear
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in lora_layers(model).values())
    assert isinstance(model.bert.encoder.layer[0].attention.self.key, bnb.nn.Linear4bit)


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_layer_matches_lora_on_dequantized_weight(mode):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    quantized = quantize_linear(linear, QuantizationConfig(mode=mode))
    rounding = ((dequantize_weight(quantized) - linear.weight).norm() / linear.weight.norm()).item()
    assert 0 < rounding < (0.15 if mode != "int8" else 0.01)  # it is quantized, and close to the original
    reference = nn.Linear(64, 96)
    with torch.no_grad():
        reference.weight.copy_(dequantize_weight(quantized))
        reference.bias.copy_(quantized.bias)
    layer, ref_layer = LoRALinear(quantized, r=4, alpha=8), LoRALinear(reference, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_a.weight.normal_()
        layer.lora_b.weight.normal_()
        ref_layer.lora_a.weight.copy_(layer.lora_a.weight)
        ref_layer.lora_b.weight.copy_(layer.lora_b.weight)
    x = torch.randn(4, 10, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref_out = layer(x), ref_layer(x_ref)
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    (ref_out * weights).sum().backward()
    rtol = RTOL[mode]
    assert_close_scaled(out, ref_out, rtol, "output")
    assert_close_scaled(layer.lora_a.weight.grad, ref_layer.lora_a.weight.grad, rtol, "grad A")
    assert_close_scaled(layer.lora_b.weight.grad, ref_layer.lora_b.weight.grad, rtol, "grad B")
    assert_close_scaled(x.grad, x_ref.grad, rtol, "grad x")


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_model_matches_lora_on_dequantized_weights(mode):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules="all-linear"), QuantizationConfig(mode=mode))
    randomize_adapter(model)
    reference = dequantized_copy(model)
    assert not any(is_quantized(module) for module in reference.modules())
    x = token_batch()
    out, grads = output_and_grads(model, x)
    ref_out, ref_grads = output_and_grads(reference, x)
    assert_close_scaled(out, ref_out, RTOL[mode], "output")
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert_close_scaled(grad, ref_grads[name], RTOL[mode], name)


@pytest.mark.parametrize(("mode", "peft_layer"), [("nf4", PeftLinear4bit), ("int8", PeftLinear8bitLt)])
def test_forward_and_grads_match_peft_on_the_same_quantized_base(mode, peft_layer):
    base = tiny_llama()
    quantize_model(base, QuantizationConfig(mode=mode))
    peft_base = copy.deepcopy(base)
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = inject_lora(base, LoRAConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapter(ours)
    peft = get_peft_model(peft_base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_layers = {name: m for name, m in peft.base_model.model.named_modules() if isinstance(m, peft_layer)}
    assert set(peft_layers) == set(lora_layers(ours))  # PEFT dispatched its bitsandbytes LoRA layer
    copy_adapter_into_peft(ours, peft)
    x = token_batch()
    out, grads = output_and_grads(ours, x)
    peft_out, peft_grads = output_and_grads(peft, x)
    rtol = RTOL[mode]
    assert_close_scaled(out, peft_out, rtol, "output")
    assert {peft_param_name(name) for name in grads} == set(peft_grads)
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, name
        assert_close_scaled(grad, peft_grads[peft_param_name(name)], rtol, name)


def test_dequantize_reads_weights_repacked_by_an_eval_forward():
    # Regression: on AVX512-BF16 CPUs an eval/no_grad forward repacks the 4-bit weight in place;
    # dequantize_weight (used by merge and merged_state_dict) must still return the real weight.
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(mode="nf4"))
    layer = model.model.layers[0].self_attn.q_proj
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")
    before = dequantize_weight(layer).clone()
    model.eval()
    with torch.no_grad():
        model(token_batch())
    assert layer.weight.quant_state.packing_format_for_cpu
    after = dequantize_weight(layer)
    # The repacked layer keeps its block scales in bf16: off by bf16 rounding (< 2^-8 relative), no more.
    assert ((after - before).norm() / before.norm()).item() < 4e-3
    torch.testing.assert_close(after, before, rtol=8e-3, atol=0)
    # ... and it is what the repacked layer computes with (its bf16 kernel rounds the input too).
    x = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ after.T, rtol=0, atol=1e-2)
    assert layer.weight.quant_state.packing_format_for_cpu  # dequantize_weight did not touch the layer


def _merge_error(eval_forward_first: bool) -> float:
    """Relative change of the logits when merging LoRA into an nf4 model."""
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), QuantizationConfig(mode="nf4"))
    randomize_adapter(model)
    x = token_batch()
    if eval_forward_first:
        model.eval()
        with torch.no_grad():
            model(x)  # a validation loop: repacks the 4-bit weights on AVX512-BF16 CPUs
        model.train()
        # merged_state_dict dequantizes the repacked weights too: it must still give the model's output.
        plain = tiny_llama()
        plain.load_state_dict(merged_state_dict(model), strict=True)
    with torch.no_grad():
        expected = model(x).logits
        if eval_forward_first:
            assert_close_scaled(plain(x).logits, expected, 1e-2, "merged_state_dict after eval")
    with pytest.warns(UserWarning, match="Merged LoRA into 4 quantized layers"):
        merge_lora(model)
    with torch.no_grad():
        merged = model(x).logits
    return ((merged - expected).norm() / expected.norm()).item()


def test_merge_after_an_eval_forward_is_as_good_as_without():
    # Requantizing W + dW in nf4 moves the logits by ~20% on this tiny model either way; merging the
    # garbage that a repacked weight dequantizes to (the bug this guards against) moved them by ~70%.
    baseline = _merge_error(eval_forward_first=False)
    after_eval = _merge_error(eval_forward_first=True)
    assert 0 < baseline < 0.3
    assert after_eval < 1.2 * baseline


def test_missing_bitsandbytes_is_a_clear_error_and_changes_nothing(monkeypatch):
    model = tiny_llama()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    monkeypatch.setattr(quantization, "_BNB", None)  # forget the module imported already
    try:
        assert not quantization.bitsandbytes_available()
        config = QuantizationConfig(mode="nf4")
        with pytest.raises(ValueError) as info:
            inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]), config)
        message = str(info.value)
        assert message.startswith(f"`quantization_config`={config!r} asks for bitsandbytes quantization")
        assert "importing bitsandbytes failed" in message
        assert "pip install bitsandbytes>=0.45" in message and "`quantization_config=None`" in message
        with pytest.raises(ValueError, match=r"^`quantization`=QuantizationConfig\(mode='int8'"):
            quantize_model(model, QuantizationConfig(mode="int8"))
        assert lora_state(model) is None and not lora_layers(model)
        assert all(type(m) is not LoRALinear for m in model.modules())
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        assert not hasattr(model, "is_loaded_in_4bit")
    finally:
        monkeypatch.undo()
        quantization._BNB = None
    assert quantization.bitsandbytes_available()


def test_quantize_linear_refuses_meta_weights():
    with torch.device("meta"):
        linear = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="`quantize_linear` got a layer on the meta device: its weights do not exist yet"):
        quantize_linear(linear, QuantizationConfig())


def test_eval_forward_then_training_works_on_4bit_cpu():
    # bitsandbytes would repack 4-bit weights in place on an eval no-grad CPU forward (AVX512-BF16),
    # which breaks a later training step; LoRA layers keep the standard layout instead.
    from lightning_lora import LoRAConfig, QuantizationConfig, inject_lora, merged_state_dict

    from _models import tiny_llama, token_batch

    model = inject_lora(tiny_llama(), LoRAConfig(r=4), QuantizationConfig(mode="nf4"))
    ids = token_batch()
    model.train()
    train_logits = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.inference_mode():
        eval_logits = model(input_ids=ids).logits
    torch.testing.assert_close(eval_logits, train_logits)  # same kernel path, same numbers
    before = merged_state_dict(model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    after = merged_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_whole_state_dict_loads_into_4bit_layers_in_place_and_refuses_another_layout():
    # A whole-model checkpoint of a 4-bit model (packed bytes + quant state) loads into the layer's own weight and
    # quant state, in place (FSDP's flat storage and the optimizer hold those objects); a checkpoint quantized
    # another way is refused by name instead of pairing its bytes with this layer's scales.
    from lightning_lora import QuantizationConfig, quantize_model

    def build(seed, quant_type="nf4"):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
        return quantize_model(model, QuantizationConfig(mode=quant_type, double_quant=True, compute_dtype="float32"), device="cpu")

    source, target = build(0), build(1)
    weight, state = target[0].weight, target[0].weight.quant_state
    x = torch.randn(4, 64)
    target.load_state_dict(source.state_dict())
    assert target[0].weight is weight and target[0].weight.quant_state is state  # the same objects, new values
    assert torch.equal(weight.data, source[0].weight.data)
    torch.testing.assert_close(state.absmax, source[0].weight.quant_state.absmax, rtol=0, atol=0)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Checkpoint entry '0\.weight' holds a 4-bit weight quantized as .*fp4.*this layer is .*nf4"):
        target.load_state_dict(build(2, "fp4").state_dict())
