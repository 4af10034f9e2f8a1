"""Checks a review found missing (2026-12-03): PEFT classification files, colliding keys, the merged dtype, and
``LoRACallback(from_backbone=...)``; then input handling: ``quantize`` named as such, 4-bit options that int8 or no
quantization would ignore, directory arguments that are not paths or are empty, and what "all-linear" leaves out."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lightning_lora import (
    LoRACallback, LoRAConfig, LoRAMixin, QuantizationConfig, adapter_state_dict, inject_lora, load_adapter, merged_state_dict,
    save_adapter,
)
from lightning_lora.export import save_merged


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _perturb_trainable(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def test_a_peft_sequence_classification_adapter_loads_and_gives_peft_outputs(tmp_path):
    """PEFT's SEQ_CLS task saves modules_to_save=['classifier', 'score'] for every model: 'score' names Llama's head
    and matches nothing in Bert. PEFT loads the file; so must we, with the trained classifier."""
    from peft import LoraConfig, get_peft_model

    logging.getLogger("peft").setLevel(logging.ERROR)
    peft_model = get_peft_model(_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    _perturb_trainable(peft_model)
    peft_model.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    ours = load_adapter(_bert(), tmp_path).eval()
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, _bert()(input_ids=ids).logits)  # the adapter and the classifier did load


def test_an_unmatched_modules_to_save_name_whose_weights_the_file_holds_is_refused(tmp_path):
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    save_adapter(model, tmp_path)
    other = _llama()
    del other.lm_head  # the saved head has nowhere to go
    with pytest.raises(ValueError, match="lm_head"):
        load_adapter(other, tmp_path)


def test_two_file_keys_for_one_tensor_are_refused(tmp_path):
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _perturb_trainable(model)
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = dict(load_file(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key.replace("lora_A.weight", "lora_A.other.weight")] = torch.zeros_like(tensors[key])
    os.remove(path)
    save_file(tensors, path)  # without our metadata: a third-party file, no checksum to catch it
    with pytest.raises(ValueError, match=r"lora_A\.other\.weight.*both hold"):
        load_adapter(_llama(), tmp_path)


def test_the_same_file_with_only_peft_adapter_names_loads(tmp_path):
    """One adapter whose keys carry PEFT's adapter name (``lora_A.default.weight``) is not a collision."""
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    _perturb_trainable(model)
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in load_file(path).items()}
    os.remove(path)
    save_file(tensors, path)
    loaded = adapter_state_dict(load_adapter(_llama(), tmp_path))
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, "int8", "bf16x", 3])
def test_merged_weights_refuse_a_dtype_that_is_not_real_floating(tmp_path, dtype):
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="`dtype` must be a floating torch dtype"):
        merged_state_dict(model, dtype=dtype)
    with pytest.raises(ValueError, match="`dtype` must be a floating torch dtype"):
        save_merged(model, tmp_path / "merged", dtype=dtype)
    assert not (tmp_path / "merged").exists()


def test_merged_weights_take_a_dtype_name():
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    by_name = merged_state_dict(model, dtype="bfloat16")
    by_dtype = merged_state_dict(model, dtype=torch.bfloat16)
    assert by_name.keys() == by_dtype.keys()
    for key, value in by_dtype.items():
        assert value.dtype == torch.bfloat16 and torch.equal(by_name[key], value), key


@pytest.mark.parametrize("value", ["false", "yes", 1, None])
def test_from_backbone_must_be_a_bool(value):
    with pytest.raises(TypeError, match="`from_backbone` must be True or False"):
        LoRACallback(r=4, target_modules=["q_proj"], from_backbone=value)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("value", ["abc", 5, [], [("q_proj", 4)]])
def test_callback_patterns_that_are_not_dicts_are_refused_by_name(field, value):
    with pytest.raises(TypeError, match=f"`{field}` must be a dict"):
        LoRACallback(r=4, target_modules=["q_proj"], **{field: value})


def test_a_float_rank_in_rank_pattern_is_called_a_rank():
    with pytest.raises(ValueError, match="must be a positive integer"):
        LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 8.0})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_prj"]}, r"`exclude_modules` entry 'v_prj' matches no module"),
        ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*\.v_prj"}, r"`exclude_modules` entry '.*\\\\.v_prj' matches no module"),
        ({"target_modules": ["q_proj"], "rank_pattern": {"q_prj": 2}}, r"`rank_pattern` key 'q_prj' matches no adapted layer"),
        ({"target_modules": ["q_proj"], "alpha_pattern": {"v_proj": 2.0}}, r"`alpha_pattern` key 'v_proj' matches no adapted layer"),
        ({"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["layers.0.self_attn"]}, r"trained in full and get no LoRA"),
    ],
)
def test_names_that_change_nothing_warn(options, message):
    with pytest.warns(UserWarning, match=message):
        inject_lora(_llama(), LoRAConfig(r=4, alpha=8, **options))


def test_names_that_all_take_effect_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_lora(
            _llama(),
            LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=[r"layers.1.self_attn.v_proj"],
                       rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.0\..*": 4.0}, modules_to_save=["lm_head"]),
        )


