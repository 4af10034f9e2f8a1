"""The ``lightning-lora`` command.

``fit`` / ``validate`` / ``test`` / ``predict`` are Lightning's CLI, configured from YAML with the
LoRACallback in ``trainer.callbacks``::

    lightning-lora fit --config configs/minilm-sentiment-qlora.yaml
    lightning-lora fit --config configs/tiny-llama-cpu.yaml --print_config

Three more commands are dispatched before Lightning's parser sees the arguments::

    lightning-lora export   --checkpoint CKPT --config CFG --output DIR [--merged]
    lightning-lora merge    --base MODEL_DIR_OR_CFG --adapter DIR --output DIR
    lightning-lora estimate --model CONFIG_JSON [--quantization nf4 --r 16 --batch-size 2 --seq-len 2048 ...]

Any string ``pkg://<package>/<path>`` in a config is replaced by that path inside the installed
package before anything is built (see ``lightning_lora.tasks._paths``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that short class names work on the command line: --model CausalLMModule, --data TextDataModule.
import lightning_lora.data
import lightning_lora.tasks  # noqa: F401
from lightning_lora.tasks._paths import resolve_path, resolve_paths

_DESCRIPTION = (
    "LoRA / QLoRA fine-tuning with PyTorch Lightning. Subcommands fit/validate/test/predict take a YAML "
    "config (--config); `lightning-lora export|merge|estimate --help` describe the other commands."
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


class CLIError(Exception):
    """A problem with the command line or the config; ``main`` prints it without a traceback."""


class LoRAArgumentParser(LightningArgumentParser):
    """Lightning's parser, with jsonargparse's nested Union report cut down to the key, the value and the problem."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{prog}: error: {condense_error(message)}\n"
            f"  See `{prog} --help` for the accepted options, or add --print_config to print a valid config.\n"
        )
        raise SystemExit(2)


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "- Expected a <class 'NoneType'>",
    "Not a valid subclass of",
    "Subclass types expect one of",
    "- a class path (str)",
    "- a dict with class_path entry",
    "- a dict without class_path but with init_args entry",
    "- a dict with parameters accepted by the base class",
)


def condense_error(message: str) -> str:
    """``'model.init_args.lr (lightning_lora.tasks.CausalLMModule): Expected a <class 'float'>. Got value: fast'``
    out of jsonargparse's report, which nests every alternative of every Union it tried."""
    path: list[str] = []
    classes: list[str] = []
    leaves: list[str] = []
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or any(line.startswith(noise.removeprefix("- ")) for noise in _NOISE):
            continue
        key = re.match(r'Parser key "([^"]+)":?\s*(.*)', line)
        cls = re.match(r"Problem with given class_path '([^']+)':?\s*(.*)", line)
        if key:
            path.append(key.group(1) if not path else f"init_args.{key.group(1)}")
            line = key.group(2)
        elif cls:
            classes.append(cls.group(1))
            line = cls.group(2)
        if line:
            leaves.append(line)
    if not leaves:
        return message.strip()
    where = ".".join(path)
    if classes:
        where = f"{where} ({classes[-1]})" if where else classes[-1]
    text = "; ".join(leaves)
    option = re.search(r"Option '([^']+)' is not accepted", text)
    if option and classes:
        text += f". Check the spelling, or list the accepted options with `--{path[0] if path else 'model'}.help {classes[-1]}`"
    return f"{where}: {text}" if where else text


