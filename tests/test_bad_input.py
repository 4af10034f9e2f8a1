"""Bad input across the public API: the exception names the parameter, echoes the value, says the fix, and changes nothing.

Each case builds its inputs in ``tmp_path`` and returns ``(trigger, model, directory)``; the test runs
``trigger``, checks the exception type and message, then checks that ``model``'s tensors, module types
and requires_grad, and every file under ``directory``, are byte-identical to before.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _lightning import LlamaLM, MixinLlamaLM, token_loader, trainer
from _models import assert_unchanged, model_snapshot, randomize_adapter, tiny_bert_classifier, tiny_gpt2, tiny_llama
from lightning_lora import (
    LoRACallback,
    LoRAConfig,
    QuantizationConfig,
    adapter_state_dict,
    inject_lora,
    load_adapter,
    merge_lora,
    quantize_model,
    save_adapter,
)
from lightning_lora.adapters import add_adapter, delete_adapter, per_sample_adapters, set_active_adapter
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.data import InstructionDataModule, TextClassificationDataModule, TextDataModule
from test_data import word_tokenizer

QV = ["q_proj", "v_proj"]


class CLIExit(Exception):
    """``lightning_lora.cli.main`` exited; the message is what it printed to stderr."""


@dataclass
class Case:
    """``says``: the parameter, the value's repr, then the fix (a verb, or the valid choices the message lists)."""

    id: str
    make: Callable[[Path], tuple[Callable[[], Any], nn.Module | None, Path | None]]
    error: type[BaseException]
    says: list[str]


def _lora(**kwargs) -> Callable[[Path], tuple]:
    return lambda tmp: (lambda: LoRAConfig(**kwargs), None, None)


def _quant(**kwargs) -> Callable[[Path], tuple]:
    return lambda tmp: (lambda: QuantizationConfig(**kwargs), None, None)


def _callback(**kwargs) -> Callable[[Path], tuple]:
    return lambda tmp: (lambda: LoRACallback(**kwargs), None, None)


def _inject(config: LoRAConfig | Any, quantization: Any = None, build=tiny_llama) -> Callable[[Path], tuple]:
    def make(tmp):
        model = build()
        return (lambda: inject_lora(model, config, quantization)), model, None

    return make


def _injected(targets=QV, r=4, build=tiny_llama, **kwargs) -> nn.Module:
    model = inject_lora(build(), LoRAConfig(r=r, target_modules=targets, **kwargs))
    randomize_adapter(model)
    return model


def _load_into(tmp: Path, source: nn.Module, target: nn.Module, edit: Callable[[Path], None] = lambda d: None) -> tuple:
    save_adapter(source, tmp / "adapter")
    edit(tmp / "adapter")
    return (lambda: load_adapter(target, tmp / "adapter")), target, tmp / "adapter"


