"""Threads per process on CPU: a tiny `lightning-lora fit`, alone and as 2 DDP processes under torchrun.

    python benchmarks/cpu_threads.py --rounds 2 --out benchmarks/results/cpu-threads.json

Scenarios (configs/tiny-llama-cpu.yaml, 8 optimizer steps; rounds alternate so drift hits all alike):

- one process, torch's default threads (all cores) vs ``OMP_NUM_THREADS=1``;
- torchrun with 2 processes (DDP, gloo) on this node: ``OMP_NUM_THREADS=<cores>`` is what every process used
  before ``lightning_lora.lightning.lora_cli.set_cpu_threads`` (each took every core), unset is the CLI's
  policy now (cores / LOCAL_WORLD_SIZE each).

Reports the command's wall time and the training time printed by ProgressLog (``[train done] ... elapsed``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny-llama-cpu.yaml"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def scenarios() -> dict[str, tuple[list[str], dict[str, str]]]:
    fit = ["-m", "lightning_lora.cli", "fit", "--config", str(CONFIG)]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    return {
        "1 process, default threads": ([sys.executable, *fit], {}),
        "1 process, OMP_NUM_THREADS=1": ([sys.executable, *fit], {"OMP_NUM_THREADS": "1"}),
        f"torchrun 2 processes, {CORES} threads each (before)": ([*torchrun, *fit, *ddp], {"OMP_NUM_THREADS": str(CORES)}),
        "torchrun 2 processes, CLI policy (after)": ([*torchrun, *fit, *ddp], {}),
    }


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    with tempfile.TemporaryDirectory() as tmp:
        environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env
        start = time.perf_counter()
        result = subprocess.run([*argv, "--trainer.default_root_dir", tmp], env=environment, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    found = re.search(r"\[train done\].*\| (\d+):(\d\d):(\d\d) elapsed", result.stdout)
    train = None if not found else 3600 * int(found.group(1)) + 60 * int(found.group(2)) + int(found.group(3))
    return wall, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float | None]]] = {name: [] for name in scenarios()}
    loads = []
    for _ in range(args.rounds):
        for name, (argv, env) in scenarios().items():
            loads.append(os.getloadavg()[0])
            times[name].append(run_once(argv, env))
    width = max(map(len, times))
    print(f"{'scenario':<{width}}  wall s (median)  train s (median)   [{CORES} CPUs, load average {min(loads):.1f}-{max(loads):.1f}]")
    rows = {}
    for name, values in times.items():
        wall = statistics.median(v[0] for v in values)
        trains = [v[1] for v in values if v[1] is not None]
        train = statistics.median(trains) if trains else None
        rows[name] = {"wall_s": [round(v[0], 2) for v in values], "train_s": [v[1] for v in values], "median_wall_s": round(wall, 2), "median_train_s": train}
        print(f"{name:<{width}}  {wall:14.1f}  {train if train is not None else '-':>15}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": CORES, "load_average_range": [min(loads), max(loads)], "rounds": args.rounds, "scenarios": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