class LoRACLI(LightningCLI):
    """Lightning's CLI with the library's defaults: any LightningModule / DataModule by class path, seed 42,
    ``data.num_labels`` linked into the model's ``num_labels`` (and ``data.labels`` into ``labels``), and
    ``pkg://`` paths resolved before instantiation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": _DESCRIPTION})
        kwargs.setdefault("parser_class", LoRAArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Read from the DataModule once it exists; ignored when either side lacks the attribute/parameter
        # (e.g. a CausalLMModule with a TextDataModule).
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        parser.link_arguments("data.labels", "model.init_args.labels", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _resolve_namespace(config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise CLIError(f"the config's values were rejected: {condense_error(str(err))}") from err


class _BuildOnlyCLI(LoRACLI):
    """Parses a ``fit`` config and builds model, data and callbacks, but no Trainer, and runs nothing."""

    def instantiate_trainer(self, **kwargs: Any) -> None:
        return None

    def _run_subcommand(self, subcommand: str) -> None:
        return None


def _resolve_namespace(config: Namespace) -> None:
    for key, value in list(config.items()):
        config[key] = _resolve_value(value)


def _resolve_value(value: Any) -> Any:
    if isinstance(value, Namespace):
        _resolve_namespace(value)
        return value
    if isinstance(value, list):
        return [_resolve_value(item) for item in value]
    return resolve_paths(value)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-lora`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in _COMMANDS:
            _COMMANDS[args[0]](args[1:])
        else:
            with warnings.catch_warnings():
                if argv is not None:  # called from Python with its own arguments: sys.argv is not ours
                    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
                LoRACLI(args=None if argv is None else args)  # None: Lightning reads sys.argv itself
    except CLIError as err:
        print(f"lightning-lora: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# --- export ------------------------------------------------------------------------------------------


def export_command(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-lora export",
        description="Rebuild the model from the training config, load an adapter-only checkpoint into it, and write "
        "the adapter in PEFT's format (PeftModel.from_pretrained reads it), or with --merged the merged full weights "
        "(model.safetensors + config.json, loadable with AutoModel*.from_pretrained).",
    )
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt written by a run with LoRACallback.")
    parser.add_argument("--config", required=True, help="The YAML config the checkpoint was trained with.")
    parser.add_argument("--output", required=True, help="Directory to write.")
    parser.add_argument("--merged", action="store_true", help="Write merged full weights instead of the adapter.")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="Dtype of merged weights (default: the backbone's)."
    )
    args = parser.parse_args(argv)
    _require_file("--checkpoint", args.checkpoint, "the .ckpt file written by `lightning-lora fit`")
    _require_file("--config", args.config, "the YAML config used for training")

    module, datamodule, callback = _build_from_config(args.config)
    callback.controller.maybe_inject(module, torch.device("cpu"))  # quantized as in training, so --merged matches it
    backbone = callback.controller.require_injected(module)
    load_lora_checkpoint(module, callback, args.checkpoint)
    output = Path(args.output)
    if args.merged:
        from lightning_lora.export import save_merged

        save_merged(backbone, output, dtype=_dtype(args.dtype))
        _copy_tokenizer(_tokenizer_dir(module, datamodule), output)
        print(f"Wrote merged weights to {output}")
    else:
        from lightning_lora.adapter_io import save_adapter

        save_adapter(backbone, output, base_model_name_or_path=_base_name(module))
        print(f"Wrote the PEFT-format adapter to {output}")


def _parse_fit_config(config_path: str) -> _BuildOnlyCLI:
    with warnings.catch_warnings():
        # Lightning warns when args are given while sys.argv holds other ones: here they are this command's own.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return _BuildOnlyCLI(args=["fit", "--config", config_path])


def _build_from_config(config_path: str) -> tuple[Any, Any, Any]:
    """(LightningModule with its backbone built, DataModule, LoRACallback) from a ``fit`` config; no Trainer."""
    from lightning_lora.lightning.callback import LoRACallback

    cli = _parse_fit_config(config_path)
    module = cli.model
    module.configure_model()
    callbacks = cli._get(cli.config_init, "trainer").get("callbacks") or []
    found = [cb for cb in callbacks if isinstance(cb, LoRACallback)]
    if not found:
        raise CLIError(
            f"--config {config_path!r} has no lightning_lora.LoRACallback in trainer.callbacks, so it does not say how "
            "LoRA was applied; pass the config the checkpoint was trained with."
        )
    return module, cli.datamodule, found[0]


def load_lora_checkpoint(module: torch.nn.Module, callback: Any, checkpoint_path: str) -> None:
    """Load an adapter-only Lightning checkpoint into ``module`` (LoRA already injected), after checking it fits."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CLIError(
            f"--checkpoint {checkpoint_path!r} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt written by `fit`."
        )
    try:
        callback.controller.validate_checkpoint(checkpoint, module)
    except ValueError as err:
        raise CLIError(f"--checkpoint {checkpoint_path!r} does not fit --config: {err}") from err
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if result.unexpected_keys:
        raise CLIError(
            f"--checkpoint {checkpoint_path!r} holds {len(result.unexpected_keys)} tensors this model lacks "
            f"(first: {result.unexpected_keys[0]!r}); pass the config it was trained with."
        )


