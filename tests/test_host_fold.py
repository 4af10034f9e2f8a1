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
    base.eval()  # on CPU an eval-mode forward would repack the weight (the library keeps it from doing so)
    assert dequantize_4bit_no_grad(base, torch.bfloat16) is None
    base.train()
    base.weight.quant_state.packing_format_for_cpu = True  # repacked (by bitsandbytes, before the library's layer)
    assert dequantize_4bit_no_grad(base, torch.bfloat16) is None
    base.weight.quant_state.packing_format_for_cpu = False
    assert dequantize_4bit_no_grad(base, torch.bfloat16) is not None
    torch.testing.assert_close(dequantize_weight(base, dtype=torch.float32), dequantize_weight(four_bit(), dtype=torch.float32))
    transposed = four_bit()
    transposed.weight.quant_state.shape = torch.Size((96, 64))  # quantized from W^T: not the layer's (out, in)
    assert dequantize_4bit_no_grad(transposed, torch.bfloat16) is None
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
@pytest.mark.parametrize("float_base", [False, True])
def test_a_bad_fold_limit_is_refused_with_the_fix(value, float_base) -> None:
    # Refused on any device and base (CPU is not launch-bound): a setting made on one machine fails there, not later.
    layer = LoRALinear(nn.Linear(96, 64), r=8, alpha=16) if float_base else lora(four_bit(compute_dtype="float32"))
    layer.fold_below_macs = value
    with torch.no_grad(), pytest.raises(ValueError, match=r"`LoRALinear.fold_below_macs` must be a non-negative int .* got " + re.escape(repr(value)) + r".*0 to turn"):
        layer(torch.randn(4, 96))


def test_an_integer_fold_limit_of_any_integer_type_is_taken(launch_bound_cpu, dequantized) -> None:
    import numpy

    layer = lora(four_bit(compute_dtype="float32"))
    layer.fold_below_macs = numpy.int64(4 * 96 * 64)
    with torch.no_grad():
        layer(torch.randn(4, 96))
        assert len(dequantized) == 1
        layer(torch.randn(5, 96))
    assert len(dequantized) == 1


def test_no_fold_while_autograd_records_a_gradient_to_the_input(launch_bound_cpu, dequantized) -> None:
    """A frozen adapter with an input that needs gradients (attributions, trained embeddings): the fold would keep
    the whole (out, in) folded weight for the backward; the output route keeps the adapter's small matrices."""
    layer = lora(four_bit(compute_dtype="float32"))
    layer.requires_grad_(False)
    saved = []
    for tokens in (4, 400):  # the launch rule and the memory-traffic rule
        x = torch.randn(tokens, 96, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = layer(x)
        assert dequantized == [], tokens
        assert (64, 96) not in saved and (96, 64) not in saved, saved
        out.sum().backward()
        with torch.no_grad():
            folded = layer(x)  # without autograd the fold is taken again, and computes the same
        torch.testing.assert_close(out.detach(), folded, rtol=1e-5, atol=1e-5 * folded.abs().max().item())
        dequantized.clear()
        assert x.grad is not None and x.grad.shape == x.shape


def test_bitsandbytes_heuristic_is_asked_with_the_layers_compute_dtype(launch_bound_cpu, monkeypatch) -> None:
    """bitsandbytes casts x to the layer's compute dtype before its op (autocast does not reach it): the fold asks its
    heuristic with that dtype, and follows it: its own kernel (no dequantize) means no fold."""
    asked = []

    def heuristic(device_index, dtype, rows, out_features, in_features):
        asked.append((dtype, rows, out_features, in_features))
        return rows < 6  # "its own kernel up to 5 rows"

    assert quantization._gemm_4bit_heuristic(torch.randn(2, 128)) is None  # not CUDA: bitsandbytes' CUDA heuristic does not apply
    monkeypatch.setattr(quantization, "_gemm_4bit_heuristic", lambda x: (heuristic, 16, 0))
    torch.manual_seed(0)
    config = QuantizationConfig(mode="nf4", compute_dtype="float32")
    base = quantize_linear(nn.Linear(128, 64, bias=False), config, device="cpu").train()  # in: a multiple of the 64-blocks
    layer = lora(base)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _routes.folds(layer, torch.randn(5, 128), four_bit=True)
        assert _routes.folds(layer, torch.randn(6, 128), four_bit=True)
        assert _routes.folds(layer, torch.randn(17, 128), four_bit=True)  # past its rows: always dequantize + matmul
    assert asked == [(torch.float32, 5, 64, 128), (torch.float32, 6, 64, 128)]
    assert quantization.gemm_4bit_dequantizes(base, torch.randn(1, 128), torch.float32) is False  # one row: GEMV
    assert quantization.gemm_4bit_dequantizes(four_bit(), torch.randn(4, 96), torch.float32) is True  # 96 % 64: its fallback
    monkeypatch.setattr(quantization, "_gemm_4bit_heuristic", lambda x: (lambda *args: 1 / 0, 16, 0))
    assert quantization.gemm_4bit_dequantizes(base, torch.randn(8, 128), torch.float32) is False  # a heuristic that fails: no fold
    monkeypatch.setattr(quantization, "_gemm_4bit_heuristic", lambda x: None)
    assert quantization.gemm_4bit_dequantizes(base, torch.randn(2, 128), torch.float32) is True  # none exposed: dequantize from 2 rows


def test_fold_under_autocast_with_a_float32_compute_dtype(launch_bound_cpu, dequantized) -> None:
    """The fold computes in autocast's dtype (like the memory-traffic fold and the training routes), returns x's."""
    layer = lora(four_bit(compute_dtype="float32", bias=True))
    x = torch.randn(4, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        folded = layer(x)
        assert dequantized == [torch.bfloat16]
        layer.fold_below_macs = 0
        unfolded = layer(x)
    assert folded.dtype == torch.float32
    torch.testing.assert_close(folded, unfolded.float(), rtol=2e-2, atol=2e-2 * unfolded.abs().max().item())
