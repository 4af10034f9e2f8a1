"""quantization.linear_4bit_no_grad: a stock Linear4bit's no-grad forward without its Python layers, on real
bitsandbytes layers. It must give the layer's own result bit for bit, and refuse (None) wherever the layer's forward
does something else; LoRA layers without autograd take it and still compute what they computed before."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_lora import LoRALinear, QuantizationConfig, quantization
from lightning_lora.quantization import linear_4bit_no_grad, quantize_linear


def four_bit(mode: str = "nf4", double_quant: bool = True, bias: bool = True, compute_dtype: str = "bfloat16", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = QuantizationConfig(mode=mode, double_quant=double_quant, compute_dtype=compute_dtype)
    return quantize_linear(nn.Linear(96, 64, bias=bias), config, device="cpu").train()  # eval on CPU repacks


CASES = list(itertools.product(["nf4", "fp4"], [True, False], [True, False], ["bfloat16", "float32"], [torch.float32, torch.bfloat16]))


@pytest.mark.parametrize("mode,double_quant,bias,compute_dtype,x_dtype", CASES)
def test_equals_the_layers_own_forward_bit_for_bit(mode, double_quant, bias, compute_dtype, x_dtype) -> None:
    base = four_bit(mode, double_quant, bias, compute_dtype)
    x = torch.randn(3, 5, 96, dtype=x_dtype)
    with torch.no_grad():
        base(x)  # the first call sets the layer's compute dtype (and casts its bias): the route waits for it
        lean = linear_4bit_no_grad(base, x)
        own = base(x)
    assert lean is not None
    assert lean.dtype == own.dtype and lean.shape == own.shape
    assert torch.equal(lean, own)


@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float16", "float32"])
def test_equals_the_layers_own_forward_with_any_quant_storage(storage) -> None:
    torch.manual_seed(0)  # a float storage (FSDP's mixed precision needs one) packs two 4-bit codes per byte all the same
    config = QuantizationConfig(mode="nf4", quant_storage=storage, compute_dtype="bfloat16")
    base = quantize_linear(nn.Linear(96, 64), config, device="cpu").train()
    x = torch.randn(5, 96)
    with torch.no_grad():
        base(x)
        lean, own = linear_4bit_no_grad(base, x), base(x)
    assert lean is not None and torch.equal(lean, own)


def test_equals_the_layers_own_forward_under_autocast() -> None:
    base = four_bit()
    x = torch.randn(4, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base(x)
        lean, own = linear_4bit_no_grad(base, x), base(x)
    assert lean is not None and torch.equal(lean, own)


def test_refuses_where_the_layers_forward_does_more() -> None:
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert linear_4bit_no_grad(four_bit(), x) is None  # never called: its compute dtype is not set yet
        base = four_bit()
        base(x)
        assert linear_4bit_no_grad(base, x) is not None
        base.eval()
        assert linear_4bit_no_grad(base, x) is None  # on CPU, eval mode repacks the weight for another kernel
        base.train()
        base.bias.data = base.bias.data.float() if base.bias.dtype != torch.float32 else base.bias.data.half()
        assert linear_4bit_no_grad(base, x) is None  # the layer would cast its bias first
        assert linear_4bit_no_grad(base, x[:0]) is None
    fresh = four_bit(bias=False)
    with torch.no_grad():
        fresh(x)
    fresh.weight.quant_state = None  # as FSDP leaves it: the layer restores it from its own copy
    with torch.no_grad():
        assert linear_4bit_no_grad(fresh, x) is None
    base = four_bit()
    with torch.no_grad():
        base(x)
    needs_grad = x.clone().requires_grad_()
    assert linear_4bit_no_grad(base, needs_grad) is None  # grad enabled and the input needs one: autograd's path
    with torch.no_grad():
        assert linear_4bit_no_grad(base, needs_grad) is not None


def lora_4bit(dropout: float = 0.0) -> LoRALinear:
    layer = LoRALinear(four_bit(bias=True), r=8, alpha=16, dropout=dropout)
    torch.manual_seed(1)
    nn.init.normal_(layer.lora_b.weight, std=0.1)
    return layer.train()


def spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, for each call of linear_4bit_no_grad, whether it computed the base (True) or declined (False)."""
    taken: list[bool] = []
    real = quantization.linear_4bit_no_grad

    def recording(module, x):
        out = real(module, x)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(quantization, "linear_4bit_no_grad", recording)
    return taken


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_layer_without_autograd_takes_it_and_computes_what_it_did(monkeypatch, autocast) -> None:
    layer = lora_4bit()
    x = torch.randn(2, 3, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer.base_layer(x)
        taken = spy(monkeypatch)
        lean = layer(x)
        monkeypatch.setattr(quantization, "linear_4bit_no_grad", lambda module, x: None)  # the layer's own forward
        before = layer(x)
        base = layer.base_layer(x)
    assert taken == [True]
    assert torch.equal(lean, before)
    update = (x.float() @ layer.lora_a.weight.t() @ layer.lora_b.weight.t() * layer.scale).to(base.dtype)
    torch.testing.assert_close(lean.float(), (base + update).float(), rtol=2e-2, atol=2e-2)
    assert not torch.equal(lean, base)  # the adapter is in it


def test_a_hook_on_the_base_layer_still_runs(monkeypatch) -> None:
    layer = lora_4bit()
    x = torch.randn(4, 96)
    calls = []
    layer.base_layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.no_grad():
        taken = spy(monkeypatch)
        layer(x)
    assert calls == [torch.Size([4, 64])] and taken == []  # a hooked base is called, never bypassed
