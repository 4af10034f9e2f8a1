"""LoRA+ (B matrices at ``lr_ratio`` x the learning rate): the groups equal PEFT's ``create_loraplus_optimizer``
per parameter, through the helper and through the callback / mixin on the user's own optimizer; resume is exact."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

from _lightning import LlamaLM, MixinLlamaLM, token_loader, trainer
from _models import peft_param_name, tiny_bert_classifier, tiny_llama
from lightning_lora import LoRACallback, LoRAConfig, adapter_state_dict, inject_lora, lora_plus_param_groups

LR, RATIO, DECAY = 1e-3, 16.0, 0.01
CASES = {
    # LayerNorm weights and biases (no decay), a 2-D head (A side), B matrices, biases of LoRA layers.
    "bert": (tiny_bert_classifier, {"target_modules": ["query", "value"], "bias": "lora_only", "modules_to_save": ["classifier", "bert.embeddings.LayerNorm"]}),
    # An RMSNorm weight: 1-D, so on the B side, with decay (it is not an nn.LayerNorm).
    "llama": (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["model.norm"]}),
}


def peft_lrs(builder, kwargs) -> dict[str, tuple[float, float]]:
    """PEFT's LoRA+ optimizer: parameter name -> (lr, weight decay)."""
    peft = get_peft_model(builder(), LoraConfig(r=4, lora_alpha=8, **kwargs))
    optimizer = create_loraplus_optimizer(peft, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=DECAY)
    names = {id(p): n for n, p in peft.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def our_lrs(model, optimizer, to_save) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {peft_param_name(names[id(p)], to_save): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_param_groups_equal_peft_per_parameter(case):
    builder, kwargs = CASES[case]
    model = inject_lora(builder(), LoRAConfig(r=4, alpha=8, **kwargs))
    optimizer = torch.optim.AdamW(lora_plus_param_groups(model, lr=LR, lr_ratio=RATIO, weight_decay=DECAY))
    ours = our_lrs(model, optimizer, kwargs["modules_to_save"])
    expected = peft_lrs(builder, kwargs)
    assert ours == expected
    assert {lr for lr, _ in ours.values()} == {LR, LR * RATIO}
    assert {wd for _, wd in ours.values()} == ({0.0, DECAY} if case == "bert" else {DECAY})  # no bias or LayerNorm in "llama"


def _lora_plus_fit(max_steps, module, ckpt_path=None, callbacks=(), data=None, **kwargs):
    L.seed_everything(0)
    callback = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["model.norm"], backbone="model", lora_plus_ratio=RATIO, **kwargs)
    t = trainer(max_steps, [callback, *callbacks], enable_checkpointing=bool(callbacks))
    t.fit(module, data or token_loader(), ckpt_path=ckpt_path)
    return t


class ScheduledLM(LlamaLM):
    """The user's own optimizer and scheduler, written without LoRA+ in mind."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_callback_splits_the_users_optimizer_into_peft_lrs():
    module = ScheduledLM(build_in="init")
    t = _lora_plus_fit(1, module)
    optimizer = t.optimizers[0]
    names = {id(p): n.removeprefix("model.") for n, p in module.named_parameters()}
    got = {peft_param_name(names[id(p)], ["model.norm"]): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    expected = {name: lr for name, (lr, _) in peft_lrs(tiny_llama, CASES["llama"][1]).items()}
    assert got == expected
    scheduler = t.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [LR, LR * RATIO]  # the scheduler was built on the split groups
    assert [g["lr"] for g in optimizer.param_groups] == [LR / 2, LR * RATIO / 2]  # and scales both after a step


def test_mixin_gets_the_same_groups_as_the_callback():
    class Mixin(MixinLlamaLM):
        lora_plus_ratio = RATIO

    module = Mixin(LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), build_in="init", lr=LR)
    t = trainer(1, [])
    t.fit(module, token_loader())
    groups = t.optimizers[0].param_groups
    assert [(len(g["params"]), g["lr"], g["lora_plus_ratio"]) for g in groups] == [(4, LR, 1.0), (4, LR * RATIO, RATIO)]
    b_ids = {id(m.lora_b.weight) for m in module.modules() if hasattr(m, "lora_b")}
    assert {id(p) for p in groups[1]["params"]} == b_ids


def test_resume_with_lora_plus_is_bit_exact(tmp_path):
    # 8 steps (2 epochs of 4 batches) vs 4, then resume from the step-4 checkpoint (an epoch boundary: the plain
    # DataLoader restarts its epoch) for 4 more; the scheduler's state and both groups' lrs come back from the checkpoint.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full = ScheduledLM()
    t = _lora_plus_fit(8, full, callbacks=[checkpoint], data=token_loader(n=16))
    assert [g["lr"] for g in t.optimizers[0].param_groups] == [LR * (1.0 / 9), LR * RATIO * (1.0 / 9)]  # LambdaLR after 8 steps
    resumed = ScheduledLM()
    _lora_plus_fit(8, resumed, ckpt_path=tmp_path / "step=4.ckpt", data=token_loader(n=16))
    expected, got = adapter_state_dict(full.model), adapter_state_dict(resumed.model)
    assert expected.keys() == got.keys() and len(expected) == 9
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_with_another_ratio_is_refused(tmp_path):
    t = _lora_plus_fit(2, ScheduledLM())
    t.save_checkpoint(tmp_path / "a.ckpt")
    callback = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["model.norm"], backbone="model")
    with pytest.raises(ValueError, match=r"`lora_plus_ratio`=16.0, this run has None"):
        trainer(4, [callback]).fit(ScheduledLM(), token_loader(), ckpt_path=tmp_path / "a.ckpt")


def test_scheduler_that_flattens_the_groups_is_an_error():
    class OneCycle(LlamaLM):
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=10)}

    with pytest.raises(ValueError, match=r"`lora_plus_ratio`=16.0 is not in effect.*OneCycleLR with one max_lr"):
        _lora_plus_fit(1, OneCycle(build_in="init"))


def test_groups_already_built_with_the_helper_are_not_split_twice():
    class OwnGroups(LlamaLM):
        def configure_optimizers(self):
            return torch.optim.AdamW(lora_plus_param_groups(self, lr=LR, lr_ratio=RATIO))

    t = _lora_plus_fit(1, OwnGroups(build_in="init"))
    assert [(len(g["params"]), g["lr"]) for g in t.optimizers[0].param_groups] == [(4, LR), (5, LR * RATIO)]  # not LR * RATIO**2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 1e-3, "lr_ratio": 0}, r"`lr_ratio` must be a positive finite number, got 0"),
        ({"lr": -1.0, "lr_ratio": 16}, r"`lr` must be a positive finite number, got -1.0"),
        ({"lr": 1e-3, "lr_ratio": 16, "weight_decay": float("nan")}, r"`weight_decay` must be a non-negative finite number"),
    ],
)
def test_bad_values_are_clear_errors(kwargs, match):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=match):
        lora_plus_param_groups(model, **kwargs)
    with pytest.raises(ValueError, match=r"`lr_ratio` must be a positive finite number, got -2"):
        LoRACallback(lora_plus_ratio=-2)
    with pytest.raises(ValueError, match=r"has no LoRA layers"):
        lora_plus_param_groups(tiny_llama(), lr=1e-3)