# --- merge -------------------------------------------------------------------------------------------


def merge_command(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-lora merge",
        description="Merge a PEFT-format adapter into its full-precision base model and save the result with "
        "save_pretrained. The update is added in float32 to the base weights (no quantization involved).",
    )
    parser.add_argument(
        "--base",
        required=True,
        help="Base model: a local transformers model directory (or pkg://...), or a lightning-lora YAML config.",
    )
    parser.add_argument("--adapter", required=True, help="Adapter directory (adapter_config.json + adapter_model.safetensors).")
    parser.add_argument("--output", required=True, help="Directory to write the merged model to.")
    parser.add_argument(
        "--task",
        choices=("auto", "causal-lm", "sequence-classification"),
        default="auto",
        help="Head of the base model when --base is a directory; auto reads config.json's architectures.",
    )
    parser.add_argument(
        "--num-labels", type=int, help="Classes of a sequence-classification head (default: read from the adapter)."
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="Dtype of merged weights (default: the base's)."
    )
    args = parser.parse_args(argv)
    from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, load_adapter, read_adapter

    adapter = resolve_path(args.adapter)
    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG_NAME)):
        raise CLIError(
            f"--adapter {args.adapter!r} has no {ADAPTER_CONFIG_NAME}; pass a directory written by `export`, the callback's export_dir/adapter, or PEFT's save_pretrained."
        )
    if args.base.endswith((".yaml", ".yml")):
        _require_file("--base", args.base, "a lightning-lora YAML config or a model directory")
        module, datamodule, _ = _build_from_config_without_lora(args.base)
        base, tokenizer_dir = module.model, _tokenizer_dir(module, datamodule)
    else:
        _, tensors, _ = read_adapter(adapter)
        base = _load_base(resolve_path(args.base), args.task, args.num_labels, tensors)
        tokenizer_dir = resolve_path(args.base)
    try:
        load_adapter(base, adapter)
    except ValueError as err:
        raise CLIError(f"--adapter {args.adapter!r} does not fit --base {args.base!r}: {err}") from err
    save_merged_pretrained(base, args.output, dtype=_dtype(args.dtype))
    _copy_tokenizer(tokenizer_dir, Path(args.output))
    print(f"Wrote the merged model to {args.output}")


def _build_from_config_without_lora(config_path: str) -> tuple[Any, Any, None]:
    cli = _parse_fit_config(config_path)
    module = cli.model
    module.configure_model()
    if getattr(module, "model", None) is None:
        raise CLIError(
            f"--base {config_path!r}: the config's model has no `.model` backbone after configure_model(); use a lightning_lora task."
        )
    return module, cli.datamodule, None


def _load_base(path: str, task: str, num_labels: int | None, adapter_tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"--base {path!r} is not a transformers model directory (no config.json) nor a .yaml config.")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if task == "auto":
        architectures = config.architectures or []
        if any(a.endswith("ForSequenceClassification") for a in architectures) or _head_labels(adapter_tensors) is not None:
            task = "sequence-classification"
        elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            task = "causal-lm"
        else:
            raise CLIError(
                f"--base {path!r} has architectures {architectures!r}, which do not say which head to build; pass --task causal-lm or --task sequence-classification."
            )
    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    num_labels = num_labels or _head_labels(adapter_tensors) or getattr(config, "num_labels", None)
    if not num_labels:
        raise CLIError("--num-labels is needed: the adapter holds no classification head to read it from.")
    return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, num_labels=num_labels)


def _head_labels(tensors: dict[str, torch.Tensor]) -> int | None:
    """Classes of a classification head saved in the adapter (modules_to_save), e.g. classifier.weight (labels, hidden)."""
    for suffix in ("classifier.out_proj.weight", "classifier.weight", "score.weight"):
        for key, value in tensors.items():
            if (key == suffix or key.endswith("." + suffix)) and value.dim() == 2:
                return int(value.shape[0])
    return None


