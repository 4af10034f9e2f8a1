"""Where a Lightning ``Trainer`` step of 7B-shape QLoRA waits for the host, against a plain loop and PEFT (issue 17.2).

Each configuration builds the model of ``compare_peft.py`` (Llama-2-7B shape, nf4 + double quant, r=16 on all seven
projections, batch 2 x 2048, AdamW, bf16 autocast, every block compiled) in this one process, times ``--steps``
steps after the warm-up (the median), then profiles one more step with CPU and CUDA activities. From that trace it
reports the GPU's busy time (the kernels, copies and memsets of the step), the median unprofiled step less that
(an estimate of the time the GPU waits for the host: the profiled step's GPU work is not the timed steps', and the
GPU's speed drifts, so it can come out negative), and the idle gaps of 10 us or more charged to the host op that launched the kernel
ending each gap (``trace_gaps.analyse``). Configurations:

* ``trainer``: ``Trainer`` + ``LoRACallback(compile_blocks=True)``, as ``compare_peft.py``'s
  ``ours_trainer_callback_compiled`` (the step timed from ``on_train_batch_start`` to ``on_train_batch_end``);
* ``trainer_no_guard``: the same with ``skip_nonfinite=False`` (no device-to-host read of the gradients' finiteness
  before the optimizer step);
* ``trainer_fused_adamw``: the same with ``torch.optim.AdamW(fused=True)``;
* ``raw``: our compiled model in a plain PyTorch loop (``compare_peft.train_step``);
* ``raw_combo_kernels``: the same, inductor's ``combo_kernels`` on (independent small kernels of a graph, such as
  the adapters' casts, launched as one);
* ``peft``: PEFT without the upcast, its blocks compiled the same way, in the plain loop.

    python benchmarks/trainer_overhead.py --out OUT [--layers 32] [--steps 6] [--only trainer raw peft]

``--tiny`` runs the same code on a small model on CPU (no compile unless ``--compile``), to check the script.
Writes ``OUT/overhead.json`` and one ``OUT/<config>.trace.json.gz`` per configuration; prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_peft  # noqa: E402
import trace_gaps  # noqa: E402

CONFIGS = ("trainer", "trainer_no_guard", "trainer_fused_adamw", "raw", "raw_combo_kernels", "peft")


class Setup:
    """The model, batch and device of one run: the 7B shape on CUDA, or a small Llama on CPU (``--tiny``)."""

    def __init__(self, layers: int, tiny: bool, compile_blocks: bool) -> None:
        self.layers, self.tiny, self.compile = layers, tiny, compile_blocks
        self.device = "cpu" if tiny else "cuda"
        self.batch, self.seq = (2, 64) if tiny else (compare_peft.BATCH, compare_peft.SEQ)
        self.vocab = 256 if tiny else 32000

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def base(self) -> torch.nn.Module:
        if not self.tiny:
            return compare_peft.quantized_llama(self.layers)
        from transformers import LlamaConfig, LlamaForCausalLM

        from lightning_lora import QuantizationConfig, quantize_model

        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=self.layers, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=self.vocab, max_position_embeddings=self.seq)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        quantize_model(model, QuantizationConfig(mode="nf4"), device="cpu")
        model.config.use_cache = False
        return model

    def ids(self) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(1)
        return torch.randint(0, self.vocab, (self.batch, self.seq), device=self.device, generator=generator)

    def autocast(self):  # noqa: ANN201 - a context manager
        return torch.autocast(self.device, dtype=torch.bfloat16)


def profiled(setup: Setup, step) -> tuple[float, object]:  # noqa: ANN001 - a zero-argument callable
    """Wall seconds of one call of ``step`` under the profiler (CPU + CUDA activities), and the profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device == "cuda" else [])
    setup.sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        setup.sync()
        wall = time.perf_counter() - start
    return wall, prof


def gpu_analysis(prof, path: str, setup: Setup) -> dict:  # noqa: ANN001 - a torch.profiler.profile
    prof.export_chrome_trace(path)
    if setup.device != "cuda":
        return {}
    result = trace_gaps.analyse(trace_gaps.load(path), 10.0)
    return {k: result[k] for k in ("gpu_span_ms", "gpu_busy_ms", "idle_ms_in_gaps", "gaps")} | {
        "idle_ms_by_outer_host_op": dict(list(result["idle_ms_by_outer_host_op"].items())[:10]),
        "largest_gaps": result["largest_gaps"][:10],
    }


def run_raw(setup: Setup, model: torch.nn.Module, steps: int, warmup: int, trace: str) -> dict:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = setup.ids()

    def step() -> None:
        with setup.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup + steps):
        setup.sync()
        start = time.perf_counter()
        step()
        setup.sync()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    wall, prof = profiled(setup, step)
    return summary(setup, times, wall, gpu_analysis(prof, trace, setup))


