"""examples/multi_gpu: the one-GPU rehearsal script runs N ranks as N nodes (on CPU here), the SLURM script builds
the command Lightning's SLURM environment expects and finds the checkpoint to resume."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "multi_gpu"


def test_scripts_parse():
    for script in ("one_gpu.sh", "slurm.sbatch", "torchrun.sh"):
        assert subprocess.run(["bash", "-n", str(EXAMPLES / script)]).returncode == 0, script


def test_slurm_script_sets_devices_and_nodes_from_slurm_and_resumes_the_newest_checkpoint(tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "srun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path / "argv"}\n')
    (shim / "srun").chmod(0o755)
    runs = tmp_path / "runs" / "job" / "checkpoints"
    runs.mkdir(parents=True)
    (runs / "step=100.ckpt").write_bytes(b"full")  # a full-state checkpoint file, older
    time.sleep(0.05)
    (runs / "step=200.ckpt").mkdir()  # an FSDP sharded checkpoint directory, newer
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "3",
           "SLURM_CPUS_PER_TASK": "6", "SLURM_SUBMIT_DIR": str(ROOT), "RUN_DIR": str(tmp_path / "runs"), "RESUME": "auto", "BATCH_SIZE": "4",
           "CONFIG": "configs/llama-qlora-fsdp.yaml"}
    result = subprocess.run(["bash", str(EXAMPLES / "slurm.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "lightning-lora", "fit", "--config", "configs/llama-qlora-fsdp.yaml", "--trainer.devices", "2", "--trainer.num_nodes", "3",
        "--data.init_args.batch_size", "4", "--ckpt_path", str(runs / "step=200.ckpt")]

    env["RUN_DIR"] = str(tmp_path / "empty")
    result = subprocess.run(["bash", str(EXAMPLES / "slurm.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "no checkpoint under" in result.stderr
    assert "--ckpt_path" not in (tmp_path / "argv").read_text().splitlines()


@pytest.mark.slow
def test_one_gpu_rehearsal_runs_two_ranks_as_two_nodes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CONFIG": "configs/tiny-llama-cpu.yaml",
           "STRATEGY": "lightning.pytorch.strategies.DDPStrategy", "RANKS": "2", "STEPS": "2", "MASTER_PORT": str(port)}
    run_dir = tmp_path / "run"
    result = subprocess.run([str(EXAMPLES / "one_gpu.sh"), "--trainer.default_root_dir", str(run_dir), "--data.init_args.batch_size", "4"],
                            env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 1/2" in result.stderr + result.stdout and "MEMBER: 2/2" in result.stderr + result.stdout
    config = yaml.safe_load(next(run_dir.glob("**/config.yaml")).read_text())["trainer"]
    assert (str(config["devices"]), config["num_nodes"], config["max_steps"]) == ("1", 2, 2)  # devices may be int or str
    assert config["strategy"]["init_args"]["process_group_backend"] == "gloo"
    checkpoint = torch.load(next(run_dir.glob("**/checkpoints/*.ckpt")), weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["state_dict"] and all(".lora_" in key for key in checkpoint["state_dict"])
