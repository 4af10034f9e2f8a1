"""Padding-free packing: exact rows and batches, per-token losses equal to the unpacked run, examples that cannot
see each other, chunked_ce, exact mid-epoch resume through Trainer, and clear errors for models that cannot pack."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import LoRACallback, adapter_state_dict
from lightning_lora.data import InstructionDataModule, TextDataModule
from lightning_lora.data.packing import PackedCollator, PackedDataset, pack_rows
from lightning_lora.tasks import CausalLMModule
from lightning_lora.tasks.packed_attention import PACKED_ATTENTION, packed_attention, restore_attention
from test_data import BOS, EOS, PAD, WORDS, ids, word_tokenizer, write_jsonl

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": False}
# GPT-2 adds learned absolute position embeddings: its per-token losses also check that positions restart.
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 64,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _instructions(tmp_path: Path, n: int = 40, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = WORDS[:20]
    rows = [
        {"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))),
         "response": " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))}
        for _ in range(n)
    ]
    return write_jsonl(tmp_path / "instructions.jsonl", rows)


def _module(config: dict, **kwargs) -> CausalLMModule:
    module = CausalLMModule(dict(config), attn_implementation="sdpa", **kwargs)
    module.configure_model()
    return module


def _packed_batch() -> dict:
    return PackedCollator(row_length=8, pad_id=0)([[{"input_ids": [4, 5, 6], "labels": [4, 5, 6]}, {"input_ids": [7, 8], "labels": [7, 8]}]])


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of predicting labels[t + 1] from position t; 0 where not scored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none").view(labels.shape[0], -1)


def _packed_vs_alone(module: CausalLMModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every scored token's NLL from the packed forward, and the same tokens' NLL with each example run alone."""
    packed_inputs = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens", "max_length")}
    packed_nll = _token_nll(module(**packed_inputs), batch["labels"])
    got, want = [], []
    for row in range(batch["input_ids"].shape[0]):
        for document in range(int(batch["document_ids"][row].max()) + 1):
            span = (batch["document_ids"][row] == document).nonzero().flatten()
            start, end = int(span[0]), int(span[-1]) + 1
            ids_, labels = batch["input_ids"][row : row + 1, start:end], batch["labels"][row : row + 1, start:end]
            alone = _token_nll(module(ids_, torch.ones_like(ids_)), labels)  # the unpacked run of this example
            scored = labels[0, 1:] != -100
            got.append(packed_nll[row, start : end - 1][scored])
            want.append(alone[0][scored])
    return torch.cat(got), torch.cat(want)


# --- rows and batches ---------------------------------------------------------------------------------


def test_best_fit_decreasing_rows_are_exact_and_deterministic() -> None:
    assert pack_rows([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    # 6 opens row 0, 5 row 1, 4 row 2; 3 fits best in row 1 (room 3), 2 in row 0 (room 2), 2 in row 2, 1 in row 2.
    assert pack_rows([2, 6, 3, 5, 4, 2, 1], 8) == [[1, 0], [3, 2], [4, 5, 6]]
    rng = random.Random(1)
    lengths = [rng.randint(1, 30) for _ in range(300)]
    rows = pack_rows(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert max(sum(lengths[i] for i in row) for row in rows) <= 32
    assert pack_rows(lengths, 32) == rows
    assert len(rows) <= -(-sum(lengths) // 32) * 1.05  # within 5% of the perfect packing


def test_collator_lays_out_one_exact_batch() -> None:
    rows = [[{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
            [{"input_ids": [10, 11], "labels": [10, 11]}]]
    batch = PackedCollator(row_length=7, pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0], [10, 11, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100], [-100, 11, -100, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 0, 1]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1], [0, 0, -1, -1, -1, -1, -1]]
    # Padding is cut into segments no longer than the longest example (3), so max_length bounds every segment.
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 7, 9, 12, 14] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 3 and "attention_mask" not in batch


def test_instruction_packing_keeps_every_example_and_its_prompt_mask(tmp_path: Path) -> None:
    path = _instructions(tmp_path)
    tok = word_tokenizer(bos=True)
    plain = InstructionDataModule(path, tok, max_length=24, batch_size=4, val_fraction=0.1)
    packed = InstructionDataModule(path, tok, max_length=24, batch_size=4, val_fraction=0.1, packing=True)
    plain.setup("fit"), packed.setup("fit")
    for split in ("train_dataset", "val_dataset"):
        want = sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in getattr(plain, split))
        rows = getattr(packed, split)
        assert sorted((tuple(e["input_ids"]), tuple(e["labels"])) for row in rows for e in row) == want
    assert len(packed.train_dataset) < len(plain.train_dataset) / 2  # the point: far fewer rows
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape == (4, 24)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == -100).all() and (batch["input_ids"][batch["document_ids"] >= 0] != PAD).all()
    assert (batch["input_ids"][starts & (batch["document_ids"] >= 0)] == BOS).all()  # every example starts itself


def test_text_packing_keeps_documents_whole_and_cuts_long_ones(tmp_path: Path) -> None:
    docs = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10 w11 w12 w13 w14 w15", "w16"]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    dm = TextDataModule(path, word_tokenizer(), block_size=8, batch_size=8, val_fraction=0.0, packing=True)
    dm.setup("fit")
    pieces = sorted(tuple(e["input_ids"]) for row in dm.train_dataset for e in row)
    long = ids(docs[2]) + [EOS]  # 11 tokens: a block of 8, then the 3 left
    assert pieces == sorted([tuple(ids(docs[0]) + [EOS]), tuple(ids(docs[1]) + [EOS]), tuple(long[:8]), tuple(long[8:]),
                             tuple(ids(docs[3]) + [EOS])])
    batch = next(iter(dm.train_dataloader()))
    assert int((batch["document_ids"] >= 0).sum()) == 4 + 3 + 11 + 2
    with pytest.raises(ValueError, match=r"packing=True needs separate documents.*\.txt"):
        (tmp_path / "stream.txt").write_text("w1 w2\n")
        TextDataModule(str(tmp_path / "stream.txt"), word_tokenizer(), packing=True)
    with pytest.raises(TypeError, match="packing must be True or False, got 'yes'"):
        TextDataModule(path, word_tokenizer(), packing="yes")


def test_pack_rows_refuses_examples_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"example 1 has 9 tokens; every example must have 1 to row_length=8"):
        pack_rows([3, 9], 8)
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        PackedDataset([{"input_ids": [], "labels": []}], 8)


