"""Ours against PEFT compiled, one training step of each in turn, on one GPU (issue 17.2).

``compare_peft.py`` runs one configuration after the other, so the GPU's own speed drifts between them: on one
H200 the same cuBLAS kernel on the same shapes took 236.6 us in one configuration and 253.8 us in the next
(``results/2026-12-03-host-wait-h200/``), as large as the differences measured. Here both models live on the GPU
together (``compare_peft.py``'s Llama-2-7B shape, nf4 + double quant, r=16 on all seven projections, batch 2 x
2048, AdamW, bf16 autocast, every block compiled, a plain PyTorch loop) and the timed steps alternate: ours, PEFT,
PEFT, ours, ... so that a drift slows both alike. Prints a table and writes JSON: each model's median step,
tokens/s and MFU (4 x parameters x tokens/s against the higher of the bf16 matmul ceilings measured before and
after), the ratio of the medians and of each round's pair, and each model's peak memory (its step's peak less the
other models' resident memory; what the process allocates once for all, such as cuBLAS workspaces, counts in the
resident memory of the first model built, ours, so ours' peak includes it and the others' do not). ``--with-before`` adds a model: ours with the compiled nf4 route of commit ``1e41e31`` (the base
product first, the update added into it; the input gradient summed in the graph). ``--batch`` / ``--seq`` change the
shape (at 1 x 512 a compiled step waits on the host's launches).

    python benchmarks/interleaved_step.py --out interleaved.json [--layers 32] [--rounds 10] [--with-before] [--batch 1 --seq 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_peft  # noqa: E402


class _Before:
    """The compiled nf4 LoRA route as it was at commit ``1e41e31`` (2026-12-03), for ``ours_before``: one opaque op
    (a ``torch.library.Library`` fragment, as the library's) that casts the adapter, computes ``h = x @ A^T`` and
    the base product and then adds the update into the base output in place; its backward sums ``g @ W`` and
    ``grad_h @ A`` in the graph. The library's route now writes the update first and lets the base product
    accumulate into it, forward and backward (``nf4_kernel.matmul_sum``)."""

    op = None
    calls = [0]  # calls of that op: ``ours_before``'s steps must make them, the other models' none
    library: list = []

    @classmethod
    def register(cls) -> None:
        from lightning_lora import nf4_kernel

        if cls.op is not None:
            return

        def kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
            cls.calls[0] += 1
            a_c, b_c = a.to(x.dtype), b.to(x.dtype)
            h = torch.mm(x, a_c.t())
            out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
            return out.addmm_(h, b_c.t(), alpha=scale), h

        def fake(x, weight, bias, a, b, scale):  # noqa: ANN001, ANN202 - the op's signature
            return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], a.shape[0]))

        library = torch.library.Library("lightning_lora_bench", "FRAGMENT")
        library.define("linear_plus_update_1e41e31(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, float scale) -> (Tensor, Tensor)")
        library.impl("linear_plus_update_1e41e31", kernel, "CompositeExplicitAutograd")
        torch.library.register_fake("lightning_lora_bench::linear_plus_update_1e41e31", fake, lib=library)
        cls.library.append(library)
        op = torch.ops.lightning_lora_bench.linear_plus_update_1e41e31.default

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, weight, bias, state, a, b, scale):  # noqa: ANN001, ANN205 - the route's signature
                x2 = x.reshape(-1, x.shape[-1])
                out, h = op(x2, nf4_kernel.dequantize(weight, state, x.dtype), bias, a, b, scale)
                ctx.state, ctx.scale = state, scale
                ctx.save_for_backward(weight, x, h, a, b)
                return out.view(*x.shape[:-1], out.shape[-1])

            @staticmethod
            def backward(ctx, grad):  # noqa: ANN001, ANN205
                weight, x, h, a, b = ctx.saved_tensors
                x2 = x.reshape(-1, x.shape[-1])
                needs_x, _, _, _, needs_a, needs_b, _ = ctx.needs_input_grad
                g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
                a_c, b_c = a.to(x2.dtype), b.to(x2.dtype)
                grad_h = torch.mm(g, b_c) * ctx.scale
                grad_a = torch.mm(grad_h.t(), x2).to(a.dtype) if needs_a else None
                grad_b = (torch.mm(g.t(), h) * ctx.scale).to(b.dtype) if needs_b else None
                grad_x = None
                if needs_x:
                    w = nf4_kernel.dequantize(weight, ctx.state, ctx.state.dtype, pass_id=1).to(g.dtype)
                    grad_x = (torch.mm(g, w) + torch.mm(grad_h, a_c)).view(*grad.shape[:-1], x2.shape[-1])
                return grad_x, None, None, None, grad_a, grad_b, None

        cls.op, cls.function = op, Function


def build(name: str, layers: int) -> torch.nn.Module:
    if name == "peft":
        return compare_peft.compiled(compare_peft.peft_model(layers, recipe=False, gc_on=False))
    return compare_peft.compiled(compare_peft.ours_model(layers, gc_on=False))


def steps(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, count: int = 1) -> torch.Tensor:
    """``count`` training steps; ``ours_before`` runs (and compiles, on its first steps) with the route of commit
    ``1e41e31`` in the current one's place, which dynamo's guards tell apart from the other model's graphs."""
    from lightning_lora import _routes

    current = _routes._FrozenNF4LoRA
    if name == "ours_before":
        _Before.register()
        _routes._FrozenNF4LoRA = _Before.function
    try:
        for _ in range(count):
            loss = compare_peft.train_step(model, optimizer, ids)
    finally:
        _routes._FrozenNF4LoRA = current
    return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--with-before", action="store_true",
                        help="a third model: ours with the compiled route of commit 1e41e31")
    parser.add_argument("--batch", type=int, default=compare_peft.BATCH)
    parser.add_argument("--seq", type=int, default=compare_peft.SEQ)
    args = parser.parse_args()
    compare_peft.BATCH, compare_peft.SEQ = args.batch, args.seq  # train_step and the model's positions read them
    generator = torch.Generator("cuda").manual_seed(1)
    ids = torch.randint(0, 32000, (compare_peft.BATCH, compare_peft.SEQ), device="cuda", generator=generator)
    names = ("ours", "peft") + (("ours_before",) if args.with_before else ())
    models, optimizers, resident = {}, {}, {}
    for name in names:
        before = torch.cuda.memory_allocated()
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)  # two models' block graphs
        models[name] = build(name, args.layers).train()
        optimizers[name] = torch.optim.AdamW([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
        steps(name, models[name], optimizers[name], ids, args.warmup)
        torch.cuda.synchronize()
        resident[name] = torch.cuda.memory_allocated() - before
    ceiling = [compare_peft.matmul_ceiling()]
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float] = dict.fromkeys(names, 0.0)
    losses: dict[str, float] = {}
    op_calls: dict[str, int] = dict.fromkeys(names, 0)
    for index in range(args.rounds):
        # Rotated each round: with two models ours, PEFT / PEFT, ours / ...; with three, each takes each place in turn.
        for name in names[index % len(names):] + names[:index % len(names)]:
            other = sum(v for k, v in resident.items() if k != name)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            calls = _Before.calls[0]
            start = time.perf_counter()
            loss = steps(name, models[name], optimizers[name], ids)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            op_calls[name] += _Before.calls[0] - calls
            peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated() - other) / 2**30)
            losses[name] = float(loss)
    ceiling.append(compare_peft.matmul_ceiling())
    params = 6_738_415_616 * args.layers / 32
    tokens = compare_peft.BATCH * compare_peft.SEQ
    results: dict = {"layers": args.layers, "rounds": args.rounds, "matmul_ceiling_tflops": [c / 1e12 for c in ceiling]}
    for name in names:
        median = statistics.median(times[name])
        results[name] = {"step_ms": median * 1e3, "steps_ms": [t * 1e3 for t in times[name]], "tokens_per_s": tokens / median,
                         "mfu": tokens / median * 4 * params / max(ceiling), "peak_gib": peaks[name], "loss": losses[name]}
    pairs = [p / o for o, p in zip(times["ours"], times["peft"])]
    results["ratio_of_medians"] = results["peft"]["step_ms"] / results["ours"]["step_ms"]
    results["ratio_per_round"] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)}
    if args.with_before:
        results["before_over_ours"] = results["ours_before"]["step_ms"] / results["ours"]["step_ms"]
        results["before_op_calls_per_step"] = {name: op_calls[name] / args.rounds for name in names}
        # Every LoRA layer (seven per block) must have run the old route's op in every step of ours_before, and none
        # in the other models' steps.
        if any(op_calls[n] for n in names if n != "ours_before") or op_calls["ours_before"] != 7 * args.layers * args.rounds:
            results["before_error"] = "a model ran another's graph, or not every layer took the route: the comparison does not hold"
    import bitsandbytes
    import peft
    import transformers

    results["versions"] = {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
                           "bitsandbytes": bitsandbytes.__version__, "gpu": torch.cuda.get_device_name(0)}
    print(f"{'model':12}{'step ms':>9}{'tokens/s':>10}{'MFU':>7}{'peak GiB':>10}")
    for name in names:
        r = results[name]
        print(f"{name:12}{r['step_ms']:>9.1f}{r['tokens_per_s']:>10.0f}{r['mfu']:>7.1%}{r['peak_gib']:>10.2f}")
    per_round = results["ratio_per_round"]
    print(f"ours / PEFT speed: {results['ratio_of_medians']:.3f}x (per round: median {per_round['median']:.3f}x, "
          f"{per_round['min']:.3f}-{per_round['max']:.3f}); ceiling {ceiling[0] / 1e12:.0f} / {ceiling[1] / 1e12:.0f} TFLOPS")
    if args.with_before:
        print(f"the route of commit 1e41e31: step {results['before_over_ours']:.3f}x ours; its op's calls per step "
              f"{results['before_op_calls_per_step']} {results.get('before_error', '')}")
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
