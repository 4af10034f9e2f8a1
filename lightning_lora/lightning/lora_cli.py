"""LoRACLI: Lightning's CLI with the library's defaults, behind ``lightning-lora fit|validate|test|predict``.

Kept apart from ``lightning_lora.cli`` (the entry point) so that ``lightning-lora --help``, ``export --help``
and ``estimate`` answer without importing Lightning: only these subcommands need it.

What it adds to ``LightningCLI``:

- any LightningModule / DataModule by class path, seed 42, ``data.num_labels`` / ``data.labels`` linked
  into the model, ``pkg://`` paths resolved before anything is built;
- run directories that never overwrite a previous run (``lightning_lora.lightning.run_dir``), and
  ``--ckpt_path last`` that finds the last checkpoint in any version of the run directory;
- ``ProgressLog`` lines instead of the TQDM bar when stdout is not a terminal;
- a model summary that counts 4-bit weights as parameters (``LoRAModelSummary``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

# Imported so that short class names work on the command line: --model CausalLMModule, --data TextDataModule.
import lightning_lora.data  # noqa: F401
from lightning_lora.cli import DESCRIPTION, CLIError, condense_error
from lightning_lora.lightning.progress import ProgressLog
from lightning_lora.lightning.run_dir import (
    NoOverwriteSaveConfig,
    RunDirectory,
    export_target,
    find_last_checkpoint,
    holds_export,
    previous_run,
)
from lightning_lora.lightning.strategies import share_one_gpu
from lightning_lora.lightning.summary import LoRAModelSummary
from lightning_lora.tasks import CausalLMModule, SequenceClassificationModule  # noqa: F401
from lightning_lora import _yaml
from lightning_lora.tasks._paths import resolve_paths

FIT_DESCRIPTION = (
    "Train: build the model, data and Trainer from --config (YAML) and run Trainer.fit. LoRA is set by "
    "lightning_lora.LoRACallback in trainer.callbacks; list its options with "
    "`lightning-lora fit --trainer.callbacks.help LoRACallback` (any other class the same way, e.g. "
    "`--model.help CausalLMModule`). Each run writes into its own directory (config.yaml, checkpoints/, export/); "
    "`--ckpt_path last` resumes the newest last.ckpt of the run directory."
)


# Lightning warnings that say nothing useful about what this CLI does on purpose.
_EXPECTED_WARNINGS = (
    ".*`tensorboardX` has been removed as a dependency.*",  # logger: true picks CSVLogger without TensorBoard: fine
    ".*The dirpath has changed from.*",  # a resumed run writes into its own new version directory, by design
)


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


class LoRACLI(LightningCLI):
    """Lightning's CLI with the library's defaults: any LightningModule / DataModule by class path, seed 42,
    ``data.num_labels`` linked into the model's ``num_labels`` (and ``data.labels`` into ``labels``), ``pkg://``
    paths resolved before instantiation, versioned run directories that are never overwritten, progress lines
    when stdout is not a terminal, and a model summary that counts quantized weights as parameters.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_callback", NoOverwriteSaveConfig)
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION, "fit": {"description": FIT_DESCRIPTION}})
        kwargs.setdefault("parser_class", LoRAArgumentParser)
        self.run_directory = RunDirectory()
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        _yaml.install()  # every YAML it reads is bounded: nested aliases are refused before they expand
        super().__init__(*args, **kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        super()._run_subcommand(subcommand)
        _shut_down_gloo()  # the run is over on every rank: leave its process group together

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
        _record_linked_values(self.model, self.datamodule, _LINKED)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        trainer = self._instantiate_trainer(config, extra + self._library_callbacks(config))
        share_one_gpu(trainer.strategy)  # several gloo ranks on one GPU (examples/multi_gpu/one_gpu.sh)
        set_cpu_threads(trainer)
        return trainer

    def _library_callbacks(self, trainer_config: dict[str, Any]) -> list[Any]:
        configured = trainer_config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        callbacks: list[Any] = [self.run_directory]
        if trainer_config.get("enable_model_summary") is not False and not any(isinstance(cb, ModelSummary) for cb in configured):
            callbacks.append(LoRAModelSummary())
        if (
            not _is_terminal(sys.stdout)
            and trainer_config.get("enable_progress_bar") is not False
            and not any(isinstance(cb, ProgressBar) for cb in configured)
        ):
            callbacks.append(ProgressLog())  # replaces TQDM, whose carriage-return redraws a log file cannot show
        return callbacks

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` across the run's versions; refuse to write over a previous run."""
        fit_config = self.config_init[self.subcommand]
        if self.trainer.log_dir is None:  # the run directory, its checks and the export all need one
            fast = self.trainer.fast_dev_run
            cause = f"--trainer.fast_dev_run {fast!r} replaces the logger" if fast else "the logger has no save_dir and"
            raise CLIError(
                f"{cause} leaves the run without a directory (trainer.log_dir is None), where `lightning-lora fit` "
                "writes config.yaml, checkpoints/ and export/. Nothing was written. For a quick check use "
                "`--trainer.max_steps 1 --trainer.limit_val_batches 1` instead, or give the logger a save_dir."
            )
        if fit_config.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer)
            if found is not None:
                fit_config["ckpt_path"] = found
                _info(f"lightning-lora: resuming from {found}")
        resuming = fit_config.get("ckpt_path") not in (None, "last")  # "last" left as is: nothing to resume
        if rank_zero_only.rank == 0:  # DDP's other processes start later and must not see rank 0's new files
            self._refuse_to_overwrite(resuming)

    def _refuse_to_overwrite(self, resuming: bool) -> None:
        from lightning_lora import LoRACallback

        trainer = self.trainer
        loras = [cb for cb in trainer.callbacks if isinstance(cb, LoRACallback)]
        for callback in loras:
            target, follows = export_target(callback.export_dir, trainer.log_dir)
            if not follows and holds_export(target):
                raise CLIError(
                    f"LoRACallback's export_dir {str(target)!r} already holds an export of a previous run, and this run "
                    "would overwrite it. Nothing was written. Give another export_dir, delete that one, or make "
                    "export_dir relative (e.g. `export`) so that it follows the run directory."
                )
        if resuming:
            return
        found = previous_run(trainer, loras)
        if found:
            root = trainer.default_root_dir
            raise CLIError(
                f"the run directory {trainer.log_dir!r} already holds a previous run ({', '.join(found[:4])}), and "
                "this new run would overwrite or mix with it. Nothing was written. Resume that run with "
                f"`--ckpt_path last`, start a new one elsewhere with `--trainer.default_root_dir {root.rstrip('/')}-2`, "
                "give each run its own version directory with a logger (`--trainer.logger true`), or delete the directory."
            )

    def after_fit(self) -> None:
        trainer = self.trainer
        lines = [f"lightning-lora: run directory {trainer.log_dir}"]
        saved = getattr(self._save_config(), "saved_to", None)
        if saved is not None:
            lines.append(f"  config      {saved}")
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(trainer.checkpoint_callback, "best_model_path", "")
        if last:
            lines.append(f"  checkpoint  {last}")
        for export in self.run_directory.exports:
            if holds_export(export):
                lines.append(f"  export      {export}")
        _info("\n".join(lines))

    def _save_config(self) -> Any:
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, NoOverwriteSaveConfig)), None)


def _shut_down_gloo() -> None:
    """After a run under gloo (CPU ranks, or ranks sharing one GPU): every rank leaves the process group together.

    Lightning destroys the group at interpreter exit, each rank on its own; a gloo rank that still holds the group
    when its peer has gone can abort there ("terminate called without an active exception", SIGABRT), failing a
    run that had finished (seen in `examples/multi_gpu/one_gpu.sh` with two CPU ranks). NCCL groups are left to
    Lightning as before.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.barrier()
        dist.destroy_process_group()


_LINKED = ("num_labels", "labels")  # data.X -> model.init_args.X (add_arguments_to_parser)


def _record_linked_values(model: Any, datamodule: Any, names: tuple[str, ...]) -> None:
    """Write a value the link gave the model into the DataModule's hparams where those hold None (labels read from the
    file), so both record the same value: a logger merges the two (initial) hparams and refuses keys that differ."""
    model_hparams = getattr(model, "hparams", None)
    if model_hparams is None or datamodule is None:
        return
    for store in (getattr(datamodule, "hparams", None), getattr(datamodule, "_hparams_initial", None)):
        for name in names if store is not None else ():
            if name in store and store[name] is None and model_hparams.get(name) is not None:
                store[name] = model_hparams[name]


class BuildOnlyCLI(LoRACLI):
    """Parses a ``fit`` config and builds model, data and callbacks, but no Trainer, and runs nothing."""

    def instantiate_trainer(self, **kwargs: Any) -> None:
        return None

    def _run_subcommand(self, subcommand: str) -> None:
        return None


def set_cpu_threads(trainer: Any) -> int | None:
    """On CPU, give each training process of this node an equal share of the CPUs it may run on.

    torch's default is every core of the machine in every process. Processes that another launcher started
    (torchrun, srun: ``LOCAL_WORLD_SIZE`` / ``SLURM_NTASKS_PER_NODE``) then oversubscribe the cores, as do
    jobs pinned to fewer CPUs than the machine has (a cluster's cpuset). Lightning's own DDP launcher already
    splits the cores; an explicit ``OMP_NUM_THREADS`` always wins. The count depends only on the machine and the
    launch, never on its load, so runs stay bit-reproducible. Returns the count set, or None.
    """
    from lightning.pytorch.accelerators import CPUAccelerator

    if "OMP_NUM_THREADS" in os.environ or not isinstance(getattr(trainer, "accelerator", None), CPUAccelerator):
        return None
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = 1
    for variable in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            processes = int(value)
            break
    threads = max(1, cpus // processes)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


@rank_zero_only
def _info(text: str) -> None:
    print(text, flush=True)


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