def run_trainer(setup: Setup, steps: int, warmup: int, trace: str, skip_nonfinite: bool = True,
                fused_adamw: bool = False) -> dict:  # fmt: skip
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora import LoRACallback

    profile_index = warmup + steps  # one more step after the timed ones, under the profiler

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = setup.base()
            self.times: list[float] = []
            self.prof = None

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning's signature
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def on_train_batch_start(self, batch, batch_idx):  # noqa: ANN001, ANN201
            if batch_idx == profile_index:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device == "cuda" else [])
                self.prof = profile(activities=activities)
                self.prof.__enter__()
            setup.sync()
            self._t = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
            setup.sync()
            self.times.append(time.perf_counter() - self._t)
            if batch_idx == profile_index:
                self.prof.__exit__(None, None, None)

        def configure_optimizers(self):  # noqa: ANN201
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused_adamw else {}))

    module = Module()
    rows = (profile_index + 1) * setup.batch
    data = DataLoader(TensorDataset(torch.randint(0, setup.vocab, (rows, setup.seq))), batch_size=setup.batch)
    callback = LoRACallback(r=compare_peft.R, alpha=compare_peft.ALPHA, target_modules=compare_peft.TARGETS, backbone="model",
                            compile_blocks=setup.compile, skip_nonfinite=skip_nonfinite)
    trainer = L.Trainer(accelerator="gpu" if setup.device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=profile_index + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, data)
    times = module.times[warmup:profile_index]
    return summary(setup, times, module.times[profile_index], gpu_analysis(module.prof, trace, setup))


def summary(setup: Setup, times: list[float], profiled_wall: float, analysis: dict) -> dict:
    median = statistics.median(times)
    row = {"tokens_per_s": setup.batch * setup.seq / median, "step_ms": median * 1e3, "steps_ms": [t * 1e3 for t in times],
           "profiled_step_ms": profiled_wall * 1e3}
    if setup.device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row.update(analysis)
    if "gpu_busy_ms" in analysis:
        row["host_wait_ms"] = row["step_ms"] - analysis["gpu_busy_ms"]  # GPU work is the same profiled or not; host time is not
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="a folder")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", nargs="*", choices=CONFIGS)
    parser.add_argument("--tiny", action="store_true", help="a small model on CPU, to check the script")
    parser.add_argument("--compile", action="store_true", help="with --tiny: compile the blocks too")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    setup = Setup(args.layers, args.tiny, compile_blocks=not args.tiny or args.compile)
    warmup = 3
    results: dict = {"layers": args.layers, "steps": args.steps, "tiny": args.tiny}
    for name in args.only or CONFIGS:
        trace = os.path.join(args.out, f"{name}.trace.json.gz")
        torch._dynamo.reset()
        model = None
        try:
            if name.startswith("trainer"):
                results[name] = run_trainer(setup, args.steps, warmup, trace, skip_nonfinite=name != "trainer_no_guard",
                                            fused_adamw=name == "trainer_fused_adamw")
            else:
                from lightning_lora import LoRAConfig, inject_lora

                if name == "peft":
                    from peft import LoraConfig, get_peft_model

                    model = get_peft_model(setup.base(), LoraConfig(r=compare_peft.R, lora_alpha=compare_peft.ALPHA,
                                                                    target_modules=compare_peft.TARGETS, lora_dropout=0.0))
                else:
                    config = LoRAConfig(r=compare_peft.R, alpha=compare_peft.ALPHA, target_modules=compare_peft.TARGETS)
                    model = inject_lora(setup.base(), config)
                if setup.compile and name == "raw_combo_kernels":
                    from lightning_lora.compiling import compile_blocks

                    compile_blocks(model, options={"combo_kernels": True})
                elif setup.compile:
                    compare_peft.compiled(model)
                results[name] = run_raw(setup, model, args.steps, warmup, trace)
        except Exception as err:  # one failing configuration must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}"[:800]}
        finally:
            model = None  # a failed configuration's model must not stay on the GPU into the next
        print(name, json.dumps({k: v for k, v in results[name].items() if k not in ("largest_gaps", "steps_ms")}), flush=True)
        gc.collect()
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    import lightning
    import transformers

    results["versions"] = {"torch": torch.__version__, "lightning": lightning.__version__,
                           "transformers": transformers.__version__,
                           "device": torch.cuda.get_device_name(0) if setup.device == "cuda" else "cpu"}
    print(f"{'config':22}{'tokens/s':>10}{'step ms':>9}{'GPU busy':>9}{'host wait':>10}{'peak GiB':>9}")
    for name in args.only or CONFIGS:
        r = results[name]
        if "error" in r:
            print(f"{name:22}  {r['error'][:100]}")
            continue
        busy, wait = r.get("gpu_busy_ms", float("nan")), r.get("host_wait_ms", float("nan"))
        peak = r.get("peak_gib", float("nan"))
        print(f"{name:22}{r['tokens_per_s']:>10.0f}{r['step_ms']:>9.1f}{busy:>9.1f}{wait:>10.1f}{peak:>9.1f}")
    with open(os.path.join(args.out, "overhead.json"), "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
