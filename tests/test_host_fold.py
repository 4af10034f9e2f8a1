"""The small-batch weight fold of ``_routes.no_grad`` (issue 17.4) and ``quantization.dequantize_4bit_no_grad``.

On a GPU at small batch an eager forward waits on the host's kernel launches; where bitsandbytes dequantizes a 4-bit
weight anyway, the LoRA update is added to that temporary (one kernel) instead of to the output (two). The rule is
``_routes.folds``; CUDA is its only launch-bound device, so the CPU tests here add "cpu" to
``_routes.LAUNCH_BOUND_DEVICES`` to run the same code on real bitsandbytes layers (the CUDA side, bitsandbytes' own
small-batch kernel and CUDA graph capture, is in ``tests/gpu/test_gpu_lean_4bit.py``).
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

from lightning_lora import LoRALinear, QuantizationConfig, _routes, quantization
from lightning_lora.quantization import dequantize_4bit_no_grad, dequantize_weight, quantize_linear


def four_bit(mode: str = "nf4", double_quant: bool = True, storage: str = "uint8", compute_dtype: str = "bfloat16", bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = QuantizationConfig(mode=mode, double_quant=double_quant, quant_storage=storage, compute_dtype=compute_dtype)
    base = quantize_linear(nn.Linear(96, 64, bias=bias), config, device="cpu").train()  # eval on CPU repacks
    with torch.no_grad():
        base(torch.randn(2, 96))  # the first call sets the compute dtype
    return base


def lora(base: nn.Module, dropout: float = 0.0) -> LoRALinear:
    layer = LoRALinear(base, r=8, alpha=16, dropout=dropout).train()  # train mode: the CPU base keeps its layout
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=generator) * 0.1)
    return layer


@pytest.fixture
def launch_bound_cpu(monkeypatch):
    monkeypatch.setattr(_routes, "LAUNCH_BOUND_DEVICES", ("cuda", "cpu"))


@pytest.fixture
def dequantized(monkeypatch):
    """Counts the weights the route dequantizes to fold into (its lean dequantize)."""
    calls = []
    real = quantization.dequantize_4bit_no_grad

    def counting(module, dtype):
        calls.append(dtype)
        return real(module, dtype)

    monkeypatch.setattr(quantization, "dequantize_4bit_no_grad", counting)
    return calls


CASES = list(itertools.product(["nf4", "fp4"], [True, False], ["uint8", "bfloat16"], [torch.bfloat16, torch.float16, torch.float32], [torch.float32, torch.bfloat16]))


def straight_into(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' own dequantize with its quant state's dtype set to ``dtype`` (what its gemm_4bit computes with)."""
    import copy

    import bitsandbytes

    state = copy.copy(base.weight.quant_state)
    state.dtype = dtype
    return bitsandbytes.functional.dequantize_4bit(base.weight.data, state)


@pytest.mark.parametrize("mode,double_quant,storage,dtype,weight_dtype", CASES)
def test_lean_dequantize_equals_bitsandbytes_bit_for_bit(mode, double_quant, storage, dtype, weight_dtype) -> None:
    torch.manual_seed(0)
    config = QuantizationConfig(mode=mode, double_quant=double_quant, quant_storage=storage, compute_dtype="bfloat16")
    base = quantize_linear(nn.Linear(96, 64, bias=False).to(weight_dtype), config, device="cpu").train()
    assert base.weight.quant_state.dtype == weight_dtype
    lean = dequantize_4bit_no_grad(base, dtype)
    assert lean is not None
    reference = straight_into(base, dtype)
    assert lean.dtype == dtype and lean.shape == reference.shape == (64, 96)
    assert torch.equal(lean, reference)
    if dtype == weight_dtype:  # dequantize_weight rounds through the weight's own dtype: the same here
        assert torch.equal(lean, dequantize_weight(base, dtype=dtype))
    lean.add_(1.0)  # a fresh tensor: writing into it leaves the layer's weight as it was
    assert torch.equal(dequantize_4bit_no_grad(base, dtype), reference)


def test_lean_dequantize_refuses_where_it_would_read_another_layout() -> None:
    base = four_bit()
    assert dequantize_4bit_no_grad(base, torch.float64) is None  # bitsandbytes writes 16- and 32-bit floats only
    with torch.no_grad():
        base.eval()(torch.randn(2, 96))  # the CPU's eval-mode forward repacks the weight
    assert dequantize_4bit_no_grad(base, torch.bfloat16) is None
    torch.testing.assert_close(dequantize_weight(base, dtype=torch.float32), dequantize_weight(four_bit(), dtype=torch.float32))
    fresh = four_bit()
    fresh.weight.quant_state = None  # FSDP drops it from the parameter; the layer restores it in its forward
    assert dequantize_4bit_no_grad(fresh, torch.bfloat16) is None


