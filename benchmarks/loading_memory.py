"""Host memory of building a quantized model: block by block (``lightning_lora.loading``) vs build-then-quantize.

Each way runs in a fresh process and reports its peak resident memory (``ru_maxrss``) next to the
model's full-precision and quantized sizes. Runs on CPU (``--device cpu``) or quantizes on a GPU
(``--device cuda``, then host memory holds only the packed model when ``offload_to='cpu'``).

    python benchmarks/loading_memory.py --out results_dir [--device cpu] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GiB = 2**30


def build(way: str, layers: int, device: str) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_lora import QuantizationConfig, quantize_model
    from lightning_lora.loading import build_quantized_model

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    quant = QuantizationConfig(mode="nf4", compute_dtype="bfloat16")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if way == "block_by_block":
        model = build_quantized_model(config, quant, device=device, offload_to="cpu")
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        quantize_model(model, quant, skip={"lm_head"}, device=device)
        model.to("cpu")
    seconds = time.perf_counter() - t0
    packed = sum(p.numel() * p.element_size() for p in model.parameters())
    full = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("proj.weight")) * 2
    full += sum(m.in_features * m.out_features * 2 for n, m in model.named_modules() if n.endswith("proj"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"way": way, "peak_rss_gib": peak / GiB, "rss_before_build_gib": base / GiB, "packed_params_gib": packed / GiB,
            "full_bf16_gib": full / GiB, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--way", choices=["block_by_block", "build_then_quantize"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(build(args.way, args.layers, args.device)))
        return
    results = []
    for way in ("block_by_block", "build_then_quantize"):
        cmd = [sys.executable, __file__, "--way", way, "--layers", str(args.layers), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
    for r in results:
        print(f"{r['way']:>20}: peak RSS {r['peak_rss_gib']:.2f} GiB (before build {r['rss_before_build_gib']:.2f}); "
              f"full bf16 {r['full_bf16_gib']:.2f} GiB, packed {r['packed_params_gib']:.2f} GiB; {r['seconds']:.1f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "loading_memory.json").write_text(json.dumps({"layers": args.layers, "device": args.device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
