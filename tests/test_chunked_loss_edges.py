"""The chunked causal-LM loss at its edges: batches with nothing to score, and models whose logits are not head(hidden).

- All labels -100: transformers' loss is NaN (a mean over no tokens; 0 with ``num_items_in_batch``) and its backward
  runs and gives zero gradients. The chunked loss must give the same loss and the same gradients, not a loss that
  has no graph (backward then raised "element 0 of tensors does not require grad"; under DDP the rank would also
  skip the gradient reduction). ``CausalLMModule(chunked_ce=...)`` on such a batch trains a zero step like the
  unchunked path.
- Config fields that transform the logits (soft caps, multipliers, a text config of a multimodal model, Chameleon's
  image tokens, whose logits it masks) are refused by name: each case below was silently accepted and gave another
  loss than the model's own. So are encoder-decoders (their loss is not the causal LM's).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BartConfig,
    BartForConditionalGeneration,
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
)

from _models import VOCAB, tiny_llama
from lightning_lora import enable_chunked_loss
from lightning_lora.data.packing import PackedCollator
from lightning_lora.tasks import CausalLMModule

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": False}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": 5}], ids=["mean", "num_items_in_batch"])
def test_all_labels_ignored_gives_transformers_loss_and_zero_gradients(kwargs) -> None:
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)  # e.g. a micro-batch of prompts only
    model = tiny_llama()
    ref = model(input_ids=ids, labels=labels, **kwargs).loss
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    enable_chunked_loss(model, chunk_size=4)
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    torch.testing.assert_close(loss, ref.detach(), equal_nan=True)  # NaN without num_items_in_batch, as transformers
    assert loss.requires_grad
    loss.backward()
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys() and len(grads) == 21
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)
        assert not grad.any(), name


def test_causal_lm_module_chunked_step_on_a_batch_with_nothing_to_score() -> None:
    # A packed row whose examples are all prompt (or one token long): no target anywhere.
    batch = PackedCollator(8, 0)([[{"input_ids": [4, 5, 6], "labels": [-100, -100, -100]}, {"input_ids": [7], "labels": [7]}]])
    losses = {}
    for chunk in (0, 4):
        module = CausalLMModule(dict(LLAMA), attn_implementation="sdpa", chunked_ce=chunk)
        module.configure_model()
        nll, tokens = module.token_losses(batch)
        loss = nll / tokens.clamp_min(1)  # what training_step returns
        assert int(tokens) == 0 and loss.requires_grad, chunk
        loss.backward()
        losses[chunk] = loss.detach()
        assert all(not p.grad.any() for p in module.parameters() if p.grad is not None)
        assert module.model.lm_head.weight.grad is not None  # the head is in the graph: a DDP rank reduces it too
    torch.testing.assert_close(losses[4], losses[0])
    assert float(losses[4]) == 0.0


def _small(model_type: str, **fields) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))


def _gemma4_vlm() -> torch.nn.Module:
    # The soft cap lives in the text config of a multimodal model; the model applies it (get_text_config()).
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=VOCAB, head_dim=16, final_logit_softcapping=2.0, hidden_size_per_layer_input=16,
                vocab_size_per_layer_input=VOCAB, layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16)
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision, audio_config=None)).train()


def _chameleon(image_tokens: int = 10) -> torch.nn.Module:
    # ChameleonForConditionalGeneration sets the logits of its image tokens (vocabulary_map's "IMGIMG..." names) to
    # the dtype's minimum after the head: the softmax of its loss runs over the text tokens only.
    vocabulary_map = {"<image>": 3, **{f"IMGIMG{chr(ord('A') + i)}Z": 100 + i for i in range(image_tokens)}}
    vq = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1], num_res_blocks=1, attn_resolutions=[],
              latent_channels=8, resolution=16, double_latent=False, dropout=0.0)
    config = ChameleonConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, vocabulary_map=vocabulary_map, image_token_id=3,
                             vq_config=vq)
    torch.manual_seed(0)
    return ChameleonForConditionalGeneration(config).train()


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, head_dim=16)
TRANSFORMED = {
    # tanh(logits / 1) * 1 is not the identity: a soft cap of 1.0 was taken for "no transform".
    "gemma2-softcap-1.0": (
        lambda: _small("gemma2", **SMALL, final_logit_softcapping=1.0), r"config sets final_logit_softcapping=1\.0"
    ),
    "recurrent-gemma-softcap": (
        lambda: _small("recurrent_gemma", **{**SMALL, "num_key_value_heads": 1}, lru_width=64, attention_window_size=16,
                       block_types=["recurrent", "attention"]),
        r"logits_soft_cap=30\.0",
    ),
    "falcon-h1-multiplier": (
        lambda: _small("falcon_h1", **SMALL, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                       mamba_chunk_size=16, lm_head_multiplier=0.5),
        r"lm_head_multiplier=0\.5",
    ),
    "gemma4-text-config-softcap": (_gemma4_vlm, r"text config sets final_logit_softcapping=2\.0"),
    "chameleon-image-token-mask": (_chameleon, r"config sets vocabulary_map with 10 image tokens \(ids 100 to 109, their logits masked\)"),
}


@pytest.mark.parametrize("case", list(TRANSFORMED))
def test_models_whose_logits_are_transformed_are_refused(case: str) -> None:
    build, message = TRANSFORMED[case]
    model = build()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    own = model(input_ids=ids, labels=ids).loss
    # What the chunked loss would compute: the head on the backbone's last hidden state, no transform.
    hidden = model.base_model(input_ids=ids)[0]
    logits = model.get_output_embeddings()(hidden[:, :-1]).flatten(0, 1).float()
    plain = torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten())
    assert (own - plain).abs() > 1e-5  # the transform is real: skipping it changes the loss
    with pytest.raises(ValueError, match=r"`chunked_ce` needs logits = lm_head\(hidden\).*" + message + r".*use chunked_ce=0"):
        enable_chunked_loss(model, 8)
    assert "forward" not in model.__dict__  # refused before anything was patched


def test_a_scale_of_one_is_still_accepted() -> None:
    model = _small("granite", **SMALL, logits_scaling=1.0)  # logits / 1.0: the identity
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    own = model(input_ids=ids, labels=ids).loss
    enable_chunked_loss(model, 5)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, own, rtol=1e-5, atol=0)


def test_a_chameleon_without_image_tokens_is_accepted_and_gives_its_own_loss() -> None:
    model = _chameleon(image_tokens=0)  # nothing to mask: its logits are head(hidden)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    own = model(input_ids=ids, labels=ids).loss
    enable_chunked_loss(model, 5)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, own, rtol=1e-5, atol=0)


def test_an_encoder_decoder_is_refused() -> None:
    # BART's loss scores the decoder's labels unshifted, on logits + final_logits_bias: not the causal LM's loss.
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0)
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).train()
    with pytest.raises(ValueError, match=r"`chunked_ce` is the loss of a causal LM.*is_encoder_decoder=True.*use chunked_ce=0"):
        enable_chunked_loss(model, 8)
    assert "forward" not in model.__dict__
