"""Tests for lightning_lora.tasks: the loss and its -100 mask, chunked CE, perplexity, classification metrics,
the optimizer and schedule, argument errors, and pkg:// paths."""

from __future__ import annotations

import math
import os
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

from lightning_lora.tasks import CausalLMModule, SequenceClassificationModule, resolve_path
from lightning_lora.tasks._paths import resolve_paths

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def causal_lm(**kwargs) -> CausalLMModule:
    module = CausalLMModule(dict(TINY_LLAMA), attn_implementation="eager", **kwargs)
    module.configure_model()
    return module


def lm_batch(seed: int = 0, batch: int = 3, seq: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 128, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, :7] = -100
    labels[2, -3:] = -100  # padding at the end
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- causal LM loss ------------------------------------------------------------------------------


def test_loss_scores_exactly_the_unmasked_next_tokens() -> None:
    module = causal_lm()
    batch = lm_batch()
    nll, tokens = module.token_losses(batch)
    logits = module(batch["input_ids"], batch["attention_mask"]).detach()
    log_probs = logits.float().log_softmax(-1)
    expected, count = 0.0, 0
    for b in range(3):
        for t in range(1, 11):  # position t - 1 predicts token t
            if batch["labels"][b, t] != -100:
                expected -= log_probs[b, t - 1, batch["labels"][b, t]].item()
                count += 1
    assert tokens.item() == count == 10 - 3 + 10 - 6 + 10 - 3
    torch.testing.assert_close(nll.item(), expected, rtol=1e-6, atol=1e-5)
    # transformers' own loss (mean over the same tokens) agrees
    hf_loss = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close((nll / tokens).detach(), hf_loss.detach())


def test_a_fully_masked_batch_scores_nothing_and_rows_add_up() -> None:
    module = causal_lm()
    batch = lm_batch()
    nll, tokens = module.token_losses(batch)
    nll_none, tokens_none = module.token_losses(dict(batch, labels=torch.full_like(batch["labels"], -100)))
    assert tokens_none.item() == 0 and nll_none.item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        assert module.training_step(dict(batch, labels=torch.full_like(batch["labels"], -100)), 0).item() == 0.0  # not NaN
    rows = [module.token_losses({k: v[i : i + 1] for k, v in batch.items()}) for i in range(3)]
    assert sum(t.item() for _, t in rows) == tokens.item()
    torch.testing.assert_close(sum(n for n, _ in rows).detach(), nll.detach(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_chunked_ce_gives_the_same_loss_and_gradients(chunk: int) -> None:
    plain, chunked = causal_lm(), causal_lm(chunked_ce=chunk)
    for p, q in zip(plain.parameters(), chunked.parameters()):
        assert torch.equal(p, q)  # init_seed makes both the same model
    batch = lm_batch(seed=1)
    nll_p, tokens_p = plain.token_losses(batch)
    nll_c, tokens_c = chunked.token_losses(batch)
    assert tokens_p.item() == tokens_c.item()
    loss_p, loss_c = nll_p / tokens_p, nll_c / tokens_c
    assert abs(loss_p.item() - loss_c.item()) < 1e-6
    loss_p.backward()
    loss_c.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_ce_refuses_models_whose_logits_are_not_the_head_output() -> None:
    module = causal_lm(chunked_ce=4)
    module.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        module.token_losses(lm_batch())


def test_val_perplexity_is_the_corpus_perplexity() -> None:
    module = causal_lm(chunked_ce=6)
    reference = Perplexity(ignore_index=-100)
    for seed, seq in ((0, 11), (1, 5)):  # batches of different sizes: a mean of batch means would differ
        batch = lm_batch(seed=seed, seq=seq)
        with torch.no_grad():
            nll, tokens = module.token_losses(batch)
            module.val_perplexity.update(nll, tokens)
            logits = CausalLMModule.forward(module, batch["input_ids"], batch["attention_mask"])
        reference.update(logits[:, :-1].double(), batch["labels"][:, 1:])
    torch.testing.assert_close(module.val_perplexity.compute(), reference.compute().to(torch.float64), rtol=1e-6, atol=0)
    nll_sum, tokens = module.val_perplexity.nll_sum.item(), module.val_perplexity.tokens.item()
    assert math.isclose(module.val_perplexity.compute().log().item(), nll_sum / tokens, rel_tol=1e-12)


def test_random_weights_come_from_init_seed_not_the_global_rng() -> None:
    torch.manual_seed(1)
    a = causal_lm()
    torch.manual_seed(2)
    b = causal_lm()
    c = CausalLMModule(dict(TINY_LLAMA), init_seed=1)
    c.configure_model()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)
    model = a.model
    a.configure_model()  # idempotent: Lightning calls it for every stage
    assert a.model is model and a.model.training


def test_causal_lm_trains_and_logs(tmp_path) -> None:
    batches = [lm_batch(seed=s) for s in range(4)]
    module = CausalLMModule(dict(TINY_LLAMA), lr=1e-2, warmup_steps=1, lr_schedule="linear")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches[:2], batch_size=None))
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_perplexity", "train_tokens_per_s"} <= set(metrics)
    assert math.isclose(metrics["val_perplexity"].item(), math.exp(metrics["val_loss"].item()), rel_tol=1e-5)
    assert metrics["train_tokens_per_s"].item() > 0


