"""LoRA on fused MoE expert parameters (``target_parameters``): PEFT parity (forward, gradients, saved keys,
files both ways), merging, quantized bases, the callback, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from _lightning import trainer
from _models import assert_same_adapter_files, assert_unchanged, copy_adapter_into_peft, model_snapshot, peft_param_name, randomize_adapter, tiny_moe, token_batch
from lightning_lora import LoRACallback, LoRAConfig, ParamLoRA, adapter_state_dict, inject_lora, load_adapter, merge_lora, merged_state_dict, quantize_model, save_adapter, unmerge_lora
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.config import QuantizationConfig
from lightning_lora.merge import disable_lora

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
CASES = {
    "mixtral": ("mixtral", {"r": 4, "alpha": 8, "target_modules": ["q_proj"], "target_parameters": EXPERTS}),
    "qwen3-experts-only-patterns": (
        "qwen3_moe",
        {"r": 4, "alpha": 8, "target_modules": None, "target_parameters": EXPERTS, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {r"layers\.1\..*gate_up_proj": 3.0}},
    ),
    "gpt-oss-transposed-rslora": ("gpt_oss", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "o_proj"], "target_parameters": EXPERTS, "use_rslora": True}),
}


def peft_config(kwargs: dict) -> LoraConfig:
    config = LoRAConfig(**kwargs)
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        target_modules=config.target_modules if config.target_modules is not None else [],
        target_parameters=config.target_parameters,
        use_rslora=config.use_rslora,
        rank_pattern=config.rank_pattern,
        alpha_pattern=config.alpha_pattern,
    )


def build_pair(kind: str, kwargs: dict):
    ours = inject_lora(tiny_moe(kind), LoRAConfig(**kwargs))
    randomize_adapter(ours, seed=3)
    peft = get_peft_model(tiny_moe(kind), peft_config(kwargs))
    copy_adapter_into_peft(ours, peft)
    return ours, peft


def output_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x).logits
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_scaled_close(actual, expected, name=""):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_peft(case):
    kind, kwargs = CASES[case]
    ours, peft = build_pair(kind, kwargs)
    wrappers = {name: m for name, m in ours.named_modules() if isinstance(m, ParamLoRA)}
    assert len(wrappers) == 4  # gate_up_proj and down_proj in 2 layers
    for name, layer in wrappers.items():
        peft_layer = peft.base_model.model.get_submodule(name)
        assert (layer.parameter_name, layer.r, layer.scale) == (peft_layer.parameter_name, peft_layer.r["default"], peft_layer.scaling["default"]), name
    x = token_batch(seed=2, batch=3, seq=12)
    out, grads = output_and_grads(ours, x)
    peft_out, peft_grads = output_and_grads(peft, x)
    assert_scaled_close(out, peft_out, "logits")
    assert {peft_param_name(name) for name in grads} == set(peft_grads)
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, name
        assert_scaled_close(grad, peft_grads[peft_param_name(name)], name)


def test_rank_and_alpha_patterns_apply_to_parameter_paths():
    kind, kwargs = CASES["qwen3-experts-only-patterns"]
    model = inject_lora(tiny_moe(kind), LoRAConfig(**kwargs))
    got = {name: (m.parameter_name, m.num_experts, m.r, m.scale) for name, m in model.named_modules() if isinstance(m, ParamLoRA)}
    assert got == {
        "model.layers.0.mlp.experts": ("down_proj", 4, 2, 4.0),
        "model.layers.0.mlp.experts.base_layer": ("gate_up_proj", 4, 4, 2.0),
        "model.layers.1.mlp.experts": ("down_proj", 4, 2, 4.0),
        "model.layers.1.mlp.experts.base_layer": ("gate_up_proj", 4, 4, 0.75),
    }
    shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items() if k.startswith("model.layers.0.")}
    assert shapes == {
        "model.layers.0.mlp.experts.lora_a.weight": (8, 96),  # (E * r, in) with r=2 from rank_pattern
        "model.layers.0.mlp.experts.lora_b.weight": (64, 8),
        "model.layers.0.mlp.experts.base_layer.lora_a.weight": (16, 64),
        "model.layers.0.mlp.experts.base_layer.lora_b.weight": (192, 16),
    }
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("case", ["mixtral", "gpt-oss-transposed-rslora"])
def test_files_match_peft_both_ways(tmp_path, case):
    kind, kwargs = CASES[case]
    ours, peft = build_pair(kind, kwargs)
    x = token_batch(seed=4)
    save_adapter(ours, tmp_path / "ours")
    peft.save_pretrained(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft")
    config = json.loads((tmp_path / "ours" / ADAPTER_CONFIG_NAME).read_text())
    assert config["target_parameters"] == EXPERTS and config["lora_dropout"] == 0.0
    with torch.no_grad():
        expected = ours(input_ids=x).logits
        peft_loaded = PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "ours")
        torch.testing.assert_close(peft_loaded(input_ids=x).logits, expected, rtol=0, atol=1e-6)
        ours_loaded = load_adapter(tiny_moe(kind), tmp_path / "peft")
        torch.testing.assert_close(ours_loaded(input_ids=x).logits, expected, rtol=0, atol=1e-6)


def test_experts_only_adapter_reloads_as_experts_only(tmp_path):
    kind, kwargs = CASES["qwen3-experts-only-patterns"]
    ours, peft = build_pair(kind, kwargs)
    peft.save_pretrained(tmp_path)
    assert json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())["target_modules"] in (None, [])
    loaded = load_adapter(tiny_moe(kind), tmp_path)
    assert sorted(adapter_state_dict(loaded)) == sorted(adapter_state_dict(ours))
    assert not any(type(m).__name__ == "LoRALinear" for m in loaded.modules())


def test_merge_unmerge_disable_and_merged_weights():
    kind, kwargs = CASES["gpt-oss-transposed-rslora"]
    model, _ = build_pair(kind, kwargs)
    x = token_batch(seed=6)
    base_experts = tiny_moe(kind).model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with disable_lora(model):
            base = model(input_ids=x).logits
        assert (adapted - base).abs().max() > 1e-3  # the random adapter changes the outputs
        torch.testing.assert_close(base, tiny_moe(kind)(input_ids=x).logits)
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model.model.layers[0].mlp.experts.base_layer.base_layer.gate_up_proj, base_experts, rtol=0, atol=1e-6)
        state = merged_state_dict(model)
        plain = tiny_moe(kind)
        plain.load_state_dict(state, strict=True)
        torch.testing.assert_close(plain(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)


def test_quantized_attention_with_float_experts_matches_peft():
    kind, kwargs = CASES["mixtral"]
    quant = QuantizationConfig(mode="nf4")
    ours = inject_lora(quantize_model(tiny_moe(kind), quant), LoRAConfig(**kwargs))
    assert type(ours.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert ours.model.layers[0].mlp.experts.base_layer.base_layer.gate_up_proj.dtype == torch.float32
    randomize_adapter(ours, seed=3)
    peft = get_peft_model(quantize_model(tiny_moe(kind), quant), peft_config(kwargs))
    copy_adapter_into_peft(ours, peft)
    x = token_batch(seed=8)
    out, grads = output_and_grads(ours, x)
    peft_out, peft_grads = output_and_grads(peft, x)
    assert_scaled_close(out, peft_out, "logits")
    for name, grad in grads.items():
        assert_scaled_close(grad, peft_grads[peft_param_name(name)], name)


def test_callback_trains_expert_adapters_and_checkpoints_them(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class MoELM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_moe("mixtral")

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    module = MoELM()
    callback = LoRACallback(r=4, target_modules=None, target_parameters=EXPERTS, backbone="model", export_dir=str(tmp_path / "export"))
    t = trainer(3, [callback])
    data = DataLoader(TensorDataset(token_batch(seed=1, batch=8, seq=12)), batch_size=4)
    t.fit(module, data)
    b = [p for n, p in module.model.named_parameters() if n.endswith("lora_b.weight")]
    assert len(b) == 4 and all(torch.count_nonzero(p) > 0 for p in b)
    t.save_checkpoint(tmp_path / "a.ckpt")
    keys = set(torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"])
    assert keys == {f"model.{k}" for k in adapter_state_dict(module.model)} and len(keys) == 8
    with safe_open(str(tmp_path / "export" / "adapter" / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
        assert len(list(handle.keys())) == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_parameters": EXPERTS, "dropout": 0.1}, ValueError, r"`dropout`=0.1 cannot be used with `target_parameters`"),
        ({"target_parameters": "experts.down_proj"}, TypeError, r"`target_parameters` must be a list"),
        ({"target_parameters": []}, ValueError, r"`target_parameters` is an empty list"),
        ({"target_modules": None}, ValueError, r"`target_modules` is empty"),
    ],
)
def test_bad_config_values_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRAConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_parameters": ["experts.up_proj"]}, r"matches no parameter.*'experts.down_proj', 'experts.gate_up_proj'"),
        ({"target_parameters": ["gate.weight"], "modules_to_save": ["gate"]}, r"inside or around modules_to_save"),
        ({"target_parameters": ["q_proj.weight"], "target_modules": ["q_proj"]}, r"inside or around the LoRA layer"),
        ({"target_parameters": ["mlp.gate.weight", "self_attn.q_proj.weight"]}, None),
    ],
)
def test_bad_targets_fail_before_the_model_changes(kwargs, match):
    model = tiny_moe("mixtral")
    snapshot = model_snapshot(model)
    config = LoRAConfig(**{"target_modules": None, **kwargs})
    if match is None:  # 2-D weights of plain modules are targets too (PEFT allows them)
        inject_lora(model, config)
        assert sum(isinstance(m, ParamLoRA) for m in model.modules()) == 4
        return
    with pytest.raises(ValueError, match=match):
        inject_lora(model, config)
    assert_unchanged(model, snapshot)


def test_quantized_parameter_is_refused():
    model = quantize_model(tiny_moe("mixtral"), QuantizationConfig(mode="nf4"))
    with pytest.raises(ValueError, match=r"only floating-point \(unquantized\) parameters"):
        inject_lora(model, LoRAConfig(target_modules=None, target_parameters=["q_proj.weight"]))


def test_yaml_config_reaches_experts_tokens_lora_plus_and_serving_checks(tmp_path, capsys):
    """The shipped tiny config turned into a Mixtral run with every new option set in YAML, through `lightning-lora fit`,
    then `lightning-lora export` with the serving flags."""
    from test_cli import tiny_config

    from lightning_lora import cli

    def edit(config: dict) -> None:
        model = config["model"]["init_args"]["model"]
        model.update(model_type="mixtral", intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
        config["trainer"]["enable_checkpointing"] = True
        config["trainer"]["max_steps"] = 2
        config["trainer"]["callbacks"][0]["init_args"].update(
            target_modules=["q_proj", "v_proj"],
            target_parameters=EXPERTS,
            trainable_token_indices=[100, 101],  # [UNK] and [CLS] of the tokenizer: [CLS] starts every sequence
            lora_plus_ratio=16.0,
            serving_targets=["vllm", "llama.cpp"],
        )

    config = tiny_config(tmp_path, edit)
    with pytest.warns(UserWarning, match=r"(?s)vllm refuses it \(trainable_token_indices\).*llama.cpp refuses it \(target_parameters\)"):
        cli.main(["fit", "--config", str(config)])
    with safe_open(str(tmp_path / "export" / "adapter" / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
        keys = set(handle.keys())
    assert {k for k in keys if "layers.0" in k and "experts" in k} == {
        f"base_model.model.model.layers.0.mlp.experts.{inner}lora_{ab}.weight" for inner in ("", "base_layer.") for ab in "AB"
    }
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys and len(keys) == 2 * (4 + 4) + 1
    (checkpoint,) = (tmp_path / "run").glob("**/checkpoints/*.ckpt")
    groups = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]["param_groups"]
    # configure_adamw's two groups (matrices, 1-D), the matrices split by LoRA+: A side and token rows, then B.
    assert [(len(g["params"]), g["lora_plus_ratio"], g["initial_lr"]) for g in groups] == [(9, 1.0, 1e-3), (8, 16.0, 16e-3)]
    # export: the flags override the config's serving options; strict stops before writing (exit 2)
    base = ["export", "--checkpoint", str(checkpoint), "--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--output", str(tmp_path / "strict"), "--serving-targets", "vllm", "--strict-serving", "--vllm-max-lora-rank", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "vllm refuses it (r): rank 8 is above --max-lora-rank 1" in err and "vllm refuses it (trainable_token_indices)" in err
    assert not (tmp_path / "strict").exists()
    with pytest.warns(UserWarning, match=r"llama.cpp refuses it \(target_parameters\)"):
        cli.main([*base, "--output", str(tmp_path / "loose"), "--serving-targets", "llama.cpp"])
    with safe_open(str(tmp_path / "loose" / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
        assert set(handle.keys()) == keys
