"""QLoRA training and inference speed: lightning_lora vs PEFT + bitsandbytes, in one process on one GPU.

Llama-2-7B shape, random weights (``lightning_lora.loading``: nf4, double quant, bf16 compute, the same
packed weights for every variant), LoRA r=16 alpha=32 dropout 0 on q,k,v,o,gate,up,down, batch 2 x 2048,
AdamW lr 1e-4, bf16 autocast, fp32 adapter weights. Variants:

- ``peft_recipe``: PEFT's documented QLoRA recipe, ``prepare_model_for_kbit_training`` (upcasts the
  embeddings, norms and head to fp32) + ``get_peft_model``, a plain PyTorch loop.
- ``peft_no_upcast``: the same without ``prepare_model_for_kbit_training``.
- ``ours``: ``Trainer(precision='bf16-mixed')`` + ``LoRACallback(quantize='nf4')``.
- ``*_gc``: the same with non-reentrant gradient checkpointing per decoder layer.

Reported per variant: tokens/s (median step after warm-up), peak GiB (``max_memory_allocated``), MFU
against a bf16 matmul ceiling measured in the same run. Then forward latency of the quantized base, our
unmerged and merged model and PEFT's unmerged model at 8 x 2048 and 1 x 512.

    python benchmarks/compare_peft.py --out results_dir           # one H200
    python benchmarks/compare_peft.py --cpu --out /tmp/cp         # tiny model on CPU: checks the code runs
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=128),
}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import LlamaConfig

        from lightning_lora import QuantizationConfig

        self.cpu = args.cpu
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.batch, self.seq = (2, 16) if args.cpu else (args.batch, args.seq)
        self.steps, self.warmup = (3, 1) if args.cpu else (args.steps, args.warmup)
        self.config = LlamaConfig(**SHAPES["tiny" if args.cpu else "7b"], max_position_embeddings=max(self.seq, 64), use_cache=False, tie_word_embeddings=False)
        self.config._attn_implementation = "sdpa"
        self.quant = QuantizationConfig(mode="nf4", double_quant=True, compute_dtype="bfloat16")
        generator = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, self.config.vocab_size, (self.batch * (self.steps + self.warmup), self.seq), generator=generator)

    # -- helpers ------------------------------------------------------------------------------------
    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if not self.cpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float:
        return 0.0 if self.cpu else torch.cuda.max_memory_allocated() / GiB

    def base_model(self):
        from lightning_lora.loading import build_quantized_model

        model = build_quantized_model(self.config, self.quant, device=self.device, offload_to=None, seed=0)
        return model.train()

    def batches(self):
        for i in range(self.steps + self.warmup):
            yield self.data[i * self.batch : (i + 1) * self.batch].to(self.device)

    def flops_per_token(self) -> dict[str, float]:
        """Matmul FLOPs per trained token. Frozen base: forward (2N) + input gradients (2N); LoRA adds 6 per adapter weight.

        Attention scores and values: 4 * seq * hidden per layer forward (no causal halving), 3x with backward.
        ``conventional_6n`` is the usual 6N count, which over-states QLoRA work (no weight gradients).
        """
        c = self.config
        h, i, layers, kv = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
        head = h * c.vocab_size
        lora = layers * 16 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
        attention = 3 * 4 * self.seq * h * layers  # forward once, backward twice that
        step = 4 * (linear + head) + 6 * lora + attention
        recompute = 2 * linear + 2 * lora + 4 * self.seq * h * layers  # checkpointing: the decoder layers' forward again
        return {
            "frozen_base": step,
            "frozen_base_gc": step + recompute,
            "conventional_6n": 6 * (linear + head),
        }

    def matmul_ceiling(self) -> float:
        if self.cpu:
            return float("nan")
        n = 8192
        mats = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
        for a, b in mats:
            a @ b
        self.sync()
        times = []
        for rep in range(10):
            a, b = mats[rep % 3]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del mats
        return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12

    # -- training variants ----------------------------------------------------------------------------
    def train_peft(self, upcast: bool, gc_: bool) -> dict:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        self.reset()
        model = self.base_model()
        if upcast:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc_, gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gc_:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times, losses = [], []
        for ids in self.batches():
            self.sync()
            t = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.sync()
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
        result = self._result(times, losses, gc_)
        del model, optimizer
        return result

    def train_ours(self, gc_: bool) -> dict:
        import lightning as L
        from lightning.pytorch.callbacks import Callback
        from torch.utils.data import DataLoader, TensorDataset

        from lightning_lora import LoRACallback

        self.reset()
        bench = self
        backbone = self.base_model()
        if gc_:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        class LM(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = backbone

            def training_step(self, batch, batch_idx):
                return self.model(input_ids=batch[0], labels=batch[0]).loss

            def configure_optimizers(self):
                return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

        class Timer(Callback):
            def __init__(self) -> None:
                self.times, self.losses, self.t = [], [], 0.0

            def on_train_batch_start(self, *args):
                bench.sync()
                self.t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, *args):
                bench.sync()
                self.times.append(time.perf_counter() - self.t)
                self.losses.append(float(outputs["loss"]))

        timer = Timer()
        trainer = L.Trainer(
            accelerator="cpu" if self.cpu else "gpu", devices=1, precision="32-true" if self.cpu else "bf16-mixed",
            max_steps=self.steps + self.warmup, callbacks=[LoRACallback(r=16, alpha=32, target_modules=TARGETS, quantize="nf4", backbone="model"), timer],
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        loader = DataLoader(TensorDataset(self.data), batch_size=self.batch, shuffle=False)
        module = LM()
        trainer.fit(module, loader)
        result = self._result(timer.times, timer.losses, gc_)
        del trainer, module, backbone
        return result

    def _result(self, times: list[float], losses: list[float], gc_: bool) -> dict:
        measured = times[self.warmup :]
        step = sorted(measured)[len(measured) // 2]
        tokens = self.batch * self.seq
        flops = self.flops_per_token()["frozen_base_gc" if gc_ else "frozen_base"]
        return {
            "tokens_per_s": tokens / step, "median_step_s": step, "peak_gib": self.peak(), "losses": losses, "step_times": times,
            "achieved_tflops": flops * tokens / step / 1e12, "achieved_tflops_6n": self.flops_per_token()["conventional_6n"] * tokens / step / 1e12,
        }

    # -- inference --------------------------------------------------------------------------------------
    @torch.no_grad()
    def latency(self, model, batch: int, seq: int, reps: int) -> float:
        ids = torch.randint(0, self.config.vocab_size, (batch, seq), device=self.device)
        model.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=not self.cpu):
            for _ in range(2):
                model(input_ids=ids, use_cache=False)
            times = []
            for _ in range(reps):
                self.sync()
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                self.sync()
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2] * 1e3

    def inference(self) -> dict:
        from peft import LoraConfig, get_peft_model

        from lightning_lora import LoRAConfig, inject_lora, merge_lora

        shapes = [(2, 16), (1, 8)] if self.cpu else [(8, 2048), (1, 512)]
        reps = 3 if self.cpu else 10
        out: dict = {}
        self.reset()
        model = self.base_model()
        out["base"] = {f"{b}x{s}": self.latency(model, b, s, reps) for b, s in shapes}
        inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules=TARGETS))
        for layer in model.modules():  # a non-zero B, so the adapter path does real work
            if hasattr(layer, "lora_b"):
                torch.nn.init.normal_(layer.lora_b.weight, std=0.01)
        out["ours_unmerged"] = {f"{b}x{s}": self.latency(model, b, s, reps) for b, s in shapes}
        merge_lora(model)
        out["ours_merged"] = {f"{b}x{s}": self.latency(model, b, s, reps) for b, s in shapes}
        del model
        self.reset()
        model = get_peft_model(self.base_model(), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
        out["peft_unmerged"] = {f"{b}x{s}": self.latency(model, b, s, reps) for b, s in shapes}
        del model
        for name in ("ours_unmerged", "ours_merged", "peft_unmerged"):
            out[name + "_overhead_pct"] = {k: 100 * (v / out["base"][k] - 1) for k, v in out[name].items()}
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="variants: peft_recipe peft_no_upcast ours peft_recipe_gc ours_gc inference")
    args = parser.parse_args()
    bench = Bench(args)
    results: dict = {"versions": _versions(), "batch": bench.batch, "seq": bench.seq, "steps": bench.steps, "warmup": bench.warmup}
    results["matmul_ceiling_tflops"] = bench.matmul_ceiling()
    results["flops_per_token"] = bench.flops_per_token()
    variants = {
        "peft_recipe": lambda: bench.train_peft(upcast=True, gc_=False),
        "peft_no_upcast": lambda: bench.train_peft(upcast=False, gc_=False),
        "ours": lambda: bench.train_ours(gc_=False),
        "peft_recipe_gc": lambda: bench.train_peft(upcast=True, gc_=True),
        "peft_no_upcast_gc": lambda: bench.train_peft(upcast=False, gc_=True),
        "ours_gc": lambda: bench.train_ours(gc_=True),
        "inference": bench.inference,
    }
    for name in args.only or list(variants):
        print(f"== {name}", flush=True)
        try:
            results[name] = variants[name]()
        except Exception as err:  # record and go on: one failure must not hide the other numbers
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        if "mfu" not in results[name] and "achieved_tflops" in results[name]:
            results[name]["mfu_vs_matmul_ceiling"] = results[name]["achieved_tflops"] / results["matmul_ceiling_tflops"]
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "compare_peft.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    if args.out:
        plot(results, Path(args.out, "compare_peft.png"))


def table(results: dict) -> str:
    rows = [f"matmul ceiling (bf16 8192^3): {results['matmul_ceiling_tflops']:.0f} TFLOP/s", "",
            "| variant | tokens/s | peak GiB | achieved TFLOP/s | MFU | final loss |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            rows.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {r['achieved_tflops']:.0f} | {r.get('mfu_vs_matmul_ceiling', float('nan')):.1%} | {r['losses'][-1]:.4f} |")
        elif isinstance(r, dict) and "error" in r:
            rows.append(f"| {name} | FAILED: {r['error'][:100]} | | | | |")
    inf = results.get("inference")
    if isinstance(inf, dict) and "base" in inf:
        rows += ["", "| forward (ms) | " + " | ".join(inf["base"]) + " |", "| --- |" + " --- |" * len(inf["base"])]
        for name in ("base", "ours_unmerged", "ours_merged", "peft_unmerged"):
            overhead = inf.get(name + "_overhead_pct", {})
            rows.append(f"| {name} | " + " | ".join(f"{v:.2f}" + (f" (+{overhead[k]:.1f}%)" if k in overhead else "") for k, v in inf[name].items()) + " |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n, r in results.items() if isinstance(r, dict) and "tokens_per_s" in r]
    if not names:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, [results[n]["tokens_per_s"] for n in names])
    axes[0].set_ylabel("tokens/s")
    axes[1].bar(names, [results[n]["peak_gib"] for n in names])
    axes[1].set_ylabel("peak GiB")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle("QLoRA 7B-shape, batch 2 x 2048, r=16 on all projections")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "lightning", "transformers", "bitsandbytes", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


if __name__ == "__main__":
    main()
