"""Tiny transformers models shared by the test suite (no downloads, fixed seeds).

Every builder returns a fresh model in train mode with dropout disabled, so two calls give
identical weights and a train-mode forward is deterministic. Linear ``out_features`` are
multiples of 32 (bitsandbytes' CPU 4-bit kernel needs that), except classification heads,
which quantization leaves alone. Other test modules import these names: keep them stable.

- ``tiny_llama(seed=0)``: ``LlamaForCausalLM``, hidden 64, 2 layers, 4 heads (2 KV heads),
  intermediate 128, vocab 128. Linear layers: q/k/v/o_proj, gate/up/down_proj, lm_head.
- ``tiny_gpt2(seed=0)``: ``GPT2LMHeadModel``, n_embd 64, 2 layers, 4 heads, vocab 128. Its
  attention/MLP layers are transformers ``Conv1D`` (c_attn, c_proj, c_fc; weight stored (in, out)).
- ``tiny_bert_classifier(seed=0, num_labels=2)``: ``BertForSequenceClassification``, hidden 64,
  2 layers, 4 heads, intermediate 128, vocab 128. Linear layers: query/key/value, dense (x3 per
  layer), pooler.dense, classifier.
- ``tiny_moe(kind="mixtral", seed=0)``: a 2-layer MoE causal LM (hidden 64, 4 experts, top-2, vocab 128) whose
  experts are transformers v5 fused 3-D parameters ``experts.gate_up_proj`` / ``experts.down_proj``: ``"mixtral"``
  and ``"qwen3_moe"`` store them (E, out, in), ``"gpt_oss"`` (E, in, out) with biases (``is_transposed``).
- ``tiny_llama_tied(seed=0)``: ``tiny_llama`` with ``tie_word_embeddings=True`` (lm_head shares the embedding).
- ``token_batch(seed=0, batch=2, seq=8, vocab=128)``: a (batch, seq) LongTensor of token ids.
- ``randomize_adapter(model, seed=1)``: give every adapter tensor of an injected model (B included,
  which starts at zero) seeded random values, so comparisons are not trivially equal.
- ``peft_param_name(key, modules_to_save=())``: the name PEFT's ``get_peft_model`` gives the parameter
  that ``adapter_state_dict`` keys ``key`` (PEFT is a test-only oracle).
- ``copy_adapter_into_peft(model, peft_model)``: copy our adapter tensors into a PEFT model.
- ``assert_same_adapter_files(a, b)``: two adapter directories hold the same tensor names and values.
- ``model_snapshot(model)`` / ``assert_unchanged(model, snapshot)``: check that a failed call left a
  model exactly as it was (tensors, module types, requires_grad).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128
HIDDEN = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64, intermediate 128, 4 heads, 2 KV heads, vocab 128), weights from ``seed``."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


def tiny_llama_tied(seed: int = 0) -> LlamaForCausalLM:
    """``tiny_llama`` with its lm_head tied to the input embedding."""
    model = tiny_llama(seed)
    config = model.config
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def tiny_moe(kind: str = "mixtral", seed: int = 0) -> nn.Module:
    """A 2-layer MoE LM with fused 3-D expert parameters (4 experts, top-2, hidden 64, expert width 96)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shared = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    extra = {
        "mixtral": dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, head_dim=16),
        "gpt_oss": dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    }[kind]
    config = AutoConfig.for_model(kind, **shared, **extra, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).train()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (n_embd 64, 4 heads, vocab 128) with Conv1D projections, dropout off, weights from ``seed``."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).train()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    """A 2-layer BERT sequence classifier (hidden 64, 4 heads, intermediate 128), dropout off, weights from ``seed``."""
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).train()


def token_batch(seed: int = 0, batch: int = 2, seq: int = 8, vocab: int = VOCAB) -> torch.Tensor:
    """Token ids (batch, seq) drawn from a private generator, so the global RNG is untouched."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


@torch.no_grad()
def randomize_adapter(model: nn.Module, seed: int = 1, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Set every adapter tensor of ``model`` to random values from ``seed`` (B: ``scale * N(0, 1)``, others: perturbed).

    Returns ``adapter_state_dict(model)`` afterwards.
    """
    from lightning_lora import adapter_state_dict

    generator = torch.Generator().manual_seed(seed)
    tensors = adapter_state_dict(model)
    for key, tensor in tensors.items():
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(device=tensor.device, dtype=tensor.dtype) * scale
        if key.endswith(".lora_b.weight"):
            tensor.copy_(noise)
        else:
            tensor.add_(noise)
    return tensors


def peft_param_name(key: str, modules_to_save: Iterable[str] = ()) -> str:
    """PEFT's parameter name (adapter "default") for our ``adapter_state_dict`` key ``key``."""
    for root in modules_to_save:
        if key.startswith(root + "."):
            return f"base_model.model.{root}.modules_to_save.default.{key[len(root) + 1 :]}"
    key = key.replace(".lora_a.weight", ".lora_A.default.weight").replace(".lora_b.weight", ".lora_B.default.weight")
    key = key.replace(".trainable_tokens_delta", ".token_adapter.trainable_tokens_delta.default")
    if key.endswith(".lora_magnitude"):  # DoRA
        key += "_vector.default.weight"
    return "base_model.model." + key


@torch.no_grad()
def copy_adapter_into_peft(model: nn.Module, peft_model: nn.Module) -> None:
    """Copy every adapter tensor of our injected ``model`` into the same-named parameter of ``peft_model``."""
    from lightning_lora import adapter_state_dict
    from lightning_lora.inject import lora_state

    to_save = lora_state(model).modules_to_save
    peft_params = dict(peft_model.named_parameters())
    for key, tensor in adapter_state_dict(model).items():
        peft_params[peft_param_name(key, to_save)].copy_(tensor)


def assert_same_adapter_files(a, b) -> None:
    """The ``adapter_model.safetensors`` of directories ``a`` and ``b`` hold the same keys and bit-equal tensors."""
    from safetensors import safe_open

    with safe_open(f"{a}/adapter_model.safetensors", framework="pt") as left, safe_open(f"{b}/adapter_model.safetensors", framework="pt") as right:
        assert set(left.keys()) == set(right.keys())
        for key in left.keys():
            assert torch.equal(left.get_tensor(key), right.get_tensor(key)), key


def model_snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, bool]]:
    """Everything a failed call must leave unchanged: state tensors (cloned), module types, requires_grad."""
    tensors = {key: value.detach().clone() for key, value in model.state_dict().items()}
    types = {name: type(module).__name__ for name, module in model.named_modules()}
    grads = {name: param.requires_grad for name, param in model.named_parameters()}
    return tensors, types, grads


def assert_unchanged(model: nn.Module, snapshot: tuple[dict[str, torch.Tensor], dict[str, str], dict[str, bool]]) -> None:
    """Assert ``model`` still matches ``model_snapshot`` output, tensor for tensor (bit-identical)."""
    tensors, types, grads = snapshot
    now_tensors, now_types, now_grads = model_snapshot(model)
    assert now_types == types
    assert now_grads == grads
    assert now_tensors.keys() == tensors.keys()
    for key, value in tensors.items():
        assert now_tensors[key].dtype == value.dtype and torch.equal(now_tensors[key], value), key