# -- a second review (input handling): quantize names, options a mode ignores, directory arguments, "all-linear" --


@pytest.mark.parametrize(
    ("value", "hint"),
    [("NF4", " Use 'nf4': mode names are lowercase."), ("Int8", " Use 'int8': mode names are lowercase."), ("int4", ""), (4, "")],
)
def test_a_bad_quantize_is_refused_by_the_callbacks_name(value, hint):
    expected = f"`quantize` must be one of ('nf4', 'fp4', 'int8') or None, got {value!r}.{hint}"
    with pytest.raises(ValueError) as info:
        LoRACallback(r=4, target_modules=["q_proj"], quantize=value)
    assert str(info.value) == expected
    with pytest.raises(ValueError) as info:  # checked too when from_backbone then drops it, as the LoRA options are
        LoRACallback(quantize=value, from_backbone=True)
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [(dict(r=4), "`r`=4 is"), (dict(target_modules=["q_proj"], quantize="nf4"), "`target_modules`=['q_proj'], `quantize`='nf4' are"),
     (dict(use_dora=True), "`use_dora`=True is"), (dict(double_quant=False, quantize="nf4"), "`quantize`='nf4', `double_quant`=False are")],
)
def test_from_backbone_refuses_lora_and_quantization_arguments_it_would_drop(kwargs, shown):
    with pytest.raises(ValueError) as info:
        LoRACallback(from_backbone=True, backbone="model", **kwargs)
    assert str(info.value) == (
        f"{shown} not used with `from_backbone`=True: the LoRA and quantization configs come from the backbone "
        "(build_lora_model). Drop them, or set from_backbone=False to have the backbone checked against them."
    )
    LoRACallback(from_backbone=False, backbone="model", **kwargs)  # without it, they are this callback's config


def test_from_backbone_takes_defaults_and_the_options_it_does_not_own():
    callback = LoRACallback(from_backbone=True, backbone="model", alpha=16, target_modules="all-linear", adapter_name="sql",
                            lora_plus_ratio=16.0, compile_blocks=True, export_dir="out", rank_pattern={},
                            modules_to_save=[])  # alpha 16 == the default 16.0; {} and [] mean the default None: nothing
    assert callback.lora_config is None and callback.controller.adapter_name == "sql"


def test_a_mode_in_another_case_is_refused_with_the_spelling_to_use():
    with pytest.raises(ValueError) as info:
        QuantizationConfig(mode="FP4")
    assert str(info.value) == "`mode` must be one of ('nf4', 'fp4', 'int8'), got 'FP4'. Use 'fp4': mode names are lowercase."


_FOUR_BIT_OPTIONS = [
    ("compute_dtype", "bfloat16"), ("compute_dtype", torch.float16), ("double_quant", False), ("quant_storage", "bfloat16"),
]


@pytest.mark.parametrize(("field", "value"), _FOUR_BIT_OPTIONS)
def test_a_4bit_option_is_refused_with_int8(field, value):
    given = re.escape(f"`{field}`={value!r}")
    with pytest.raises(ValueError, match=rf"^{given} has no effect for int8 \(`mode`='int8'\): .* Drop it"):
        QuantizationConfig(mode="int8", **{field: value})
    with pytest.raises(ValueError, match=rf"^{given} has no effect for int8 \(`quantize`='int8'\): .* Drop it"):
        LoRACallback(r=4, target_modules=["q_proj"], quantize="int8", **{field: value})


def test_int8_takes_the_defaults_of_the_4bit_options_and_4bit_modes_take_any():
    pytest.importorskip("bitsandbytes")
    from lightning_lora.quantization import is_8bit, quantize_linear

    explicit = QuantizationConfig(mode="int8", double_quant=True, compute_dtype=None, quant_storage="uint8")
    assert explicit == QuantizationConfig(mode="int8")
    assert LoRACallback(r=4, target_modules=["q_proj"], quantize="int8").controller.quantization_config == explicit
    torch.manual_seed(0)
    layer = quantize_linear(torch.nn.Linear(64, 32), explicit, device="cpu")  # bitsandbytes' real 8-bit layer, on CPU
    assert is_8bit(layer) and layer.weight.dtype == torch.int8 and tuple(layer.weight.shape) == (32, 64)
    for mode in ("nf4", "fp4"):
        config = QuantizationConfig(mode=mode, double_quant=False, compute_dtype="bf16", quant_storage="bfloat16")
        assert (config.double_quant, config.compute_dtype, config.quant_storage) == (False, "bfloat16", "bfloat16")


