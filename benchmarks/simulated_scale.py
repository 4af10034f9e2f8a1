"""Per-GPU memory of QLoRA training at 2 to 64 GPUs, measured on one GPU with torch's fake process group.

Each row runs ``lightning_lora.measure`` in its own process: rank 0 of W builds only its shards (4-bit
projections with real per-layer quant states, LoRA r=16 on all projections, fp32 adapters), shards with
FSDP2 (``fully_shard_lora``) or FSDP1 (``lora_fsdp_policy``, ``use_orig_params=True``, bf16 mixed
precision), checkpoints every decoder layer and trains ``--steps`` AdamW steps on batch 1 x 2048 under bf16
autocast. Collectives move no data, so losses are garbage; the allocations are rank 0's. Beside each
row: ``lightning_lora.estimate.estimate_memory`` for the same set-up, minus the CUDA context (it is outside
the allocator), and the error of that estimate against the measured peak.

    python benchmarks/simulated_scale.py --out results/          # the GPU grid (70B at 2-64, 405B at 8-64)
    python benchmarks/simulated_scale.py --cpu --out results/    # tiny shape at 2 and 4 ranks, same code path
    python benchmarks/simulated_scale.py --cpu --cpu-shape small --seq 512 --out results/

Rows run ``--jobs`` at a time when their estimates fit in the GPU's free memory together, in a fixed order
(the 405B goal first); ``--max-seconds`` stops starting rows, and the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Condition, Lock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_lora.estimate import CUDA_CONTEXT_BYTES, GiB, MiB, estimate_memory  # noqa: E402
from lightning_lora.measure import _make_spec, _measure  # noqa: E402

SHAPES = {
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672, vocab_size=32000),
    "405b": dict(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8, intermediate_size=53248,
                 vocab_size=128256),  # fmt: skip
    # Multiples of 32 (bitsandbytes' CPU kernels), q width (4 x 32) != hidden, GQA, untied head.
    # Where the FSDP terms stand out of the fixed costs on the CPU: a decoder layer packs to 1.4 MB, the root is 2 MB.
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1536,
                  vocab_size=1024),  # fmt: skip
    "tiny": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=160,
                 vocab_size=128),  # fmt: skip
}


def gpu_rows() -> list[dict]:
    """In the order they start: the 405B goal and the rows that explain it first, so a time limit cuts the least."""
    rows = [
        dict(shape="405b", world=8, strategy="fsdp2", offload=True),  # goal: <= 40 GiB per GPU at 8 GPUs
        dict(shape="405b", world=8, strategy="fsdp2"),
        dict(shape="70b", world=2, strategy="fsdp2"),
        dict(shape="405b", world=8, strategy="fsdp"),
        # fully_shard_lora as it sharded before the embedding and head got groups of their own
        dict(shape="405b", world=8, strategy="fsdp2", root_as_one_group=True),
    ]
    rows += [dict(shape="70b", world=w, strategy=s) for w in (2, 4, 8, 16, 64) for s in ("fsdp2", "fsdp") if (w, s) != (2, "fsdp2")]
    rows += [dict(shape="405b", world=w, strategy=s) for w in (16, 64) for s in ("fsdp2", "fsdp")]
    return rows + [dict(shape="405b", world=8, strategy="fsdp", offload=True)]


def cpu_rows(shape: str) -> list[dict]:
    rows = [dict(shape=shape, world=w, strategy=s) for w in (2, 4) for s in ("fsdp2", "fsdp")]
    return rows + [dict(shape=shape, world=2, strategy="fsdp2", offload=True), dict(shape=shape, world=2, strategy="fsdp2", root_as_one_group=True)]


def variant(row: dict) -> str:
    if row.get("offload"):
        return "offload"
    return "root as one group" if row.get("root_as_one_group") else "-"


def estimate(row: dict, seq: int):
    if row.get("root_as_one_group"):
        return None  # the estimator models fully_shard_lora as it shards now
    return estimate_memory(
        SHAPES[row["shape"]], quantization="nf4", double_quant=True, r=16, batch_size=1, seq_len=seq, strategy=row["strategy"],
        num_gpus=row["world"], activation_checkpointing=True, offload_activations=bool(row.get("offload")),
    )  # fmt: skip


def run_row(row: dict, args: argparse.Namespace) -> dict:
    spec = _make_spec(
        SHAPES[row["shape"]], num_gpus=row["world"], strategy=row["strategy"], quantization="nf4", double_quant=True, r=16,
        target_modules="all-linear", batch_size=1, seq_len=args.seq, activation_checkpointing=True,
        offload_activations=bool(row.get("offload")), lora_dtype="fp32", steps=args.steps, device="cpu" if args.cpu else "cuda",
    )  # fmt: skip
    spec["root_as_one_group"] = bool(row.get("root_as_one_group"))
    est = estimate(row, args.seq)
    out = dict(row, variant=variant(row), seq=args.seq, steps=args.steps)
    if est is not None:
        out.update(estimate_total=est.total, estimate_allocated=est.total - CUDA_CONTEXT_BYTES, estimate_phase=est.peak_phase,
                   estimate_breakdown=est.breakdown(), estimate_other_phase=[est.other_phase, est.other_phase_total])  # fmt: skip
    t0 = time.perf_counter()
    try:
        measured = _measure(spec, timeout=args.timeout)
        out["measured"] = measured.to_dict()
        if est is not None:
            out["error"] = out["estimate_allocated"] / measured.peak_allocated - 1
    except RuntimeError as err:
        out["failure"] = str(err)[-2000:]
    out["wall_seconds"] = time.perf_counter() - t0
    print(f"done {row['shape']} W={row['world']} {row['strategy']} {variant(row)}: {out.get('failure', 'ok')[:200]}", flush=True)
    return out


def table(results: list[dict], unit: int = GiB) -> str:
    name = "GiB" if unit == GiB else "MiB"
    head = f"{'shape':<6}{'W':>4}  {'strategy':<9}{'variant':<19}{'measured':>10}{'estimate':>10}{'error':>8}{'reserved':>10}{'step start':>11}{'s':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        m = r.get("measured") or {}
        gib = lambda v: f"{v / unit:10.2f}" if isinstance(v, (int, float)) else f"{'-':>10}"  # noqa: E731
        err = f"{r['error']:+8.1%}" if "error" in r else f"{'-':>8}"
        lines.append(
            f"{r['shape']:<6}{r['world']:>4}  {r['strategy']:<9}{r['variant']:<19}{gib(m.get('peak_allocated'))}{gib(r.get('estimate_allocated'))}"
            f"{err}{gib(m.get('peak_reserved'))}{gib(m.get('step_start_allocated')):>11}{r['wall_seconds']:6.0f}"
            + (f"  FAILED: {r['failure'].splitlines()[-1][:120]}" if "failure" in r else "")
        )
    lines.append(f"{name} per GPU, rank 0. measured: peak allocated in the steps after the first; estimate: estimate_memory minus the")
    lines.append(f"CUDA context ({CUDA_CONTEXT_BYTES / GiB:.2f} GiB, outside the allocator; add it for what nvidia-smi shows). Values are garbage.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for simulated_scale.json and .txt.")
    parser.add_argument("--cpu", action="store_true", help="A small shape on the CPU at 2 and 4 ranks (correctness smoke).")
    parser.add_argument("--cpu-shape", dest="cpu_shape", choices=("tiny", "small"), default="tiny", help="Shape of the --cpu rows.")
    parser.add_argument("--steps", type=int, default=2, help="Steps per row; the peak is read from step 2 on.")
    parser.add_argument("--seq", type=int, default=None, help="Tokens per sequence (default 2048; 64 with --cpu).")
    parser.add_argument("--jobs", type=int, default=1, help="Rows measured at once (on a GPU: while their estimates fit).")
    parser.add_argument("--only", default=None, help="Comma-separated shapes to run, e.g. 70b.")
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds per row.")
    parser.add_argument("--max-seconds", dest="max_seconds", type=float, default=0, help="Start no row after this many seconds (0: no limit).")
    args = parser.parse_args()
    args.seq = args.seq or (64 if args.cpu else 2048)
    rows = cpu_rows(args.cpu_shape) if args.cpu else gpu_rows()
    if args.only:
        rows = [r for r in rows if r["shape"] in args.only.split(",")]
    budget = _free_bytes(args.cpu)
    gate = Condition()
    in_use = [0]

    def need(row: dict) -> int:
        est = estimate(row, args.seq) or estimate(dict(row, root_as_one_group=False), args.seq)
        return int(est.total * 1.25) + 8 * GiB  # room for the caching allocator's reserve and a safety margin

    def guarded(row: dict) -> dict | None:
        with gate:
            gate.wait_for(lambda: in_use[0] == 0 or in_use[0] + need(row) <= budget)
            if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
                return None  # past the time budget: listed under not_run
            in_use[0] += need(row)
        try:
            return run_row(row, args)
        finally:
            with gate:
                in_use[0] -= need(row)
                gate.notify_all()

    t0 = time.perf_counter()
    results: list[dict | None] = [None] * len(rows)
    lock = Lock()

    def record() -> dict:
        done = [r for r in results if r is not None]
        return dict(
            command=" ".join([os.path.basename(sys.executable), *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M:%S"),
            wall_seconds=time.perf_counter() - t0, device="cpu" if args.cpu else _gpu_name(), rows=done,
            not_run=[dict(r, variant=variant(r)) for r, res in zip(rows, results) if res is None],
            note="fake process group: values are garbage, memory is rank 0's" + (
                "; CPU: peaks from the profiler's allocation events, offload is a no-op (host memory is what is measured)"
                if args.cpu else ""),
        )  # fmt: skip

    def one(index: int) -> None:
        out = guarded(rows[index])
        if out is None:
            return
        with lock:
            results[index] = out
            (args.out / "simulated_scale.json").write_text(json.dumps(record(), indent=1))  # partial results survive a kill

    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, range(len(rows))))
    text = table([r for r in results if r is not None], MiB if args.cpu else GiB)
    final = record()
    if final["not_run"]:
        text += f"\nnot run (past --max-seconds {args.max_seconds:g}): " + "; ".join(
            f"{r['shape']} W={r['world']} {r['strategy']} {r['variant']}" for r in final["not_run"])
    print(text)
    (args.out / "simulated_scale.json").write_text(json.dumps(final, indent=1))
    (args.out / "simulated_scale.txt").write_text(text + "\n")


def _free_bytes(cpu: bool) -> int:
    if cpu:
        return 1 << 62
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


if __name__ == "__main__":
    main()
