"""QLoRA training speed and memory on one GPU: PEFT + bitsandbytes vs lightning_lora, side by side.

Llama-2-7B shape with random weights, nf4 + double quant, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down,
batch 2 x 2048, AdamW, bf16 autocast. Each configuration builds the same model from the same seed in
this one process, runs 2 warm-up and ``--steps`` timed optimizer steps, and reports tokens/s, peak
memory and MFU against a bf16 matmul ceiling measured in the same run. Also the unmerged/merged
inference overhead of our LoRA layers against the quantized base. Prints a table, writes JSON, with every timed
step's time (``steps_ms``) and what happened in it besides its work (``step_events``: generation-2 garbage
collections, graphs dynamo compiled).

    python benchmarks/compare_peft.py --out results.json [--steps 8] [--layers 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

R, ALPHA, BATCH, SEQ = 16, 32, 2, 2048
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start)


def quantized_llama(layers: int, mode: str = "nf4") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_lora import QuantizationConfig, quantize_model

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=SEQ)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    quantize_model(model, QuantizationConfig(mode=mode, compute_dtype=None if mode == "int8" else "bfloat16"), device="cuda")
    model.config.use_cache = False
    return model


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    from lightning_lora.compiling import compile_blocks

    compile_blocks(model)  # the same regional compilation LoRACallback(compile_blocks=True) applies
    return model


def peft_model(layers: int, recipe: bool, gc_on: bool, mode: str = "nf4") -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = quantized_llama(layers, mode)
    if recipe:  # PEFT's documented QLoRA recipe: fp32 upcast of norms/embeddings/head
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc_on, gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))


def ours_model(layers: int, gc_on: bool, mode: str = "nf4") -> torch.nn.Module:
    from lightning_lora import LoRAConfig, inject_lora

    model = quantized_llama(layers, mode)
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return inject_lora(model, LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS))


MARK_CUDAGRAPH_STEPS = False  # set by step_levers.py's cudagraph variants: each step starts a new CUDA-graph generation


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> torch.Tensor:
    """One plain-PyTorch optimizer step under bf16 autocast; returns the loss."""
    if MARK_CUDAGRAPH_STEPS:
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class StepWatch:
    """What happened besides the step's own work, step by step: the generation-2 garbage collections (their
    milliseconds) and the graphs dynamo compiled. ``mark()`` after each step returns both since the last mark.
    Only dynamo's graphs are counted: a backward that AOT autograd compiles lazily, or inductor's autotuning, is
    not."""

    def __init__(self) -> None:
        self._gc_ms: list[float] = []
        self._start = 0.0
        self._graphs = self._compiled()
        gc.callbacks.append(self._callback)

    @staticmethod
    def _compiled() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif info.get("generation") == 2:
            self._gc_ms.append((time.perf_counter() - self._start) * 1e3)

    def mark(self) -> dict:
        graphs = self._compiled()
        found = {"gc_gen2_ms": [round(ms, 1) for ms in self._gc_ms], "graphs_compiled": graphs - self._graphs}
        self._gc_ms, self._graphs = [], graphs
        return found

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def step_times(model: torch.nn.Module, steps: int, warmup: int = 2, ids: torch.Tensor | None = None,
               events: list[dict] | None = None) -> tuple[list[float], float]:  # fmt: skip
    """Seconds of each timed step after ``warmup`` untimed ones, and the last loss; resets the peak memory first.
    ``events``, if given, gets each timed step's ``StepWatch.mark()``."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (BATCH, SEQ), device="cuda") if ids is None else ids
    torch.cuda.reset_peak_memory_stats()
    times = []
    watch = StepWatch()
    try:
        for step in range(steps + warmup):
            torch.cuda.synchronize()
            watch.mark()
            start = time.perf_counter()
            loss = train_step(model, optimizer, ids)
            torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
                if events is not None:
                    events.append(watch.mark())
    finally:
        watch.close()
    return times, float(loss)


def train_raw(model: torch.nn.Module, steps: int, warmup: int = 2) -> dict:
    events: list[dict] = []
    times, loss = step_times(model, steps, warmup, events=events)
    return {"tokens_per_s": BATCH * SEQ / (sum(times) / len(times)), "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss,
            "steps_ms": [t * 1e3 for t in times], "step_events": events}


def train_lightning(layers: int, steps: int, gc_on: bool, compile_blocks: bool = False) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora import LoRACallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = quantized_llama(layers)
            if gc_on:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.times: list[float] = []
            self.events: list[dict] = []

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def on_train_batch_start(self, batch, batch_idx):
            torch.cuda.synchronize()
            watch.mark()  # what happened between steps is not the step's
            self._t = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)
            self.events.append(watch.mark())

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    module = Module()
    warmup = 3 if compile_blocks else 2  # compiled: the first steps compile (the first block's input needs no grad)
    data = DataLoader(TensorDataset(torch.randint(0, 32000, ((steps + warmup) * BATCH, SEQ))), batch_size=BATCH)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps + warmup, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LoRACallback(r=R, alpha=ALPHA, target_modules=TARGETS, backbone="model", compile_blocks=compile_blocks)])
    torch.cuda.reset_peak_memory_stats()
    watch = StepWatch()
    try:
        trainer.fit(module, data)
    finally:
        watch.close()
    times = module.times[warmup:]
    # Per timed step: generation-2 collections inside it and graphs compiled in it (a late recompile, a GC pause).
    return {"tokens_per_s": BATCH * SEQ / (sum(times) / len(times)), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "steps_ms": [t * 1e3 for t in times], "step_events": module.events[warmup:]}


