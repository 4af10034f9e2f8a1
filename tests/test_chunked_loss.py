"""The chunked causal-LM loss (``lightning_lora.chunked_loss``) for any transformers model and through the Lightning wing.

What must hold: the loss and every gradient equal transformers' own loss (float32, ignore index, gradient-accumulation
``num_items_in_batch``, tuple outputs); the vocabulary head never sees more rows than one chunk, so the full logits are
never formed; without labels or gradients the model's own forward runs; models whose logits are not ``head(hidden)``
are refused by name; ``LoRACallback(chunked_ce=...)`` and ``LoRAMixin.chunked_ce`` train a user's module to the same
adapter as without it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from _lightning import LlamaLM, MixinLlamaLM, token_loader, trainer
from _models import VOCAB, tiny_llama, tiny_moe
from lightning_lora import LoRACallback, LoRAConfig, adapter_state_dict, disable_chunked_loss, enable_chunked_loss, inject_lora
from lightning_lora.chunked_loss import chunked_loss_size


def _head_rows(model) -> list[int]:
    """Rows of every call of the model's vocabulary head, recorded by a forward hook."""
    rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return rows


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    loss = out.loss if not isinstance(out, tuple) else out[0]
    loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _labels(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[2, 15:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": torch.tensor(17)}, {"return_dict": False}])
def test_loss_and_gradients_equal_transformers_own_loss(kwargs):
    ids, labels = _labels()
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # B away from zero, so every adapter tensor has a gradient
    _, ref_loss, ref_grads = _loss_and_grads(model, input_ids=ids, labels=labels, **kwargs)
    enable_chunked_loss(model, chunk_size=7)
    rows = _head_rows(model)
    out, loss, grads = _loss_and_grads(model, input_ids=ids, labels=labels, **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == 12
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    scored = int((labels[:, 1:] != -100).sum())
    # Forward and the recompute in backward: chunks of at most 7 rows, covering exactly the scored positions each time.
    assert max(rows) <= 7 and sum(rows) == 2 * scored, rows
    if kwargs.get("return_dict") is False:
        assert isinstance(out, tuple)
    else:
        assert out.logits is None


def test_without_labels_or_gradients_the_model_returns_its_logits():
    ids, labels = _labels()
    model = tiny_llama()
    expected = model(input_ids=ids, labels=labels)
    enable_chunked_loss(model, 8)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)  # validation: the model's own forward, logits and loss
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss.detach())
    assert model(input_ids=ids).logits.shape == (3, 20, VOCAB)
    assert chunked_loss_size(model) == 8
    enable_chunked_loss(model, 5)  # again: a new size, the same original forward underneath
    assert chunked_loss_size(model) == 5 and model(input_ids=ids, labels=labels).logits is None
    disable_chunked_loss(model)
    assert "forward" not in model.__dict__ and chunked_loss_size(model) == 0
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, expected.loss)


def test_refuses_models_whose_logits_are_not_the_head_output():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        enable_chunked_loss(model, 8)
    moe = tiny_moe("mixtral")
    moe.config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits=True"):
        enable_chunked_loss(moe, 8)
    with pytest.raises(ValueError, match="no|none is inside Linear"):
        enable_chunked_loss(torch.nn.Linear(4, 4), 8)
    for bad in (0, -3, True, "8", 2.0):
        with pytest.raises(ValueError, match=r"`chunk_size` must be a positive integer .*got " + repr(bad).replace(".", r"\.")):
            enable_chunked_loss(tiny_llama(), bad)


@pytest.mark.parametrize("bad", [-1, True, "512", None])
def test_callback_refuses_a_bad_chunked_ce(bad):
    with pytest.raises(ValueError, match=r"`chunked_ce` must be an integer >= 0"):
        LoRACallback(r=4, target_modules=["q_proj"], chunked_ce=bad)


def _fit(module, callbacks, steps=4):
    L.seed_everything(0)
    trainer(steps, callbacks).fit(module, token_loader())
    return {k: v.detach().clone() for k, v in adapter_state_dict(module.model).items()}


@pytest.mark.parametrize("front", ["callback", "mixin"])
def test_lightning_front_ends_train_the_same_adapter_with_chunks(front):
    config = dict(r=4, target_modules=["q_proj", "v_proj"])

    def run(chunked):
        if front == "callback":
            module = LlamaLM(build_in="configure_model")
            return module, _fit(module, [LoRACallback(**config, backbone="model", chunked_ce=chunked)])
        module = MixinLlamaLM(LoRAConfig(**config), build_in="configure_model")
        module.chunked_ce = chunked
        return module, _fit(module, [])

    _, plain = run(0)
    module, chunked = run(6)
    assert chunked_loss_size(module.model) == 6
    rows = _head_rows(module.model)
    module.model.train()
    ids = torch.randint(0, VOCAB, (4, 16))
    module.model(input_ids=ids, labels=ids).loss.backward()  # what training_step calls
    assert rows and max(rows) <= 6
    assert plain.keys() == chunked.keys()
    for key in plain:
        torch.testing.assert_close(chunked[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any((v != 0).any() for k, v in chunked.items() if "lora_b" in k)  # it trained
