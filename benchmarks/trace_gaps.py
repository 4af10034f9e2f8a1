"""Where the GPU waits for the host in a profiled step: the idle gaps between GPU events of a chrome trace.

Reads a trace written by ``torch.profiler`` with CPU and CUDA activities (``step_levers.py --trace``), takes every
gap between consecutive GPU events (kernels, copies, memsets) longer than ``--min-us``, and charges it to what the
host was doing: the CPU ops enclosing the launch of the kernel that ended the gap (its outermost op and the
innermost ``aten::`` / custom op). Prints the total idle time, the largest gaps, and the idle time per host op;
``--out`` writes them as JSON.

    python benchmarks/trace_gaps.py trace.json.gz [--min-us 10] [--out gaps.json]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    return [e for e in trace.get("traceEvents", trace) if e.get("ph") == "X"]


def enclosing(ops: list[dict], starts: list[float], ts: float) -> list[dict]:
    """The CPU ops of one thread that contain the time ``ts``, outermost first."""
    found = []
    index = bisect.bisect_right(starts, ts)
    for op in reversed(ops[:index]):  # ops sorted by start: any container starts before ts
        if op["ts"] <= ts <= op["ts"] + op["dur"]:
            found.append(op)
        if len(found) > 12 or ts - op["ts"] > 5e6:
            break
    return sorted(found, key=lambda op: (op["ts"], -op["dur"]))


def analyse(events: list[dict], min_us: float) -> dict:
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit("no GPU events in the trace: profile with ProfilerActivity.CUDA")
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops_by_thread: dict = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            ops_by_thread[e["tid"]].append(e)
    starts = {}
    for tid, ops in ops_by_thread.items():
        ops.sort(key=lambda op: op["ts"])
        starts[tid] = [op["ts"] for op in ops]
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    busy = sum(e["dur"] for e in gpu)
    gaps, by_outer, by_inner = [], defaultdict(float), defaultdict(float)
    end = gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        gap = e["ts"] - end
        if gap >= min_us:
            launch = launches.get(e.get("args", {}).get("correlation"))
            chain = enclosing(ops_by_thread[launch["tid"]], starts[launch["tid"]], launch["ts"]) if launch else []
            names = [op["name"] for op in chain]
            outer = names[0] if names else "(no host op found)"
            inner = next((n for n in reversed(names) if "::" in n), outer)
            gaps.append({"gap_us": gap, "before_kernel": e["name"][:80], "host_ops": names[:6]})
            by_outer[outer] += gap
            by_inner[inner] += gap
        end = max(end, e["ts"] + e["dur"])
    gaps.sort(key=lambda g: -g["gap_us"])
    idle = sum(g["gap_us"] for g in gaps)
    return {
        "gpu_span_ms": span / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "idle_ms_in_gaps": idle / 1e3,
        "gaps": len(gaps),
        "min_gap_us": min_us,
        "idle_ms_by_outer_host_op": {k: v / 1e3 for k, v in sorted(by_outer.items(), key=lambda kv: -kv[1])},
        "idle_ms_by_inner_host_op": {k: v / 1e3 for k, v in sorted(by_inner.items(), key=lambda kv: -kv[1])[:25]},
        "largest_gaps": gaps[:25],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--min-us", type=float, default=10.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = analyse(load(args.trace), args.min_us)
    print(f"GPU span {result['gpu_span_ms']:.1f} ms, busy {result['gpu_busy_ms']:.1f} ms, idle in {result['gaps']} gaps "
          f">= {args.min_us:g} us: {result['idle_ms_in_gaps']:.1f} ms")  # fmt: skip
    print("idle ms by the outermost host op running at the launch that ended the gap:")
    for name, ms in list(result["idle_ms_by_outer_host_op"].items())[:15]:
        print(f"  {ms:8.2f}  {name[:100]}")
    print("idle ms by the innermost op:")
    for name, ms in list(result["idle_ms_by_inner_host_op"].items())[:15]:
        print(f"  {ms:8.2f}  {name[:100]}")
    print("largest gaps:")
    for g in result["largest_gaps"][:12]:
        print(f"  {g['gap_us']:8.1f} us before {g['before_kernel'][:50]:50}  {' > '.join(n[:40] for n in g['host_ops'][:4])}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
