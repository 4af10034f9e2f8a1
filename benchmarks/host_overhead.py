"""Host (Python) time per call of one LoRA layer, against its base layer and the bare ops computing the same.

For a float ``nn.Linear`` base and a bitsandbytes nf4 base, at 1 and 512 tokens, each variant is called many
times back to back and the median over several rounds is kept (one synchronize per round on CUDA, so when the
device work is small the figure is the host's: Python, dispatch, launches). On CPU the layers are tiny (64 x 64
by default), so compute is small and the difference between our layer and the bare ops is our Python.

Variants (``ours - bare`` is the layer's own overhead):

- ``base``: the base layer alone, no grad;
- ``ours_no_grad`` / ``bare_no_grad``: our layer without autograd, and the ops of the route it takes
  (``out``: base output + ``mm`` + in-place ``addmm_``; ``fold``: the update added to the weight, one linear);
- ``ours_train`` / ``bare_train``: grad enabled, adapter trainable, input needing grad: the forward alone (our
  fused node, or plain ops where it does not apply) and ``*_step``: forward plus backward.

What runs on CPU differs from CUDA: bitsandbytes' eval-mode 4-bit forward under no_grad is another kernel there,
so ``quantization.linear_4bit_no_grad`` declines in eval mode and the layer calls its base's forward
(``ours_no_grad``); the row ``ours_no_grad_train_mode`` (a train-mode layer under no_grad, no dropout) is the
direct route CUDA takes in eval. With 64 x 64 layers, 512 tokens take the weight-fold route of ``_routes.no_grad``
(on CUDA at 4096 x 4096 they fold too, by launches: ``_routes.folds``; the row ``ours_no_grad_output_route`` is the
output route there).

    python benchmarks/host_overhead.py --out host.json [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def per_call(fns: dict[str, Callable[[], object]], device: str, calls: int, rounds: int) -> dict[str, list[float]]:
    """The time per call (us) of ``calls`` back-to-back calls of each of ``fns``, in each of ``rounds`` rounds.

    The variants take turns within each round, so a drift of the host's speed (a shared machine) moves them alike.
    On CPU the clock is the thread's CPU time (torch runs on this one thread: ``--threads 1``), which leaves out
    the time the host gives to others; on CUDA it is wall time up to a synchronize.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = time.perf_counter if device == "cuda" else time.thread_time
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        for _ in range(max(10, calls // 10)):
            fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            for _ in range(calls):
                fn()
            sync()
            times[name].append((clock() - start) / calls * 1e6)
    return times


def python_calls(fn: Callable[[], object], calls: int = 100) -> float:
    """Python function calls (cProfile's count, builtins included) per call of ``fn``: a figure without noise."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    return pstats.Stats(profiler).total_calls / calls - 1  # less fn itself


def build(kind: str, size: int, device: str, dtype: torch.dtype) -> nn.Module:
    """A LoRA layer (r=16, alpha=32, B random so the update is not zero) around a float or nf4 base."""
    from lightning_lora import LoRALinear, QuantizationConfig
    from lightning_lora.quantization import quantize_linear

    torch.manual_seed(0)
    linear = nn.Linear(size, size, bias=False)
    if kind == "nf4":
        config = QuantizationConfig(mode="nf4", compute_dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        base = quantize_linear(linear.to(dtype), config, device=device)
    else:
        base = linear.to(device, dtype).requires_grad_(False)
    layer = LoRALinear(base, r=16, alpha=32).to(device)
    nn.init.normal_(layer.lora_b.weight, std=0.02)
    return layer


def route(layer: nn.Module, x: torch.Tensor) -> str:
    """The no-grad route ``_routes.no_grad`` takes (its own rule, ``_routes.folds``): 'fold' (into the weight) or 'out'."""
    from lightning_lora import _routes, quantization

    return "fold" if _routes.folds(layer, x, quantization.is_4bit(layer.base_layer)) else "out"


def variants(layer: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    from lightning_lora import quantization

    base, scale = layer.base_layer, layer.scale
    a, b = layer.lora_a.weight, layer.lora_b.weight
    four_bit = quantization.is_4bit(base)
    dtype = x.dtype
    a_c, b_c = a.detach().to(dtype), b.detach().to(dtype)
    x_grad = x.detach().clone().requires_grad_(True)
    grad_out = torch.ones(*x.shape[:-1], layer.out_features, device=x.device, dtype=dtype)
    folds = route(layer, x) == "fold"

    def in_mode(training: bool, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            if layer.training != training:
                layer.train(training)
            return fn()

        return run

    def base_call() -> object:
        with torch.no_grad():
            return base(x)

    def ours_no_grad() -> object:
        with torch.no_grad():
            return layer(x)

    def bare_no_grad() -> object:
        with torch.no_grad():
            if folds:
                if four_bit:
                    weight = quantization.dequantize_4bit_no_grad(base, dtype)
                    weight = (quantization.dequantize_weight(base, dtype=dtype) if weight is None else weight).addmm_(b_c, a_c, alpha=scale)
                else:
                    weight = torch.addmm(base.weight, b_c, a_c, alpha=scale)
                return F.linear(x, weight)
            out = base(x)
            out.view(-1, layer.out_features).addmm_(torch.mm(x.reshape(-1, layer.in_features), a_c.t()), b_c.t(), alpha=scale)
            return out

    def ours_train() -> object:
        return layer(x_grad)

    def bare_train() -> object:  # what _routes.unfused_training computes, without its guards
        out = base(x_grad)
        h = F.linear(x_grad, a.to(dtype) if a.dtype != dtype else a)
        b_ = b.to(dtype) if b.dtype != dtype else b
        return torch.addmm(out.reshape(-1, layer.out_features), h.reshape(-1, layer.r), b_.t(), alpha=scale).view(out.shape)

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            forward().backward(grad_out)
            x_grad.grad = a.grad = b.grad = None

        return run

    fns = {
        "base": in_mode(False, base_call),
        "ours_no_grad": in_mode(False, ours_no_grad),
        "bare_no_grad": in_mode(False, bare_no_grad),
        "ours_train": in_mode(True, ours_train),
        "bare_train": in_mode(True, bare_train),
        "ours_train_step": in_mode(True, step(ours_train)),
        "bare_train_step": in_mode(True, step(bare_train)),
    }
    if four_bit and folds and x.is_cuda:
        # The output route the layer took before the small-batch fold (``fold_below_macs`` 0 on this layer).
        def ours_no_grad_output_route() -> object:
            layer.fold_below_macs = 0
            try:
                return ours_no_grad()
            finally:
                del layer.fold_below_macs

        fns["ours_no_grad_output_route"] = in_mode(False, ours_no_grad_output_route)
    if four_bit and x.device.type == "cpu":
        # Dropout is 0: the same math. On CPU only a train-mode layer takes the direct 4-bit route CUDA takes in eval.
        fns["ours_no_grad_train_mode"] = in_mode(True, ours_no_grad)
    return fns


def measure(kind: str, device: str, size: int, tokens: int, calls: int, rounds: int) -> dict[str, object]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = build(kind, size, device, dtype)
    x = torch.randn(tokens, size, device=device, dtype=dtype)
    with torch.no_grad():
        layer.base_layer(x)  # a 4-bit layer sets its compute dtype on its first call
    row: dict[str, object] = {"kind": kind, "device": device, "size": size, "tokens": tokens, "no_grad_route": route(layer, x)}
    fns = variants(layer, x)
    times = per_call(fns, device, calls, rounds)
    row.update({f"{name}_us": statistics.median(values) for name, values in times.items()})
    # Our layer's own cost: ours - bare within each round (the two ran back to back), the median of those.
    for ours, bare in (("ours_no_grad", "bare_no_grad"), ("ours_train", "bare_train"), ("ours_train_step", "bare_train_step")):
        row[f"{ours}_over_bare_us"] = statistics.median(o - b for o, b in zip(times[ours], times[bare]))
    for name in ("ours_no_grad", "bare_no_grad", "ours_train", "bare_train"):
        row[f"{name}_python_calls"] = python_calls(fns[name])
    return row


def profile(kind: str, device: str, size: int, tokens: int, calls: int, top: int) -> str:
    """cProfile of our layer's no-grad call and training forward: where the Python time goes."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = build(kind, size, device, dtype)
    x = torch.randn(tokens, size, device=device, dtype=dtype)
    with torch.no_grad():
        layer.base_layer(x)
    fns = variants(layer, x)
    text = []
    for name in ("ours_no_grad", "ours_no_grad_train_mode", "ours_train"):
        if name not in fns:
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fns[name]()
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
        text.append(f"== {kind} {device} {tokens} tokens {name}, {calls} calls ==\n{stream.getvalue()}")
    return "\n".join(text)


COLUMNS = ("base", "ours_no_grad", "bare_no_grad", "ours_train", "bare_train", "ours_train_step", "bare_train_step")


def table(rows: list[dict[str, object]]) -> str:
    over = ("ours_no_grad", "ours_train", "ours_train_step")
    calls = ("ours_no_grad", "bare_no_grad", "ours_train", "bare_train")
    head = ["device", "base", "size", "tokens", "route", *COLUMNS, *(f"{c} over bare" for c in over), *(f"{c} py calls" for c in calls)]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for row in rows:
        cells = [row["device"], row["kind"], row["size"], row["tokens"], row["no_grad_route"]]
        cells += [f"{row[c + '_us']:.1f}" for c in COLUMNS]
        cells += [f"{row[c + '_over_bare_us']:+.1f}" for c in over]
        cells += [f"{row[c + '_python_calls']:.0f}" for c in calls]
        lines.append(" | ".join(str(c) for c in cells))
        if "ours_no_grad_output_route_us" in row:
            lines.append(f"  ({row['kind']} {row['device']} {row['tokens']} tokens, our layer on the output route instead of the fold: {row['ours_no_grad_output_route_us']:.1f} us)")
        if "ours_no_grad_train_mode_us" in row:
            lines.append(f"  (nf4 on CPU, our layer under no_grad in train mode, the direct 4-bit route: {row['ours_no_grad_train_mode_us']:.1f} us)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--calls", type=int, default=500, help="calls per round")
    parser.add_argument("--rounds", type=int, default=15, help="rounds (the variants take turns in each); the median is kept")
    parser.add_argument("--cpu-size", type=int, default=64, help="in = out features of the CPU layers (a multiple of 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier host-time figures)")
    parser.add_argument("--no-cuda", action="store_true", help="CPU only, even where CUDA is available")
    parser.add_argument("--no-cpu", action="store_true", help="CUDA only (on the GPU machine, where device time is short)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile tables (CPU, 1 token)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import bitsandbytes

    if args.no_cpu and (args.no_cuda or not torch.cuda.is_available()):
        parser.error("--no-cpu leaves nothing to measure without CUDA: drop --no-cpu, or run it where CUDA is available.")
    setups = ([] if args.no_cpu else [("cpu", args.cpu_size)]) + ([("cuda", 4096)] if torch.cuda.is_available() and not args.no_cuda else [])
    rows = []
    for device, size in setups:
        for kind in ("linear", "nf4"):
            for tokens in (1, 512):
                rows.append(measure(kind, device, size, tokens, args.calls, args.rounds))
                print(f"{device} {kind} {tokens}: " + json.dumps({k: round(v, 1) for k, v in rows[-1].items() if k.endswith("_us")}), flush=True)
    print()
    print("Host time per call, us (median of rounds; 'over bare': median of the per-round differences):")
    print(table(rows))
    if args.profile:
        for kind in ("linear", "nf4"):
            print(profile(kind, "cpu", args.cpu_size, 1, args.calls, top=25))
    versions = {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "threads": args.threads}
    if torch.cuda.is_available() and not args.no_cuda:
        versions["gpu"] = torch.cuda.get_device_name(0)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"rows": rows, "calls": args.calls, "rounds": args.rounds, "versions": versions}, handle, indent=2)


if __name__ == "__main__":
    main()
