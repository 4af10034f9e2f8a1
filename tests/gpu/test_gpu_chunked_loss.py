"""CUDA check of the chunked causal-LM loss (`pytest -m gpu tests/gpu/test_gpu_chunked_loss.py`); CI on CPU skips it.

An nf4 Llama with LoRA under bf16 autocast, activation checkpointing and compiled decoder layers (the long-context
configuration of ``benchmarks/long_context.py``): the chunked loss and every LoRA gradient agree with transformers'
own loss over the full logits, and the vocabulary head never sees more than one chunk of rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: _models

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/gpu)")]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-blocks"])
def test_chunked_loss_matches_the_full_logits_loss_on_cuda(compiled):
    from _models import VOCAB, tiny_llama
    from lightning_lora import LoRAConfig, QuantizationConfig, enable_chunked_loss, inject_lora, quantize_model
    from lightning_lora.checkpointing import enable_activation_checkpointing
    from lightning_lora.compiling import compile_blocks

    def build(chunked):
        model = tiny_llama().to(torch.bfloat16)
        model.config._attn_implementation = "sdpa"
        model = quantize_model(model, QuantizationConfig(mode="nf4", compute_dtype="bfloat16"), device="cuda").cuda()
        enable_activation_checkpointing(model)
        model = inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
        torch.manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        if chunked:
            enable_chunked_loss(model, 16)
        if compiled:
            compile_blocks(model)
        return model.train()

    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0)).cuda()
    labels = ids.clone()
    labels[:, :10] = -100
    results = {}
    for chunked in (False, True):
        model = build(chunked)
        rows = []
        model.get_output_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
        for _ in range(2 if compiled else 1):  # compiled: the first call compiles
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results[chunked] = (loss.detach().float(), grads, rows)
    (ref_loss, ref_grads, _), (loss, grads, rows) = results[False], results[True]
    assert max(rows) <= 16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        error = (grad - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)
        assert error < 3e-2, (name, error.item())
