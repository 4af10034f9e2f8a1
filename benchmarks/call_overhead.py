"""Host-side cost of one LoRA layer call at small batch: time per call of a CUDA nf4 base alone and with LoRA.

Variants: the base layer; the base through bitsandbytes' op alone (``quantization.linear_4bit_no_grad``, what our
layer computes its 4-bit base with when no gradient is taken); our LoRA layer, and the same through the base
layer's own forward (as before that route); the two LoRA launches bare, and several spellings of the second.
Each variant is called 2,000 times back to back with one synchronize at the end, so when the GPU
work is small the figure is the host's (Python + dispatch + launch) time per call.

    python benchmarks/call_overhead.py --out overhead.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def per_call(fn, x: torch.Tensor, n: int = 2000) -> float:
    for _ in range(50):
        fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from torch import nn

    from lightning_lora import LoRALinear, QuantizationConfig, quantization
    from lightning_lora.quantization import quantize_linear

    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(4096, 4096, bias=False).bfloat16(), QuantizationConfig(mode="nf4", compute_dtype="bfloat16"), device="cuda")
    layer = LoRALinear(base, r=16, alpha=32).cuda().eval()
    a, b = layer.lora_a.weight.bfloat16(), layer.lora_b.weight.bfloat16()
    results = {}
    for tokens in (1, 512):
        x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)

        def bare(x):  # the two LoRA launches with no module logic around them
            out = base(x)
            out.addmm_(torch.mm(x, a.t()), b.t(), alpha=2.0)
            return out

        b_scaled = (b * 2.0).contiguous()
        h = torch.mm(x, a.t())
        out = base(x)
        ops = {  # the second LoRA op alone, in several spellings
            "addmm_inplace": lambda x: out.addmm_(h, b.t(), alpha=2.0),
            "addmm_inplace_beta_alpha1": lambda x: out.addmm_(h, b_scaled.t()),
            "addmm_outofplace": lambda x: torch.addmm(out, h, b.t(), alpha=2.0),
            "mm_then_add_": lambda x: out.add_(torch.mm(h, b_scaled.t())),
            "linear_then_add_": lambda x: out.add_(torch.nn.functional.linear(h, b_scaled)),
            "matmul_then_add_": lambda x: out.add_(h @ b_scaled.t()),
        }
        row = {}
        for autocast in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                row[f"base_us{'_autocast' if autocast else ''}"] = per_call(base, x)
                row[f"lora_us{'_autocast' if autocast else ''}"] = per_call(layer, x)
                # The base through bitsandbytes' op alone (the layer's own result without its Python), and our layer
                # as it was before it took that route for its base.
                row[f"base_direct_op_us{'_autocast' if autocast else ''}"] = per_call(lambda x: quantization.linear_4bit_no_grad(base, x), x)
                real, quantization.linear_4bit_no_grad = quantization.linear_4bit_no_grad, lambda module, x: None
                try:
                    row[f"lora_through_base_forward_us{'_autocast' if autocast else ''}"] = per_call(layer, x)
                finally:
                    quantization.linear_4bit_no_grad = real
                row[f"bare_two_ops_us{'_autocast' if autocast else ''}"] = per_call(bare, x)
                row[f"mm_only_us{'_autocast' if autocast else ''}"] = per_call(lambda x: torch.mm(x, a.t()), x)
                for name, op in ops.items():
                    row[f"{name}_us{'_autocast' if autocast else ''}"] = per_call(op, x)
        results[f"{tokens}_tokens"] = row
        print(tokens, json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
    results["versions"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
