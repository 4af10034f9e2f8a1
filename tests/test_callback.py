"""LoRACallback through a real Trainer on CPU: injection timing, adapter-only checkpoints, exact resume."""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger

from _lightning import BertClassifier, LlamaLM, MixinLlamaLM, classification_loader, token_loader, trainer
from lightning_lora import LoRACallback, LoRAConfig, QuantizationConfig, adapter_state_dict
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.inject import lora_state

TARGETS = ["q_proj", "v_proj"]


def _callback(**kwargs) -> LoRACallback:
    return LoRACallback(**{"r": 4, "target_modules": TARGETS, "backbone": "model", **kwargs})


def _fit(max_steps: int, ckpt_path=None, callbacks=(), quantize=None, dropout=0.0, module=None, **trainer_kwargs):
    L.seed_everything(0)
    module = module or LlamaLM()
    callback = _callback(quantize=quantize, dropout=dropout)
    t = trainer(max_steps, [callback, *callbacks], **trainer_kwargs)
    t.fit(module, token_loader(), ckpt_path=ckpt_path)
    return module, t


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(module.model).items()}


@pytest.mark.parametrize("build_in", ["init", "setup", "configure_model"])
def test_injects_before_optimizer_wherever_backbone_is_built(build_in):
    module = LlamaLM(build_in=build_in)
    t = trainer(2, [_callback()])
    t.fit(module, token_loader())
    state = lora_state(module.model)
    assert state is not None and len(state.targets) == 4  # q_proj, v_proj in 2 layers
    optimizer_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert optimizer_params == trainable and len(trainable) == 8


def test_only_lora_tensors_change_and_backbone_bytes_are_identical():
    module = LlamaLM(build_in="init")
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    t = trainer(4, [_callback()])
    t.fit(module, token_loader())
    after = module.model.state_dict()
    changed = set()
    for key, value in after.items():
        original_key = key.replace(".base_layer.", ".")
        if original_key in before:
            assert torch.equal(before[original_key], value), f"frozen tensor {key} changed"
        else:
            changed.add(key)
    assert changed == set(adapter_state_dict(module.model))
    assert all(k.endswith(("lora_a.weight", "lora_b.weight")) for k in changed)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if "lora_b" in k)


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_checkpoint_holds_adapter_only_and_is_small(tmp_path, quantize):
    module, t = _fit(4, quantize=quantize)
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    adapter = adapter_state_dict(module.model)
    assert set(checkpoint["state_dict"]) == {"model." + k for k in adapter}
    assert not any("absmax" in k or "quant_" in k or "SCB" in k for k in checkpoint["state_dict"])
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapter.values())
    optimizer_bytes = sum(
        v.numel() * v.element_size() for s in checkpoint["optimizer_states"][0]["state"].values() for v in s.values() if torch.is_tensor(v)
    )
    # The bound the issue states: adapter + optimizer state + 256 KiB of metadata and loop state.
    assert os.path.getsize(path) <= adapter_bytes + optimizer_bytes + 256 * 1024
    meta = checkpoint["lightning_lora"]
    assert meta["lora_config"]["r"] == 4 and meta["lora_config"]["target_modules"] == TARGETS
    assert (meta["quantization"] or {}).get("mode") == quantize