@pytest.mark.parametrize(("field", "value"), _FOUR_BIT_OPTIONS)
def test_a_4bit_option_without_quantize_is_refused(field, value):
    given = re.escape(f"`{field}`={value!r}")
    with pytest.raises(ValueError, match=rf"^{given} has no effect with `quantize`=None: nothing is quantized\. Drop it"):
        LoRACallback(r=4, target_modules=["q_proj"], **{field: value})


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("double_quant", "yes", TypeError, "`double_quant` must be True or False, got 'yes'."),
        ("compute_dtype", "float64", ValueError,
         "`compute_dtype` must be one of ['bfloat16', 'float16', 'float32'] or None, got 'float64'."),
        ("quant_storage", "int4", ValueError, "`quant_storage` must be 'uint8', 'bfloat16', 'float16' or 'float32', got 'int4'."),
    ],
)
def test_a_bad_4bit_option_without_quantize_gets_its_own_message(field, value, error, message):
    with pytest.raises(error) as info:
        LoRACallback(r=4, target_modules=["q_proj"], **{field: value})
    assert str(info.value) == message


def test_defaults_without_quantize_build_no_quantization():
    spelled_out = dict(quantize=None, double_quant=True, compute_dtype=None, quant_storage=torch.uint8)
    assert LoRACallback(r=4, target_modules=["q_proj"], **spelled_out).controller.quantization_config is None
    assert LoRACallback(r=4, target_modules=["q_proj"]).controller.quantization_config is None


_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", _CONFIGS, ids=[p.stem for p in _CONFIGS])
def test_every_shipped_config_passes_the_quantization_checks(path):
    callbacks = [c for c in yaml.safe_load(path.read_text())["trainer"]["callbacks"] if c["class_path"].endswith("LoRACallback")]
    assert len(callbacks) == 1
    options = callbacks[0]["init_args"]
    callback = LoRACallback(**options)
    quantize = options.get("quantize")
    assert (callback.controller.quantization_config is None) == (quantize is None)
    if quantize is not None:
        assert callback.controller.quantization_config.mode == quantize


def test_the_cli_refuses_a_4bit_option_without_quantize_before_writing(tmp_path, capsys):
    from lightning_lora import cli

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "tiny-llama-cpu.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    options = config["trainer"]["callbacks"][0]["init_args"]
    assert options["quantize"] is None
    options.update(export_dir=str(tmp_path / "export"), compute_dtype="bfloat16")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--config", str(path)])
    assert info.value.code == 2
    assert "`compute_dtype`='bfloat16' has no effect with `quantize`=None" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


class _MixinModule(LoRAMixin, L.LightningModule):
    lora_config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])

    def __init__(self):
        super().__init__()
        self.model = _llama()


def _injected_mixin() -> _MixinModule:
    module = _MixinModule()
    module.lora_controller.maybe_inject(module)  # what setup does, without a Trainer
    return module


def _writers(model):
    from lightning_lora.export import copy_tokenizer_files

    return {
        "save_adapter": ("directory", lambda d: save_adapter(model, d)),
        "save_merged": ("directory", lambda d: save_merged(model, d)),
        "LoRAMixin.save_adapter": ("directory", lambda d: _injected_mixin().save_adapter(d)),
        "copy_tokenizer_files": ("target", lambda d: copy_tokenizer_files(".", d)),
        "LoRACallback": ("export_dir", lambda d: LoRACallback(r=4, target_modules=["q_proj"], export_dir=d)),
    }


@pytest.mark.parametrize("writer", list(_writers(None)))
@pytest.mark.parametrize("value", [5, b"out", ["out"]])
def test_a_directory_that_is_not_a_path_is_refused_by_name(writer, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # something for copy_tokenizer_files to copy
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    parameter, write = _writers(model)[writer]
    with pytest.raises(TypeError) as info:
        write(value)
    assert str(info.value).startswith(f"`{parameter}` must be a directory path (a str or os.PathLike)")
    assert f"got {value!r}; pass the directory to write" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


@pytest.mark.parametrize("writer", list(_writers(None)))
def test_an_empty_directory_is_refused_and_nothing_lands_in_the_current_one(writer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    model = inject_lora(_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    parameter, write = _writers(model)[writer]
    with pytest.raises(ValueError) as info:
        write("")
    assert str(info.value) == (
        f"`{parameter}`='' is an empty path, which would write into the current directory: pass the directory to write, "
        "e.g. 'runs/exp1/export' (or '.' if the current directory is meant)."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def test_all_linear_leaves_out_the_heads_the_readme_names_and_nothing_else():
    """Bert: every linear but `classifier`, which PEFT leaves out with task_type="SEQ_CLS" and adapts without one."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    from lightning_lora import _matching
    from lightning_lora.inject import find_targets

    model = _bert()
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    ours = set(find_targets(model, LoRAConfig(target_modules="all-linear")))
    assert linears - ours == {"classifier"}
    def peft(task_type):
        config = LoraConfig(target_modules="all-linear", task_type=task_type)
        return set(_maybe_include_all_linear_layers(config, _bert()).target_modules)

    assert ours == peft("SEQ_CLS")
    assert peft(None) == linears
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    stated = re.search(r'`target_modules="all-linear"` adapts every .*?last\s+path component is (.*?) \(', readme, re.S)
    assert stated is not None, "the README no longer says what 'all-linear' leaves out"
    assert set(re.findall(r"`(\w+)`", stated.group(1))) == set(_matching._HEAD_NAMES)