# --- numerics: the unpacked run, token by token ---------------------------------------------------------


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_per_token_loss_equals_the_unpacked_run(tmp_path: Path, config: dict) -> None:
    dm = InstructionDataModule(_instructions(tmp_path), word_tokenizer(bos=True), max_length=24, batch_size=3, packing=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = _module(config)
    got, want = _packed_vs_alone(module, batch)
    assert got.numel() == int((batch["labels"] != -100).sum()) > 20
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    # The batch loss is the mean of exactly those tokens.
    nll, tokens = module.token_losses(batch)
    assert int(tokens) == got.numel()
    torch.testing.assert_close(nll, want.sum(), rtol=1e-4, atol=1e-4)
    assert module.model.config._attn_implementation == PACKED_ATTENTION  # left on through backward ...
    module(batch["input_ids"][:, :4], torch.ones_like(batch["input_ids"][:, :4]))
    assert module.model.config._attn_implementation == "sdpa"  # ... until an unpacked batch


def test_an_example_cannot_see_another_and_the_check_would_catch_a_missing_mask(tmp_path: Path) -> None:
    rows = [[{"input_ids": [4, 5, 6, 7, 8], "labels": [4, 5, 6, 7, 8]}, {"input_ids": [9, 10, 11, 12], "labels": [9, 10, 11, 12]}]]
    collate = PackedCollator(row_length=12, pad_id=0)
    batch = collate(rows)
    perturbed = collate([[{"input_ids": [20, 21, 22, 23, 24], "labels": [20, 21, 22, 23, 24]}, rows[0][1]]])
    module = _module(LLAMA)
    inputs = ("input_ids", "position_ids", "cu_seq_lens", "max_length")
    second = slice(5, 9)
    logits = module(**{k: batch[k] for k in inputs})
    other = module(**{k: perturbed[k] for k in inputs})
    torch.testing.assert_close(logits[0, second], other[0, second], rtol=0, atol=1e-6)  # example 2 did not move
    assert not torch.allclose(logits[0, :5], other[0, :5], atol=1e-3)  # example 1 did
    # Without document masks (one causal sequence over the row) the same perturbation does reach example 2.
    unmasked = module(batch["input_ids"], torch.ones_like(batch["input_ids"]))
    unmasked_other = module(perturbed["input_ids"], torch.ones_like(perturbed["input_ids"]))
    assert (unmasked[0, second] - unmasked_other[0, second]).abs().max() > 1e-2
    # And a packed batch that smuggles an attention mask in is refused rather than run across examples.
    with pytest.raises(ValueError, match="must not carry an attention_mask"):
        module.token_losses({**batch, "attention_mask": torch.ones_like(batch["input_ids"])})


def test_the_loss_never_scores_an_example_start_even_when_the_labels_do() -> None:
    batch = _packed_batch()  # row [4 5 6 | 7 8 | pad pad pad]
    module = _module(LLAMA)
    nll, tokens = module.token_losses(batch)
    assert int(tokens) == 3  # 5 and 6 from 4 / 4 5; 8 from 7; never 7 from 6
    # Labels written by hand with the example starts left as targets score the same three tokens.
    raw = torch.where(batch["document_ids"] >= 0, batch["input_ids"], -100)
    assert int((raw[:, 1:] != -100).sum()) == 4
    raw_nll, raw_tokens = module.token_losses({**batch, "labels": raw})
    assert int(raw_tokens) == 3
    torch.testing.assert_close(raw_nll, nll)


def test_chunked_ce_with_packing_gives_the_same_loss_and_gradients(tmp_path: Path) -> None:
    dm = InstructionDataModule(_instructions(tmp_path), word_tokenizer(bos=True), max_length=24, batch_size=3, packing=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    results = []
    for chunk in (0, 7):
        module = _module(LLAMA, chunked_ce=chunk)
        nll, tokens = module.token_losses(batch)
        (nll / tokens).backward()
        results.append((nll.detach(), tokens, module.model.model.layers[0].self_attn.q_proj.weight.grad))
    (nll0, tokens0, grad0), (nll1, tokens1, grad1) = results
    assert int(tokens0) == int(tokens1) == int((batch["labels"] != -100).sum())
    torch.testing.assert_close(nll1, nll0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad1, grad0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_packed_gradients_equal_the_unpacked_ones(tmp_path: Path, checkpointing: bool) -> None:
    # Gradient checkpointing recomputes each layer in backward: the recompute must attend per document too.
    dm = InstructionDataModule(_instructions(tmp_path), word_tokenizer(bos=True), max_length=24, batch_size=2, packing=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    grads = []
    for packed in (True, False):
        module = _module(LLAMA, gradient_checkpointing=checkpointing)
        if packed:
            module.token_losses(batch)[0].backward()
        else:
            for row in range(batch["input_ids"].shape[0]):
                for document in range(int(batch["document_ids"][row].max()) + 1):
                    where = batch["document_ids"][row] == document
                    ids_, labels = batch["input_ids"][row][where][None], batch["labels"][row][where][None]
                    module.token_losses({"input_ids": ids_, "attention_mask": torch.ones_like(ids_), "labels": labels})[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_packed_rows_through_transformers_own_detection_agree(tmp_path: Path) -> None:
    # A plain transformers call with restarting position_ids and no attention_mask also keeps examples apart
    # (with a dense mask for sdpa); our document-masked path gives the same logits.
    dm = InstructionDataModule(_instructions(tmp_path), word_tokenizer(bos=True), max_length=24, batch_size=2, packing=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = _module(LLAMA)
    ours = module(**{k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens", "max_length")})
    restore_attention(module.model)
    theirs = module.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    real = batch["document_ids"] >= 0
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-5)


# --- resume ---------------------------------------------------------------------------------------------


def _fit_packed(tmp_path: Path, path: str, max_steps: int, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = CausalLMModule(dict(LLAMA), attn_implementation="sdpa", lr=1e-2)
    data = InstructionDataModule(path, word_tokenizer(bos=True), max_length=24, batch_size=2, val_fraction=0.0, packing=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, deterministic=True, callbacks=[LoRACallback(r=4, dropout=0.1, backbone="model", target_modules="all-linear"), checkpoint],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    assert module.model.config._attn_implementation == "sdpa"  # the model's own attention again after fit
    return {k: v.detach().clone() for k, v in adapter_state_dict(module.model).items()}


def test_mid_epoch_resume_with_packing_gives_the_bit_identical_adapter(tmp_path: Path) -> None:
    path = _instructions(tmp_path, n=60)
    probe = InstructionDataModule(path, word_tokenizer(bos=True), max_length=24, batch_size=2, val_fraction=0.0, packing=True)
    probe.setup("fit")
    batches = len(probe.train_dataloader())
    assert batches > 6  # step 3 is mid-epoch and step 6 too
    full = _fit_packed(tmp_path / "full", path, 6)
    _fit_packed(tmp_path / "cut", path, 3)
    resumed = _fit_packed(tmp_path / "resumed", path, 6, ckpt_path=tmp_path / "cut" / "ckpt" / "step=3.ckpt")
    assert full.keys() == resumed.keys() and len(full) == 28  # A and B of 7 projections in 2 layers
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_the_cli_trains_the_tiny_config_with_packing_on(tmp_path: Path) -> None:
    from lightning_lora import cli
    from test_cli import tiny_config

    def edit(config: dict) -> None:
        config["data"]["init_args"]["packing"] = True
        config["trainer"]["max_epochs"] = 2  # 24 rows pack into 2 batches an epoch: 3 steps cross an epoch

    cli.main(["fit", "--config", str(tiny_config(tmp_path, edit))])
    (checkpoint,) = (tmp_path / "run").glob("**/checkpoints/*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and len(state["state_dict"]) == 28
    assert yaml.safe_load(next((tmp_path / "run").glob("**/config.yaml")).read_text())["data"]["init_args"]["packing"] is True


# --- models and backends that cannot pack ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "attn", "message"),
    [
        ({"model_type": "bloom", "hidden_size": 64, "n_layer": 1, "n_head": 4, "vocab_size": 64}, None,
         "BloomForCausalLM does not"),
        ({**LLAMA, "model_type": "mistral", "sliding_window": 4}, "sdpa", r"sliding_window=4 is shorter than the packed rows \(8"),
        ({**LLAMA, "model_type": "gemma2", "head_dim": 16, "attn_logit_softcapping": 50.0, "sliding_window": 64}, "eager",
         "uses softcap"),
        (LLAMA, "flex_attention", "flex_attention' cannot train packed batches on CPU"),
    ],
    ids=["no-attention-backend", "sliding-window", "softcap", "flex-on-cpu"],
)
def test_models_that_cannot_pack_are_refused(config: dict, attn: str | None, message: str) -> None:
    module = CausalLMModule(dict(config), attn_implementation=attn)
    module.configure_model()
    before = module.model.config._attn_implementation
    with pytest.raises(ValueError, match=message):
        module.token_losses(_packed_batch())
    assert module.model.config._attn_implementation == before


def test_an_unpacked_call_while_packed_attention_is_on_is_an_error() -> None:
    module = _module(LLAMA)
    with packed_attention(module.model):
        assert module.model.config._attn_implementation == PACKED_ATTENTION
        with pytest.raises(ValueError, match="got no cu_seq_lens_q.*restore_attention"):
            module.model(input_ids=torch.tensor([[4, 5, 6]]))
    assert module.model.config._attn_implementation == "sdpa"


# --- GPU: torch's varlen FlashAttention kernel, compiled blocks, FlexAttention ---------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/test_packing.py)")


def _cuda_batch(tmp_path: Path) -> dict:
    dm = InstructionDataModule(_instructions(tmp_path), word_tokenizer(bos=True), max_length=24, batch_size=3, packing=True)
    dm.setup("fit")
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in next(iter(dm.train_dataloader())).items()}


def _count_varlen_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from lightning_lora.tasks import packed_attention as module

    calls, kernel = [], module._varlen_attn
    assert kernel is not None, "torch has no torch.nn.attention.varlen (needs torch >= 2.10)"

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, "_varlen_attn", counted)
    return calls


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_gpu_per_token_loss_equals_the_unpacked_run_in_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attn: str) -> None:
    calls = _count_varlen_calls(monkeypatch)
    module = CausalLMModule(dict(LLAMA), attn_implementation=attn)
    module.configure_model()
    module.cuda()
    batch = _cuda_batch(tmp_path)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = _packed_vs_alone(module, batch)
    assert len(calls) == (2 if attn == "sdpa" else 0)  # sdpa models go through varlen, once per layer; flex keeps flex
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-blocks"])
def test_gpu_packed_gradients_equal_the_unpacked_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    batch = _cuda_batch(tmp_path)
    grads = {}
    for route in ("packed", "alone"):
        module = _module(LLAMA).cuda()
        if compiled and route == "packed":
            for layer in module.model.model.layers:
                layer.compile()
        calls = _count_varlen_calls(monkeypatch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if route == "packed":
                for _ in range(2 if compiled else 1):  # the first compiled step compiles; check the second
                    module.zero_grad(set_to_none=True)
                    nll, _ = module.token_losses(batch)
                    nll.backward()
                assert len(calls) > 0
            else:
                for row in range(batch["input_ids"].shape[0]):
                    for document in range(int(batch["document_ids"][row].max()) + 1):
                        span = (batch["document_ids"][row] == document).nonzero().flatten()
                        start, end = int(span[0]), int(span[-1]) + 1
                        ids_ = batch["input_ids"][row : row + 1, start:end]
                        nll, _ = module.token_losses({"input_ids": ids_, "attention_mask": torch.ones_like(ids_),
                                                      "labels": batch["labels"][row : row + 1, start:end]})
                        nll.backward()
        grads[route] = torch.cat([p.grad.flatten().float() for p in module.parameters() if p.grad is not None])
    assert grads["packed"].numel() == grads["alone"].numel() > 0
    error = (grads["packed"] - grads["alone"]).norm() / grads["alone"].norm()
    assert error < 2e-2, f"relative gradient error {error:.3e}"
