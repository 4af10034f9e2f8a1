"""Run directories of ``lightning-lora fit``: where a run writes, and the rule that no run overwrites another.

A run writes into ``trainer.log_dir``: with a logger (Lightning's default) that is a fresh
``<default_root_dir>/lightning_logs/version_N`` per ``fit``, without one (``logger: false``) it is
``default_root_dir`` itself. In it go the parsed config (``config.yaml``), the checkpoints
(``checkpoints/``) and, when LoRACallback's ``export_dir`` is relative or unset, the export
(``export/adapter``). So changing ``--trainer.default_root_dir`` moves everything.

Nothing of a previous run is overwritten:

- a new ``fit`` into a directory that holds a run (no logger) is refused before anything is written, with
  the fix (resume it, or pick another directory);
- a resumed run keeps the old ``config.yaml`` and writes ``config-v1.yaml`` (then ``-v2``, ...), and an export
  directory that exists gets the next free name (``export-v1``) — the suffixes ModelCheckpoint uses;
- an absolute ``export_dir`` that already holds an export is refused.

``--ckpt_path last`` finds the newest ``last*.ckpt`` of every version of the run directory (Lightning looks
only in the new run's own version, where there is none yet).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

EXPORT_NAME = "export"
_EXPORT_PARTS = ("adapter", "merged")


def free_name(directory: str | os.PathLike, name: str) -> str:
    """``name`` if ``directory/name`` does not exist, else the first free ``stem-vN.suffix`` (N = 1, 2, ...)."""
    directory = Path(directory)
    if not (directory / name).exists():
        return name
    stem, suffix = os.path.splitext(name)
    version = 1
    while (directory / f"{stem}-v{version}{suffix}").exists():
        version += 1
    return f"{stem}-v{version}{suffix}"


def export_target(export_dir: str | os.PathLike | None, run_dir: str | os.PathLike) -> tuple[Path, bool]:
    """(where the export goes, whether that path follows the run directory): relative or unset -> under ``run_dir``."""
    if export_dir is None:
        return Path(run_dir) / EXPORT_NAME, True
    path = Path(export_dir)
    return (path, False) if path.is_absolute() else (Path(run_dir) / path, True)


def holds_export(path: str | os.PathLike) -> bool:
    return any((Path(path) / part).exists() for part in _EXPORT_PARTS)


def checkpoint_dirs(trainer: Any) -> list[Path]:
    """The directories this run's ModelCheckpoint callbacks write to (their dirpath, else ``<log_dir>/checkpoints``)."""
    return [
        Path(cb.dirpath) if cb.dirpath is not None else Path(trainer.log_dir) / "checkpoints"
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint)
    ]


def previous_run(trainer: Any, lora_callbacks: list[Any]) -> list[str]:
    """What in this run's directories shows that another run wrote there: config files, checkpoints, exports."""
    run_dir = Path(trainer.log_dir)
    found = sorted(str(p) for p in run_dir.glob("config*.yaml")) if run_dir.is_dir() else []
    for directory in checkpoint_dirs(trainer):
        if directory.is_dir():
            found += sorted(str(p) for p in directory.glob("*.ckpt"))[:3]
    for callback in lora_callbacks:
        target, _ = export_target(callback.export_dir, run_dir)
        if holds_export(target):
            found.append(str(target))
    return found


def find_last_checkpoint(trainer: Any) -> str | None:
    """The newest ``last*.ckpt`` this run's ModelCheckpoint callbacks could have written, in any version of the run
    directory; None when there is none."""
    candidates: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        prefix = callback.CHECKPOINT_NAME_LAST
        directories = [Path(callback.dirpath)] if callback.dirpath is not None else [Path(trainer.log_dir) / "checkpoints"]
        if callback.dirpath is None and trainer.loggers:
            # <save_dir>/<name>/<version>/checkpoints of every earlier version (a resumed run gets a new version).
            logger = trainer.loggers[0]
            root = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name or "")
            directories += sorted(root.glob("*/checkpoints"))
        for directory in directories:
            if directory.is_dir():
                candidates |= {str(p) for p in directory.iterdir() if p.suffix == ".ckpt" and p.stem.startswith(prefix)}
    if not candidates:
        return None
    return max(candidates, key=os.path.getmtime)


class RunDirectory(Callback):
    """Points every LoRACallback's relative or unset ``export_dir`` into the run directory, at a free name.

    Installed by ``lightning-lora fit``; runs in ``setup``, when ``trainer.log_dir`` is final (and the same on
    every rank). ``exports`` lists the export directories after setup.
    """

    def __init__(self) -> None:
        self.exports: list[Path] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_lora import LoRACallback

        run_dir = Path(trainer.log_dir)
        self.exports = []
        for callback in (cb for cb in trainer.callbacks if isinstance(cb, LoRACallback)):
            target, follows = export_target(callback.export_dir, run_dir)
            if follows:
                name = free_name(target.parent, target.name) if trainer.is_global_zero else None
                target = target.parent / trainer.strategy.broadcast(name)
            callback.export_dir = str(target)
            self.exports.append(target)


class NoOverwriteSaveConfig(SaveConfigCallback):
    """Lightning's SaveConfigCallback that never overwrites: an existing ``config.yaml`` makes it write
    ``config-v1.yaml`` (then ``-v2``, ...) next to it."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir
            name = free_name(log_dir, self.config_filename) if trainer.is_global_zero else None
            self.config_filename = trainer.strategy.broadcast(name)
            self.saved_to = Path(log_dir) / self.config_filename
        super().setup(trainer, pl_module, stage)
