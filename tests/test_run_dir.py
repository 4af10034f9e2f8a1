"""Runs never overwrite each other: versioned run directories, export_dir that follows the run, refusals with the fix."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from lightning_lora import cli
from lightning_lora.lightning.run_dir import export_target, free_name

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny-llama-cpu.yaml"


def config_file(tmp_path: Path, *, logger: bool = True, export_dir: str = "export", name: str = "tiny.yaml") -> Path:
    """The shipped tiny config, 2 optimizer steps on 16 rows, as shipped otherwise (relative export_dir)."""
    config = yaml.safe_load(TINY.read_text())
    config["data"]["init_args"].update(limit=16, val_fraction=0.002)
    config["trainer"].update(max_steps=2, limit_val_batches=1, logger=logger, default_root_dir=str(tmp_path / "runs"))
    config["trainer"]["callbacks"][0]["init_args"]["export_dir"] = export_dir
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and modification time (ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def fit(*args: str) -> None:
    cli.main(["fit", *args])


def test_each_fit_gets_its_own_version_and_export_and_the_first_is_untouched(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    fit("--config", str(config))
    first = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert (first / "config.yaml").is_file() and (first / "export" / "adapter" / "adapter_config.json").is_file()
    assert (first / "checkpoints" / "last.ckpt").is_file()
    before = snapshot(first)
    time.sleep(0.01)
    fit("--config", str(config))
    second = tmp_path / "runs" / "lightning_logs" / "version_1"
    assert snapshot(first) == before  # not one byte or timestamp of the first run changed
    assert sorted(p.name for p in (second / "export" / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (second / "config.yaml").is_file()


def test_export_dir_follows_default_root_dir(tmp_path: Path) -> None:
    fit("--config", str(config_file(tmp_path)), "--trainer.default_root_dir", str(tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "lightning_logs" / "version_0" / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "export").exists()


def test_without_a_logger_a_second_fresh_fit_is_refused_and_a_resume_writes_beside(tmp_path: Path, capsys) -> None:
    config = config_file(tmp_path, logger=False)
    run = tmp_path / "runs"
    fit("--config", str(config))
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "export"]
    before = snapshot(run)
    with pytest.raises(SystemExit) as exit_info:
        fit("--config", str(config))
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"the run directory {str(run)!r} already holds a previous run ({run / 'config.yaml'}" in err
    assert "Nothing was written. Resume that run with `--ckpt_path last`" in err
    assert f"`--trainer.default_root_dir {run}-2`" in err
    assert snapshot(run) == before

    fit("--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "3", "--trainer.max_epochs", "2")
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k in before and not k.startswith("checkpoints")} == {
        k: v for k, v in before.items() if not k.startswith("checkpoints")
    }  # config.yaml and export/ exactly as they were; last.ckpt moves on, as it should
    assert (run / "config-v1.yaml").is_file() and (run / "export-v1" / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((run / "config-v1.yaml").read_text())["trainer"]["max_steps"] == 3


def test_an_absolute_export_dir_holding_an_export_is_refused(tmp_path: Path, capsys) -> None:
    export = tmp_path / "shared-export"
    fit("--config", str(config_file(tmp_path, export_dir=str(export))))
    before = snapshot(export)
    with pytest.raises(SystemExit) as exit_info:
        fit("--config", str(config_file(tmp_path, export_dir=str(export), name="other.yaml")), "--trainer.default_root_dir", str(tmp_path / "b"))
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"LoRACallback's export_dir {str(export)!r} already holds an export of a previous run" in err
    assert snapshot(export) == before and not (tmp_path / "b").exists()


def test_ckpt_path_last_finds_the_newest_last_checkpoint_of_any_version(tmp_path: Path, capsys) -> None:
    config = config_file(tmp_path)
    by_epochs = ["--trainer.max_steps", "-1"]  # 16 rows are 2 steps an epoch; stop at epoch ends, not mid-epoch
    fit("--config", str(config), *by_epochs)
    fit("--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", "2", *by_epochs)  # version_1 resumes version_0
    assert f"resuming from {tmp_path / 'runs' / 'lightning_logs' / 'version_0' / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    fit("--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", "3", *by_epochs)  # version_2 resumes version_1
    assert f"resuming from {tmp_path / 'runs' / 'lightning_logs' / 'version_1' / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    import torch

    last = torch.load(tmp_path / "runs" / "lightning_logs" / "version_2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (6, 3)


def test_free_name_and_export_target(tmp_path: Path) -> None:
    assert free_name(tmp_path, "config.yaml") == "config.yaml"
    (tmp_path / "config.yaml").write_text("")
    (tmp_path / "config-v1.yaml").write_text("")
    assert free_name(tmp_path, "config.yaml") == "config-v2.yaml"
    (tmp_path / "export").mkdir()
    assert free_name(tmp_path, "export") == "export-v1"
    assert export_target(None, "/r") == (Path("/r/export"), True)
    assert export_target("out/a", "/r") == (Path("/r/out/a"), True)
    assert export_target("/abs/x", "/r") == (Path("/abs/x"), False)
