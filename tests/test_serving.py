"""Serving checks before export (vLLM, llama.cpp): each rule fires on the adapter it is about and on nothing else,
strict mode writes nothing, and the callback / mixin pass the options through."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from _lightning import LlamaLM, MixinLlamaLM, token_loader, trainer
from _models import tiny_bert_classifier, tiny_llama, tiny_moe
from lightning_lora import LoRACallback, LoRAConfig, inject_lora, save_adapter, serving_issues
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, peft_config_dict, to_peft_keys
from lightning_lora.adapter_io import adapter_state_dict
from lightning_lora.serving import ServingIssue, adapter_serving_issues

QV = ["q_proj", "v_proj"]


def findings(model, **kwargs) -> set[tuple[str, str, str]]:
    shapes = {k: tuple(v.shape) for k, v in to_peft_keys(adapter_state_dict(model)).items()}
    return {(i.consumer, i.effect, i.key) for i in serving_issues(peft_config_dict(model), shapes, **kwargs)}


def llama(**kwargs):
    return inject_lora(tiny_llama(), LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": QV, **kwargs}))


def test_a_plain_adapter_suits_both():
    assert findings(llama()) == set()
    assert findings(llama(r=16, alpha=16)) == set()
    # rank_pattern alone is fine for llama.cpp (it reads the rank of each tensor) and vLLM main honours it.
    assert findings(llama(rank_pattern={"v_proj": 8})) == set()


def bert(**kwargs):
    return inject_lora(tiny_bert_classifier(), LoRAConfig(**{"r": 4, "target_modules": ["query", "value"], **kwargs}))


@pytest.mark.parametrize(
    ("build", "kwargs", "expected"),
    [
        # The one modules_to_save vLLM takes is a classification head; llama.cpp's converter exits on its tensors.
        (bert, {"modules_to_save": ["classifier"]}, {("llama.cpp", "refuses", "classifier.weight")}),
        # vLLM reads `bias` from the config; llama.cpp stops at the first bias tensor.
        (bert, {"bias": "lora_only"}, {("vllm", "refuses", "bias"), ("llama.cpp", "refuses", "bert.encoder.layer.0.attention.self.query.base_layer.bias")}),
        (bert, {"bias": "all"}, {("vllm", "refuses", "bias"), ("llama.cpp", "refuses", "bert.embeddings.LayerNorm.bias")}),
        (llama, {"bias": "lora_only"}, {("vllm", "refuses", "bias")}),  # Llama's projections have no bias tensors
        # A norm trained in full passes the converter (it keeps "*.norm*" tensors), not vLLM.
        (llama, {"modules_to_save": ["model.norm"]}, {("vllm", "refuses", "modules_to_save")}),
        (llama, {"r": 32, "alpha": 64}, {("vllm", "refuses", "r")}),
        (llama, {"rank_pattern": {"q_proj": 64}}, {("vllm", "refuses", "r")}),
        (llama, {"use_rslora": True}, {("llama.cpp", "mis-scales", "use_rslora")}),
        (llama, {"alpha_pattern": {"v_proj": 2.0}}, {("llama.cpp", "mis-scales", "alpha_pattern")}),
        (llama, {"trainable_token_indices": [3, 4]}, {("vllm", "refuses", "trainable_token_indices"), ("llama.cpp", "refuses", "model.embed_tokens.token_adapter.trainable_tokens_delta")}),
    ],
)
def test_each_rule_fires_on_its_adapter(build, kwargs, expected):
    assert findings(build(**kwargs)) == expected


def test_llama_cpp_scale_factors_are_the_ones_it_would_apply():
    rslora = serving_issues(peft_config_dict(llama(use_rslora=True)), {k: tuple(v.shape) for k, v in to_peft_keys(adapter_state_dict(llama(use_rslora=True))).items()}, ["llama.cpp"])
    assert len(rslora) == 1 and "[0.5]" in rslora[0].reason  # alpha / r = 2 where PEFT applies alpha / sqrt(r) = 4
    model = llama(alpha_pattern={"v_proj": 2.0})
    shapes = {k: tuple(v.shape) for k, v in to_peft_keys(adapter_state_dict(model)).items()}
    (issue,) = serving_issues(peft_config_dict(model), shapes, ["llama.cpp"])
    assert "2 LoRA layers" in issue.reason and "[4.0]" in issue.reason  # 8/4 applied, 2/4 meant


def test_vllm_rank_limit_follows_the_server_setting():
    model = llama(r=32, alpha=64)
    assert findings(model, vllm_max_lora_rank=32) == set()
    (issue,) = [i for i in serving_issues(peft_config_dict(model), {}, ["vllm"])]
    assert "--max-lora-rank 32" in issue.reason
    huge = {"r": 1024, "lora_alpha": 16, "target_modules": ["q_proj"]}
    assert "largest --max-lora-rank is 512" in serving_issues(huge, {}, ["vllm"])[0].reason


def test_experts_adapter_is_refused_by_llama_cpp_only():
    model = inject_lora(tiny_moe("mixtral"), LoRAConfig(r=4, target_modules=None, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    assert findings(model) == {("llama.cpp", "refuses", "target_parameters")}


def test_dora_and_pissa_adapters_written_by_peft(tmp_path):
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_dora=True))
    peft.save_pretrained(tmp_path)
    got = {(i.consumer, i.effect, i.key) for i in adapter_serving_issues(tmp_path)}
    assert got == {("vllm", "refuses", "use_dora"), ("llama.cpp", "refuses", "model.layers.0.self_attn.q_proj.lora_magnitude_vector")}
    pissa = {"r": 8, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": "pissa_niter_4"}
    got = {(i.consumer, i.effect, i.key) for i in serving_issues(pissa, {}, ["vllm", "llama.cpp"])}
    assert got == {("vllm", "refuses", "init_lora_weights"), ("llama.cpp", "mis-applies", "init_lora_weights")}
    assert serving_issues({**pissa, "init_lora_weights": "gaussian"}, {}) == []


def test_save_adapter_warns_and_writes_or_strictly_writes_nothing(tmp_path):
    model = bert(bias="lora_only")
    with pytest.warns(UserWarning, match=r"(?s)vllm refuses it \(bias\).*llama.cpp refuses it"):
        save_adapter(model, tmp_path / "loose", serving_targets=["vllm", "llama.cpp"])
    assert (tmp_path / "loose" / ADAPTER_WEIGHTS_NAME).is_file()
    with pytest.raises(ValueError, match=r"(?s)nothing was written \(strict_serving=True\).*vllm refuses it \(bias\)"):
        save_adapter(model, tmp_path / "strict", serving_targets="vllm", strict_serving=True)
    assert not (tmp_path / "strict").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path / "llama-only-ok", serving_targets=[])  # no targets: no checks, no warning
        save_adapter(llama(), tmp_path / "clean", serving_targets=["vllm", "llama.cpp"], strict_serving=True)


def test_callback_export_checks_before_writing(tmp_path):
    callback = LoRACallback(r=4, target_modules=QV, use_rslora=True, backbone="model", export_dir=str(tmp_path), serving_targets=["llama.cpp"], strict_serving=True)
    with pytest.raises(ValueError, match=r"llama.cpp mis-scales it \(use_rslora\)"):
        trainer(1, [callback]).fit(LlamaLM(build_in="init"), token_loader())
    assert not (tmp_path / "adapter").exists()


def test_mixin_save_adapter_passes_the_options(tmp_path):
    module = MixinLlamaLM(LoRAConfig(r=32, target_modules=QV), build_in="init")
    trainer(1, []).fit(module, token_loader())
    with pytest.raises(ValueError, match=r"rank 32 is above --max-lora-rank 16"):
        module.save_adapter(tmp_path / "a", serving_targets=["vllm"], strict_serving=True)
    module.save_adapter(tmp_path / "b", serving_targets=["vllm"], strict_serving=True, vllm_max_lora_rank=32)
    assert json.loads((tmp_path / "b" / ADAPTER_CONFIG_NAME).read_text())["r"] == 32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"serving_targets": ["tgi"]}, ValueError, r"`serving_targets` holds \['tgi'\]; the checks know \['vllm', 'llama.cpp'\]"),
        ({"serving_targets": [1]}, TypeError, r"`serving_targets` must be a list of consumer names"),
        ({"vllm_max_lora_rank": 24}, ValueError, r"`vllm_max_lora_rank` must be one of vLLM's --max-lora-rank values"),
        ({"strict_serving": "yes"}, TypeError, r"`strict_serving` must be True or False, got 'yes'"),
    ],
)
def test_bad_options_fail_when_the_callback_is_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRACallback(**kwargs)


def test_issue_reads_as_a_sentence():
    assert str(ServingIssue("vllm", "refuses", "bias", "why")) == "vllm refuses it (bias): why"

