"""CPU side of the one-kernel nf4 dequantize (``lightning_lora.nf4_kernel``): where it must not run, and its switch.

The kernel itself, its bit-for-bit equality with bitsandbytes and the compiled paths that use it are checked on
CUDA by ``tests/gpu/test_gpu_nf4_kernel.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_lora import QuantizationConfig, nf4_kernel
from lightning_lora.quantization import frozen_nf4_linear, quantize_linear


def _nf4_layer(double_quant: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return quantize_linear(nn.Linear(64, 64, bias=False), QuantizationConfig(mode="nf4", double_quant=double_quant, compute_dtype="bfloat16"), device="cpu")


def test_cpu_weights_are_left_to_bitsandbytes(monkeypatch) -> None:
    monkeypatch.setattr(nf4_kernel, "ENABLED", True)
    layer = _nf4_layer()
    x = torch.randn(2048, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x)
    assert not nf4_kernel.usable(layer.weight, layer.weight.quant_state)
    assert frozen_nf4_linear(layer, x) is None  # eager and on CPU: the layer computes itself


def test_frozen_linear_declines_outside_a_compiled_graph_and_for_fp4(monkeypatch) -> None:
    monkeypatch.setattr(nf4_kernel, "ENABLED", True)
    layer = quantize_linear(nn.Linear(64, 64, bias=False), QuantizationConfig(mode="fp4", compute_dtype="bfloat16"), device="cpu")
    x = torch.randn(2048, 64, dtype=torch.bfloat16)
    layer(x)
    assert frozen_nf4_linear(layer, x) is None
    assert not nf4_kernel.usable(layer.weight, layer.weight.quant_state)


def test_prepare_without_triton_says_no_and_does_not_raise() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        assert nf4_kernel.prepare() is False
        assert nf4_kernel.prepare() is False  # remembered, not retried
    else:  # a machine with Triton registers the op
        assert nf4_kernel.prepare() is True


def test_environment_switch_turns_it_off(monkeypatch) -> None:
    import importlib

    registered, unavailable = list(nf4_kernel._OP), list(nf4_kernel._UNAVAILABLE)  # a reload must not re-register the op
    try:
        for value, expected in (("0", False), ("1", True), (None, True)):
            if value is None:
                monkeypatch.delenv("LIGHTNING_LORA_NF4_KERNEL", raising=False)
            else:
                monkeypatch.setenv("LIGHTNING_LORA_NF4_KERNEL", value)
            assert importlib.reload(nf4_kernel).ENABLED is expected, value  # read once, at import
    finally:
        monkeypatch.undo()
        importlib.reload(nf4_kernel)
        nf4_kernel._OP[:], nf4_kernel._UNAVAILABLE[:] = registered, unavailable
