"""Long-context QLoRA at batch 1: the longest sequence that trains on one GPU, ours vs PEFT's best configuration.

Llama-3-8B shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336, vocabulary 128,256) with random weights,
nf4 + double quant (bf16 compute), LoRA r=16 alpha=32 on every projection, AdamW, bf16 autocast, SDPA attention,
one sequence of random tokens, the loss through ``model(input_ids=ids, labels=ids)`` as a user's module calls it.

Systems (each built from the same seed, one after the other in this process):

- ``peft``: PEFT's best configuration for memory: ``get_peft_model`` + non-reentrant gradient checkpointing +
  every decoder layer compiled (transformers' loss over the full logits);
- ``ours``: ``inject_lora`` + ``enable_activation_checkpointing`` + the same compiled layers + the chunked loss
  (``enable_chunked_loss``, what ``LoRACallback(chunked_ce=4096)`` installs);
- ``ours_offload``: ``ours`` with the checkpointed layer inputs in pinned host memory (``offload_to_cpu=True``).

The search is the same for every system: one optimizer step at two probe lengths gives the peak allocated memory's
line ``a + b * tokens`` (attention is SDPA / FlashAttention, linear in memory); the predicted longest length is where
that line meets the GPU's memory less ``--headroom-gib``, rounded down to 1024; one step at that length verifies it
(on out-of-memory: 10% shorter, up to 3 times). The verified length is capped (a step at 300k tokens takes minutes):
at ``--verify-cap``, and for the systems after ``peft`` at ``--cap-vs-peft`` (2.2) times PEFT's longest; a system
predicted beyond its cap is verified at the cap, and the table says so beside the predicted maximum. Then tokens/s at
``--tps-len`` (32k) for each system. Compiled layers use ``dynamic=True`` so new lengths do not recompile.

    python benchmarks/long_context.py --out DIR                                # one H200
    python benchmarks/long_context.py --tiny --device cpu --out DIR            # the code path on CPU (no memory figures)

Writes DIR/long_context.json; prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

R, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (128, 256, 2, 4, 2, 4096),
}
GIB = 2**30


def build_base(shape: str, device: torch.device, max_len: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_lora import QuantizationConfig, quantize_model

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max_len, rope_theta=500000.0,
                         tie_word_embeddings=False, use_cache=False)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    compute = "bfloat16" if device.type == "cuda" else "float32"
    quantize_model(model, QuantizationConfig(mode="nf4", double_quant=True, compute_dtype=compute), device=device)
    return model


def build_system(name: str, args: argparse.Namespace) -> torch.nn.Module:
    from lightning_lora.compiling import compile_blocks

    model = build_base(args.shape, args.device, args.max_position)
    if name == "peft":
        from peft import LoraConfig, get_peft_model

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    else:
        from lightning_lora import LoRAConfig, enable_chunked_loss, inject_lora
        from lightning_lora.checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model, offload_to_cpu=name == "ours_offload")
        model = inject_lora(model, LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
        enable_chunked_loss(model, args.chunk)
    if args.compile:
        compile_blocks(model, dynamic=True)
    return model.train()


class System:
    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.model = build_system(name, args)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.vocab = SHAPES[args.shape][5]

    def step(self, tokens: int) -> dict[str, Any]:
        """One optimizer step on one sequence of ``tokens``: seconds, peak allocated GiB, loss; or the OOM."""
        device = self.args.device
        cuda = device.type == "cuda"
        # The same tokens for every system at a length: the first step's losses must agree (B starts at zero).
        ids = torch.randint(0, self.vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens)).to(device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = self.model(input_ids=ids, labels=ids).loss
            loss.backward()
            self.optimizer.step()
            loss = float(loss.detach())
        except torch.OutOfMemoryError as error:
            return {"tokens": tokens, "ok": False, "error": str(error).splitlines()[0][:200]}
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            del ids
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
        return {"tokens": tokens, "ok": True, "seconds": seconds, "peak_gib": peak, "loss": loss}

    def free(self) -> None:
        del self.model, self.optimizer
        gc.collect()
        if self.args.device.type == "cuda":
            torch.cuda.empty_cache()


def _clear(args: argparse.Namespace) -> None:
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()


def search(system: System, args: argparse.Namespace, log: Any, peft_longest: int | None = None) -> dict[str, Any]:
    """The probes, the predicted longest length and its verification (see the module docstring)."""
    out: dict[str, Any] = {"probes": [], "verify": []}
    out["first_step"] = system.step(args.probe[0])  # warm-up: compiles the layers, allocates the optimizer state
    log(f"  {system.name} first step {args.probe[0]}: {out['first_step']}")
    _clear(args)
    for tokens in args.probe:
        result = system.step(tokens)
        out["probes"].append(result)
        log(f"  {system.name} probe {tokens}: {result}")
        _clear(args)
        if not result["ok"]:
            return out
    if args.device.type != "cuda":
        return out  # no allocator figures on CPU: the code path only
    (t1, p1), (t2, p2) = ((r["tokens"], r["peak_gib"]) for r in out["probes"][-2:])
    slope = (p2 - p1) / (t2 - t1)  # GiB per token
    free, total = torch.cuda.mem_get_info()
    capacity = (free + torch.cuda.memory_reserved()) / GIB - args.headroom_gib
    predicted = int((capacity - (p1 - slope * t1)) / slope) // 1024 * 1024
    out.update({"kib_per_token": slope * 2**20, "fixed_gib": p1 - slope * t1, "capacity_gib": capacity, "predicted_max": predicted})
    cap = args.verify_cap if peft_longest is None else min(args.verify_cap, int(args.cap_vs_peft * peft_longest) // 1024 * 1024)
    target = min(predicted, cap)
    out["capped"], out["verify_cap"] = predicted > cap, cap
    if system.name not in args.verify:
        return out  # predicted only (the table says so)
    for _ in range(4):
        result = system.step(target)
        out["verify"].append(result)
        log(f"  {system.name} verify {target}: {result}")
        _clear(args)
        if result["ok"]:
            out["longest_trained"] = target
            break
        target = int(target * 0.9) // 1024 * 1024
    return out


def throughput(system: System, tokens: int, steps: int) -> dict[str, Any]:
    results = [system.step(tokens) for _ in range(steps + 1)][1:]  # the first: warm-up for this length
    if not all(r["ok"] for r in results):
        return {"tokens": tokens, "ok": False, "results": results}
    seconds = sorted(r["seconds"] for r in results)[len(results) // 2]
    return {"tokens": tokens, "ok": True, "median_s": seconds, "tokens_per_s": tokens / seconds, "peak_gib": results[-1]["peak_gib"]}


def versions() -> dict[str, Any]:
    import bitsandbytes
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "bitsandbytes": bitsandbytes.__version__}  # fmt: skip
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--systems", nargs="+", default=["peft", "ours", "ours_offload"], choices=["peft", "ours", "ours_offload"])
    parser.add_argument("--verify", nargs="*", default=None, help="systems whose predicted length a step verifies (default: all)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama (hidden 128, 2 layers): checks the code path")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--probe", nargs=2, type=int, default=None, help="the two probe lengths (default 8192 16384; tiny 64 128)")
    parser.add_argument("--verify-cap", type=int, default=200_000, help="longest length verified by a step (default 200,000)")
    parser.add_argument("--cap-vs-peft", type=float, default=2.2, help="after peft, verify at most this multiple of its longest (default 2.2)")
    parser.add_argument("--headroom-gib", type=float, default=3.0, help="memory left free in the prediction (default 3 GiB)")
    parser.add_argument("--tps-len", type=int, default=None, help="length for tokens/s (default 32768; tiny 256; 0 = skip)")
    parser.add_argument("--tps-steps", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per loss chunk for ours")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager layers for every system")
    args = parser.parse_args()
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.shape = "tiny" if args.tiny else "llama3-8b"
    args.verify = args.systems if args.verify is None else args.verify
    args.probe = args.probe or ([64, 128] if args.tiny else [8192, 16384])
    args.tps_len = args.tps_len if args.tps_len is not None else (256 if args.tiny else 32768)
    args.max_position = max(args.verify_cap, args.tps_len, *args.probe) + 1024
    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    results: dict[str, Any] = {}
    report = {"date": date.today().isoformat(), "shape": args.shape, "device": str(args.device), "versions": versions(),
              "setup": {"lora": f"r={R} alpha={ALPHA} on {TARGETS}", "quantization": "nf4 + double quant", "batch": 1,
                        "compiled_layers": args.compile, "chunk": args.chunk, "probe": args.probe, "verify_cap": args.verify_cap,
                        "cap_vs_peft": args.cap_vs_peft, "headroom_gib": args.headroom_gib, "verified": args.verify},
              "systems": results, "log": lines}  # fmt: skip
    for name in args.systems:
        start = time.perf_counter()
        system = System(name, args)
        log(f"{name}: built in {time.perf_counter() - start:.1f} s")
        entry = search(system, args, log, results.get("peft", {}).get("longest_trained"))
        if args.tps_len:
            entry["throughput"] = throughput(system, args.tps_len, args.tps_steps)
            log(f"  {name} throughput: {entry['throughput']}")
        entry["wall_s"] = time.perf_counter() - start
        results[name] = entry
        system.free()
        (args.out / "long_context.json").write_text(json.dumps(report, indent=1))  # after each system: a cut run keeps its figures
    base = results.get("peft", {}).get("longest_trained")
    log("")
    log("| system | KiB/token | predicted max | longest trained | step s there | vs peft | tokens/s at tps-len | peak GiB there |")
    log("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, entry in results.items():
        longest = entry.get("longest_trained")
        step_s = next((r["seconds"] for r in entry["verify"] if r["ok"]), None)
        tps = entry.get("throughput", {})
        cells = [name, f"{entry['kib_per_token']:.0f}" if "kib_per_token" in entry else "-",
                 f"{entry.get('predicted_max', '-')}", f"{longest if longest else ('not verified' if name not in args.verify else '-')}{' (cap)' if entry.get('capped') and longest == entry.get('verify_cap') else ''}",
                 f"{step_s:.1f}" if step_s else "-", f"{longest / base:.2f}x" if longest and base else "-",
                 f"{tps.get('tokens_per_s', 0):,.0f}" if tps.get("ok") else "-", f"{tps.get('peak_gib') or 0:.1f}" if tps.get("ok") else "-"]  # fmt: skip
        log("| " + " | ".join(cells) + " |")
    (args.out / "long_context.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
