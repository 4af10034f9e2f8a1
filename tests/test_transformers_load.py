"""transformers' own ``model.load_adapter(dir)`` (its PEFT integration) loads every kind of adapter we write and
computes our outputs: plain, rsLoRA and patterns, biases, modules_to_save, Conv1D, trained token rows (tied and
untied), and fused MoE experts."""

from __future__ import annotations

import pytest
import torch

from _models import randomize_adapter, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_llama_tied, tiny_moe, token_batch
from lightning_lora import LoRAConfig, inject_lora, save_adapter

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
CASES = {
    "llama-plain": (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    "llama-rslora-patterns": (
        tiny_llama,
        {"target_modules": "all-linear", "use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {r"layers\.1\.mlp\.down_proj": 3.0}},
    ),
    "gpt2-conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"]}),
    "bert-bias-all-classifier": (tiny_bert_classifier, {"target_modules": ["query", "value"], "bias": "all", "modules_to_save": ["classifier"]}),
    "bert-lora-only": (tiny_bert_classifier, {"target_modules": ["query", "value"], "bias": "lora_only"}),
    "llama-tokens-untied": (tiny_llama, {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 9]}),
    "llama-tokens-tied": (tiny_llama_tied, {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [1, 5, 9]}}),
    "mixtral-experts": (lambda: tiny_moe("mixtral"), {"target_modules": ["q_proj"], "target_parameters": EXPERTS}),
    "gpt-oss-experts-only": (lambda: tiny_moe("gpt_oss"), {"target_modules": None, "target_parameters": EXPERTS, "rank_pattern": {"down_proj": 2}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_load_adapter_gives_our_outputs(tmp_path, case):
    builder, kwargs = CASES[case]
    ours = inject_lora(builder(), LoRAConfig(r=4, alpha=8, **kwargs)).eval()
    randomize_adapter(ours, seed=5)
    save_adapter(ours, tmp_path)
    theirs = builder().eval()
    theirs.load_adapter(str(tmp_path))
    x = token_batch(seed=6)
    x[0, :3] = torch.tensor([1, 5, 9])
    with torch.no_grad():
        expected, got = ours(input_ids=x).logits, theirs(input_ids=x).logits
        assert (expected - builder().eval()(input_ids=x).logits).abs().max() > 1e-4  # the adapter matters
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
