"""DoRA, several adapters and PiSSA / OLoRA on CUDA (`pytest -m gpu tests/gpu/test_gpu_adapters.py`); CI on CPU skips them.

- DoRA on a CUDA nf4 base with bf16 compute and on an int8 base: outputs and gradients equal PEFT's (bf16 / int8
  tolerance); on a float32 base at rtol 1e-5. Regional compilation (inductor) gives the eager gradients.
- PiSSA (exact and randomized SVD) on a float base and OLoRA on a CUDA nf4 base give PEFT's A, B and residual
  (PEFT rounds a 4-bit layer's A and B to its bf16 compute dtype; ours stay float32).
- Per-sample adapters equal PEFT's ``adapter_names``; loading new weights into a compiled model does not recompile.

``LL_GPU_TESTS_ON=cpu`` runs the same code on the CPU (to check the tests themselves where no GPU is).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: _models

DEVICE = os.environ.get("LL_GPU_TESTS_ON", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/gpu)")]
QVD = ["q_proj", "v_proj", "down_proj"]


def assert_close_scaled(actual, expected, rtol, name=""):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * expected.float().abs().max().item(), msg=lambda m: f"{name}: {m}")


def _base(mode):
    from _models import tiny_llama
    from lightning_lora import QuantizationConfig, quantize_model

    model = tiny_llama().to(DEVICE)
    if mode is not None:
        # compute_dtype is a 4-bit option: int8 refuses it (Linear8bitLt computes in its input's dtype)
        quantize_model(model, QuantizationConfig(mode=mode, compute_dtype=None if mode == "int8" else "bfloat16"), device=DEVICE)
    return model


def _grads(model, x, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x).logits
    (out.float() * torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("mode", "rtol"), [(None, 1e-5), ("nf4", 2e-2), ("int8", 2e-2)])
def test_dora_matches_peft_on_cuda(mode, rtol):
    from peft import LoraConfig, get_peft_model

    from _models import copy_adapter_into_peft, peft_param_name, randomize_adapter, token_batch
    from lightning_lora import LoRAConfig, inject_lora

    base = _base(mode)
    peft_base = copy.deepcopy(base)
    ours = inject_lora(base, LoRAConfig(r=4, alpha=8, target_modules=QVD, use_dora=True))
    randomize_adapter(ours)
    peft = get_peft_model(peft_base, LoraConfig(r=4, lora_alpha=8, target_modules=QVD, use_dora=True))
    copy_adapter_into_peft(ours, peft)
    x = token_batch().to(DEVICE)
    out, grads = _grads(ours, x)
    peft_out, peft_grads = _grads(peft, x)
    assert_close_scaled(out, peft_out, rtol, "output")
    assert {peft_param_name(n) for n in grads} == set(peft_grads)
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, name
        assert_close_scaled(grad, peft_grads[peft_param_name(name)], max(rtol, 1e-4), name)


def test_dora_compiled_blocks_match_eager_on_cuda():
    from _models import randomize_adapter, token_batch
    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.compiling import compile_blocks

    model = inject_lora(_base("nf4"), LoRAConfig(r=4, target_modules=QVD, use_dora=True))
    randomize_adapter(model)
    x = token_batch(seq=32).to(DEVICE)
    eager_out, eager = _grads(model, x)
    torch._dynamo.reset()
    compile_blocks(model)
    out, grads = _grads(model, x)
    assert_close_scaled(out, eager_out, 2e-2, "output")
    assert grads.keys() == eager.keys()
    for name, grad in eager.items():
        assert_close_scaled(grads[name], grad, 5e-2, name)


@pytest.mark.parametrize(("init", "mode"), [("pissa", None), ("pissa_niter_4", None), ("olora", "nf4")])
def test_inits_match_peft_on_cuda(init, mode):
    from peft import LoraConfig, get_peft_model

    from _models import peft_param_name, token_batch
    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.layers import lora_layers
    from lightning_lora.quantization import dequantize_weight, is_quantized

    base = _base(mode)
    peft_base = copy.deepcopy(base)
    torch.manual_seed(5)
    ours = inject_lora(base, LoRAConfig(r=4, alpha=8, target_modules=QVD, init=init))
    torch.manual_seed(5)
    peft = get_peft_model(peft_base, LoraConfig(r=4, lora_alpha=8, target_modules=QVD, init_lora_weights=init))
    params = dict(peft.named_parameters())
    # PEFT moves the adapter of a 4-bit layer to its compute dtype (bf16) after the init, then back to float32, so its
    # A and B are our (float32) ones rounded to bf16; the residual it leaves is computed before, and equals ours.
    rtol = 1e-5 if mode is None else 8e-3
    for path, layer in lora_layers(ours).items():
        for name in ("lora_a.weight", "lora_b.weight"):
            assert_close_scaled(params[peft_param_name(f"{path}.{name}")], ours.get_parameter(f"{path}.{name}"), rtol, name)
        theirs = peft.base_model.model.get_submodule(path).base_layer
        weight = dequantize_weight if is_quantized(layer.base_layer) else (lambda m: m.weight)
        torch.testing.assert_close(weight(layer.base_layer), weight(theirs), rtol=1e-5, atol=1e-6)
    x = token_batch().to(DEVICE)
    with torch.no_grad():
        assert_close_scaled(ours(x).logits, peft(x).logits, 1e-4 if mode is None else 2e-2)


def test_per_sample_adapters_and_compiled_swap_on_cuda(tmp_path):
    from peft import PeftModel

    from _models import randomize_adapter, tiny_llama, token_batch
    from lightning_lora import LoRAConfig, inject_lora, load_adapter, per_sample_adapters, save_adapter

    for name, seed in (("a", 1), ("b", 2)):
        model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        randomize_adapter(model, seed=seed)
        save_adapter(model, tmp_path / name)
    ours = load_adapter(tiny_llama(), tmp_path / "a", adapter_name="a").to(DEVICE).eval()
    load_adapter(ours, tmp_path / "b", adapter_name="b")
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a").to(DEVICE).eval()
    peft.load_adapter(str(tmp_path / "b"), adapter_name="b")
    names = ["b", "__base__", "a"]
    x = token_batch(batch=3).to(DEVICE)
    with torch.no_grad(), per_sample_adapters(ours, names):
        mixed = ours(x).logits
    with torch.no_grad():
        assert_close_scaled(mixed, peft(x, adapter_names=names).logits, 1e-4)
    compiles = []

    def counting(graph_module, example_inputs):
        compiles.append(1)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=counting)
    with torch.no_grad():
        first = compiled(x).logits
        count = len(compiles)
        load_adapter(compiled, tmp_path / "b", adapter_name="a")  # b's weights into adapter a, in place
        second = compiled(x).logits
        peft.set_adapter("b")
        assert_close_scaled(second, peft(x).logits, 1e-4)
    assert len(compiles) == count and not torch.allclose(first, second)