@torch.no_grad()
def forward_seconds(model: torch.nn.Module, ids: torch.Tensor, repeats: int | None = None) -> float:
    """Seconds per forward under bf16 autocast: 2 warm-up then ``repeats`` timed passes (default 20 for up to 4,096
    tokens, where the host's timing noise is largest, else 5)."""
    repeats = repeats or (20 if ids.numel() <= 4096 else 5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):
            model(input_ids=ids)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def inference_overhead(layers: int) -> dict:
    from lightning_lora import LoRAConfig, LoRALinear, cast_adapters, disable_lora, inject_lora, merge_lora, quantization

    model = inject_lora(quantized_llama(layers), LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS)).eval()
    for layer in model.modules():
        if hasattr(layer, "lora_b"):
            torch.nn.init.normal_(layer.lora_b.weight, std=1e-3)
    cast_adapters(model, torch.bfloat16)  # served unmerged in the compute dtype: no per-forward cast
    shapes = ((8, 2048), (1, 512))
    inputs = {shape: torch.randint(0, 32000, shape, device="cuda") for shape in shapes}

    def graphed(ids: torch.Tensor) -> float:
        """Seconds per forward replayed from a CUDA graph: GPU time without Python's launch overhead."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            for _ in range(2):  # warm-up outside the capture: lazy inits, the adapter cast cache
                model(input_ids=ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            model(input_ids=ids)
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / 10
        del graph
        return seconds

    def through_base_forward(ids: torch.Tensor) -> float:
        """Unmerged, each 4-bit base computed through its layer's own forward (as before linear_4bit_no_grad)."""
        real, quantization.linear_4bit_no_grad = quantization.linear_4bit_no_grad, lambda module, x: None
        try:
            return forward_seconds(model, ids)
        finally:
            quantization.linear_4bit_no_grad = real

    def base_seconds(ids: torch.Tensor) -> float:
        with disable_lora(model):
            return forward_seconds(model, ids)

    def fold_limit_seconds(ids: torch.Tensor, macs: int) -> float:
        """Unmerged with ``LoRALinear.fold_below_macs`` at ``macs`` (0: the output route everywhere, as before it)."""
        default = LoRALinear.fold_below_macs
        LoRALinear.fold_below_macs = macs
        try:
            return forward_seconds(model, ids)
        finally:
            LoRALinear.fold_below_macs = default

    out = {}
    for (batch, seq), ids in inputs.items():
        # Eager timings follow the host's speed: alternating rounds (7 for small shapes, whose forward is bound by
        # the host, else 3), the median of each variant, and each round's own overhead (base and unmerged timed
        # back to back) with its median and range.
        # At the small shape also: the output route in every layer (fold_below_macs 0, before the small-batch fold)
        # and the fold in the attention projections only (2**34: 512 x 4096 x 4096 folds, 512 x 4096 x 11008 not).
        small = ids.numel() <= 4096
        count = 7 if small else 3
        variants = [base_seconds, lambda i: forward_seconds(model, i), through_base_forward]
        if small:
            variants += [lambda i: fold_limit_seconds(i, 0), lambda i: fold_limit_seconds(i, 2**34)]
        rounds = [tuple(variant(ids) for variant in variants) for _ in range(count)]
        medians = [sorted(column)[count // 2] for column in zip(*rounds)]
        base, unmerged, before = medians[:3]
        per_round = sorted(r[1] / r[0] - 1 for r in rounds)
        entry = out[f"{batch}x{seq}"] = {"base_s": base, "unmerged_s": unmerged, "unmerged_overhead": unmerged / base - 1,
                                         "unmerged_through_base_forward_s": before,
                                         "unmerged_through_base_forward_overhead": before / base - 1, "rounds_s": rounds,
                                         "round_overhead_median": per_round[count // 2],
                                         "round_overhead_range": [per_round[0], per_round[-1]],
                                         "fold_below_macs": LoRALinear.fold_below_macs}
        if small:
            for index, name in ((3, "unmerged_output_route"), (4, "unmerged_fold_attention_only")):
                per = sorted(r[index] / r[0] - 1 for r in rounds)
                entry.update({f"{name}_s": medians[index], f"{name}_overhead": medians[index] / base - 1,
                              f"{name}_round_overhead_median": per[count // 2]})
        try:  # the same two forwards replayed from CUDA graphs (the small shapes are bound by Python otherwise)
            with disable_lora(model):
                base_graphed = graphed(ids)
            unmerged_graphed = graphed(ids)
            entry.update(base_graphed_s=base_graphed, unmerged_graphed_s=unmerged_graphed, unmerged_graphed_overhead=unmerged_graphed / base_graphed - 1)
        except Exception as err:
            entry["graphed_error"] = f"{type(err).__name__}: {err}"[:300]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge_lora(model)
    for (batch, seq), ids in inputs.items():
        entry = out[f"{batch}x{seq}"]
        entry["merged_s"] = forward_seconds(model, ids)
        entry["merged_overhead"] = entry["merged_s"] / entry["base_s"] - 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--only", nargs="*", help="run only these configurations (add 'inference' for the inference timing)")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference timing")
    args = parser.parse_args()
    ceiling = matmul_ceiling()
    params = 6_738_415_616 * args.layers / 32  # Llama-2-7B, scaled by depth
    runs = {
        "peft_recipe": lambda: train_raw(peft_model(args.layers, recipe=True, gc_on=False), args.steps),
        "peft_no_upcast": lambda: train_raw(peft_model(args.layers, recipe=False, gc_on=False), args.steps),
        "ours_raw_loop": lambda: train_raw(ours_model(args.layers, gc_on=False), args.steps),
        "ours_trainer_callback": lambda: train_lightning(args.layers, args.steps, gc_on=False),
        "ours_trainer_callback_compiled": lambda: train_lightning(args.layers, args.steps, gc_on=False, compile_blocks=True),
        "peft_no_upcast_compiled": lambda: train_raw(compiled(peft_model(args.layers, recipe=False, gc_on=False)), args.steps, warmup=3),
        "peft_recipe_gc": lambda: train_raw(peft_model(args.layers, recipe=True, gc_on=True), args.steps),
        "ours_trainer_callback_gc": lambda: train_lightning(args.layers, args.steps, gc_on=True),
        "ours_trainer_callback_gc_compiled": lambda: train_lightning(args.layers, args.steps, gc_on=True, compile_blocks=True),
        "peft_recipe_gc_compiled": lambda: train_raw(compiled(peft_model(args.layers, recipe=True, gc_on=True)), args.steps, warmup=3),
        "peft_int8_recipe": lambda: train_raw(peft_model(args.layers, recipe=True, gc_on=False, mode="int8"), args.steps),
        "peft_int8_no_upcast": lambda: train_raw(peft_model(args.layers, recipe=False, gc_on=False, mode="int8"), args.steps),
        "ours_int8_raw_loop": lambda: train_raw(ours_model(args.layers, gc_on=False, mode="int8"), args.steps),
        "ours_int8_raw_loop_compiled": lambda: train_raw(compiled(ours_model(args.layers, gc_on=False, mode="int8")), args.steps, warmup=3),
    }
    if args.only:
        runs = {name: fn for name, fn in runs.items() if name in args.only}
    results = {"matmul_ceiling_tflops": ceiling / 1e12, "params": params}
    for name, fn in runs.items():
        try:
            results[name] = fn()
            results[name]["mfu"] = results[name]["tokens_per_s"] * 4 * params / ceiling
        except Exception as err:  # record and go on: one failing configuration must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        gc.collect()
        torch.cuda.empty_cache()
        print(name, json.dumps(results[name]), flush=True)
    if (not args.only and not args.no_inference) or "inference" in (args.only or []):
        try:
            results["inference"] = inference_overhead(args.layers)
        except Exception as err:
            results["inference"] = {"error": f"{type(err).__name__}: {err}"[:500]}
        print("inference", json.dumps(results["inference"]), flush=True)
        keys = ("unmerged", "unmerged_output_route", "unmerged_fold_attention_only", "unmerged_through_base_forward", "unmerged_graphed", "merged")
        print(f"{'shape':8}{'base ms':>9}" + "".join(f"{k.removeprefix('unmerged_') or 'unmerged':>22}" for k in keys))
        for shape, entry in results["inference"].items():
            if isinstance(entry, dict) and "base_s" in entry:
                cells = "".join(f"{entry[k + '_overhead']:>+22.1%}" if k + "_overhead" in entry else f"{'-':>22}" for k in keys)
                print(f"{shape:8}{entry['base_s'] * 1e3:>9.1f}{cells}", flush=True)
    import bitsandbytes
    import lightning
    import peft
    import transformers

    results["versions"] = {"torch": torch.__version__, "lightning": lightning.__version__, "peft": peft.__version__,
                           "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
                           "gpu": torch.cuda.get_device_name(0)}
    print(f"{'config':28}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>7}")
    for name in runs:
        r = results[name]
        if "error" in r:
            print(f"{name:28}  {r['error'][:80]}")
        else:
            print(f"{name:28}{r['tokens_per_s']:>10.0f}{r['peak_gib']:>10.1f}{r['mfu']:>7.1%}")
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
