"""Padding-free packing at its edges: layouts at the edges, models whose positions are not 0, 1, ... per example, and
collator input that would shift labels silently.

- Per-token losses equal the unpacked run on rows with an example exactly the row length, one-token examples, a
  row with a single example, prompt masks, in float32 and under CPU bf16 autocast.
- RoBERTa-family causal LMs count positions from padding_idx + 1: packed, they got other position embeddings than
  unpacked (losses off by ~0.2 per token); now refused by name.
- ``PackedCollator`` given an example whose labels are not as long as its input_ids (or an empty example) laid out
  labels shifted onto the next example's tokens, or failed with a reshape error; now a ValueError naming the example.
"""

from __future__ import annotations

import pytest
import torch

from lightning_lora.data.packing import PackedCollator
from lightning_lora.tasks import CausalLMModule
from test_packing import GPT2, LLAMA, _module, _packed_vs_alone


def _example(n: int, prompt: int = 0, start: int = 4) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


LAYOUTS = {
    "example-fills-the-row": [[_example(8, 1)], [_example(3), _example(5, 2, 20)]],
    "one-token-examples": [[_example(1), _example(1, 0, 30), _example(6, 0, 40)], [_example(1, 0, 9)]],
    "single-example-row": [[_example(5, 2)]],
    "prompt-masks": [[_example(4, 3), _example(4, 1, 30)], [_example(7, 2, 40)]],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_edge_layouts_give_the_unpacked_per_token_loss(layout: str, config: dict) -> None:
    batch = PackedCollator(row_length=8, pad_id=0)(LAYOUTS[layout])
    module = _module(config)
    got, want = _packed_vs_alone(module, batch)
    scored = int((batch["labels"] != -100).sum())
    assert got.numel() == scored > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    nll, tokens = module.token_losses(batch)
    assert int(tokens) == scored
    torch.testing.assert_close(nll, want.sum(), rtol=1e-4, atol=1e-4)


def test_bf16_autocast_on_cpu_gives_the_unpacked_per_token_loss() -> None:
    batch = PackedCollator(row_length=8, pad_id=0)(LAYOUTS["prompt-masks"])
    module = _module(LLAMA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _packed_vs_alone(module, batch)
    assert got.numel() == int((batch["labels"] != -100).sum())
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


ROBERTA = {"model_type": "roberta", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 64, "is_decoder": True,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def test_models_that_count_positions_from_the_padding_index_are_refused() -> None:
    module = CausalLMModule(dict(ROBERTA), attn_implementation="sdpa")
    module.configure_model()
    batch = PackedCollator(row_length=8, pad_id=1)(LAYOUTS["prompt-masks"])
    message = r"RobertaForCausalLM's RobertaEmbeddings counts positions from padding_idx \+ 1.*packing=False"
    with pytest.raises(ValueError, match=message):
        module.token_losses(batch)
    assert module.model.config._attn_implementation == "sdpa"  # left as it was
    # Why: with position ids 0, 1, ... (what a packed row gives) the model is another function than unpacked.
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        own = module.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        restarted = module.model(input_ids=ids, position_ids=torch.arange(4)[None]).logits
    assert (own - restarted).abs().max() > 1e-2


@pytest.mark.parametrize(
    "rows",
    [
        # 3 + 2 tokens, 2 + 3 labels: the total matches, so nothing failed and every label of the row moved.
        [[{"input_ids": [4, 5, 6], "labels": [4, 5]}, {"input_ids": [7, 8], "labels": [9, 7, 8]}]],
        [[{"input_ids": [4, 5], "labels": [4, 5]}, {"input_ids": [], "labels": []}]],
    ],
    ids=["labels-of-another-length", "empty-example"],
)
def test_the_collator_refuses_examples_whose_labels_do_not_line_up(rows: list) -> None:
    with pytest.raises(ValueError, match=r"example \d of a row has \d input_ids and \d labels; every example needs"):
        PackedCollator(row_length=8, pad_id=0)(rows)


def test_a_model_that_drops_the_varlen_kwargs_is_refused_with_the_reason() -> None:
    # Nemotron's decoder layer does not hand **kwargs to its attention: cu_seq_lens never arrive there.
    config = {"model_type": "nemotron", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}
    module = CausalLMModule(config, attn_implementation="sdpa")
    module.configure_model()
    message = r"NemotronAttention does not hand the model's keyword arguments to its attention, so it cannot pack"
    with pytest.raises(ValueError, match=message):
        module.token_losses(PackedCollator(row_length=8, pad_id=0)(LAYOUTS["prompt-masks"]))
    assert module.model.config._attn_implementation == "sdpa"


# --- GPU: the varlen kernel on the same edge layouts -----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/test_packing_edges.py)")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_edge_layouts_in_bf16_give_the_unpacked_per_token_loss(layout: str) -> None:
    from lightning_lora.tasks import packed_attention

    calls, kernel = [], packed_attention._varlen_attn
    assert kernel is not None

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    packed_attention._varlen_attn = counted
    try:
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in PackedCollator(8, 0)(LAYOUTS[layout]).items()}
        module = _module(LLAMA).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = _packed_vs_alone(module, batch)
    finally:
        packed_attention._varlen_attn = kernel
    assert len(calls) == 2  # one varlen call per layer
    assert got.numel() == int((batch["labels"] != -100).sum())
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
