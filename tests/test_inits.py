"""PiSSA / OLoRA inits (``init='pissa'``, ``'pissa_niter_K'``, ``'olora'``): the same A, B and residual base weights as
PEFT's (test-only oracle), and the conversion to plain LoRA on the original base (PEFT's
``path_initial_model_for_weight_conversion``): the same files, and the same outputs as the trained PiSSA model.

Measured: A, B, the residual base (float, and the packed nf4 / int8 bytes for OLoRA) and the logits equal PEFT's
bit for bit (max difference 0.0); the converted adapter's tensors equal PEFT's converted file bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from _lightning import LlamaLM, MixinLlamaLM, token_loader, trainer
from _models import copy_adapter_into_peft, peft_param_name, randomize_adapter, tiny_gpt2, tiny_llama, token_batch
from lightning_lora import LoRACallback, LoRAConfig, QuantizationConfig, inject_lora, load_adapter, quantize_model, save_adapter
from lightning_lora.inject import lora_state
from lightning_lora.layers import lora_layers
from lightning_lora.quantization import dequantize_weight, is_quantized

QVD = ["q_proj", "v_proj", "down_proj"]


def _pair(builder, init: str, mode: str | None = None, **kwargs) -> tuple[nn.Module, nn.Module]:
    base = builder()
    if mode is not None:
        quantize_model(base, QuantizationConfig(mode=mode))
    peft_base = copy.deepcopy(base)
    config = LoRAConfig(init=init, **kwargs)
    torch.manual_seed(5)  # pissa_niter_K draws its random projection from the global generator, in both
    ours = inject_lora(base, config)
    torch.manual_seed(5)
    peft = get_peft_model(peft_base, LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=config.target_modules, init_lora_weights=init,
                                                use_dora=config.use_dora, use_rslora=config.use_rslora, fan_in_fan_out=builder is tiny_gpt2))  # fmt: skip
    return ours, peft


def _weight(layer: nn.Module) -> torch.Tensor:
    return dequantize_weight(layer) if is_quantized(layer) else layer.weight


@pytest.mark.parametrize(
    ("builder", "init", "mode", "kwargs"),
    [
        (tiny_llama, "pissa", None, {"target_modules": QVD}),
        (tiny_llama, "pissa_niter_4", None, {"target_modules": QVD}),
        (tiny_llama, "olora", None, {"target_modules": QVD, "alpha": 16}),
        (tiny_llama, "pissa", None, {"target_modules": QVD, "use_dora": True}),
        (tiny_gpt2, "pissa", None, {"target_modules": ["c_attn", "c_fc"]}),
        (tiny_llama, "olora", "nf4", {"target_modules": QVD}),
        (tiny_llama, "olora", "int8", {"target_modules": QVD}),
    ],
    ids=["pissa", "pissa-niter", "olora", "pissa-dora", "pissa-gpt2-conv1d", "olora-nf4", "olora-int8"],
)
def test_init_equals_peft_adapter_and_residual_base(builder, init, mode, kwargs):
    ours, peft = _pair(builder, init, mode, r=4, **kwargs)
    peft_params = dict(peft.named_parameters())
    names = ["lora_a.weight", "lora_b.weight"] + (["lora_magnitude"] if kwargs.get("use_dora") else [])
    for path, layer in lora_layers(ours).items():
        for name in names:
            assert torch.equal(ours.get_parameter(f"{path}.{name}"), peft_params[peft_param_name(f"{path}.{name}")]), f"{path}.{name}"
        peft_base = peft.base_model.model.get_submodule(path).base_layer
        assert torch.equal(_weight(layer.base_layer), _weight(peft_base)), path  # the same residual ...
        if mode is not None:  # ... quantized into the same bytes
            assert torch.equal(layer.base_layer.weight.data.view(torch.uint8), peft_base.weight.data.view(torch.uint8)), path
        assert torch.count_nonzero(layer.lora_b.weight) > 0  # B holds part of W now
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(ours(x).logits, peft(x).logits)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_keeps_the_function_and_leaves_the_residual(init):
    original = tiny_llama()
    x = token_batch()
    with torch.no_grad():
        expected = original(x).logits
    model = inject_lora(copy.deepcopy(original), LoRAConfig(r=4, alpha=8, target_modules=QVD, init=init))
    for path, layer in lora_layers(model).items():
        w = original.get_submodule(path).weight
        torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), w, rtol=0, atol=2e-6)
        if init == "pissa":  # the residual holds no more of W's top-r subspace: its top singular value is W's (r+1)-th
            s, s_res = torch.linalg.svdvals(w), torch.linalg.svdvals(layer.base_layer.weight)
            torch.testing.assert_close(s_res[0], s[4], rtol=1e-4, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_int8_olora_computes_with_the_requantized_residual():
    base = quantize_model(tiny_llama(), QuantizationConfig(mode="int8"))
    model = inject_lora(base, LoRAConfig(r=4, target_modules=["q_proj"], init="olora"))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    # bitsandbytes' int8 matmul on the new weight, not its state from before the init (~1e-3: int8 rounding of x)
    torch.testing.assert_close(layer.base_layer(x), x @ dequantize_weight(layer.base_layer).t(), rtol=0, atol=2e-2)


def _peft_converted(tmp_path, peft: nn.Module, ours: nn.Module, init: str) -> dict:
    """PEFT's recipe: save the initial adapter with init_lora_weights=True, train, save with the conversion."""
    peft.peft_config["default"].init_lora_weights = True
    peft.save_pretrained(tmp_path / "peft_init")
    peft.peft_config["default"].init_lora_weights = init
    copy_adapter_into_peft(ours, peft)  # "training": the same new values as ours
    peft.save_pretrained(tmp_path / "peft_converted", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    return json.loads((tmp_path / "peft_converted" / "adapter_config.json").read_text())


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("olora", True)])
def test_converted_adapter_applies_to_the_original_base_like_peft(tmp_path, init, rslora):
    ours, peft = _pair(tiny_llama, init, r=4, alpha=8, target_modules=QVD, use_rslora=rslora)
    randomize_adapter(ours)
    x = token_batch()
    ours.eval()
    with torch.no_grad():
        trained = ours(x).logits  # the trained adapter on the residual base
    peft_config = _peft_converted(tmp_path, peft, ours, init)
    save_adapter(ours, tmp_path / "ours", convert_to_lora=True)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert config[key] == peft_config[key], key
    assert sorted(config["target_modules"]) == sorted(peft_config["target_modules"])
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    assert config["lora_alpha"] == pytest.approx(8 * (2**0.5 if rslora else 2))
    ours_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_tensors = load_file(tmp_path / "peft_converted" / "adapter_model.safetensors")
    assert ours_tensors.keys() == peft_tensors.keys() and len(ours_tensors) == 12
    for key, value in peft_tensors.items():
        assert torch.equal(ours_tensors[key], value), key
    for loaded in (load_adapter(tiny_llama(), tmp_path / "ours"), PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")):
        loaded.eval()
        with torch.no_grad():
            out = loaded(x).logits
        torch.testing.assert_close(out, trained, rtol=1e-5, atol=1e-5 * trained.abs().max().item())
    # the PiSSA-form file loads too: the init runs again on the original base, then the trained tensors load
    save_adapter(ours, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["init_lora_weights"] == init
    again = load_adapter(tiny_llama(), tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, trained, rtol=0, atol=0)


def test_callback_exports_the_converted_adapter_and_the_mixin_saves_it(tmp_path):
    module = LlamaLM(build_in="configure_model")
    callback = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa_niter_2", backbone="model",
                            export_dir=str(tmp_path / "export"), convert_init_on_export=True)  # fmt: skip
    trainer(2, [callback]).fit(module, token_loader(n=8))
    x = token_batch()
    module.model.eval()
    with torch.no_grad():
        trained = module.model(x).logits
    converted = load_adapter(tiny_llama(), tmp_path / "export" / "adapter_converted").eval()
    assert lora_state(converted).config.r == 8 and lora_state(converted).config.init == "kaiming"
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, trained, rtol=1e-5, atol=1e-5 * trained.abs().max().item())
    mixin = MixinLlamaLM(LoRAConfig(r=4, target_modules=["q_proj"], init="olora"), build_in="init")
    trainer(1).fit(mixin, token_loader(n=4))
    mixin.save_adapter(tmp_path / "mixin", convert_to_lora=True)
    assert json.loads((tmp_path / "mixin" / "adapter_config.json").read_text())["r"] == 8
