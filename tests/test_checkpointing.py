"""Tests of lightning_lora.checkpointing: per-layer checkpointing, and checkpointed inputs offloaded to host memory."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lora import LoRAConfig, inject_lora
from lightning_lora.checkpointing import enable_activation_checkpointing, offloading_checkpoint

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


def _model(seed: int = 0, device: str = "cpu") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa")).to(device).train()
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    for name, param in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(param, std=0.02)  # B = 0 would make A's gradients zero
    return model


def _lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointed_gradients_equal_plain_ones(offload):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = _lora_grads(_model(), ids)
    model = _model()
    enable_activation_checkpointing(model, offload_to_cpu=offload)
    layers = [m for m in model.model.layers]
    assert all(m.gradient_checkpointing for m in layers) and model.config.use_cache is False
    wrapped = {getattr(m._gradient_checkpointing_func, "func", None) is offloading_checkpoint for m in layers}
    assert wrapped == {offload}
    checkpointed = _lora_grads(model, ids)
    assert checkpointed.keys() == plain.keys() and len(plain) == 3 * 7 * 2
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0)


def test_rejects_what_it_cannot_offload():
    with pytest.raises(TypeError, match="needs a transformers model"):
        enable_activation_checkpointing(torch.nn.Linear(4, 4), offload_to_cpu=True)
    with pytest.raises(ValueError, match="`use_reentrant`=True cannot offload"):
        offloading_checkpoint(lambda x: x * 2, torch.ones(2, requires_grad=True), use_reentrant=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_offloading_frees_the_checkpointed_inputs_on_the_gpu():
    shape = dict(SHAPE, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8)
    ids = torch.randint(0, 128, (4, 1024), device="cuda")
    peaks, grads = {}, {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to("cuda", torch.bfloat16).train()
        inject_lora(model, LoRAConfig(r=4, alpha=8))
        enable_activation_checkpointing(model, offload_to_cpu=offload)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        after_forward = torch.cuda.memory_allocated() - base
        loss.backward()
        peaks[offload] = (after_forward, torch.cuda.max_memory_allocated() - base)
        grads[offload] = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
        del model, loss
        torch.cuda.empty_cache()
    layer_input = 4 * 1024 * 1024 * 2  # (batch, seq, hidden) bf16
    # All 8 checkpointed inputs leave the GPU after forward (the last layer's output feeds the head, not a checkpoint).
    assert peaks[False][0] - peaks[True][0] >= 7 * layer_input
    assert peaks[True][1] < peaks[False][1]
    for name, value in grads[False].items():  # the same up to the attention backward's nondeterministic sums
        torch.testing.assert_close(grads[True][name], value, rtol=1e-2, atol=1e-4)
