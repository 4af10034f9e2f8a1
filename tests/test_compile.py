"""Regional compilation (``compile_blocks`` / ``compile_blocks=True``): same numbers as eager, same keys.

Inductor compiles on CPU here (a C++ compiler is needed); each test compiles one tiny block graph.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from _lightning import LlamaLM, token_loader
from _models import randomize_adapter, tiny_llama, token_batch
from lightning_lora import LoRACallback, LoRAConfig, QuantizationConfig, inject_lora
from lightning_lora.compiling import compile_blocks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_blocks_match_eager_on_an_nf4_llama():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=TARGETS), QuantizationConfig(mode="nf4"))
    randomize_adapter(model)
    ids = token_batch(batch=2, seq=16)
    keys = list(model.state_dict())
    eager_loss, eager = _grads(model, ids)
    names = compile_blocks(model)
    assert names == [f"model.layers.{i}" for i in range(len(model.model.layers))]
    compiled_loss, compiled = _grads(model, ids)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=lambda m, n=name: f"{n}: {m}")
    assert list(model.state_dict()) == keys  # compiled in place: no `_orig_mod.` in any key
    assert compile_blocks(model) == names  # a second call leaves compiled blocks alone


def test_compile_blocks_needs_block_classes_for_a_plain_module():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="block_classes"):
        compile_blocks(model)
    with pytest.raises(ValueError, match=r"No module of Sequential matches `block_classes`=\['Block'\]"):
        compile_blocks(model, ["Block"])


@pytest.mark.parametrize("value", ["yes", [], [1], 1])
def test_callback_rejects_bad_compile_blocks(value):
    with pytest.raises(ValueError, match=r"`compile_blocks` must be True, False or a list of block class names"):
        LoRACallback(compile_blocks=value)


def test_callback_compiles_blocks_and_trains(tmp_path):
    module = LlamaLM(build_in="configure_model")
    callback = LoRACallback(r=4, alpha=8, target_modules=TARGETS, backbone="model", compile_blocks=["LlamaDecoderLayer"])
    trainer = L.Trainer(accelerator="cpu", max_steps=3, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, token_loader(n=12, batch_size=4))
    assert all(layer._compiled_call_impl is not None for layer in module.model.model.layers)
    checkpoint = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in key and "_orig_mod" not in key for key in checkpoint["state_dict"])
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_mixin_passes_compile_blocks_to_its_controller():
    from _lightning import MixinLlamaLM
    from lightning_lora import LoRAConfig

    class Compiled(MixinLlamaLM):
        compile_blocks = ["LlamaDecoderLayer"]

    assert Compiled(LoRAConfig(r=4, alpha=8)).lora_controller.compile_blocks == ["LlamaDecoderLayer"]
