"""Training chosen embedding rows (``trainable_token_indices``): PEFT parity (forward, gradients, keys, config,
files both ways), tied embeddings, merging, the callback, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

from _lightning import LlamaLM, token_loader, trainer
from _models import assert_same_adapter_files, assert_unchanged, copy_adapter_into_peft, model_snapshot, peft_param_name, randomize_adapter, tiny_llama, tiny_llama_tied, token_batch
from lightning_lora import LoRACallback, LoRAConfig, TrainableTokens, adapter_state_dict, inject_lora, load_adapter, merge_lora, merged_state_dict, save_adapter, unmerge_lora
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.merge import disable_lora

ROWS = [3, 5, 7, 100]
CASES = {
    "untied-list": (tiny_llama, {"trainable_token_indices": ROWS}),
    "tied-list": (tiny_llama_tied, {"trainable_token_indices": ROWS}),
    "tied-dict": (tiny_llama_tied, {"trainable_token_indices": {"embed_tokens": ROWS}}),
    "untied-dict-two-modules": (tiny_llama, {"trainable_token_indices": {"embed_tokens": ROWS, "lm_head": [1, 2]}}),
}


def kwargs_for(case: str) -> dict:
    return {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **CASES[case][1]}


def build_pair(case: str):
    builder = CASES[case][0]
    kwargs = kwargs_for(case)
    ours = inject_lora(builder(), LoRAConfig(**kwargs))
    randomize_adapter(ours, seed=2)
    peft = get_peft_model(builder(), LoraConfig(r=4, lora_alpha=8, target_modules=kwargs["target_modules"], trainable_token_indices=kwargs["trainable_token_indices"]))
    copy_adapter_into_peft(ours, peft)
    return ours, peft


def batch_with_rows() -> torch.Tensor:
    x = token_batch(seed=3, batch=2, seq=10)
    x[0, :4] = torch.tensor(ROWS)  # the trained rows are read, and predicted
    return x


def output_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x).logits
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(9))).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_gradients_and_trained_set_match_peft(case):
    ours, peft = build_pair(case)
    out, grads = output_and_grads(ours, batch_with_rows())
    peft_out, peft_grads = output_and_grads(peft, batch_with_rows())
    torch.testing.assert_close(out, peft_out, rtol=1e-5, atol=1e-5)
    assert {peft_param_name(name) for name in grads} == set(peft_grads)
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(grad, peft_grads[peft_param_name(name)], rtol=1e-5, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_tied_head_follows_the_embedding_rows_and_saves_nothing():
    ours, _ = build_pair("tied-list")
    assert isinstance(ours.lm_head, TrainableTokens) and ours.lm_head.source is ours.model.embed_tokens
    assert sorted(k for k in adapter_state_dict(ours) if "tokens" in k) == ["model.embed_tokens.trainable_tokens_delta"]
    # The logits of a trained token use its trained row: hidden @ row.
    hidden = torch.randn(1, 64)
    logits = ours.lm_head(hidden)
    torch.testing.assert_close(logits[0, ROWS], hidden[0] @ ours.model.embed_tokens.trainable_tokens_delta.T)
    untrained = [i for i in range(128) if i not in ROWS]
    torch.testing.assert_close(logits[0, untrained], hidden[0] @ ours.model.embed_tokens.base_layer.weight[untrained].T)


@pytest.mark.parametrize("case", ["untied-list", "tied-list", "untied-dict-two-modules"])
def test_files_match_peft_both_ways(tmp_path, case):
    ours, peft = build_pair(case)
    save_adapter(ours, tmp_path / "ours")
    peft.save_pretrained(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft")
    ours_config = json.loads((tmp_path / "ours" / ADAPTER_CONFIG_NAME).read_text())
    peft_config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG_NAME).read_text())
    assert ours_config["trainable_token_indices"] == peft_config["trainable_token_indices"] == CASES[case][1]["trainable_token_indices"]
    builder, x = CASES[case][0], batch_with_rows()
    with torch.no_grad():
        expected = ours(input_ids=x).logits
        torch.testing.assert_close(PeftModel.from_pretrained(builder(), tmp_path / "ours")(input_ids=x).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_adapter(builder(), tmp_path / "peft")(input_ids=x).logits, expected, rtol=0, atol=1e-5)


def test_only_the_chosen_rows_change_in_training_and_merging():
    model = inject_lora(tiny_llama_tied(), LoRAConfig(r=4, target_modules=["q_proj"], trainable_token_indices=ROWS))
    original = model.model.embed_tokens.base_layer.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = batch_with_rows()
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    delta = model.model.embed_tokens.trainable_tokens_delta.detach()
    assert torch.equal(model.model.embed_tokens.base_layer.weight, original)  # the table itself stays frozen
    assert (delta - original[ROWS]).abs().min() > 0  # every trained row moved
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with disable_lora(model):
            torch.testing.assert_close(model(input_ids=x).logits, tiny_llama_tied()(input_ids=x).logits)
        merge_lora(model)
        merged_weight = model.model.embed_tokens.base_layer.weight.clone()
        torch.testing.assert_close(model(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        assert torch.equal(model.model.embed_tokens.base_layer.weight, original)
    changed = (merged_weight != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == ROWS
    state = merged_state_dict(model)
    assert torch.equal(state["model.embed_tokens.weight"], merged_weight) and torch.equal(state["lm_head.weight"], merged_weight)
    plain = tiny_llama_tied()
    plain.load_state_dict(state, strict=True)
    torch.testing.assert_close(plain(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)


def test_scaled_embedding_subclass_uses_its_own_forward():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    base = Scaled(32, 16)
    layer = TrainableTokens(base, [2, 4])
    with torch.no_grad():
        layer.trainable_tokens_delta += 1.0
    ids = torch.tensor([[2, 3, 4]])
    expected = torch.stack([layer.trainable_tokens_delta[0], base.weight[3], layer.trainable_tokens_delta[1]]) * 8.0
    torch.testing.assert_close(layer(ids)[0], expected)


def test_callback_trains_new_token_rows_and_resumes_them(tmp_path):
    callback = LoRACallback(r=4, target_modules=["q_proj"], trainable_token_indices=ROWS, backbone="model")
    module = LlamaLM(build_in="init")
    t = trainer(2, [callback])
    t.fit(module, token_loader(seed=4))
    rows = module.model.model.embed_tokens.trainable_tokens_delta.detach()
    assert not torch.equal(rows, tiny_llama().model.embed_tokens.weight[ROWS])
    t.save_checkpoint(tmp_path / "a.ckpt")
    assert "model.model.embed_tokens.trainable_tokens_delta" in torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    other = LoRACallback(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5], backbone="model")
    with pytest.raises(ValueError, match=r"`trainable_token_indices`=\[3, 5, 7, 100\].*`trainable_token_indices`=\[3, 5\]"):
        trainer(3, [other]).fit(LlamaLM(build_in="init"), token_loader(), ckpt_path=tmp_path / "a.ckpt")


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([3, 3], ValueError, r"lists token ids \[3\] more than once"),
        ([-1], ValueError, r"holds \[-1\], which are not token ids"),
        ("3", TypeError, r"must be a non-empty list of token ids"),
        ({"": [1]}, TypeError, r"must map module names to token ids"),
        ([], TypeError, r"must be a non-empty list"),
    ],
)
def test_bad_index_values_are_clear_errors(value, error, match):
    with pytest.raises(error, match=match):
        LoRAConfig(trainable_token_indices=value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trainable_token_indices": [128]}, r"holds \[128\], but it has 128 rows: resize the embeddings"),
        ({"trainable_token_indices": {"wte": [1]}}, r"names 'wte', which matches no module.*\['model.embed_tokens'\]"),
        ({"trainable_token_indices": {"embed_tokens": [1]}, "modules_to_save": ["embed_tokens"]}, r"also in modules_to_save"),
        ({"trainable_token_indices": {"norm": [1]}}, r"a LlamaRMSNorm: only nn.Embedding"),
    ],
)
def test_bad_targets_fail_before_the_model_changes(kwargs, match):
    model = tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=match):
        inject_lora(model, LoRAConfig(target_modules=["q_proj"], **kwargs))
    assert_unchanged(model, snapshot)