@pytest.mark.parametrize(("quantize", "dropout"), [(None, 0.0), (None, 0.1), ("nf4", 0.0), ("int8", 0.1)])
def test_resume_is_bit_exact(tmp_path, quantize, dropout):
    # Uninterrupted 16 steps (2 epochs of 8 batches) vs 8 steps, resume from the step-8 checkpoint, 8 more.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
    full, _ = _fit(16, callbacks=[checkpoint], quantize=quantize, dropout=dropout, enable_checkpointing=True)
    expected = _snapshot(full)
    resumed, _ = _fit(16, ckpt_path=tmp_path / "step=8.ckpt", quantize=quantize, dropout=dropout)
    got = _snapshot(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_rejects_checkpoint_of_another_lora_config(tmp_path):
    _, t = _fit(2)
    t.save_checkpoint(tmp_path / "a.ckpt")
    L.seed_everything(0)
    module = LlamaLM()
    t2 = trainer(4, [_callback(r=8)])
    with pytest.raises(ValueError, match=r"`r`=4.*`r`=8"):
        t2.fit(module, token_loader(), ckpt_path=tmp_path / "a.ckpt")
    # Nothing was loaded: the adapter still has its fresh init (B == 0).
    assert all(torch.count_nonzero(v) == 0 for k, v in adapter_state_dict(module.model).items() if "lora_b" in k)


def test_resume_rejects_checkpoint_of_another_backbone(tmp_path):
    _, t = _fit(2)
    t.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    checkpoint["lightning_lora"]["fingerprint"] = "0" * 16
    torch.save(checkpoint, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match="another backbone"):
        trainer(4, [_callback()]).fit(LlamaLM(), token_loader(), ckpt_path=tmp_path / "b.ckpt")


def test_resume_rejects_checkpoint_missing_adapter_tensors(tmp_path):
    _, t = _fit(2)
    t.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    dropped = sorted(checkpoint["state_dict"])[0]
    del checkpoint["state_dict"][dropped]
    torch.save(checkpoint, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match="lacks 1 adapter tensors"):
        trainer(4, [_callback()]).fit(LlamaLM(), token_loader(), ckpt_path=tmp_path / "b.ckpt")


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_matches_clipping_by_hand(algorithm):
    clip = 1e-3

    class Capture(L.Callback):
        # Lightning clips after on_before_optimizer_step: these are the raw gradients and weights.
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    raw = Capture()
    L.seed_everything(0)
    module = LlamaLM(build_in="init")
    # One SGD step with lr=1 makes the applied update equal to the (clipped) gradient.
    module.configure_optimizers = lambda: torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    t = trainer(1, [_callback(), raw], gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    t.fit(module, token_loader())
    total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.grads.values()]))
    if algorithm == "norm":  # torch's rule: scale by clip / (norm + 1e-6) when that is below 1
        factor = torch.clamp(clip / (total_norm + 1e-6), max=1.0)
        expected = {n: g * factor for n, g in raw.grads.items()}
    else:
        expected = {n: g.clamp(-clip, clip) for n, g in raw.grads.items()}
    params = dict(module.named_parameters())
    assert len(expected) == 8
    for name, grad in expected.items():
        torch.testing.assert_close(raw.weights[name] - params[name].detach(), grad, rtol=1e-4, atol=1e-9)
    applied = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(raw.weights[n] - params[n].detach()) for n in expected]))
    assert total_norm > clip  # the clip is active
    if algorithm == "norm":
        assert applied.item() == pytest.approx(clip, rel=1e-3)


def test_callback_and_mixin_give_identical_adapters():
    via_callback, _ = _fit(6)
    L.seed_everything(0)
    mixin = MixinLlamaLM(LoRAConfig(r=4, target_modules=TARGETS))
    trainer(6).fit(mixin, token_loader())
    a, b = _snapshot(via_callback), _snapshot(mixin)
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_optimizer_with_frozen_parameters_warns_with_fix():
    with pytest.warns(UserWarning, match=r"frozen parameters.*requires_grad"):
        trainer(1, [_callback()]).fit(LlamaLM(build_in="init", all_params_in_optimizer=True), token_loader())


