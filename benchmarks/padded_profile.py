"""Why our LoRA is slower than PEFT's on padded batches of many short rows (packing.py's ``ours_padded``): a profile.

``benchmarks/packing.py --gpu`` measured our LoRA on PEFT's padded tweet batches (131 rows of ~61 tokens) at 0.62x
PEFT's tokens/s on an H200 (0.98x on the instruction set's fewer, longer rows; ~1.05x on CPU). Three systems on the
same padded batches of real tweets, Llama-2-7B width with ``--layers`` decoder layers, nf4 + double quant, bf16
autocast, LoRA r=16 on every linear layer, AdamW:

- ``ours_task_loss``: our LoRA, the loss of ``CausalLMModule.token_losses`` (what packing.py's ``ours_padded`` times);
- ``ours_hf_loss``: our LoRA, transformers' own loss (``model(**batch).loss``, what PEFT's users call);
- ``peft_hf_loss``: PEFT, transformers' own loss.

The first two tell the layers from the loss. Each is timed over ``--steps`` steps after a warm-up, then one step is
profiled (torch.profiler): the table lists each system's largest operators by device time and by host time.

    python benchmarks/padded_profile.py --out DIR [--layers 8] [--tokenizer FOLDER]
    python benchmarks/padded_profile.py --out DIR --tiny --device cpu --layers 2      # the code path on CPU

Writes DIR/padded_profile.json and DIR/padded_profile.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import packing as P  # noqa: E402  (the same data, models and steps as the packing benchmark)


def top_ops(prof: Any, key: str, n: int) -> list[dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "device_ms": e.self_device_time_total / 1e3 if hasattr(e, "self_device_time_total") else None,
             "host_ms": e.self_cpu_time_total / 1e3} for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="packing.py's tiny fp32 model on the CPU: checks the code path")
    args = parser.parse_args()
    shape, row_length = ("tiny", 256) if args.tiny else ("7b", 2048)
    hidden, intermediate, _, heads, vocab = P.SHAPES[shape]
    P.SHAPES[shape] = (hidden, intermediate, args.layers, heads, vocab)
    ns = argparse.Namespace(shape=shape, row_length=row_length, rows=2, gpu=not args.tiny, device=args.device, tokenizer=args.tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ours = P.ours(ns)
    systems = {"ours_task_loss": P.System("ours_padded", ours, False, ns), "peft_hf_loss": P.System("peft_padded", P.peft(ns), False, ns)}
    hf = P.System("peft_padded", ours, False, ns)  # the name picks transformers' own loss; the model is ours
    systems = {"ours_task_loss": systems["ours_task_loss"], "ours_hf_loss": hf, "peft_hf_loss": systems["peft_hf_loss"]}
    with tempfile.TemporaryDirectory() as folder:
        paths = P.write_data(Path(folder))
        total = 2 + args.steps + 1
        packed, examples = P.packed_data("tweets", paths["tweets"], row_length, 2, total, tokenizer=args.tokenizer)
        padded = P.dynamic_batches(examples, [int((b["document_ids"] >= 0).sum()) for b in packed])
    shapes = [tuple(b["input_ids"].shape) for b in padded]
    results: dict[str, Any] = {"batch_shapes": shapes, "layers": args.layers}
    lines = [f"padded tweet batches (rows x tokens): {shapes}", ""]
    for name, system in systems.items():
        system.reset()
        for i in range(2):
            system.step(padded[i], timed=False)
        for i in range(2, 2 + args.steps):
            system.step(padded[i], timed=True)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            system.step(padded[total - 1], timed=False)
        by_device = top_ops(prof, "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total", args.top)
        by_host = top_ops(prof, "self_cpu_time_total", args.top)
        seconds = sum(system.seconds) / len(system.seconds)
        results[name] = {"seconds_per_step": seconds, "top_by_device": by_device, "top_by_host": by_host}
        lines.append(f"== {name}: {seconds * 1e3:.1f} ms per step")
        for title, rows in (("device", by_device), ("host", by_host)):
            lines.append(f"  top by {title} time: op | calls | device ms | host ms")
            lines += [f"    {r['op'][:60]:60} {r['calls']:6d} {r['device_ms'] or 0:9.2f} {r['host_ms']:9.2f}" for r in rows]
        lines.append("")
        del prof
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "padded_profile.txt").write_text(text)
    (out / "padded_profile.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