# --- optimizer and schedule ------------------------------------------------------------------------


def test_optimizer_holds_only_trainable_parameters_and_the_schedule_is_linear() -> None:
    module = causal_lm(lr=1.0, warmup_steps=2, lr_schedule="linear", weight_decay=0.1)
    for name, param in module.named_parameters():
        param.requires_grad_("lm_head" in name or "norm" in name)  # a stand-in for LoRA having frozen the rest
    module.trainer = _FakeTrainer(total=6)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}
    decay = {group["weight_decay"]: len(group["params"]) for group in optimizer.param_groups}
    assert decay == {0.1: 1, 0.0: 5}  # lm_head.weight decays; the 5 norm weights do not
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert module.trainer.reads == 1  # the total is read once, at the first step after warmup


class _FakeTrainer:
    """Counts reads of ``estimated_stepping_batches`` (which builds the train loader in a real Trainer)."""

    def __init__(self, total, max_epochs: int = 1, max_steps: int = -1) -> None:
        self.total, self.max_epochs, self.max_steps, self.reads = total, max_epochs, max_steps, 0

    @property
    def estimated_stepping_batches(self):
        self.reads += 1
        return self.total


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_configure_optimizers_does_not_read_the_step_count(warmup_steps: int) -> None:
    # Reading trainer.estimated_stepping_batches in configure_optimizers builds the train loader before a checkpoint's
    # loader state is restored, and a mid-epoch resume then restarts the epoch (tests/test_resume_cli.py).
    module = causal_lm(lr=1.0, warmup_steps=warmup_steps, lr_schedule="linear")
    module.trainer = _FakeTrainer(total=10)
    config = module.configure_optimizers()
    assert module.trainer.reads == 0
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0 if warmup_steps == 0 else 1 / 3)
    first_decay_step = max(warmup_steps, 1)
    for _ in range(first_decay_step - 1):
        optimizer.step()
        scheduler.step()
    assert module.trainer.reads == 0  # warmup needs no total
    optimizer.step()
    scheduler.step()
    assert module.trainer.reads == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx((10 - first_decay_step) / (10 - warmup_steps))


@pytest.mark.parametrize(
    ("trainer", "where"),
    [
        (_FakeTrainer(total=10, max_epochs=-1, max_steps=-1), "configure"),  # no end at all: refused at once
        (_FakeTrainer(total=-1, max_epochs=1), "step"),  # e.g. an iterable dataset without max_steps
        (_FakeTrainer(total=float("inf"), max_epochs=1), "step"),
    ],
)
def test_linear_schedule_without_an_end_is_a_clear_error(trainer, where: str) -> None:
    module = causal_lm(lr=1.0, lr_schedule="linear")
    module.trainer = trainer
    message = "`lr_schedule`='linear' needs a finite number of steps"
    if where == "configure":
        with pytest.raises(ValueError, match=message):
            module.configure_optimizers()
        return
    config = module.configure_optimizers()
    config["optimizer"].step()
    with pytest.raises(ValueError, match=message):
        config["lr_scheduler"]["scheduler"].step()


def test_no_trainable_parameters_is_a_clear_error() -> None:
    module = causal_lm()
    for param in module.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        module.configure_optimizers()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "`lr` must be a positive number, got -1.0"),
        ({"warmup_steps": 1.5}, "`warmup_steps` must be an integer >= 0, got 1.5"),
        ({"lr_schedule": "cosine"}, "`lr_schedule` must be 'constant' or 'linear', got 'cosine'"),
        ({"torch_dtype": "fp8"}, "`torch_dtype` must be one of"),
        ({"chunked_ce": -4}, "`chunked_ce` must be an integer >= 0"),
        ({"model": {"hidden_size": 64}}, "without a 'model_type' key"),
        ({"model": 3}, "`model` must be a local model directory"),
    ],
)
def test_bad_causal_lm_arguments(kwargs: dict, message: str) -> None:
    kwargs.setdefault("model", dict(TINY_LLAMA))
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace("[", r"\[")):
        CausalLMModule(**kwargs)


