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
    for rows in (1, 512):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            layer.base_layer(x)
            lean = layer(x)
            with monkeypatch.context() as patch:
                patch.setattr(quantization, "linear_4bit_no_grad", lambda module, x: None)
                before = layer(x)
        assert torch.equal(lean, before), rows
