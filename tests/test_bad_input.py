"""Bad input across the public API: the exception names the parameter, echoes the value, says the fix, and changes nothing.

Each case builds its inputs in ``tmp_path`` and returns ``(trigger, model, directory)``; the test runs
``trigger``, checks the exception type and message, then checks that ``model``'s tensors, module types
and requires_grad, and every file under ``directory``, are byte-identical to before.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
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
from lightning_lora.export import save_merged
from lightning_lora.layers import LoRALinear
from lightning_lora.merge import cast_adapters
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
    Case("rank-pattern-zero", _lora(rank_pattern={"q_proj": 0}), ValueError, ["`rank_pattern['q_proj']`", "got 0", "must be a positive integer"]),
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
    # a PEFT-written file (no lightning_lora metadata) that says DoRA but holds no magnitudes
    Case("load-dora-without-magnitudes", _load_case(target=tiny_llama, edit=lambda d: (_edit_config(lambda c: c.update(use_dora=True))(d), _edit_tensors(lambda t: None)(d))), ValueError, ["missing keys", "q_proj.lora_magnitude", "load it into the model"]),
    Case("load-dora-config-of-another-save", _load_case(target=tiny_llama, edit=_edit_config(lambda c: c.update(use_dora=True))), ValueError, ["`use_dora`=True", "use_dora=False", "different saves", "Re-save"]),
    Case("load-corda", _load_case(target=tiny_llama, edit=_edit_config(lambda c: c.update(init_lora_weights="corda"))), ValueError, ["`init_lora_weights`='corda'", "rewrites the base weights", "Convert it to plain LoRA"]),
    Case("load-int-tensor", _load_case(edit=_edit_tensors(lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}))), ValueError, ["torch.int32", "floating point"]),
    # Lightning: callback, mixin, checkpoints
    Case("callback-r", _callback(r=0), ValueError, ["`r`", "0", "set"]),
    Case("callback-quantize", _callback(quantize="int4"), ValueError, ["`quantize`", "'int4'", "one of ('nf4', 'fp4', 'int8') or None"]),
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


# -- helpers of the second set of cases (issue 13) -----------------------------------------------------
NAN, INF = float("nan"), float("inf")


def _call(make_args: Callable[[Path], tuple[Callable[[], Any], nn.Module | None, Path | None]]) -> Callable[[Path], tuple]:
    return make_args


def _merged(targets=QV, **kwargs) -> nn.Module:
    model = _injected(targets, **kwargs)
    merge_lora(model)
    return model


def _nonfinite(value: float) -> nn.Module:
    model = _injected()
    with torch.no_grad():
        next(t for k, t in adapter_state_dict(model).items() if k.endswith("lora_b.weight")).fill_(value)
    return model


def _tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _peft_wrapped(tmp):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=QV))
    return (lambda: inject_lora(model, LoRAConfig(r=4, target_modules=QV))), model, None


def _edit_metadata(change: Callable[[dict[str, str]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(directory / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
            metadata = dict(handle.metadata())
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        change(metadata)
        save_file(tensors, directory / ADAPTER_WEIGHTS_NAME, metadata=metadata)

    return edit


def _flip_tensor_byte(directory: Path) -> None:
    data = bytearray((directory / ADAPTER_WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0x10  # inside the last tensor: only the checksum can tell
    (directory / ADAPTER_WEIGHTS_NAME).write_bytes(bytes(data))


def _raw_config(text: str) -> Callable[[Path], None]:
    return lambda directory: (directory / ADAPTER_CONFIG_NAME).write_text(text)


_CHECKPOINT: dict[str, bytes] = {}


def _base_checkpoint() -> bytes:
    """One adapter-only checkpoint of a 1-step LoRACallback run, written once per test session."""
    if "bytes" not in _CHECKPOINT:
        module = LlamaLM(build_in="init")
        t = trainer(1, [LoRACallback(r=4, target_modules=QV, backbone="model")])
        t.fit(module, token_loader(n=8))
        buffer = io.BytesIO()
        checkpoint = t._checkpoint_connector.dump_checkpoint(weights_only=False)
        torch.save(checkpoint, buffer)
        _CHECKPOINT["bytes"] = buffer.getvalue()
    return _CHECKPOINT["bytes"]


def _tampered_resume(edit: Callable[[dict], None] | None = None, raw: bytes | None = None, evil: bool = False):
    """Resume a LoRACallback run from the shared checkpoint after ``edit`` changed it (or from ``raw`` bytes)."""

    def make(tmp):
        path = tmp / "ckpt" / "last.ckpt"
        path.parent.mkdir()
        if raw is not None:
            path.write_bytes(raw)
        elif evil:
            checkpoint = torch.load(io.BytesIO(_base_checkpoint()), weights_only=True)
            checkpoint["payload"] = _RunsCode(tmp / "marker")
            torch.save(checkpoint, path)
        else:
            checkpoint = torch.load(io.BytesIO(_base_checkpoint()), weights_only=True)
            edit(checkpoint)
            torch.save(checkpoint, path)
        module = LlamaLM(build_in="init")
        callback = LoRACallback(r=4, target_modules=QV, backbone="model")

        def run():
            try:
                trainer(2, [callback]).fit(module, token_loader(n=8), ckpt_path=str(path))
            finally:
                assert not (tmp / "marker").exists()

        return run, None, path.parent

    return make


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _adapter_key(checkpoint: dict, index: int = 0) -> str:
    return sorted(k for k in checkpoint["state_dict"] if ".lora_" in k)[index]


def _cli_text(text: str, command: str = "fit") -> Callable[[Path], tuple]:
    def make(tmp):
        from lightning_lora import cli

        path = tmp / "cfg" / "config.yaml"
        path.parent.mkdir()
        path.write_text(text)

        def run():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    cli.main([command, "--config", str(path)])
                except SystemExit as exit_:
                    assert exit_.code == 2 and len(err.getvalue().strip().splitlines()) <= 2, err.getvalue()
                    raise CLIExit(err.getvalue()) from None

        return run, None, path.parent

    return make


def _cli_command(make_argv: Callable[[Path], list[str]]) -> Callable[[Path], tuple]:
    def make(tmp):
        from lightning_lora import cli

        argv = make_argv(tmp)

        def run():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    cli.main(argv)
                except SystemExit as exit_:
                    assert exit_.code == 2 and "Traceback" not in err.getvalue(), err.getvalue()
                    raise CLIExit(err.getvalue()) from None

        return run, None, tmp / "data"

    return make


def _merge_argv(tmp: Path) -> list[str]:
    base = tmp / "base"
    tiny_llama().save_pretrained(base)
    adapter = save_adapter(_injected(), tmp / "adapter")
    output = _write(tmp, "out.bin", b"a file")
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(output)]


def _export_argv(tmp: Path) -> list[str]:
    output = _write(tmp, "out.bin", b"a file")
    checkpoint = _write(tmp, "x.ckpt", b"never read")
    return ["export", "--checkpoint", str(checkpoint), "--config", str(Path(__file__).parent.parent / "configs" / "tiny-llama-cpu.yaml"), "--output", str(output)]


def _billion_laughs() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\ntrainer: {max_steps: *a8}\n"


def _peft_field(field: str, value: Any, target=lambda: tiny_llama()) -> Callable[[Path], tuple]:
    return _load_case(target=target, edit=_edit_config(lambda c: c.update({field: value})))


def _failing_export_dir(tmp):
    path = _write(tmp, "export.bin", b"a file")
    module = LlamaLM(build_in="init")
    run = lambda: trainer(1, [LoRACallback(r=4, target_modules=QV, backbone="model", export_dir=str(path))]).fit(module, token_loader(n=4))  # noqa: E731
    return run, module.model, path.parent


CASES += [
    # LoRAConfig / QuantizationConfig / LoRALinear: types and finiteness
    Case("alpha-nan", _lora(alpha=NAN), ValueError, ["`alpha`", "nan", "set"]),
    Case("alpha-inf", _lora(alpha=INF), ValueError, ["`alpha`", "inf", "set"]),
    Case("alpha-minus-inf", _lora(alpha=-INF), ValueError, ["`alpha`", "-inf", "set"]),
    Case("dropout-nan", _lora(dropout=NAN), ValueError, ["`dropout`", "nan", "Use"]),
    Case("use-rslora-string", _lora(use_rslora="false"), TypeError, ["`use_rslora`", "'false'", "must be True or False"]),
    Case("use-rslora-int", _lora(use_rslora=1), TypeError, ["`use_rslora`", "1", "must be True or False"]),
    Case("alpha-pattern-nan", _lora(alpha_pattern={"q_proj": NAN}), ValueError, ["`alpha_pattern['q_proj']`", "nan", "Set it"]),
    Case("alpha-pattern-inf", _lora(alpha_pattern={"q_proj": INF}), ValueError, ["`alpha_pattern['q_proj']`", "inf", "Set it"]),
    Case("modules-to-save-int", _lora(modules_to_save=5), TypeError, ["`modules_to_save`", "5", "Pass"]),
    Case("target-lookahead-nested", _lora(target_modules=r"(?=(a+)+b)(a+)+c"), ValueError, ["`target_modules`", "'(?=(a+)+b)(a+)+c'", "bounded time", "Simplify"]),
    Case("target-backreference-nested", _lora(target_modules=r"(a+)+\1"), ValueError, ["`target_modules`", "bounded time", "Simplify"]),
    Case("target-nested-300", _lora(target_modules="(" * 300 + "a" + ")" * 300), ValueError, ["`target_modules`", "levels deep", "Simplify"]),
    Case("rank-pattern-hostile-key", _lora(rank_pattern={r"(?=(a+)+b)(a+)+c": 4}), ValueError, ["`rank_pattern`", "bounded time", "Simplify"]),
    Case("quant-compute-dtype-list", _quant(compute_dtype=["bf16"]), ValueError, ["`compute_dtype`", "['bf16']", "one of"]),
    Case("lora-linear-r-zero", lambda tmp: (lambda: LoRALinear(nn.Linear(32, 32), r=0, alpha=8), None, None), ValueError, ["`r`", "0", "Set"]),
    Case("lora-linear-alpha-nan", lambda tmp: (lambda: LoRALinear(nn.Linear(32, 32), r=4, alpha=NAN), None, None), ValueError, ["`alpha`", "nan", "Set"]),
    Case("lora-linear-rslora-string", lambda tmp: (lambda: LoRALinear(nn.Linear(32, 32), r=4, alpha=8, use_rslora="no"), None, None), TypeError, ["`use_rslora`", "'no'", "must be True or False"]),
    # LoRACallback options
    Case("callback-adapter-only-string", _callback(adapter_only_checkpoint="yes"), TypeError, ["`adapter_only_checkpoint`", "'yes'", "must be True or False"]),
    Case("callback-skip-nonfinite-string", _callback(skip_nonfinite="no"), TypeError, ["`skip_nonfinite`", "'no'", "must be True or False"]),
    Case("callback-merge-on-export-string", _callback(merge_on_export="true"), TypeError, ["`merge_on_export`", "'true'", "must be True or False"]),
    Case("callback-export-dir-int", _callback(export_dir=5), TypeError, ["`export_dir`", "5", "pass"]),
    Case("callback-rslora-string", _callback(use_rslora="false"), TypeError, ["`use_rslora`", "'false'", "must be True or False"]),
    Case("callback-export-dir-is-a-file", _failing_export_dir, ValueError, ["`export_dir`", "export.bin", "is a file", "Pass a directory path"]),
    # loading an adapter: the scale, merged models, PEFT fields, the two files against each other
    Case("load-other-alpha", _load_case(source=lambda: _injected(alpha=32)), ValueError, ["scale", "lora_alpha=32", "alpha=16", "Inject LoRA with the adapter's"]),
    Case("load-other-rslora", _load_case(source=lambda: _injected(use_rslora=True)), ValueError, ["scale", "use_rslora=True", "Inject LoRA with the adapter's"]),
    Case("load-other-alpha-pattern", _load_case(source=lambda: _injected(alpha_pattern={"v_proj": 64})), ValueError, ["scale", "v_proj", "lora_alpha=64", "Inject LoRA with"]),
    Case("load-into-merged", _load_case(target=_merged), ValueError, ["`load_adapter`", "merged", "Call `unmerge_lora(model)` first"]),
    Case("cast-merged", lambda tmp: (lambda m: ((lambda: cast_adapters(m, torch.bfloat16)), m, None))(_merged()), ValueError, ["`cast_adapters`", "merged", "Call `unmerge_lora(model)` first"]),
    Case("peft-layers-to-transform", _peft_field("layers_to_transform", [0]), ValueError, ["`layers_to_transform`", "[0]", "export it"]),
    Case("peft-loftq", _peft_field("loftq_config", {"loftq_bits": 4}), ValueError, ["`loftq_config`", "{'loftq_bits': 4}", "export it"]),
    # PiSSA / OLoRA are implemented (they run again on load); other base-rewriting inits stay refused, and a PiSSA
    # adapter does not load into LoRA injected with another init (it applies to the residual base).
    Case("peft-init-loftq", _peft_field("init_lora_weights", "loftq"), ValueError, ["`init_lora_weights`", "'loftq'", "Convert it to plain LoRA"]),
    Case("peft-init-pissa-niter-bad", _peft_field("init_lora_weights", "pissa_niter_x"), ValueError, ["`init_lora_weights`='pissa_niter_x'", "K is a positive integer"]),
    Case("peft-init-pissa-into-injected", _peft_field("init_lora_weights", "pissa", target=lambda: _injected()), ValueError, ["init='pissa'", "init='kaiming'", "Load it into a model without LoRA"]),
    Case("peft-target-parameters", _peft_field("target_parameters", ["mlp.experts.gate_up_proj"]), ValueError, ["`target_parameters`", "gate_up_proj", "matches no parameter"]),
    Case("peft-alora", _peft_field("alora_invocation_tokens", [1, 2]), ValueError, ["`alora_invocation_tokens`", "[1, 2]", "export it"]),
    Case("peft-weight-tying", _peft_field("ensure_weight_tying", True), ValueError, ["`ensure_weight_tying`", "True", "export it"]),
    Case("peft-lora-bias", _peft_field("lora_bias", True), ValueError, ["`lora_bias`", "True", "export it"]),
    Case("peft-eva", _peft_field("eva_config", {"rho": 2.0}), ValueError, ["`eva_config`", "{'rho': 2.0}", "export it"]),
    Case("peft-layer-replication", _peft_field("layer_replication", [[0, 1]]), ValueError, ["`layer_replication`", "[[0, 1]]", "export it"]),
    Case("peft-qalora", _peft_field("use_qalora", True), ValueError, ["`use_qalora`", "True", "export it"]),
    Case("peft-unknown-field", _peft_field("future_scaling", 2.0), ValueError, ["`future_scaling`", "2.0", "Remove it"]),
    # use_dora is implemented: a PEFT file (no metadata) that says DoRA does not load into LoRA injected without it
    Case("peft-dora-into-injected", _load_case(edit=lambda d: (_edit_config(lambda c: c.update(use_dora=True))(d), _edit_tensors(lambda t: None)(d))), ValueError, ["`use_dora`=True", "use_dora=False", "Load it into a model without LoRA"]),
    Case("load-config-weights-mismatch", _load_case(edit=_edit_config(lambda c: c.update(lora_alpha=32))), ValueError, ["`lora_alpha`=32", "lora_alpha=16", "different saves", "Re-save"]),
    Case("load-config-dropout-mismatch", _load_case(edit=_edit_config(lambda c: c.update(lora_dropout=0.3))), ValueError, ["`lora_dropout`=0.3", "different saves", "Re-save"]),
    Case("load-config-r-deleted", _load_case(edit=_edit_config(lambda c: c.pop("r"))), ValueError, ["`r`=None", "r=4", "Re-save"]),
    Case("load-rslora-string-in-file", _load_case(target=tiny_llama, edit=_edit_config(lambda c: c.update(use_rslora="false"))), TypeError, ["`use_rslora`='false'", "adapter_config.json", "must be True or False"]),
    Case("load-alpha-nan-in-file", _load_case(target=tiny_llama, edit=_edit_config(lambda c: c.update(lora_alpha=NAN))), ValueError, ["`lora_alpha`=nan", "adapter_config.json", "Set it"]),
    Case("load-flipped-tensor-byte", _load_case(edit=_flip_tensor_byte), ValueError, [ADAPTER_WEIGHTS_NAME, "checksum", "Re-export"]),
    Case("load-damaged-metadata", _load_case(edit=_edit_metadata(lambda m: m.update(lora_config="not json"))), ValueError, [ADAPTER_WEIGHTS_NAME, "`lora_config`", "Re-export"]),
    Case("load-renamed-metadata", _load_case(edit=_edit_metadata(lambda m: m.update(tensors_sha257=m.pop("tensors_sha256")))), ValueError, [ADAPTER_WEIGHTS_NAME, "`tensors_sha257`", "Re-export"]),
    Case("load-nan-tensor", _load_case(edit=_edit_tensors(lambda t: next(v for k, v in sorted(t.items()) if "lora_A" in k).fill_(NAN))), ValueError, ["NaN/Inf", "lora_a.weight", "restore"]),
    Case("load-inf-tensor", _load_case(edit=_edit_tensors(lambda t: next(v for k, v in sorted(t.items()) if "lora_B" in k).fill_(-INF))), ValueError, ["NaN/Inf", "lora_b.weight", "restore"]),
    Case("load-config-json-list", _load_case(edit=_raw_config("[1, 2]")), ValueError, [ADAPTER_CONFIG_NAME, "JSON list", "re-export"]),
    Case("load-config-json-deep", _load_case(edit=_raw_config("[" * 100_000 + "]" * 100_000)), ValueError, [ADAPTER_CONFIG_NAME, "not valid JSON", "re-export"]),
    Case("load-hostile-regex-in-file", _load_case(target=tiny_llama, edit=_edit_config(lambda c: c.update(target_modules="(a+)+$"))), ValueError, ["`target_modules`", "'(a+)+$'", "pick"]),
    Case("load-lookahead-regex-in-file", _load_case(target=tiny_llama, edit=_edit_config(lambda c: c.update(target_modules=r"(?=(a+)+b)(a+)+c"))), ValueError, ["`target_modules`", "bounded time", "Simplify"]),
    # injection: tied heads, PEFT models
    Case("tied-head-in-modules-to-save", _inject(LoRAConfig(target_modules=QV, modules_to_save=["lm_head"]), build=_tied_llama), ValueError, ["`modules_to_save`", "'lm_head.weight'", "tied to", "Add 'embed_tokens'"]),
    Case("inject-into-peft-model", _peft_wrapped, ValueError, ["`inject_lora`", "PEFT", "merge_and_unload"]),
    # writers: non-finite adapters are never written, files are not directories
    # (model None: NaN never equals itself, so the snapshot comparison cannot be used; nothing writes to the model)
    Case("save-nan-adapter", lambda tmp: (lambda m: ((lambda: save_adapter(m, tmp / "out")), None, tmp))(_nonfinite(NAN)), ValueError, ["NaN/Inf", "lora_b.weight", "nothing was written"]),
    Case("save-inf-adapter", lambda tmp: (lambda m: ((lambda: save_adapter(m, tmp / "out")), m, tmp))(_nonfinite(INF)), ValueError, ["NaN/Inf", "lora_b.weight", "nothing was written"]),
    Case("save-merged-nan-adapter", lambda tmp: (lambda m: ((lambda: save_merged(m, tmp / "out")), None, tmp))(_nonfinite(NAN)), ValueError, ["NaN/Inf", "lora_b.weight", "nothing was written"]),
    Case("save-merged-into-a-file", lambda tmp: (lambda m, f: ((lambda: save_merged(m, f)), m, f.parent))(_injected(), _write(tmp, "m.bin", b"x")), ValueError, ["`directory`", "m.bin", "directory path"]),
    Case("cli-merge-output-is-a-file", _cli_command(_merge_argv), CLIExit, ["--output", "out.bin", "is a file", "Pass a directory path"]),
    Case("cli-export-output-is-a-file", _cli_command(_export_argv), CLIExit, ["--output", "out.bin", "is a file", "Pass a directory path"]),
    # resuming from damaged or tampered checkpoints
    Case("resume-metadata-no-fingerprint", _tampered_resume(lambda c: c["lightning_lora"].pop("fingerprint")), ValueError, ["['fingerprint']", "missing", "Resume from another checkpoint"]),
    Case("resume-metadata-not-a-dict", _tampered_resume(lambda c: c.update(lightning_lora=[1, 2])), ValueError, ["['lightning_lora']", "list", "Resume from another checkpoint"]),
    Case("resume-lora-config-not-a-dict", _tampered_resume(lambda c: c["lightning_lora"].update(lora_config="r=4")), ValueError, ["['lora_config']", "'r=4'", "Resume from another checkpoint"]),
    Case("resume-state-dict-not-a-dict", _tampered_resume(lambda c: c.update(state_dict=[1])), ValueError, ["'state_dict'", "list", "damaged"]),
    Case("resume-backbone-tensor", _tampered_resume(lambda c: c["state_dict"].update({"model.model.embed_tokens.weight": torch.zeros(128, 64)})), ValueError, ["not the adapter", "'model.model.embed_tokens.weight'", "overwrite the frozen backbone", "resume from a checkpoint"]),
    Case("resume-nan-adapter", _tampered_resume(lambda c: c["state_dict"][_adapter_key(c)].fill_(NAN)), ValueError, ["NaN/Inf", "lora_a.weight", "restore"]),
    Case("resume-int-adapter", _tampered_resume(lambda c: c["state_dict"].update({_adapter_key(c): c["state_dict"][_adapter_key(c)].to(torch.int32)})), ValueError, ["torch.int32", "floating point"]),
    Case("resume-list-adapter", _tampered_resume(lambda c: c["state_dict"].update({_adapter_key(c): [0.0]})), ValueError, ["is a list", "not a tensor", "damaged"]),
    Case("resume-garbage-file", _tampered_resume(raw=b"\x00garbage" * 100), ValueError, ["last.ckpt", "truncated or corrupted", "Resume from"]),
    Case("resume-empty-file", _tampered_resume(raw=b""), ValueError, ["last.ckpt", "truncated or corrupted", "Resume from"]),
    Case("resume-crafted-pickle", _tampered_resume(evil=True), ValueError, ["posix.system", "nothing of it was run", "Use a checkpoint you wrote"]),
    # YAML configs that expand or nest without bound
    Case("yaml-billion-laughs", _cli_text(_billion_laughs()), CLIExit, ["100,000 values", "aliases", "Write the values out"]),
    Case("yaml-deep-nesting", _cli_text("trainer: " + "[" * 150 + "1" + "]" * 150 + "\n"), CLIExit, ["nests more than 100 levels", "flatten"]),
    Case("yaml-self-referencing-merge", _cli_text("a: &a {x: 1}\nb: &b {<<: *a, y: [*a, *a, *a, *a, *a, *a, *a, *a]}\n" + "".join(f"c{i}: &c{i} [{', '.join([f'*c{i - 1}' if i else '*b'] * 8)}]\n" for i in range(8))), CLIExit, ["100,000 values", "Write the values out"]),
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


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100 and len({case.id for case in CASES}) == len(CASES)


def test_merging_twice_is_a_no_op():
    model = _injected()
    merge_lora(model)
    once = model_snapshot(model)
    merge_lora(model)
    assert_unchanged(model, once)
