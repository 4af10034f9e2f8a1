"""inject_lora: which layers get wrapped, what trains, parameter counts, and errors that leave the model alone."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from _models import assert_unchanged, model_snapshot, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch
from lightning_lora import (
    LoRAConfig,
    LoRALinear,
    QuantizationConfig,
    adapter_state_dict,
    backbone_fingerprint,
    inject_lora,
    parameter_summary,
    quantize_model,
    trainable_parameters,
)
from lightning_lora.inject import lora_state, parameter_counts, plan_injection
from lightning_lora.layers import lora_layers

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


def layer_paths(prefix: str, layers: int, names: list[str]) -> set[str]:
    return {f"{prefix}.{i}.{name}" for i in range(layers) for name in names}


@pytest.mark.parametrize(
    ("builder", "targets"),
    [
        (tiny_llama, ["q_proj", "v_proj"]),
        (tiny_llama, "all-linear"),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
        (tiny_bert_classifier, "all-linear"),
    ],
    ids=["llama-qv", "llama-all", "gpt2-conv1d", "bert-all"],
)
def test_output_at_init_equals_base_exactly(builder, targets):
    base = builder()
    x = token_batch()
    with torch.no_grad():
        expected = base(x).logits
    model = inject_lora(builder(), LoRAConfig(r=4, alpha=8, target_modules=targets))
    assert len(lora_layers(model)) > 0
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)


def test_targets_by_suffix_list():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    expected = layer_paths("model.layers", 2, ["self_attn.q_proj", "self_attn.v_proj"])
    assert set(lora_layers(model)) == expected
    assert set(lora_state(model).targets) == expected
    assert all(type(layer.base_layer) is nn.Linear for layer in lora_layers(model).values())


def test_all_linear_leaves_output_heads_alone():
    llama = inject_lora(tiny_llama(), LoRAConfig(r=4))
    names = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    assert set(lora_layers(llama)) == layer_paths("model.layers", 2, names)
    assert type(llama.lm_head) is nn.Linear

    bert = inject_lora(tiny_bert_classifier(), LoRAConfig(r=4))
    names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert set(lora_layers(bert)) == layer_paths("bert.encoder.layer", 2, names) | {"bert.pooler.dense"}
    assert type(bert.classifier) is nn.Linear


def test_regex_and_exclude_modules():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj"))
    assert set(lora_layers(model)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.0\..*"))
    assert set(lora_layers(model)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


@pytest.mark.parametrize(
    ("bias", "extra"),
    [
        ("none", set()),
        ("lora_only", {"bert.encoder.layer.0.attention.self.query.base_layer.bias", "bert.encoder.layer.1.attention.self.query.base_layer.bias"}),
    ],
)
def test_only_adapter_tensors_train(bias, extra):
    model = inject_lora(tiny_bert_classifier(), LoRAConfig(r=4, target_modules=["query"], bias=bias, modules_to_save=["classifier"]))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    lora = {f"bert.encoder.layer.{i}.attention.self.query.lora_{ab}.weight" for i in range(2) for ab in "ab"}
    assert trainable == lora | {"classifier.weight", "classifier.bias"} | extra
    assert trainable == set(adapter_state_dict(model))
    assert [id(p) for p in trainable_parameters(model)] == [id(p) for n, p in model.named_parameters() if n in trainable]


def test_bias_all_trains_every_bias():
    model = inject_lora(tiny_bert_classifier(), LoRAConfig(r=4, target_modules=["query"], bias="all"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    biases = {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    # Per layer: query, key, value, attention dense + LayerNorm, intermediate dense, output dense + LayerNorm.
    assert len(biases) == 2 * 8 + 3  # + embeddings.LayerNorm, pooler.dense, classifier
    assert trainable - biases == {f"bert.encoder.layer.{i}.attention.self.query.lora_{ab}.weight" for i in range(2) for ab in "ab"}
    assert biases <= trainable


def test_trainable_parameters_and_summary_exact_numbers():
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    assert base_total == 90_432
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # r * (in + out) per target: q_proj 64 -> 64, v_proj 64 -> 32 (2 KV heads x 16), 2 layers.
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert expected == 1_792
    assert sum(p.numel() for p in trainable_parameters(model)) == expected
    assert parameter_counts(model) == {"trainable": expected, "total": base_total + expected}
    assert parameter_summary(model) == (
        f"trainable params: 1,792 || all params: 92,224 || trainable%: {100 * 1792 / 92224:.4f}"
    )
    assert parameter_summary(model) == "trainable params: 1,792 || all params: 92,224 || trainable%: 1.9431"


def test_parameter_counts_of_quantized_model_count_logical_weights():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), QuantizationConfig(mode="nf4"))
    # 4-bit weights are packed two per byte; the count is of the weights they stand for.
    assert parameter_counts(model) == {"trainable": 1_792, "total": 92_224}


def test_llama_7b_shape_adapter_size_on_meta_device():
    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
            )
        )
    inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    adapter = adapter_state_dict(model)
    assert len(adapter) == 32 * 2 * 2
    assert sum(t.numel() for t in adapter.values()) == 4_194_304  # 32 layers x 2 modules x 8 x (4096 + 4096)
    assert {t.device.type for t in adapter.values()} == {"meta"}
    assert sum(p.numel() for p in trainable_parameters(model)) == 4_194_304


def test_backbone_fingerprint_ignores_the_adapter():
    base = tiny_llama()
    before = backbone_fingerprint(base)
    inject_lora(base, LoRAConfig(r=4, target_modules=["q_proj"]))
    assert backbone_fingerprint(base) == before
    assert backbone_fingerprint(tiny_llama(seed=3)) == before  # weights do not matter, shapes do
    assert backbone_fingerprint(tiny_gpt2()) != before


def test_prequantized_model_gets_its_bnb_layers_wrapped():
    import bitsandbytes as bnb

    model = tiny_llama()
    quantize_model(model, QuantizationConfig(mode="nf4"))
    x = token_batch()
    expected = model(x).logits.detach()  # train mode: bitsandbytes' training path on CPU
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert set(lora_layers(model)) == layer_paths("model.layers", 2, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in lora_layers(model).values())
    assert lora_state(model).quantization is None
    assert torch.equal(model(x).logits.detach(), expected)


# --- errors: clear messages, and the model is left as it was -----------------------------------------


def test_pattern_matching_nothing_lists_linear_layer_names():
    model = tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        inject_lora(model, LoRAConfig(target_modules=["query", "value"]))
    message = str(info.value)
    assert "`target_modules`=['query', 'value']" in message
    assert "matches no linear layer of LlamaForCausalLM" in message
    assert f"Linear layers here are named {LLAMA_LINEARS}" in message
    assert_unchanged(model, snapshot)
    assert lora_state(model) is None


def test_exclude_removing_every_target_is_reported():
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape("(exclude_modules=['q_proj']) matches no linear layer")):
        inject_lora(model, LoRAConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    assert not lora_layers(model)


@pytest.mark.parametrize(
    ("targets", "kinds"),
    [
        (["input_layernorm"], "'model.layers.0.input_layernorm': 'LlamaRMSNorm'"),
        (["embed_tokens"], "'model.embed_tokens': 'Embedding'"),
        (["q_proj", "post_attention_layernorm"], "'model.layers.0.post_attention_layernorm': 'LlamaRMSNorm'"),
    ],
)
def test_target_that_is_not_a_linear_layer(targets, kinds):
    model = tiny_llama()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        inject_lora(model, LoRAConfig(target_modules=targets))
    message = str(info.value)
    assert f"`target_modules`={targets!r} matches modules that are not linear layers" in message
    assert kinds in message
    assert "narrow the pattern" in message
    assert_unchanged(model, snapshot)


def test_modules_to_save_matching_nothing():
    model = tiny_bert_classifier()
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError) as info:
        inject_lora(model, LoRAConfig(target_modules=["query"], modules_to_save=["score"]))
    assert "`modules_to_save` entry 'score' matches no module of BertForSequenceClassification" in str(info.value)
    assert "['bert', 'dropout', 'classifier']" in str(info.value)
    assert_unchanged(model, snapshot)


def test_injecting_twice_is_refused_and_changes_nothing():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    snapshot = model_snapshot(model)
    layers = lora_layers(model)
    state = lora_state(model)
    for config in (LoRAConfig(r=4, target_modules=["q_proj"]), LoRAConfig(r=4, target_modules=["v_proj"])):
        with pytest.raises(ValueError, match="`inject_lora` was called twice. Inject once, or call it on a fresh model."):
            inject_lora(model, config)
    assert lora_layers(model) == layers
    assert lora_state(model) is state
    assert_unchanged(model, snapshot)


def test_wrong_argument_types():
    model = tiny_llama()
    with pytest.raises(TypeError, match="`config` must be a LoRAConfig, got dict"):
        inject_lora(model, {"r": 4})
    with pytest.raises(TypeError, match="`quantization_config` must be a QuantizationConfig or None, got str"):
        inject_lora(model, LoRAConfig(), "nf4")
    assert not lora_layers(model)


def test_lora_layer_is_not_a_target_candidate():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    assert all(isinstance(model.get_submodule(name), LoRALinear) for name in lora_state(model).targets)


def test_inject_quantizes_onto_the_given_device():
    from lightning_lora import QuantizationConfig
    from lightning_lora.inject import lora_state

    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]), QuantizationConfig(mode="nf4"), device="cpu")
    base = model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base).__name__ == "Linear4bit" and base.weight.device.type == "cpu" and base.weight.dtype == torch.uint8
    assert len(lora_state(model).quantized) == 14  # 7 projections x 2 layers; lm_head stays full precision


# -- freezing and saving use one definition of the adapter ------------------------------------------
def _expected_adapter_keys(model: nn.Module, config: LoRAConfig) -> set[str]:
    """The adapter's keys worked out from the config alone, independently of the library's rule."""
    layers = lora_layers(model)
    keys = {f"{path}.lora_{ab}.weight" for path in layers for ab in "ab"}
    names = [name for name, _ in model.named_parameters()]
    for root in config.modules_to_save or []:
        keys |= {name for name in names if name.startswith(root + ".") or f".{root}." in f".{name}"}
    if config.bias == "all":
        keys |= {name for name in names if name.endswith(".bias")}
    if config.bias == "lora_only":
        keys |= {f"{path}.base_layer.bias" for path, layer in layers.items() if getattr(layer.base_layer, "bias", None) is not None}
    return keys


_BERT_LINEARS = ["query", "key", "value", "dense"]


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("modules_to_save", [None, ["classifier"], ["classifier", "pooler"]], ids=["no-save", "head", "head+pooler"])
@pytest.mark.parametrize(
    "patterns",
    [{}, {"rank_pattern": {"query": 2}}, {"alpha_pattern": {"value": 3.0}, "exclude_modules": ["key"]}],
    ids=["plain", "rank-pattern", "alpha-pattern+exclude"],
)
def test_what_trains_is_exactly_what_is_saved(bias, modules_to_save, patterns):
    config = LoRAConfig(r=4, alpha=8, target_modules=_BERT_LINEARS, bias=bias, modules_to_save=modules_to_save, **patterns)
    fresh = tiny_bert_classifier()
    planned = plan_injection(fresh, config).adapter_shapes(fresh)  # what adapter_io checks files against
    model = inject_lora(tiny_bert_classifier(), config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    saved = adapter_state_dict(model)
    assert trainable == set(saved) == _expected_adapter_keys(model, config)
    assert planned == {key: tuple(value.shape) for key, value in saved.items()}
    if "rank_pattern" in patterns:
        assert saved["bert.encoder.layer.0.attention.self.query.lora_a.weight"].shape == (2, 64)
    # Six linears named query/key/value/dense per layer, two layers, and pooler.dense (unless saved in full).
    per_layer = 5 if "exclude_modules" in patterns else 6
    pooler = 0 if modules_to_save and "pooler" in modules_to_save else 1
    assert len([k for k in saved if k.endswith(".lora_a.weight")]) == 2 * per_layer + pooler


@pytest.mark.parametrize(("builder", "targets", "quantize"), [
    (tiny_gpt2, ["c_attn", "c_proj"], False),  # Conv1D bases with biases
    (tiny_llama, "all-linear", True),  # nf4 bases, no biases
    (tiny_bert_classifier, ["query", "value"], True),  # nf4 bases with biases
], ids=["gpt2", "llama-nf4", "bert-nf4"])  # fmt: skip
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_what_trains_is_what_is_saved_on_other_bases(builder, targets, quantize, bias):
    config = LoRAConfig(r=4, alpha=8, target_modules=targets, bias=bias)
    model = inject_lora(builder(), config, QuantizationConfig(mode="nf4") if quantize else None)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) == _expected_adapter_keys(model, config)
