"""What each candidate lever for a faster compiled QLoRA step would buy, measured on one GPU (issue 17.2).

Five parts, each in this one process:

* ``gemm``: the base matmuls of projections that share an input (q/k/v; gate/up) as one matmul over the
  concatenated weights against one matmul each, forward (``x @ W^T``) and input-gradient (``sum g_i @ W_i``);
* ``lora_shared``: LoRA's A-side products for projections that share an input, one per projection against one
  over the stacked A matrices (forward, A's gradient, the input-gradient term);
* ``update_order``: the LoRA update and the base matmul of one layer in two orders, forward (base first and the
  update accumulated into its output, against the update first and the base matmul accumulating into it in its
  epilogue) and input gradient (two products then a sum, against one product accumulating into the other);
* ``dequant``: bitsandbytes' nf4 dequantize (double quant: three kernels) against ``lightning_lora.nf4_kernel``
  (one Triton kernel): bit-identical output and time per call;
* ``model``: the 16-layer 7B-shape nf4 model of ``profile_step.py``, every block compiled: ``bnb_addmm``
  (bitsandbytes dequantizes, the LoRA update added by one ``addmm`` into the base output: the library's
  default before the nf4 kernel), ``kernel_addmm`` (the nf4 kernel, the update added after the matmul by one
  functional ``addmm``, which copies the base output first: the default before 2026-12-03), ``kernel_inplace`` (the
  library's default: ``_routes.frozen_nf4_lora_linear``, the update added in place by one opaque op), ``kernel_plain_add`` (the update as a
  plain add that inductor fuses into its neighbours),
  PEFT compiled the same way, and eager variants
  (``breaks`` in a name: the 4-bit weight's ``as_subclass`` traced as on 2026-12-02, a graph break in every LoRA
  layer; ``eager_`` prefix: not compiled, where the library never uses the kernel; ``unfused``: the plain-ops route
  instead of the fused autograd node):
  tokens/s, peak memory, GPU ms per step by kernel family, and the step's wall time less its GPU time (the time
  the GPU waits for the host). ``--trace`` writes a chrome trace of one step of the last variant of ours. A name
  may carry a suffix (``kernel_addmm_again``) to measure a variant twice; one with ``cudagraph`` in its name
  compiles its blocks with ``mode='reduce-overhead'`` (CUDA graphs replayed by inductor's cudagraph trees, each
  step marked as a new generation). ``--trace-variant`` names the variant whose step is traced.

    python benchmarks/step_levers.py --out levers.json [--parts gemm lora_shared update_order dequant model] [--trace trace.json.gz]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn.functional as F


def cuda_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def graph_ms(fn, repeats: int = 20) -> float:
    """GPU time per call of ``fn``: ``repeats`` calls captured in one CUDA graph and replayed (no host time in it)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (3 * repeats)


