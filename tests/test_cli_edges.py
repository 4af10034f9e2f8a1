"""Edge cases of the `lightning-lora` command found in review."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_lora import cli
from test_cli import tiny_config


def test_fast_dev_run_is_refused_in_one_line_naming_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # fast_dev_run swaps the logger for one without a directory: trainer.log_dir is None, and the run directory checks
    # failed with "TypeError: expected str, bytes or os.PathLike object, not NoneType".
    config = tiny_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fast_dev_run" in err and "--trainer.max_steps" in err and "Traceback" not in err
    assert not (tmp_path / "export").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {marker}']", "!!python/name:os.system"])
def test_python_yaml_tags_are_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], tag: str) -> None:
    marker = tmp_path / "ran"
    config = tiny_config(tmp_path)
    config.write_text(config.read_text().replace("seed_everything: 42", f"seed_everything: {tag.format(marker=marker)}"))
    assert tag.split()[0] in config.read_text()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 2
    assert "could not determine a constructor" in capsys.readouterr().err
    assert not marker.exists()


def test_a_gloo_run_leaves_its_process_group_before_returning(tmp_path: Path, fork_server) -> None:
    # Left to interpreter exit, a gloo rank whose peer had gone could abort (SIGABRT) after a finished run
    # (examples/multi_gpu/one_gpu.sh). One DDP rank under gloo, in its own process (a fork of the session's warm
    # process): after `fit` returns the group is gone.
    import sys
    import textwrap

    from _processes import Queue

    config = tiny_config(tmp_path)
    code = textwrap.dedent(
        f"""
        import os, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        from lightning_lora import cli
        cli.main(["fit", "--config", {str(config)!r}, "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
                  "--trainer.strategy.process_group_backend", "gloo", "--trainer.max_steps", "1"])
        print("GROUP", dist.is_initialized())
        """
    )
    queue = Queue()
    queue.add("fit", [sys.executable, "-c", code], cwd=tmp_path, forks=fork_server)
    result = queue.run(timeout=300)["fit"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "GROUP False"
