"""CUDA check of ``quantization.linear_4bit_no_grad`` (`pytest -m gpu tests/gpu/test_gpu_lean_4bit.py`); CI skips it.

On CUDA bitsandbytes' ``gemm_4bit`` op picks its own fused kernel or dequantize + matmul by the number of rows: the
direct call must give the layer's result bit for bit on both sides of that choice, and a LoRA layer without autograd
the same output as through the layer's own forward.
"""

from __future__ import annotations

import itertools

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/gpu)")]

ROWS = (1, 3, 8, 64, 512, 2048)  # the fused kernel at few rows, dequantize + matmul at many


@pytest.mark.parametrize("mode,double_quant,bias", list(itertools.product(["nf4", "fp4"], [True, False], [True, False])))
def test_equals_the_layers_own_forward_on_cuda(mode, double_quant, bias) -> None:
    from torch import nn

    from lightning_lora import QuantizationConfig
    from lightning_lora.quantization import linear_4bit_no_grad, quantize_linear

    torch.manual_seed(0)
    config = QuantizationConfig(mode=mode, double_quant=double_quant, compute_dtype="bfloat16")
    base = quantize_linear(nn.Linear(4096, 1024, bias=bias).bfloat16(), config, device="cuda").eval()
    for rows, autocast in itertools.product(ROWS, (False, True)):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.float32 if autocast else torch.bfloat16)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            base(x)
            lean, own = linear_4bit_no_grad(base, x), base(x)
        assert lean is not None, (rows, autocast)
        assert lean.dtype == own.dtype and torch.equal(lean, own), (rows, autocast)


def test_lora_layer_without_autograd_is_unchanged_on_cuda(monkeypatch) -> None:
    from torch import nn

    from lightning_lora import LoRALinear, QuantizationConfig, quantization
    from lightning_lora.quantization import quantize_linear

    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(4096, 4096, bias=False).bfloat16(), QuantizationConfig(mode="nf4", compute_dtype="bfloat16"), device="cuda")
    layer = LoRALinear(base, r=16, alpha=32).cuda().eval()
    nn.init.normal_(layer.lora_b.weight, std=1e-2)
    layer.fold_below_macs = 0  # the output route at 512 rows too (the small-batch fold is tested below)
    for rows in (1, 512):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            layer.base_layer(x)
            lean = layer(x)
            with monkeypatch.context() as patch:
                patch.setattr(quantization, "linear_4bit_no_grad", lambda module, x: None)
                before = layer(x)
        assert torch.equal(lean, before), rows


def test_small_batch_fold_on_cuda(monkeypatch) -> None:
    """Eagerly on CUDA a LoRA layer over an nf4 base folds its update into the weight exactly where bitsandbytes
    dequantizes it (not at one row, nor where its small-batch kernel runs) up to ``fold_below_macs``; the output
    agrees with the output route to bf16 rounding; a CUDA graph capture takes the output route."""
    from torch import nn

    from lightning_lora import LoRALinear, QuantizationConfig, quantization
    from lightning_lora.quantization import gemm_4bit_dequantizes, quantize_linear

    bnb_ops = __import__("bitsandbytes.backends.cuda.ops", fromlist=["_gemm_4bit_use_custom_fn"])
    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(4096, 4096, bias=False).bfloat16(), QuantizationConfig(mode="nf4", compute_dtype="bfloat16"), device="cuda")
    layer = LoRALinear(base, r=16, alpha=32).cuda().eval()
    nn.init.normal_(layer.lora_b.weight, std=1e-2)
    folds = []
    real = quantization.dequantize_4bit_no_grad
    monkeypatch.setattr(quantization, "dequantize_4bit_no_grad", lambda module, dtype: folds.append(1) or real(module, dtype))
    seen = {}
    for rows in (1, 2, 4, 7, 8, 64, 512, 1024):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            layer.base_layer(x)
            count = len(folds)
            folded = layer(x)
            took = len(folds) > count
            # bitsandbytes' own choice, asked directly (not through gemm_4bit_dequantizes): dequantize unless its kernel runs
            own_kernel = rows == 1 or (rows <= bnb_ops._gemm_4bit_custom_max_m and bnb_ops._gemm_4bit_use_custom_fn(0, torch.bfloat16, rows, 4096, 4096))
            assert gemm_4bit_dequantizes(base, x, torch.bfloat16) == (not own_kernel), rows
            expected = not own_kernel and rows * 4096 * 4096 <= layer.fold_below_macs
            assert took == expected, (rows, took)
            seen[rows] = took
            layer.fold_below_macs = 0
            unfolded = layer(x)
            del layer.fold_below_macs  # back to the class default
        torch.testing.assert_close(folded, unfolded, rtol=2e-2, atol=2e-2 * unfolded.abs().max().item(), msg=lambda m: f"{rows} rows: {m}")
    assert not seen[1] and seen[512], seen  # one row: GEMV; 512 rows: dequantize + matmul on every current GPU
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        with torch.cuda.stream(stream):
            eager = layer(x)  # warm-up outside the capture (folds)
        torch.cuda.current_stream().wait_stream(stream)
        count = len(folds)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        assert len(folds) == count, "a CUDA graph capture should take the output route"
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=2e-2, atol=2e-2 * eager.abs().max().item())


@pytest.mark.parametrize("mode,double_quant", list(itertools.product(["nf4", "fp4"], [True, False])))
def test_lean_dequantize_equals_dequantize_weight_on_cuda(mode, double_quant) -> None:
    """``dequantize_4bit_no_grad`` calls bitsandbytes' CUDA functions behind its ops: the weight bitsandbytes' own
    dequantize gives (its quant state's dtype set to the one asked), bit for bit, and at many rows the base layer's
    own output is ``linear`` with it."""
    import copy

    import bitsandbytes
    from torch import nn

    from lightning_lora import QuantizationConfig, quantization
    from lightning_lora.quantization import dequantize_4bit_no_grad, dequantize_weight, quantize_linear

    assert quantization._cuda_dequantize_impls() is not None, "bitsandbytes' CUDA dequantize functions changed: the ops are called"
    torch.manual_seed(0)
    config = QuantizationConfig(mode=mode, double_quant=double_quant, compute_dtype="bfloat16")
    base = quantize_linear(nn.Linear(4096, 1024).bfloat16(), config, device="cuda").eval()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        lean = dequantize_4bit_no_grad(base, dtype)
        assert lean is not None and lean.dtype == dtype and lean.is_cuda
        state = copy.copy(base.weight.quant_state)
        state.dtype = dtype
        assert torch.equal(lean, bitsandbytes.functional.dequantize_4bit(base.weight.data, state)), dtype
    assert torch.equal(dequantize_4bit_no_grad(base, torch.bfloat16), dequantize_weight(base, dtype=torch.bfloat16))
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)  # past bitsandbytes' fused-kernel rows
    with torch.no_grad():
        assert torch.equal(base(x), nn.functional.linear(x, dequantize_4bit_no_grad(base, torch.bfloat16), base.bias))