def test_missing_model_directory_says_what_to_pass(tmp_path) -> None:
    module = CausalLMModule(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="is not a local directory"):
        module.configure_model()
    with pytest.raises(ValueError, match="got `model`=None"):
        CausalLMModule().configure_model()


# --- classification --------------------------------------------------------------------------------


class FixedPredictions(SequenceClassificationModule):
    """Predicts the class written in each row's first token, so the metrics can be computed by hand."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.one_hot(batch["input_ids"][:, 0], self.hparams.num_labels).float() * 5.0


def classification_batches() -> list[dict[str, torch.Tensor]]:
    preds = [[0, 0, 1], [2, 2, 1]]
    labels = [[0, 1, 1], [2, 0, 1]]
    return [
        {
            "input_ids": torch.tensor(p).unsqueeze(1).repeat(1, 4),
            "attention_mask": torch.ones(3, 4, dtype=torch.long),
            "labels": torch.tensor(y),
        }
        for p, y in zip(preds, labels)
    ]


def test_classification_metrics_on_a_known_batch(tmp_path) -> None:
    module = FixedPredictions(dict(TINY_BERT), num_labels=3)
    module.configure_model()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    loader = DataLoader(classification_batches(), batch_size=None)
    val = trainer.validate(module, loader, verbose=False)[0]
    test = trainer.test(module, loader, verbose=False)[0]
    # accuracy 4/6; per-class F1: class 0 P=1/2 R=1/2 -> 1/2, class 1 P=1 R=2/3 -> 4/5, class 2 P=1/2 R=1 -> 2/3
    macro_f1 = (1 / 2 + 4 / 5 + 2 / 3) / 3
    for metrics, stage in ((val, "val"), (test, "test")):
        assert metrics[f"{stage}_acc"] == pytest.approx(4 / 6)
        assert metrics[f"{stage}_f1"] == pytest.approx(macro_f1)
    expected_loss = torch.cat(
        [F.cross_entropy(module(b), b["labels"], reduction="none") for b in classification_batches()]
    ).mean()
    assert val["val_loss"] == pytest.approx(expected_loss.item(), rel=1e-6)
    predictions = trainer.predict(module, loader)
    assert [p.tolist() for p in predictions] == [[0, 0, 1], [2, 2, 1]]


def test_classifier_is_built_with_labels_and_trains(tmp_path) -> None:
    module = SequenceClassificationModule(dict(TINY_BERT), num_labels=3, labels=["neg", "neu", "pos"], lr=1e-2)
    module.configure_model()
    assert module.model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert module.model.classifier.out_features == 3 and module.model.training
    batch = {
        "input_ids": torch.randint(0, 128, (4, 6)),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 1]),
    }
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader([batch, batch], batch_size=None))
    assert "train_loss" in trainer.callback_metrics


def test_config_overrides_reach_the_transformers_config() -> None:
    module = SequenceClassificationModule(dict(TINY_BERT), num_labels=3, config_overrides={"hidden_dropout_prob": 0.25})
    module.configure_model()
    assert module.model.config.hidden_dropout_prob == 0.25 and module.model.config.num_labels == 3
    lm = causal_lm(config_overrides={"hidden_size": 32, "rms_norm_eps": 1e-3})  # merged over the config dict
    assert lm.model.config.hidden_size == 32 and lm.model.config.rms_norm_eps == 1e-3
    with pytest.raises(TypeError, match="`config_overrides` must be a dict"):
        CausalLMModule(dict(TINY_LLAMA), config_overrides=["hidden_size"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_labels": 1}, "`num_labels` must be an integer >= 2, got 1"),
        ({"num_labels": 3, "labels": ["a", "b"]}, "`labels` has 2 names but `num_labels`=3"),
    ],
)
def test_bad_classification_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SequenceClassificationModule(dict(TINY_BERT), **kwargs)


# --- pkg:// paths ----------------------------------------------------------------------------------


def test_pkg_paths_resolve_inside_installed_packages() -> None:
    path = resolve_path("pkg://lightning_lora/tasks/_paths.py")
    assert os.path.samefile(path, os.path.join(os.path.dirname(__file__), "..", "lightning_lora", "tasks", "_paths.py"))
    assert resolve_path("/plain/path") == "/plain/path"
    nested = resolve_paths({"a": ["pkg://lightning_lora", 3], "b": "x"})
    assert os.path.isdir(nested["a"][0]) and nested["a"][1] == 3 and nested["b"] == "x"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pkg://no_such_package_xyz/model", "names the package 'no_such_package_xyz', which is not installed"),
        ("pkg://lightning_lora/no_such_dir", "which does not exist"),
        ("pkg://", "is not a valid package path"),
    ],
)
def test_bad_pkg_paths(value: str, message: str) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        resolve_path(value)
