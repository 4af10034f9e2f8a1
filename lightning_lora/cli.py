"""The ``lightning-lora`` command.

``fit`` / ``validate`` / ``test`` / ``predict`` are Lightning's CLI, configured from YAML with the
LoRACallback in ``trainer.callbacks``::

    lightning-lora fit --config configs/minilm-sentiment-qlora.yaml
    lightning-lora fit --config configs/tiny-llama-cpu.yaml --print_config

Three more commands are dispatched before Lightning's parser sees the arguments::

    lightning-lora export   --checkpoint CKPT --config CFG --output DIR [--merged] [--serving-targets vllm llama.cpp [--strict-serving]]
    lightning-lora merge    --base MODEL_DIR_OR_CFG --adapter DIR --output DIR
    lightning-lora estimate --model CONFIG_JSON [--quantization nf4 --r 16 --batch-size 2 --seq-len 2048 ...]
    lightning-lora estimate --model CONFIG_JSON --strategy fsdp2 --num-gpus 64 --measure   # + measured on this GPU

Any string ``pkg://<package>/<path>`` in a config is replaced by that path inside the installed
package before anything is built (see ``lightning_lora.tasks._paths``).

This module imports neither torch nor Lightning at the top: ``--help``, ``export --help`` and ``estimate``
answer without them, and the Lightning subcommands live in ``lightning_lora.lightning.lora_cli``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_lora._io import require_directory_path
from lightning_lora.tasks._paths import resolve_path

if TYPE_CHECKING:
    import torch

# Heavy imports (torch, Lightning, transformers, bitsandbytes) happen inside the commands that need them, so that
# `--help` and `estimate` answer at once; fit/validate/test/predict load Lightning through
# lightning_lora.lightning.lora_cli.

DESCRIPTION = (
    "LoRA / QLoRA fine-tuning with PyTorch Lightning. Subcommands fit/validate/test/predict take a YAML "
    "config (--config); `lightning-lora export|merge|estimate --help` describe the other commands."
)
_LIGHTNING_COMMANDS = {
    "fit": "Train LoRA on a model from a YAML config (Lightning's Trainer.fit).",
    "validate": "Run one evaluation epoch over the validation set.",
    "test": "Run one evaluation epoch over the test set.",
    "predict": "Run inference on the predict set.",
}
_OTHER_COMMANDS = {
    "export": "Write a checkpoint's adapter in PEFT's format, or merged full weights.",
    "merge": "Merge a PEFT-format adapter into its base model (save_pretrained).",
    "estimate": "Estimate the peak GPU memory of a LoRA / QLoRA run from config.json.",
}


class CLIError(Exception):
    """A problem with the command line or the config; ``main`` prints it without a traceback."""


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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-lora`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args in (["-h"], ["--help"]):
            print(usage() + "\n\n" + commands_help())
            if not args:
                print("\nlightning-lora: error: give a command, e.g. `lightning-lora fit --config configs/tiny-llama-cpu.yaml`.", file=sys.stderr)
                raise SystemExit(2)
            return
        if args[0] in _COMMANDS:
            _COMMANDS[args[0]](args[1:])
            return
        from lightning_lora.lightning.lora_cli import LoRACLI

        with warnings.catch_warnings():
            if argv is not None:  # called from Python with its own arguments: sys.argv is not ours
                warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            LoRACLI(args=None if argv is None else args)  # None: Lightning reads sys.argv itself
    except CLIError as err:
        print(f"lightning-lora: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, TypeError, OSError) as err:
        # The library's own checks (bad input, a damaged file, a full disk) print one line; anything raised
        # elsewhere (the user's module, torch) keeps its traceback, and LIGHTNING_LORA_DEBUG=1 shows ours too.
        if os.environ.get("LIGHTNING_LORA_DEBUG") or not _raised_by_library(err):
            raise
        print(f"lightning-lora: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _raised_by_library(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)


def usage() -> str:
    names = ",".join([*_LIGHTNING_COMMANDS, *_OTHER_COMMANDS])
    return f"usage: lightning-lora [-h] {{{names}}} ..."


def commands_help() -> str:
    width = max(map(len, [*_LIGHTNING_COMMANDS, *_OTHER_COMMANDS]))
    lines = [DESCRIPTION, "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in {**_LIGHTNING_COMMANDS, **_OTHER_COMMANDS}.items()]
    lines += [
        "",
        "`lightning-lora COMMAND --help` describes a command; `lightning-lora fit --trainer.callbacks.help LoRACallback`",
        "lists LoRACallback's options. Examples:",
        "  lightning-lora fit --config configs/tiny-llama-cpu.yaml",
        "  lightning-lora fit --config configs/tiny-llama-cpu.yaml --ckpt_path last      # resume",
        "  lightning-lora estimate --model path/to/config.json --r 16 --batch-size 2 --seq-len 2048",
    ]
    return "\n".join(lines)


def __getattr__(name: str) -> Any:
    # LoRACLI and its parser moved to lightning_lora.lightning.lora_cli (they import Lightning); the old names still work.
    if name in ("LoRACLI", "LoRAArgumentParser", "BuildOnlyCLI"):
        from lightning_lora.lightning import lora_cli

        return getattr(lora_cli, name)
    raise AttributeError(f"module 'lightning_lora.cli' has no attribute {name!r}")


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
    parser.add_argument(
        "--serving-targets", nargs="+", choices=("vllm", "llama.cpp"), default=None,
        help="Say before writing which of these will refuse or mis-scale the adapter (default: the callback's serving_targets).",
    )
    parser.add_argument("--strict-serving", action="store_true", default=None, help="Make such a finding an error; nothing is written.")
    parser.add_argument("--vllm-max-lora-rank", type=int, default=None, help="The vLLM server's --max-lora-rank (default: the callback's, 16).")
    args = parser.parse_args(argv)
    _require_file("--checkpoint", args.checkpoint, "the .ckpt file written by `lightning-lora fit`")
    _require_file("--config", args.config, "the YAML config used for training")
    require_directory_path(args.output, "--output")  # before any work

    import torch

    module, datamodule, callback = _build_from_config(args.config)
    callback.controller.maybe_inject(module, torch.device("cpu"))  # quantized as in training, so --merged matches it
    backbone = callback.controller.require_injected(module)
    load_lora_checkpoint(module, callback, args.checkpoint)
    output = Path(args.output)
    if args.merged:
        from lightning_lora.export import save_merged

        save_merged(backbone, output, dtype=_dtype(args.dtype), tokenizer_dir=_tokenizer_dir(module, datamodule), parameter="--output")
        print(f"Wrote merged weights to {output}")
    else:
        from lightning_lora.adapter_io import save_adapter

        options = dict(callback.serving_options)  # the config's, overridden by the flags given here
        for key in ("serving_targets", "strict_serving", "vllm_max_lora_rank"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        try:
            save_adapter(backbone, output, base_model_name_or_path=_base_name(module), **options)
        except ValueError as err:  # strict serving checks, raised before anything is written
            raise CLIError(str(err)) from None
        print(f"Wrote the PEFT-format adapter to {output}")


def _parse_fit_config(config_path: str) -> Any:
    from lightning_lora.lightning.lora_cli import BuildOnlyCLI

    with warnings.catch_warnings():
        # Lightning warns when args are given while sys.argv holds other ones: here they are this command's own.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return BuildOnlyCLI(args=["fit", "--config", config_path])


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
    try:
        callback.controller.restore(module, checkpoint_path, parameter="--checkpoint")  # the checked reader: weights_only=True
    except ValueError as err:
        raise CLIError(f"--checkpoint {checkpoint_path!r} does not fit --config: {err}") from err


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
    from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, load_read_adapter, read_adapter
    from lightning_lora.export import save_merged

    require_directory_path(args.output, "--output")  # before any work
    adapter = resolve_path(args.adapter)
    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG_NAME)):
        raise CLIError(
            f"--adapter {args.adapter!r} has no {ADAPTER_CONFIG_NAME}; pass a directory written by `export`, the callback's export_dir/adapter, or PEFT's save_pretrained."
        )
    read = read_adapter(adapter)  # once: the head's size and the loaded tensors come from the same save
    if args.base.endswith((".yaml", ".yml")):
        _require_file("--base", args.base, "a lightning-lora YAML config or a model directory")
        module, datamodule, _ = _build_from_config_without_lora(args.base)
        base, tokenizer_dir = module.model, _tokenizer_dir(module, datamodule)
    else:
        base = _load_base(resolve_path(args.base), args.task, args.num_labels, read[1])
        tokenizer_dir = resolve_path(args.base)
    try:
        load_read_adapter(base, read, source=repr(adapter))
    except ValueError as err:
        raise CLIError(f"--adapter {args.adapter!r} does not fit --base {args.base!r}: {err}") from err
    save_merged(base, args.output, dtype=_dtype(args.dtype), tokenizer_dir=tokenizer_dir, parameter="--output")
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
    parser.add_argument(
        "--strategy", choices=("single", "ddp", "fsdp", "fsdp2"), help="How the GPUs share the work (fsdp2: ModelParallelStrategy)."
    )
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
    parser.add_argument(
        "--offload-activations", dest="offload_activations", action=argparse.BooleanOptionalAction,
        help="Checkpointed layer inputs kept in host memory (needs --activation-checkpointing).",
    )  # fmt: skip
    parser.add_argument(
        "--measure", action="store_true", default=False,
        help="Also measure: train a few steps as rank 0 of --num-gpus on this machine's GPU (torch's fake process group).",
    )  # fmt: skip
    parser.add_argument("--measure-device", dest="measure_device", default=None, help="Where to measure: cuda (default), cuda:N or cpu.")
    args = vars(parser.parse_args(argv))
    measure, measure_device = args.pop("measure"), args.pop("measure_device")
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
    if measure:
        from lightning_lora.measure import compare_with_estimate

        try:
            print(compare_with_estimate(model, args, device=measure_device), flush=True)
        except (ValueError, TypeError, RuntimeError) as err:
            raise CLIError(str(err)) from err


# --- helpers -----------------------------------------------------------------------------------------


def _require_file(option: str, path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise CLIError(f"{option} {path!r} does not exist or is not a file; pass {what}.")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    import torch

    return getattr(torch, name)


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


_COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "estimate": estimate_command,
    "export": export_command,
    "merge": merge_command,
}

if __name__ == "__main__":
    # `python -m lightning_lora.cli`: run the importable module's main, not this __main__ copy, so that the CLIError
    # raised by lightning_lora.lightning.lora_cli is the class main() catches.
    from lightning_lora.cli import main as _main

    _main()
