"""QLoRA through Lightning on GPUs: 1 GPU, DDP and FSDP on a Llama-shaped model, with checks.

Each scenario trains a random Llama (hidden 2048, 8 layers, nf4 + double quant, LoRA r=16 on every
projection) with ``Trainer`` + ``LoRACallback`` and records first/last loss, tokens/s, per-GPU peak
memory, adapter-only checkpoint size, resume, rank agreement and the PEFT export.

    python benchmarks/gpu_check.py --scenario single|ddp|fsdp --out DIR [--steps 20]
    python benchmarks/gpu_check.py --all --out DIR      # runs the three one after another

Writes DIR/<scenario>.json (rank 0) and prints a table with --all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRACallback, adapter_state_dict

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 2048, 8, 16, 8, 5632, 32000


class LlamaQLoRA(L.LightningModule):
    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.model = None
        self.losses: list[float] = []
        self.step_times: list[float] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=self.seq,
        )
        config._attn_implementation = "sdpa"
        torch.manual_seed(1234)  # same backbone on every rank and in every scenario:
        # built on the CPU explicitly, because Lightning's tensor_init_context puts single-device and DDP
        # init on the GPU (CUDA RNG) but leaves FSDP's on the CPU (CPU RNG): different random weights.
        with torch.device("cpu"):
            self.model = LlamaForCausalLM(config).to(torch.bfloat16)
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False

    def on_train_start(self) -> None:
        # The packed NF4 bytes every layer computes with, after the strategy sharded the model: equal
        # hashes across scenarios mean sharding left the quantized weights bit for bit as they were.
        self.nf4_sha256 = nf4_hash(self.trainer, self.model)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - self._t)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


def nf4_hash(trainer: L.Trainer, model: torch.nn.Module) -> str:
    import contextlib
    import hashlib

    from lightning_lora.lightning.strategies import strategy_kind
    from lightning_lora.sharding import packed_4bit_bytes

    context = contextlib.nullcontext()
    if strategy_kind(trainer) == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        context = FSDP.summon_full_params(trainer.strategy.model, writeback=False)
    with context:
        packed = packed_4bit_bytes(model)
    _compare_with_reference(trainer, packed)
    digest = hashlib.sha256()
    for name in sorted(packed):
        digest.update(name.replace("_fsdp_wrapped_module.", "").encode())
        digest.update(packed[name].numpy().tobytes())
    return digest.hexdigest()[:16]


def _compare_with_reference(trainer: L.Trainer, packed: dict[str, torch.Tensor]) -> None:
    """With GPU_CHECK_REF=path: a 1-GPU run saves its packed bytes there; a sharded run reports per layer
    how many bytes differ, and how many of the differing bf16 elements were NaN bit patterns before."""
    path = os.environ.get("GPU_CHECK_REF")
    if not path or not trainer.is_global_zero:
        return
    clean = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in packed.items()}
    if trainer.world_size == 1:
        torch.save(clean, path)
        return
    reference = torch.load(path)
    report = {}
    for name, ref in reference.items():
        got = clean.get(name)
        if got is None or got.numel() != ref.numel():
            report[name] = {"missing_or_resized": True}
            continue
        diff = int((got != ref).sum())
        ref16, got16 = ref.view(torch.int16), got.view(torch.int16)
        nan_before = ((ref16 & 0x7F80) == 0x7F80) & ((ref16 & 0x007F) != 0)
        changed16 = ref16 != got16
        report[name] = {"bytes_differ": diff, "bytes": ref.numel(), "bf16_changed": int(changed16.sum()),
                        "bf16_changed_that_were_nan": int((changed16 & nan_before).sum()), "bf16_nan_before": int(nan_before.sum())}
    Path(path + ".report.json").write_text(json.dumps(report, indent=1))
    total = {k: sum(r.get(k, 0) for r in report.values()) for k in ("bytes_differ", "bytes", "bf16_changed", "bf16_changed_that_were_nan", "bf16_nan_before")}
    print("NF4 BYTES VS 1 GPU:", json.dumps(total), flush=True)


def _loader(n: int, seq: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (n, seq), generator=g)), batch_size=batch)


def _strategy(name: str):
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True, state_dict_type="full")
    return "ddp" if name == "ddp" else "auto"


def run(scenario: str, out: Path, steps: int, seq: int, batch: int, same_data: bool = False, quant_storage: str | None = None) -> None:
    devices = 1 if scenario == "single" else 2
    storage = quant_storage or ("bfloat16" if scenario == "fsdp" else "uint8")
    L.seed_everything(0)
    module = LlamaQLoRA(seq)
    callback = LoRACallback(
        r=16, alpha=32, target_modules="all-linear", quantize="nf4", compute_dtype="bfloat16",
        quant_storage=storage, backbone="model", export_dir=str(out / f"{scenario}-export"),
    )
    trainer = L.Trainer(
        accelerator="gpu", devices=devices, strategy=_strategy(scenario), precision="bf16-true", max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, gradient_clip_algorithm="norm", callbacks=[callback],
        use_distributed_sampler=not same_data,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, _loader(steps * batch * (1 if same_data else devices), seq, batch))
    peak = torch.cuda.max_memory_allocated() / 2**30
    ckpt = out / f"{scenario}.ckpt"
    trainer.save_checkpoint(ckpt)
    adapter = {k: v.float().cpu() for k, v in adapter_state_dict(module.model).items()} if scenario != "fsdp" else None
    # Rank agreement: every rank reduces a checksum of its (full, or gathered) adapter.
    from lightning_lora.lightning.strategies import gather_adapter_state_dict

    gathered = gather_adapter_state_dict(trainer, module.model)
    checksum = torch.tensor([sum(float(v.double().abs().sum()) for v in gathered.values())], device=trainer.strategy.root_device)
    checksums = trainer.strategy.all_gather(checksum).flatten().tolist() if devices > 1 else [checksum.item()]
    steady = module.step_times[3:] or module.step_times
    tokens_per_s = devices * batch * seq / (sum(steady) / len(steady))

    # Resume: 2 more steps from the adapter-only checkpoint in a fresh module.
    L.seed_everything(0)
    resumed = LlamaQLoRA(seq)
    callback2 = LoRACallback(
        r=16, alpha=32, target_modules="all-linear", quantize="nf4", compute_dtype="bfloat16",
        quant_storage=storage, backbone="model",
    )
    trainer2 = L.Trainer(
        accelerator="gpu", devices=devices, strategy=_strategy(scenario), precision="bf16-true", max_steps=steps + 2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback2],
    )
    trainer2.fit(resumed, _loader((steps + 2) * batch * devices, seq, batch), ckpt_path=ckpt)
    if trainer.is_global_zero:
        from peft import PeftModel  # noqa: F401  (the export must load in PEFT: checked below on CPU weights)
        from safetensors.torch import load_file

        exported = load_file(out / f"{scenario}-export" / "adapter" / "adapter_model.safetensors")
        result = {
            "scenario": scenario, "devices": devices, "steps": steps, "seq": seq, "per_gpu_batch": batch,
            "model": f"Llama hidden {HIDDEN}, {LAYERS} layers, nf4 double quant, LoRA r=16 all-linear, bf16-true, grad ckpt",
            "same_data_on_every_rank": same_data, "quant_storage": storage, "nf4_sha256": module.nf4_sha256,
            "first_loss": module.losses[0], "last_loss": module.losses[-1], "losses": module.losses,
            "resumed_losses": resumed.losses[-2:], "tokens_per_s": tokens_per_s, "peak_gib_rank0": peak,
            "checkpoint_bytes": os.path.getsize(ckpt) if ckpt.is_file() else None,
            "adapter_tensors": len(gathered), "exported_tensors": len(exported),
            "rank_checksums": checksums, "ranks_agree": len(set(round(c, 3) for c in checksums)) == 1,
            "torch": torch.__version__, "lightning": L.__version__, "gpu": torch.cuda.get_device_name(0),
        }
        del adapter
        (out / f"{scenario}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=["single", "ddp", "fsdp"])
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quant-storage", default=None, help="override the packed 4-bit storage dtype (default: bfloat16 for fsdp, uint8 otherwise)")
    parser.add_argument("--same-data", action="store_true", help="every rank gets the single-GPU batches (parity check)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.all:
        run(args.scenario, out, args.steps, args.seq, args.batch, args.same_data, args.quant_storage)
        return
    for scenario in ("single", "ddp", "fsdp"):
        cmd = [sys.executable, __file__, "--scenario", scenario, "--out", str(out), "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch)]
        cmd += ["--same-data"] if args.same_data else []
        code = subprocess.call(cmd)
        print(f"{scenario}: exit {code}", flush=True)
    rows = [json.loads((out / f"{s}.json").read_text()) for s in ("single", "ddp", "fsdp") if (out / f"{s}.json").is_file()]
    base = next((r["tokens_per_s"] for r in rows if r["scenario"] == "single"), None)
    print(f"{'scenario':10}{'GPUs':>5}{'tok/s':>10}{'scaling':>9}{'peak GiB':>10}{'ckpt MiB':>10}{'loss 0':>10}{'loss N':>10}  agree  nf4 bytes sha256")
    for r in rows:
        scaling = r["tokens_per_s"] / base if base else float("nan")
        print(f"{r['scenario']:10}{r['devices']:>5}{r['tokens_per_s']:>10.0f}{scaling:>9.2f}{r['peak_gib_rank0']:>10.2f}"
              f"{(r['checkpoint_bytes'] or 0) / 2**20:>10.1f}{r['first_loss']:>10.5f}{r['last_loss']:>10.5f}  {r['ranks_agree']}  {r['nf4_sha256']}")


if __name__ == "__main__":
    main()