def test_optimizer_built_before_injection_is_an_error():
    module = LlamaLM(build_in="init")
    frozen_copy = [torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    module.configure_optimizers = lambda: torch.optim.AdamW(frozen_copy, lr=1e-3)
    with pytest.raises(ValueError, match="none of them trains"):
        trainer(1, [_callback()]).fit(module, token_loader())


def test_backbone_that_never_appears_is_a_clear_error():
    module = LlamaLM(build_in="never")
    with pytest.raises(RuntimeError, match="LoRA was never injected"):
        trainer(1, [_callback()]).fit(module, token_loader())


def test_export_dir_writes_peft_adapter_and_merged_weights(tmp_path):
    from peft import PeftModel

    from _models import tiny_llama, token_batch

    module = LlamaLM(build_in="init")
    callback = _callback(export_dir=str(tmp_path / "export"), merge_on_export=True)
    trainer(4, [callback]).fit(module, token_loader())
    adapter_dir = tmp_path / "export" / "adapter"
    assert {p.name for p in adapter_dir.iterdir()} == {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME}
    ids = token_batch()
    module.model.eval()
    with torch.no_grad():
        ours = module.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(tiny_llama().eval(), adapter_dir)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
        from safetensors.torch import load_file

        plain = tiny_llama().eval()
        plain.load_state_dict(load_file(tmp_path / "export" / "merged" / "model.safetensors"), strict=True)
        torch.testing.assert_close(plain(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_export_of_a_module_adapted_as_a_whole_loads_on_the_bare_backbone(tmp_path):
    # backbone=None adapts the LightningModule itself, whose paths start with "model.": the adapter must still load in
    # PEFT on the transformers model, and the merged weights in transformers (they were keyed "model.model...").
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from _models import tiny_llama, token_batch

    module = LlamaLM(build_in="init")
    callback = LoRACallback(r=4, target_modules=TARGETS, export_dir=str(tmp_path / "export"), merge_on_export=True)
    trainer(2, [callback]).fit(module, token_loader())
    assert lora_state(module) is not None and lora_state(module.model) is None  # LoRA was injected into the whole module
    ids = token_batch()
    module.model.eval()
    with torch.no_grad():
        ours = module.model(input_ids=ids).logits
        assert not torch.allclose(ours, tiny_llama().eval()(input_ids=ids).logits, atol=1e-4)  # training changed the output
        peft_model = PeftModel.from_pretrained(tiny_llama().eval(), tmp_path / "export" / "adapter")
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_summary_logged_and_works_with_usual_callbacks(tmp_path, caplog):
    module = LlamaLM(build_in="init")
    callbacks = [
        _callback(),
        ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True),
        EarlyStopping(monitor="val_loss", patience=3),
        RichProgressBar(),
    ]
    t = trainer(4, callbacks, logger=CSVLogger(tmp_path / "logs"), enable_checkpointing=True, enable_progress_bar=True, val_check_interval=2)
    with caplog.at_level("INFO"):
        t.fit(module, token_loader(), token_loader(n=8))
    # r=4 per layer: q_proj (64 -> 64) 4*(64+64) + v_proj (64 -> 32, 2 KV heads) 4*(64+32) = 896; 2 layers.
    assert "trainable params: 1,792 || all params:" in caplog.text
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(last["state_dict"]) == {"model." + k for k in adapter_state_dict(module.model)}


def test_bert_classifier_with_modules_to_save_checkpoints_the_head(tmp_path):
    module = BertClassifier()
    callback = LoRACallback(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], backbone="model", quantize="nf4")
    t = trainer(3, [callback])
    t.fit(module, classification_loader())
    t.save_checkpoint(tmp_path / "c.ckpt")
    keys = set(torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"])
    assert {"model.classifier.weight", "model.classifier.bias"} <= keys
    assert len([k for k in keys if "lora_" in k]) == 8
    assert type(module.model.bert.encoder.layer[0].attention.self.key).__name__ == "Linear4bit"
    assert type(module.model.classifier).__name__ == "Linear"


def test_nonfinite_gradients_skip_the_step_and_stop_after_the_limit():
    module = LlamaLM(build_in="init")
    original = module.training_step
    module.training_step = lambda batch, batch_idx: original(batch, batch_idx) * float("nan")
    callback = _callback(max_nonfinite_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="3 optimizer steps in a row had NaN/Inf gradients"):
            trainer(10, [callback]).fit(module, token_loader())
    assert callback.controller.skipped_steps == 3
    assert all(torch.isfinite(v).all() for v in adapter_state_dict(module.model).values())


def test_backbone_left_in_eval_mode_warns():
    module = LlamaLM(build_in="init")
    module.model.eval()  # what from_pretrained returns
    with pytest.warns(UserWarning, match=r"LoRA layers are in eval mode.*call `.train\(\)`"):
        trainer(1, [_callback()]).fit(module, token_loader())
