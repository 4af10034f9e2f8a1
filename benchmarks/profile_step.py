"""Where a QLoRA training step spends its GPU time, and what each LoRA code path costs.

Builds one Llama-shaped nf4 model with our LoRA layers and one with PEFT's (same seed, same
shape as ``compare_peft.py``), then times in one process:

* ours with the fused LoRA autograd node (the default) and without it (``layers.fused_training(model, False)``),
* ours and PEFT with every decoder block compiled (``block.compile()``, regional compilation),
* a ``torch.profiler`` breakdown of our eager and compiled steps, and PEFT's compiled one, by kernel family
  (matmul, 4-bit dequantize, attention, the rest), with the top kernels (GPU ms per step against the step's
  wall time shows how long the GPU waits for the host),
* forward-only inference: quantized base vs our unmerged LoRA, eager and compiled.

    python benchmarks/profile_step.py --layers 16 --out profile.json
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
from compare_peft import ALPHA, BATCH, SEQ, TARGETS, R, forward_seconds, matmul_ceiling, quantized_llama, step_times, train_step

from lightning_lora.compiling import compile_blocks


def timed_steps(model: torch.nn.Module, steps: int, warmup: int = 2) -> dict:
    ids = torch.randint(0, 32000, (BATCH, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    times, loss = step_times(model, steps, warmup, ids)
    median = sorted(times)[len(times) // 2]
    return {"tokens_per_s": BATCH * SEQ / median, "step_s": median, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss}


def family(name: str) -> str:
    lowered = name.lower()
    if "dequantize" in lowered:
        return "4-bit dequantize"
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered:
        return "attention"
    if any(k in lowered for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "splitk")):
        return "matmul"
    if "adam" in lowered or "foreach" in lowered:
        return "optimizer"
    return "elementwise / reductions / copies"


def profile_step(model: torch.nn.Module, top: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (BATCH, SEQ), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            train_step(model, optimizer, ids)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels)
    families: dict[str, float] = {}
    for e in kernels:
        families[family(e.key)] = families.get(family(e.key), 0.0) + e.self_device_time_total
    kernels.sort(key=lambda e: -e.self_device_time_total)
    rows = [{"kernel": e.key[:120], "ms_per_step": e.self_device_time_total / 2e3, "calls_per_step": e.count / 2,
             "share": e.self_device_time_total / total} for e in kernels[:top]]
    return {"gpu_ms_per_step": total / 2e3, "families_ms_per_step": {k: v / 2e3 for k, v in sorted(families.items(), key=lambda kv: -kv[1])}, "top_kernels": rows}


def inference(model: torch.nn.Module) -> dict:
    from lightning_lora import disable_lora

    model.eval()
    out = {}
    for batch, seq in ((8, 2048), (1, 512)):
        ids = torch.randint(0, 32000, (batch, seq), device="cuda")
        with disable_lora(model):
            base = forward_seconds(model, ids)
        unmerged = forward_seconds(model, ids)
        out[f"{batch}x{seq}"] = {"base_ms": base * 1e3, "unmerged_ms": unmerged * 1e3, "overhead": unmerged / base - 1}
    return out


def check_compiled_gradients(layers: int = 2) -> dict:
    """Gradients of every LoRA tensor, eager unfused (the reference) against each other code path, on one batch.

    Relative error = ||g - g_ref|| / ||g_ref|| per tensor; the eager fused figure is the bf16 rounding
    noise floor. Compiled: every block compiled (LoRA layers emit plain ops in the graph). Also each
    step's peak memory.
    """
    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.layers import fused_training

    ids = torch.randint(0, 32000, (BATCH, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(2))

    def build() -> torch.nn.Module:
        model = inject_lora(quantized_llama(layers), LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
        with torch.no_grad():
            generator = torch.Generator("cuda").manual_seed(3)
            for name, p in model.named_parameters():
                if "lora_b" in name:  # non-zero B so every gradient path is exercised
                    p.copy_(torch.randn(p.shape, device="cuda", generator=generator) * 1e-2)
        return model

    def grads(m: torch.nn.Module) -> tuple[dict, float, float]:
        m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        return ({n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}, float(loss.detach()),
                torch.cuda.max_memory_allocated() / 2**30)

    variants = {"eager_unfused": (False, False), "eager_fused": (True, False), "compiled": (True, True)}  # (fused, compiled)
    out, ref = {}, None
    for name, (fused, compile_it) in variants.items():
        torch._dynamo.reset()
        model = build()
        with fused_training(model, fused):
            if compile_it:
                compile_blocks(model)
                grads(model)  # compiles
            g, loss, peak = grads(model)
        ref = ref or g
        errors = {n: float((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in ref}
        out[name] = {"loss": loss, "peak_gib": peak, "worst_rel_err": max(errors.values()),
                     "bad_tensors": sorted(n for n, e in errors.items() if e > 0.05)[:12]}
        print(name, out[name], flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


@torch.no_grad()
def profile_inference(model: torch.nn.Module, batch: int = 1, seq: int = 512, top: int = 12) -> dict:
    """Wall time vs GPU kernel time of one unmerged forward, and its top kernels."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    wall = forward_seconds(model, ids)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    return {"wall_ms": wall * 1e3, "gpu_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
            "top": [{"kernel": e.key[:100], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in kernels[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: check, peft, compile, profile, inference")
    args = parser.parse_args()
    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.layers import fused_training

    ceiling = matmul_ceiling()
    params = 6_738_415_616 * args.layers / 32
    results: dict = {"matmul_ceiling_tflops": ceiling / 1e12, "layers": args.layers}

    def record(name: str, fn) -> None:
        try:
            results[name] = fn()
            if "tokens_per_s" in results[name]:
                results[name]["mfu"] = results[name]["tokens_per_s"] * 4 * params / ceiling
        except Exception as err:  # one failing part must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}"[:800]}
        print(name, json.dumps(results[name]), flush=True)

    if "check" not in args.skip:
        record("compiled_gradients", check_compiled_gradients)
        gc.collect()
        torch.cuda.empty_cache()
    ours = inject_lora(quantized_llama(args.layers), LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
    with fused_training(ours, False):
        record("ours_unfused", lambda: timed_steps(ours, args.steps))
    record("ours_fused", lambda: timed_steps(ours, args.steps))
    if "profile" not in args.skip:
        record("profile_ours_fused", lambda: profile_step(ours))
    if "inference" not in args.skip:
        record("inference_eager", lambda: inference(ours))
        record("inference_profile_1x512", lambda: profile_inference(ours))
        from lightning_lora import disable_lora

        with disable_lora(ours):
            record("inference_profile_1x512_base", lambda: profile_inference(ours))
    if "compile" not in args.skip:
        compile_blocks(ours)
        record("ours_compiled", lambda: timed_steps(ours, args.steps, warmup=3))
        if "profile" not in args.skip:
            record("profile_ours_compiled", lambda: profile_step(ours, top=30))
        if "inference" not in args.skip:
            record("inference_compiled", lambda: inference(ours))
    ours = None  # free the model before PEFT's is built
    gc.collect()
    torch.cuda.empty_cache()
    if "peft" not in args.skip:
        from compare_peft import peft_model

        peft = peft_model(args.layers, recipe=False, gc_on=False)
        record("peft_no_upcast", lambda: timed_steps(peft, args.steps))
        if "compile" not in args.skip:
            compile_blocks(peft)
            record("peft_no_upcast_compiled", lambda: timed_steps(peft, args.steps, warmup=3))
            if "profile" not in args.skip:  # the same breakdown as ours compiled: where the two steps differ
                record("profile_peft_compiled", lambda: profile_step(peft, top=30))
    import bitsandbytes
    import transformers

    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "bitsandbytes": bitsandbytes.__version__, "gpu": torch.cuda.get_device_name(0)}
    print(f"{'config':28}{'tokens/s':>10}{'step ms':>9}{'peak GiB':>10}{'MFU':>7}")
    for name, r in results.items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            print(f"{name:28}{r['tokens_per_s']:>10.0f}{r['step_s'] * 1e3:>9.1f}{r['peak_gib']:>10.1f}{r['mfu']:>7.1%}")
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
