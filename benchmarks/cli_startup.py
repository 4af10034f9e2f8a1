"""How long the ``lightning-lora`` command takes to answer: median wall time of N fresh processes per command.

    python benchmarks/cli_startup.py --runs 5 --out benchmarks/results/cli-startup.json

Times ``lightning-lora --help``, ``lightning-lora estimate`` on a Llama-2-7B-shaped config.json (written to a
temporary directory) and ``lightning-lora fit --help``, plus ``python -c "import lightning_lora"`` for
reference. Each run is a new process (nothing cached in memory; the OS file cache is warm after the first
one, as it is for a user who runs the command twice). Prints a table and writes the timings as JSON.

The commands run in an empty directory, so ``PYTHONPATH=<a checkout>`` times that checkout's code with this
virtual environment (how the before/after figures in benchmarks/results/2026-12-01-cli-startup/ were taken).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def commands(model_dir: str) -> dict[str, list[str]]:
    script = str(Path(sys.executable).parent / "lightning-lora")
    return {
        "import lightning_lora": [sys.executable, "-c", "import lightning_lora"],
        "lightning-lora --help": [script, "--help"],
        "lightning-lora estimate": [script, "estimate", "--model", model_dir, "--r", "16", "--batch-size", "2", "--seq-len", "2048"],
        "lightning-lora fit --help": [script, "fit", "--help"],
    }


def time_once(argv: list[str], cwd: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command (the median is reported)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--label", default="", help="what this measurement is, e.g. 'before' / 'after' and the commit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(LLAMA_7B))
        rows = {}
        for name, argv in commands(tmp).items():
            time_once(argv, tmp)  # warm the OS file cache, as for a second invocation
            seconds = [time_once(argv, tmp) for _ in range(args.runs)]
            rows[name] = {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3), "runs_s": [round(s, 3) for s in seconds]}
    width = max(len(name) for name in rows)
    print(f"{'command':<{width}}  median s   min s   ({args.runs} fresh processes each)")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['median_s']:8.2f}  {row['min_s']:6.2f}")
    if args.out:
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        result = {
            "label": args.label,
            "pythonpath": os.environ.get("PYTHONPATH", ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "load_average": load},
            "runs": args.runs,
            "commands": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