def gemm_part(tokens: int = 4096, hidden: int = 4096, inter: int = 11008) -> dict:
    out = {}
    dtype = torch.bfloat16
    for name, widths in (("q/k/v", [hidden] * 3), ("gate/up", [inter] * 2)):
        x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
        weights = [torch.randn(w, hidden, device="cuda", dtype=dtype) / 64 for w in widths]
        grads = [torch.randn(tokens, w, device="cuda", dtype=dtype) for w in widths]
        cat_w = torch.cat(weights)
        cat_g = torch.cat(grads, dim=1)

        def separate_grad() -> torch.Tensor:
            total = grads[0] @ weights[0]
            for g, w in zip(grads[1:], weights[1:]):
                total = total + g @ w  # what autograd does: one matmul per projection, then a sum
            return total

        row = {
            "forward_separate_ms": cuda_ms(lambda: [x @ w.t() for w in weights]),
            "forward_one_ms": cuda_ms(lambda: x @ cat_w.t()),
            "grad_separate_ms": cuda_ms(separate_grad),
            "grad_one_precat_ms": cuda_ms(lambda: cat_g @ cat_w),
            "grad_cat_then_one_ms": cuda_ms(lambda: torch.cat(grads, dim=1) @ cat_w),
        }
        row["forward_gain"] = row["forward_separate_ms"] / row["forward_one_ms"] - 1
        row["grad_gain_with_cat"] = row["grad_separate_ms"] / row["grad_cat_then_one_ms"] - 1
        out[name] = row
        print(name, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    return out


def lora_shared_part(tokens: int = 4096, hidden: int = 4096, r: int = 16) -> dict:
    """LoRA's A side for projections that share an input (q/k/v: 3; gate/up: 2): one ``(tokens, r)`` product each
    against one ``(tokens, n * r)`` product over the stacked A matrices, forward (``x @ A^T``) and backward (A's
    gradient ``grad_h^T @ x``, and the input-gradient term ``grad_h @ A`` added into the base's input gradient)."""
    out = {}
    dtype = torch.bfloat16
    for name, n in (("q/k/v", 3), ("gate/up", 2)):
        x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
        grad_x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
        a = [torch.randn(r, hidden, device="cuda", dtype=dtype) / 64 for _ in range(n)]
        gh = [torch.randn(tokens, r, device="cuda", dtype=dtype) for _ in range(n)]
        a_cat, gh_cat = torch.cat(a), torch.cat(gh, dim=1)

        def separate_backward() -> None:
            for g, w in zip(gh, a):
                torch.mm(g.t(), x)
                grad_x.addmm_(g, w)

        def shared_backward() -> None:
            torch.mm(gh_cat.t(), x)
            grad_x.addmm_(gh_cat, a_cat)

        row = {
            "forward_separate_ms": cuda_ms(lambda: [torch.mm(x, w.t()) for w in a]),
            "forward_shared_ms": cuda_ms(lambda: torch.mm(x, a_cat.t())),
            "backward_separate_ms": cuda_ms(separate_backward),
            "backward_shared_ms": cuda_ms(shared_backward),
        }
        separate = row["forward_separate_ms"] + row["backward_separate_ms"]
        row["saved_ms_per_layer"] = separate - row["forward_shared_ms"] - row["backward_shared_ms"]
        out[name] = row
        print(name, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    return out


def update_order_part(tokens: int = 4096, hidden: int = 4096, inter: int = 11008, r: int = 16, scale: float = 2.0) -> dict:
    """One LoRA layer's forward ``x @ W^T + s * h @ B^T`` and input gradient ``g @ W + grad_h @ A`` at the 7B
    shapes, GPU time from CUDA graphs. Forward: ``after`` (the base product, then the update accumulated into
    it: a second pass over the output) against ``first`` (the update written, then the base product
    accumulating into it in cuBLAS's epilogue, ``beta=1``). Input gradient: ``sum`` (two products and an add, the
    add as a separate kernel, which a compiled graph fuses into the next elementwise kernel instead) against
    ``first`` (``grad_h @ A`` written, then ``g @ W`` accumulating into it)."""
    out = {}
    dtype = torch.bfloat16
    for name, (n_in, n_out) in (("4096->4096", (hidden, hidden)), ("4096->11008", (hidden, inter)), ("11008->4096", (inter, hidden))):
        x = torch.randn(tokens, n_in, device="cuda", dtype=dtype)
        w = torch.randn(n_out, n_in, device="cuda", dtype=dtype) / 64
        a = torch.randn(r, n_in, device="cuda", dtype=dtype) / 64
        b = torch.randn(n_out, r, device="cuda", dtype=dtype) / 8
        h = torch.randn(tokens, r, device="cuda", dtype=dtype)
        g = torch.randn(tokens, n_out, device="cuda", dtype=dtype)

        def forward_after() -> torch.Tensor:
            return torch.mm(x, w.t()).addmm_(h, b.t(), alpha=scale)

        def forward_first() -> torch.Tensor:
            return x.new_empty(tokens, n_out).addmm_(h, b.t(), beta=0, alpha=scale).addmm_(x, w.t())

        def grad_sum() -> torch.Tensor:
            return torch.mm(g, w) + torch.mm(h, a)

        def grad_first() -> torch.Tensor:
            return torch.mm(h, a).addmm_(g, w)

        reference = (x.float() @ w.float().t() + scale * h.float() @ b.float().t())
        row = {
            "forward_after_ms": graph_ms(forward_after),
            "forward_first_ms": graph_ms(forward_first),
            "grad_sum_ms": graph_ms(grad_sum),
            "grad_first_ms": graph_ms(grad_first),
            "forward_after_rel_err": float((forward_after().float() - reference).norm() / reference.norm()),
            "forward_first_rel_err": float((forward_first().float() - reference).norm() / reference.norm()),
        }
        row["forward_saved_ms"] = row["forward_after_ms"] - row["forward_first_ms"]
        row["grad_saved_ms"] = row["grad_sum_ms"] - row["grad_first_ms"]
        out[name] = row
        print(name, json.dumps({k: round(v, 5) for k, v in row.items()}), flush=True)
    # Per 7B decoder layer: q, k, v and o of the first shape, gate and up of the second, down of the third.
    out["forward_saved_ms_per_layer"] = 4 * out["4096->4096"]["forward_saved_ms"] + 2 * out["4096->11008"]["forward_saved_ms"] + out["11008->4096"]["forward_saved_ms"]
    out["grad_saved_ms_per_layer"] = 4 * out["4096->4096"]["grad_saved_ms"] + 2 * out["4096->11008"]["grad_saved_ms"] + out["11008->4096"]["grad_saved_ms"]
    print("per layer", {k: round(out[k], 4) for k in ("forward_saved_ms_per_layer", "grad_saved_ms_per_layer")}, flush=True)
    return out


def dequant_part() -> dict:
    import bitsandbytes.functional as BF

    from lightning_lora import nf4_kernel

    out = {}
    torch.manual_seed(0)
    for shape in ((4096, 4096), (11008, 4096), (4096, 11008), (96, 64)):
        for nested in (True, False):
            w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
            packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested, quant_storage=torch.uint8)
            ref = BF.dequantize_4bit(packed, state)
            row = {"bnb_ms": cuda_ms(lambda: BF.dequantize_4bit(packed, state))}
            default = nf4_kernel._BLOCK[0]
            for block in (512, 1024, 2048, 4096):  # packed bytes per program
                nf4_kernel._BLOCK[0] = block
                row[f"kernel_{block}_equal"] = bool(torch.equal(nf4_kernel.dequantize(packed, state, state.dtype), ref))
                row[f"kernel_{block}_ms"] = cuda_ms(lambda: nf4_kernel.dequantize(packed, state, state.dtype))
            nf4_kernel._BLOCK[0] = default
            # GPU time alone (CUDA-graph replay: no host time in it).
            try:
                row["gpu_bnb_ms"] = graph_ms(lambda: BF.dequantize_4bit(packed, state))
            except Exception as err:  # bitsandbytes' launches may refuse capture
                row["gpu_bnb_ms"] = f"{type(err).__name__}: {err}"[:200]
            row["gpu_kernel_ms"] = graph_ms(lambda: nf4_kernel.dequantize(packed, state, state.dtype))
            bytes_moved = packed.numel() + ref.numel() * 2
            row["bnb_tb_s"] = bytes_moved / row["bnb_ms"] / 1e9
            row["kernel_best_tb_s"] = bytes_moved / min(row[f"kernel_{b}_ms"] for b in (512, 1024, 2048, 4096)) / 1e9
            key = f"{shape[0]}x{shape[1]}{' nested' if nested else ''}"
            out[key] = row
            print(key, json.dumps(row), flush=True)
    return out


def plain_add_training(layer, adapter, x, a, b):  # noqa: ANN001, ANN201 - the route's own signature
    """``_routes.unfused_training`` with the update added as a plain op (inductor fuses the add into its neighbours)."""
    from lightning_lora import _routes, quantization

    base = layer.base_layer
    out = quantization.frozen_nf4_linear(base, x) if quantization.is_4bit(base) and _routes.fusable(layer, adapter) else None
    out = base(x) if out is None else out
    if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        a, b = a.to(x.dtype), b.to(x.dtype)
    h = F.linear(adapter.dropout(x), a)
    return out + (F.linear(h, b) * adapter.scale).to(out.dtype)


def model_part(layers: int, steps: int, variants: list[str], trace: str | None, deadline: float, trace_variant: str | None = None) -> dict:
    import compare_peft
    from compare_peft import ALPHA, TARGETS, R, peft_model, quantized_llama
    from profile_step import profile_step, timed_steps

    from lightning_lora import LoRAConfig, _routes, inject_lora, nf4_kernel, quantization
    from lightning_lora.compiling import compile_blocks
    from lightning_lora.layers import lora_layers

    results = {}
    original, enabled = _routes.unfused_training, nf4_kernel.ENABLED
    in_place, packed_tensor = _routes.frozen_nf4_lora_linear, quantization.packed_tensor

    def packed_tensor_before_2026_12_03(weight):  # noqa: ANN001, ANN202 - as_subclass even while compiling
        classes = quantization._bnb_classes()
        return weight.as_subclass(torch.Tensor) if classes and type(weight) is classes[2] else weight

    for variant in variants:
        if time.perf_counter() > deadline:
            results[variant] = {"skipped": "past the deadline"}
            continue
        torch._dynamo.reset()
        try:
            if variant == "peft":
                model = peft_model(layers, recipe=False, gc_on=False)
            else:
                model = inject_lora(quantized_llama(layers), LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
                _routes.unfused_training = plain_add_training if variant.endswith("plain_add") else original
                nf4_kernel.ENABLED = "bnb" not in variant
                # ``addmm`` variants: the update added by a functional addmm (a copy of the base output first),
                # the library's compiled route before ``frozen_nf4_lora_linear``; ``inplace``: that route.
                _routes.frozen_nf4_lora_linear = (lambda *args: None) if "addmm" in variant else in_place
                # ``breaks``: the weight's ``as_subclass`` traced as on 2026-12-02, which dynamo cannot trace (a graph break per layer)
                quantization.packed_tensor = packed_tensor_before_2026_12_03 if "breaks" in variant else packed_tensor
            if "unfused" in variant:  # the plain-ops route (bitsandbytes computes the base then)
                for layer in lora_layers(model).values():
                    layer.fused = False
            compare_peft.MARK_CUDAGRAPH_STEPS = "cudagraph" in variant
            if not variant.startswith("eager"):
                compile_blocks(model, **({"mode": "reduce-overhead"} if "cudagraph" in variant else {}))
            row = timed_steps(model, steps, warmup=3)
            row.update(profile_step(model, top=40))
            row["host_wait_ms"] = row["step_s"] * 1e3 - row["gpu_ms_per_step"]
            if trace and variant == (trace_variant or [v for v in variants if v != "peft"][-1]):
                from compare_peft import train_step
                from torch.profiler import ProfilerActivity, profile

                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                ids = torch.randint(0, 32000, (2, 2048), device="cuda")
                train_step(model, optimizer, ids)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    train_step(model, optimizer, ids)
                    torch.cuda.synchronize()
                prof.export_chrome_trace(trace)
        except Exception as err:  # one failing variant must not hide the others
            row = {"error": f"{type(err).__name__}: {err}"[:800]}
        finally:
            _routes.unfused_training = original
            nf4_kernel.ENABLED = enabled
            _routes.frozen_nf4_lora_linear, quantization.packed_tensor = in_place, packed_tensor
            compare_peft.MARK_CUDAGRAPH_STEPS = False
        results[variant] = row
        print(variant, json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
        model = None
        gc.collect()
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", nargs="*", default=["gemm", "dequant", "model"])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", nargs="*", default=["bnb_addmm", "kernel_addmm", "kernel_inplace", "peft"])
    parser.add_argument("--trace", default=None)
    parser.add_argument("--trace-variant", default=None, help="the variant whose step --trace records (default: the last of ours)")
    parser.add_argument("--max-seconds", type=float, default=480)
    args = parser.parse_args()
    deadline = time.perf_counter() + args.max_seconds
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if "gemm" in args.parts:
        results["gemm"] = gemm_part()
    if "lora_shared" in args.parts:
        results["lora_shared"] = lora_shared_part()
    if "update_order" in args.parts:
        results["update_order"] = update_order_part()
    if "dequant" in args.parts:
        try:
            results["dequant"] = dequant_part()
        except Exception as err:
            results["dequant"] = {"error": f"{type(err).__name__}: {err}"[:800]}
            print("dequant", results["dequant"], flush=True)
    if "model" in args.parts:
        results["model"] = model_part(args.layers, args.steps, args.variants, args.trace, deadline, args.trace_variant)
        print(f"{'variant':18}{'tokens/s':>10}{'step ms':>9}{'GPU ms':>8}{'host wait':>10}{'peak GiB':>10}")
        for name, r in results["model"].items():
            if "tokens_per_s" in r:
                print(f"{name:18}{r['tokens_per_s']:>10.0f}{r['step_s'] * 1e3:>9.1f}{r['gpu_ms_per_step']:>8.1f}{r['host_wait_ms']:>10.1f}{r['peak_gib']:>10.1f}")
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