def save_merged_pretrained(model: torch.nn.Module, output: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """``merged_state_dict(model)`` written with ``save_pretrained`` (``lightning_lora.export.save_merged``)."""
    from lightning_lora.export import save_merged

    save_merged(model, output, dtype=dtype)


# --- estimate ----------------------------------------------------------------------------------------


def estimate_command(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-lora estimate",
        description="Estimate the peak GPU memory per GPU of a LoRA / QLoRA run from the model's config.json, without "
        "loading weights (lightning_lora.estimate.estimate_memory). Options left out take that function's defaults.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--model", required=True, help="config.json, a model directory holding one, or pkg://...")
    parser.add_argument("--quantization", choices=("none", "nf4", "fp4", "int8"), help="Backbone quantization (default nf4).")
    parser.add_argument(
        "--double-quant", dest="double_quant", action=argparse.BooleanOptionalAction, help="Quantize the 4-bit scales too."
    )
    parser.add_argument("--r", type=int, help="LoRA rank.")
    parser.add_argument(
        "--target-modules", dest="target_modules", help="'all-linear' or comma-separated names, e.g. q_proj,v_proj."
    )
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="Micro-batch of sequences per GPU.")
    parser.add_argument("--seq-len", dest="seq_len", type=int, help="Padded tokens per sequence.")
    parser.add_argument("--strategy", choices=("single", "ddp", "fsdp"), help="How the GPUs share the work.")
    parser.add_argument("--num-gpus", dest="num_gpus", type=int, help="GPUs the run uses.")
    parser.add_argument(
        "--activation-checkpointing",
        dest="activation_checkpointing",
        action=argparse.BooleanOptionalAction,
        help="Recompute activations in backward.",
    )
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="Compute dtype and that of unquantized weights.")
    parser.add_argument("--lora-dtype", dest="lora_dtype", choices=("bf16", "fp16", "fp32"), help="Dtype of the LoRA weights.")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), help="Optimizer whose state is counted.")
    parser.add_argument(
        "--chunked-ce",
        dest="chunked_ce",
        action=argparse.BooleanOptionalAction,
        help="Loss computed in chunks (CausalLMModule chunked_ce > 0).",
    )
    parser.add_argument("--lora-dropout", dest="lora_dropout", type=float, help="LoRA dropout (> 0 stores a dropout mask).")
    args = vars(parser.parse_args(argv))
    try:
        from lightning_lora.estimate import estimate_memory
    except ImportError as err:
        raise CLIError(f"`estimate` needs lightning_lora.estimate, which failed to import: {err}") from err
    model = resolve_path(args.pop("model"))
    if not os.path.exists(model):
        raise CLIError(f"--model {model!r} does not exist; pass a config.json or the model directory holding it.")
    if "target_modules" in args and args["target_modules"] != "all-linear":
        args["target_modules"] = [name.strip() for name in args["target_modules"].split(",") if name.strip()]
    try:
        estimate = estimate_memory(model, **args)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    print(estimate.table())


# --- helpers -----------------------------------------------------------------------------------------


def _require_file(option: str, path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise CLIError(f"{option} {path!r} does not exist or is not a file; pass {what}.")


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _base_name(module: Any) -> str | None:
    model = getattr(getattr(module, "hparams", {}), "get", lambda *_: None)("model")
    if isinstance(model, str):
        return resolve_path(model)
    return None


def _tokenizer_dir(module: Any, datamodule: Any) -> str | None:
    tokenizer = getattr(getattr(datamodule, "hparams", None), "get", lambda *_: None)("tokenizer")
    if isinstance(tokenizer, str):
        return resolve_path(tokenizer)
    return _base_name(module)


def _copy_tokenizer(source: str | None, output: Path) -> None:
    """Copy the tokenizer files next to merged weights, so the output directory is a complete model."""
    if not source or not os.path.isdir(source):
        return
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            output.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(source, name), output / name)


_COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "estimate": estimate_command,
    "export": export_command,
    "merge": merge_command,
}

if __name__ == "__main__":
    main()