def _edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        tensors = load_file(directory / ADAPTER_WEIGHTS_NAME)
        change(tensors)
        save_file(tensors, directory / ADAPTER_WEIGHTS_NAME)

    return edit


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
        change(config)
        (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _truncate(directory: Path) -> None:
    data = (directory / ADAPTER_WEIGHTS_NAME).read_bytes()
    (directory / ADAPTER_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _garble(directory: Path) -> None:
    (directory / ADAPTER_WEIGHTS_NAME).write_bytes(b"\x00\xffnot safetensors at all" * 10)


def _load_case(source=lambda: _injected(), target=lambda: _injected(), edit=lambda d: None):
    return lambda tmp: _load_into(tmp, source(), target(), edit)


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / "data" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def _datamodule(cls, name: str, data: bytes, **kwargs) -> Callable[[Path], tuple]:
    def make(tmp):
        path = _write(tmp, name, data)
        return (lambda: cls(str(path), word_tokenizer(), **kwargs).setup("fit")), None, path.parent

    return make


def _cli(config: dict) -> Callable[[Path], tuple]:
    def make(tmp):
        import yaml

        from lightning_lora import cli

        path = tmp / "cfg" / "config.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(config))

        def run():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    cli.main(["fit", "--config", str(path)])
                except SystemExit:
                    raise CLIExit(err.getvalue()) from None

        return run, None, path.parent

    return make


_CLI_BASE = {
    "model": {"class_path": "lightning_lora.tasks.CausalLMModule", "init_args": {"model": {"model_type": "llama", "vocab_size": 64}}},
    "trainer": {"accelerator": "cpu", "max_steps": 1},
}


def _fit_resume(save_kwargs: dict, resume_kwargs: dict, resume_model=lambda: LlamaLM(build_in="init"), corrupt: bool = False):
    def make(tmp):
        module = LlamaLM(build_in="init")
        t = trainer(1, [LoRACallback(**{"r": 4, "target_modules": QV, "backbone": "model", **save_kwargs})])
        t.fit(module, token_loader(n=8))
        path = tmp / "ckpt" / "last.ckpt"
        t.save_checkpoint(path)
        if corrupt:
            path.write_bytes(path.read_bytes()[:1000])
        other = resume_model()
        callback = LoRACallback(**{"r": 4, "target_modules": QV, "backbone": "model", **resume_kwargs})
        return (lambda: trainer(2, [callback]).fit(other, token_loader(n=8), ckpt_path=str(path))), None, path.parent

    return make


def _no_bitsandbytes(tmp):
    from lightning_lora import quantization

    model = tiny_llama()

    def run():
        def broken():
            raise RuntimeError("bitsandbytes missing") from ImportError("No module named 'bitsandbytes'")

        original = quantization._bnb
        quantization._bnb = broken
        try:
            inject_lora(model, LoRAConfig(target_modules=QV), QuantizationConfig(mode="nf4"))
        finally:
            quantization._bnb = original

    return run, model, None


class _NoConfig(MixinLlamaLM):
    def __init__(self):
        super().__init__(lora_config=None, build_in="init")


CASES = [
    # LoRAConfig
    Case("r-zero", _lora(r=0), ValueError, ["`r`", "0", "set"]),
    Case("r-negative", _lora(r=-4), ValueError, ["`r`", "-4", "set"]),
    Case("r-string", _lora(r="8"), ValueError, ["`r`", "'8'", "set"]),
    Case("r-bool", _lora(r=True), ValueError, ["`r`", "True", "set"]),
    Case("alpha-zero", _lora(alpha=0), ValueError, ["`alpha`", "0", "set"]),
    Case("alpha-string", _lora(alpha="16"), ValueError, ["`alpha`", "'16'", "set"]),
    Case("dropout-one", _lora(dropout=1.0), ValueError, ["`dropout`", "1.0", "Use"]),
    Case("dropout-negative", _lora(dropout=-0.1), ValueError, ["`dropout`", "-0.1", "Use"]),
    Case("bias-mode", _lora(bias="some"), ValueError, ["`bias`", "'some'", "one of ('none', 'all', 'lora_only')"]),
    Case("init-mode", _lora(init="xavier"), ValueError, ["`init`", "'xavier'", "one of ('kaiming', 'gaussian', 'pissa', 'olora', 'pissa_niter_<K>')"]),
    Case("use-dora-not-bool", _lora(use_dora=1), TypeError, ["`use_dora`", "got 1", "True or False"]),
    Case("init-pissa-on-nf4", _inject(LoRAConfig(init="pissa", target_modules=QV), QuantizationConfig(mode="nf4")), ValueError, ["`init`='pissa'", "quantized", "Initialise on the full-precision model"]),
    Case("init-pissa-on-prequantized", _inject(LoRAConfig(init="pissa_niter_2", target_modules=QV), build=lambda: quantize_model(tiny_llama(), QuantizationConfig(mode="int8"))), ValueError, ["`init`='pissa_niter_2'", "quantized", "use init='olora'"]),
    Case("init-olora-conv1d", _inject(LoRAConfig(init="olora", target_modules=["c_attn"]), build=tiny_gpt2), ValueError, ["`init`='olora'", "Conv1D", "Use init='pissa'"]),
    Case("init-pissa-rank-too-big", _inject(LoRAConfig(r=96, init="pissa", target_modules=QV)), ValueError, ["`init`='pissa'", "r=96", "lower `r`"]),
    Case("adapter-name", lambda tmp: (lambda m: ((lambda: inject_lora(m, LoRAConfig(target_modules=QV), adapter_name="a.b")), m, None))(tiny_llama()), ValueError, ["`adapter_name`", "'a.b'", "Name adapters"]),
    Case("add-adapter-duplicate", lambda tmp: (lambda m: ((lambda: add_adapter(m, "default", LoRAConfig(target_modules=QV))), m, None))(_injected()), ValueError, ["'default'", "['default']", "pick another name"]),
    Case("add-adapter-modules-to-save", lambda tmp: (lambda m: ((lambda: add_adapter(m, "b", LoRAConfig(target_modules=QV, modules_to_save=["lm_head"]))), m, None))(_injected()), ValueError, ["'b'", "`modules_to_save`=['lm_head']", "Use bias='none'"]),
    Case("add-adapter-over-pissa", lambda tmp: (lambda m: ((lambda: add_adapter(m, "b", LoRAConfig(target_modules=["q_proj"]))), m, None))(_injected(init="pissa")), ValueError, ["init='pissa'", "'model.layers.0.self_attn.q_proj'", "convert the PiSSA / OLoRA adapter"]),
    Case("set-active-unknown", lambda tmp: (lambda m: ((lambda: set_active_adapter(m, "sql")), m, None))(_injected()), ValueError, ["`adapter_name`", "'sql'", "it has ['default']"]),
    Case("delete-active", lambda tmp: (lambda m: ((lambda: delete_adapter(m, "default")), m, None))(_injected()), ValueError, ["`adapter_name`", "'default'", "only adapter"]),
    Case("per-sample-unknown", lambda tmp: (lambda m: ((lambda: per_sample_adapters(m, ["default", "sql"]).__enter__()), m, None))(_injected()), ValueError, ["`names`", "['sql']", "use ['default'] or '__base__'"]),
    Case("save-convert-without-pissa", lambda tmp: (lambda m: ((lambda: save_adapter(m, tmp / "out", convert_to_lora=True)), m, tmp))(_injected()), ValueError, ["`convert_to_lora`=True", "init=['kaiming']", "Save them without convert_to_lora"]),
    Case("save-convert-dora", lambda tmp: (lambda m: ((lambda: save_adapter(m, tmp / "out", convert_to_lora=True)), m, tmp))(_injected(init="olora", use_dora=True)), ValueError, ["`use_dora`=True", "magnitude", "Save the adapter as it is"]),
    Case("callback-convert-without-pissa", _callback(convert_init_on_export=True), ValueError, ["`convert_init_on_export`=True", "`init`='kaiming'", "use init='pissa'"]),
    Case("callback-adapter-name", _callback(adapter_name=""), ValueError, ["`adapter_name`", "''", "Name adapters"]),
    Case("target-empty", _lora(target_modules=[]), ValueError, ["`target_modules`", "[]", "use"]),
    Case("target-bad-regex", _lora(target_modules="q_proj("), ValueError, ["`target_modules`", "'q_proj('", "Escape"]),
    Case("target-not-str", _lora(target_modules=[3]), TypeError, ["`target_modules`", "[3]", "pass"]),
    Case("rank-pattern-zero", _lora(rank_pattern={"q_proj": 0}), ValueError, ["`rank_pattern['q_proj']`", "got 0", "must be a positive number"]),
    Case("rank-pattern-list", _lora(rank_pattern=["q_proj"]), TypeError, ["`rank_pattern`", "['q_proj']", "pass"]),
    # QuantizationConfig
    Case("quant-mode", _quant(mode="int4"), ValueError, ["`mode`", "'int4'", "one of ('nf4', 'fp4', 'int8')"]),
    Case("quant-double-quant", _quant(double_quant="yes"), TypeError, ["`double_quant`", "'yes'", "must be True or False"]),
    Case("quant-compute-dtype", _quant(compute_dtype="float64"), ValueError, ["`compute_dtype`", "'float64'", "one of ['bfloat16', 'float16', 'float32']"]),
    Case("quant-storage", _quant(quant_storage="int4"), ValueError, ["`quant_storage`", "'int4'", "must be 'uint8', 'bfloat16'"]),
    # inject_lora
    Case("target-matches-nothing", _inject(LoRAConfig(target_modules=["query"])), ValueError, ["`target_modules`", "['query']", "q_proj", "use"]),
    Case("target-not-linear", _inject(LoRAConfig(target_modules=["embed_tokens"])), ValueError, ["`target_modules`", "['embed_tokens']", "Embedding", "narrow"]),
    Case("modules-to-save-missing", _inject(LoRAConfig(target_modules=QV, modules_to_save=["classifier"])), ValueError, ["`modules_to_save`", "'classifier'", "name one"]),
    Case("config-not-loraconfig", _inject({"r": 8}), TypeError, ["`config`", "dict", "build one"]),
    Case("quantization-wrong-type", _inject(LoRAConfig(target_modules=QV), "nf4"), TypeError, ["`quantization_config`", "'nf4'", "pass"]),
    Case("quantization-without-bitsandbytes", _no_bitsandbytes, ValueError, ["`quantization_config`", "mode='nf4'", "Install", "bitsandbytes"]),
    Case("inject-twice", lambda tmp: (lambda m: ((lambda: inject_lora(m, LoRAConfig(target_modules=QV))), m, None))(_injected()), ValueError, ["`inject_lora`", "twice", "fresh model"]),
    # save / load adapter
    Case("save-without-lora", lambda tmp: (lambda m: ((lambda: save_adapter(m, tmp / "out")), m, None))(tiny_llama()), ValueError, ["`save_adapter`", "inject_lora", "call"]),
    Case("save-into-a-file", lambda tmp: (lambda m, f: ((lambda: save_adapter(m, f)), m, f.parent))(_injected(), _write(tmp, "x.bin", b"x")), ValueError, ["`directory`", "x.bin", "directory path"]),
    Case("load-missing-dir", lambda tmp: (lambda m: ((lambda: load_adapter(m, tmp / "nowhere")), m, None))(_injected()), FileNotFoundError, ["`directory`", "nowhere", "adapter_config.json"]),
    Case("load-other-rank", _load_case(source=lambda: _injected(r=8)), ValueError, ["lora_a.weight", "(8, 64)", "(4, 64)", "r=8", "build the model with"]),
    Case("load-wrong-shape", _load_case(edit=_edit_tensors(lambda t: t.update({k: torch.zeros(4, 7) for k in list(t)[:1]}))), ValueError, ["has shape", "(4, 7)", "in the model"]),
    Case("load-missing-keys", _load_case(source=lambda: _injected(targets=["q_proj"])), ValueError, ["missing keys", "v_proj.lora_a.weight", "load it into the model"]),
    Case("load-extra-keys", _load_case(target=lambda: _injected(targets=["q_proj"])), ValueError, ["unexpected keys", "v_proj.lora_a.weight", "load it into the model"]),
    Case("load-other-architecture", _load_case(source=lambda: _injected(targets=["c_attn"], build=tiny_gpt2)), ValueError, ["missing keys", "c_attn", "load it into the model"]),
    Case("load-into-fresh-other-architecture", _load_case(source=lambda: _injected(targets=["c_attn"], build=tiny_gpt2), target=tiny_llama), ValueError, ["`target_modules`", "['c_attn']", "q_proj", "use"]),
    Case("load-truncated-safetensors", _load_case(edit=_truncate), ValueError, [ADAPTER_WEIGHTS_NAME, "truncated or corrupted", "Re-export"]),
    Case("load-garbage-safetensors", _load_case(edit=_garble), ValueError, [ADAPTER_WEIGHTS_NAME, "truncated or corrupted", "Re-export"]),
    Case("load-corrupt-config-json", _load_case(edit=lambda d: (d / ADAPTER_CONFIG_NAME).write_text('{"r": 4,')), ValueError, [ADAPTER_CONFIG_NAME, "not valid JSON", "re-export"]),
    Case("load-not-lora", _load_case(edit=_edit_config(lambda c: c.update(peft_type="IA3"))), ValueError, ["peft_type", "'IA3'", "only LoRA"]),
    Case("load-dora-without-magnitudes", _load_case(target=tiny_llama, edit=_edit_config(lambda c: c.update(use_dora=True))), ValueError, ["missing keys", "q_proj.lora_magnitude", "load it into the model"]),
    Case("load-corda", _load_case(target=tiny_llama, edit=_edit_config(lambda c: c.update(init_lora_weights="corda"))), ValueError, ["`init_lora_weights`='corda'", "rewrites the base weights", "Convert it to plain LoRA"]),
    Case("load-int-tensor", _load_case(edit=_edit_tensors(lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}))), ValueError, ["torch.int32", "floating point"]),
    # Lightning: callback, mixin, checkpoints
    Case("callback-r", _callback(r=0), ValueError, ["`r`", "0", "set"]),
    Case("callback-quantize", _callback(quantize="int4"), ValueError, ["`mode`", "'int4'", "one of ('nf4', 'fp4', 'int8')"]),
    Case("callback-backbone-empty", _callback(backbone=""), ValueError, ["`backbone`", "''", "e.g. 'model'"]),
    Case("callback-max-nonfinite", _callback(max_nonfinite_steps=0), ValueError, ["`max_nonfinite_steps`", "0", "set"]),
    Case("callback-backbone-missing", lambda tmp: (lambda m: ((lambda: trainer(1, [LoRACallback(backbone="net")]).fit(m, token_loader(n=4))), m.model, None))(LlamaLM(build_in="init")), ValueError, ["`backbone`", "'net'", "Name the attribute"]),
    Case("mixin-no-config", lambda tmp: (lambda m: ((lambda: trainer(1).fit(m, token_loader(n=4))), m.model, None))(_NoConfig()), ValueError, ["lora_config", "None", "Set it"]),
    Case("resume-other-rank", _fit_resume({}, {"r": 8}), ValueError, ["`r`=4", "`r`=8", "Set `r`=4"]),
    Case("resume-other-targets", _fit_resume({}, {"target_modules": ["q_proj"]}), ValueError, ["`target_modules`", "['q_proj', 'v_proj']", "Set"]),
    Case("resume-other-init", _fit_resume({"init": "olora"}, {}), ValueError, ["`init`='olora'", "`init`='kaiming'", "Set `init`='olora'"]),
    Case("resume-other-base-model", _fit_resume({}, {}, resume_model=lambda: _BiggerLM()), ValueError, ["another backbone", "fingerprint", "same base model"]),
    Case("resume-truncated-checkpoint", _fit_resume({}, {}, corrupt=True), RuntimeError, ["last.ckpt", "truncated or corrupted", "Resume from"]),
    # CLI / YAML
    Case("yaml-unknown-key", _cli({**_CLI_BASE, "trainer": {**_CLI_BASE["trainer"], "max_stepz": 1}}), CLIExit, ["max_stepz"]),
    Case("yaml-wrong-type", _cli({**_CLI_BASE, "trainer": {**_CLI_BASE["trainer"], "max_steps": "many"}}), CLIExit, ["max_steps", "many"]),
    # data modules
    Case("data-missing-column", _datamodule(TextClassificationDataModule, "a.csv", b"text,lbl\nw1 w2,good\nw3,bad\nw4,good\n"), ValueError, ["label_column='label'", "['text', 'lbl']", "Pass label_column="]),
    Case("data-empty-file", _datamodule(TextDataModule, "a.txt", b""), ValueError, ["path", "a.txt", "has no text", "add text"]),
    Case("data-non-utf8", _datamodule(TextDataModule, "a.txt", b"w1 w2 \xff\xfe w3\n" * 4), ValueError, ["encoding_errors='strict'", "0xff", "pass"]),
    Case("data-unseen-label", _datamodule(TextClassificationDataModule, "a.csv", b"text,label\nw1,good\nw2,bad\nw3,meh\n", labels=["good", "bad"]), ValueError, ["unseen label 'meh'", "labels=['good', 'bad']", "add it to labels"]),
    Case("data-missing-response", _datamodule(InstructionDataModule, "a.jsonl", b'{"prompt": "w1"}\n{"prompt": "w2"}\n{"prompt": "w3"}\n'), ValueError, ["response_column='response'", "['prompt']", "Pass response_column="]),
]


class _BiggerLM(LlamaLM):
    def __init__(self):
        super().__init__(build_in="init")
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(config)


def _files(directory: Path | None) -> dict[str, bytes]:
    if directory is None or not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_raises_a_clear_error_and_changes_nothing(case, tmp_path):
    trigger, model, directory = case.make(tmp_path)
    snapshot = model_snapshot(model) if model is not None else None
    files = _files(directory)
    with pytest.raises(case.error) as info:
        trigger()
    message = str(info.value)
    # The parameter and the value match exactly; the fix word (last) in any case: "Set it" or "set `r`".
    *exact, fix = case.says
    missing = [text for text in exact if text not in message] + ([fix] if fix.lower() not in message.lower() else [])
    assert not missing, f"message lacks {missing}: {message}"
    if model is not None:
        assert_unchanged(model, snapshot)
    assert _files(directory) == files


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


def test_merging_twice_is_a_no_op():
    model = _injected()
    merge_lora(model)
    once = model_snapshot(model)
    merge_lora(model)
    assert_unchanged(model, once)