@pytest.mark.parametrize("tokens", [2, 7, 64])
def test_small_batch_folds_into_the_dequantized_weight(launch_bound_cpu, dequantized, tokens) -> None:
    layer = lora(four_bit(compute_dtype="float32"))
    x = torch.randn(tokens, 96)
    with torch.no_grad():
        folded = layer(x)
        assert dequantized == [torch.float32], "a launch-bound small batch over a 4-bit base should fold"
        expected = layer.base_layer(x) + (x @ layer.lora_a.weight.t() @ layer.lora_b.weight.t()) * layer.scale
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_fold_and_output_routes_agree_under_autocast(launch_bound_cpu, dequantized) -> None:
    layer = lora(four_bit(compute_dtype="bfloat16", bias=True))
    x = torch.randn(3, 5, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        folded = layer(x)
        assert dequantized == [torch.bfloat16]
        layer.fold_below_macs = 0  # this layer only: the output route
        unfolded = layer(x)
        assert len(dequantized) == 1
    assert folded.dtype == unfolded.dtype == torch.float32 and folded.shape == (3, 5, 64)
    # The fold rounds W + s B A to bf16 once (like merging); the output route rounds the base output and the update.
    torch.testing.assert_close(folded, unfolded, rtol=2e-2, atol=2e-2 * unfolded.abs().max().item())
    assert LoRALinear.fold_below_macs > 0  # the class default is untouched


def test_fold_is_not_taken_where_it_saves_no_launch(launch_bound_cpu, dequantized, monkeypatch) -> None:
    layer = lora(four_bit(compute_dtype="float32"))
    with torch.no_grad():
        layer(torch.randn(1, 96))  # one row: bitsandbytes' GEMV reads the 4-bit weight without dequantizing
        layer(torch.randn(1, 1, 96))
        monkeypatch.setattr(LoRALinear, "fold_below_macs", 4 * 96 * 64)
        layer(torch.randn(4, 96))  # at the limit: folds
        assert len(dequantized) == 1
        layer(torch.randn(5, 96))  # over it
        assert len(dequantized) == 1
        monkeypatch.setattr(quantization, "gemm_4bit_dequantizes", lambda module, x, dtype: False)
        layer(torch.randn(4, 96))  # bitsandbytes' own small-batch kernel would compute the base
        assert len(dequantized) == 1
    dropped = lora(four_bit(compute_dtype="float32"), dropout=0.1)  # dropout acts on the input: never folded
    with torch.no_grad():
        dropped(torch.randn(4, 96))
    assert len(dequantized) == 1


def test_fold_needs_a_launch_bound_device_and_a_4bit_base(dequantized, monkeypatch) -> None:
    layer = lora(four_bit(compute_dtype="float32"))
    x = torch.randn(4, 96)
    with torch.no_grad():
        layer(x)  # CPU is not launch-bound: the output route
    assert dequantized == []
    assert not _routes.folds(layer, x, four_bit=True)
    monkeypatch.setattr(_routes, "LAUNCH_BOUND_DEVICES", ("cuda", "cpu"))
    assert _routes.folds(layer, x, four_bit=True)
    float_layer = LoRALinear(nn.Linear(96, 64), r=8, alpha=16)
    assert not _routes.folds(float_layer, x, four_bit=False)  # a float weight is read once by the matmul: no temporary
    assert _routes.folds(float_layer, torch.randn(400, 96), four_bit=False)  # the memory-traffic rule still holds


def test_fold_is_not_taken_inside_a_compiled_graph(launch_bound_cpu, monkeypatch) -> None:
    layer = lora(four_bit(compute_dtype="float32"))
    x = torch.randn(4, 96)
    assert _routes.folds(layer, x, four_bit=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _routes.folds(layer, x, four_bit=True)


def test_a_hooked_base_is_called_not_folded(launch_bound_cpu, dequantized) -> None:
    layer = lora(four_bit(compute_dtype="float32"))
    seen = []
    layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        out = layer(torch.randn(4, 96))
    assert seen == [(4, 64)] and dequantized == [] and out.shape == (4, 64)


@pytest.mark.parametrize("value", [-1, 1.5, "auto", True, None])
def test_a_bad_fold_limit_is_refused_with_the_fix(launch_bound_cpu, value) -> None:
    layer = lora(four_bit(compute_dtype="float32"))
    layer.fold_below_macs = value
    with torch.no_grad(), pytest.raises(ValueError, match=r"`LoRALinear.fold_below_macs` must be a non-negative int .* got " + re.escape(repr(value)) + r".*0 to turn"):
        layer(torch.randn(4, 96))
