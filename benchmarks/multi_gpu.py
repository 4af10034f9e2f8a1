"""Multi-GPU QLoRA through Lightning: one GPU, DDP, FSDP1 (FSDPStrategy), FSDP2 (ModelParallelStrategy),
a 70B-shaped model under FSDP, and a two-node launch simulated on one host.

Every scenario trains a random Llama-shaped model (built with ``lightning_lora.loading``, nf4 with
double quant, bf16 storage) through ``Trainer`` + ``LoRACallback`` (r=16, alpha=32, all linear layers),
bf16-mixed, AdamW, norm clipping at 1.0. Run everything (the driver launches one process tree per
scenario and writes one JSON)::

    python benchmarks/multi_gpu.py --all --out results_dir            # GPUs
    python benchmarks/multi_gpu.py --all --out results_dir --cpu      # tiny sizes on CPU (gloo), to debug

One scenario, as the driver runs it (Lightning starts the other ranks itself)::

    python benchmarks/multi_gpu.py --scenario fsdp --work /tmp/mg
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "small": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}
LORA = dict(r=16, alpha=32.0, target_modules="all-linear")

# name -> how it runs. steps_per_epoch * global batch = dataset size, so checkpoints at epoch ends resume exactly.
SCENARIOS = {
    "single": dict(strategy="single", devices=1, batch=8, steps=20, ckpt_every=0),  # parity: same global batch as 2 x 4
    "single_b4": dict(strategy="single", devices=1, batch=4, steps=20, ckpt_every=0),  # throughput baseline, same per-GPU batch
    "ddp": dict(strategy="ddp", devices=2, batch=4, steps=20, ckpt_every=10),
    "ddp_resume": dict(strategy="ddp", devices=2, batch=4, steps=20, resume="ddp"),
    "fsdp": dict(strategy="fsdp", devices=2, batch=4, steps=20, ckpt_every=10, export=True, checkpointing=True),
    "fsdp_resume": dict(strategy="fsdp", devices=2, batch=4, steps=20, resume="fsdp", checkpointing=True),
    "fsdp_sharded": dict(strategy="fsdp", devices=2, batch=4, steps=10, ckpt_every=5, checkpointing=True, state_dict_type="sharded"),
    "fsdp_sharded_resume": dict(strategy="fsdp", devices=2, batch=4, steps=10, resume="fsdp_sharded", checkpointing=True, state_dict_type="sharded"),
    "fsdp2": dict(strategy="fsdp2", devices=2, batch=4, steps=20, ckpt_every=10),
    "fsdp2_resume": dict(strategy="fsdp2", devices=2, batch=4, steps=20, resume="fsdp2"),
    "fsdp2_allbf16": dict(strategy="fsdp2", devices=2, batch=4, steps=5, ckpt_every=0, lora_bf16=True),
    "ddp_2node": dict(strategy="ddp", devices=1, num_nodes=2, batch=4, steps=10, ckpt_every=0),
    # The 70B shape on one GPU (no sharding): low-memory loading and QLoRA training where one H200 holds it all.
    "single_70b": dict(strategy="single", devices=1, batch=1, steps=5, ckpt_every=5, checkpointing=True, model="70b", seq=2048,
                       check_bytes=False),
    "fsdp_70b": dict(strategy="fsdp", devices=2, batch=1, steps=5, ckpt_every=5, checkpointing=True, model="70b", seq=2048,
                     state_dict_type="sharded", check_bytes=False),
}
DEFAULT_ORDER = ["single", "single_b4", "ddp", "ddp_resume", "fsdp", "fsdp_resume", "fsdp_sharded", "fsdp_sharded_resume",
                 "fsdp2", "fsdp2_resume", "ddp_2node", "fsdp2_allbf16"]


def llama_config(name: str, seq: int):
    from transformers import LlamaConfig

    config = LlamaConfig(**MODELS[name], max_position_embeddings=max(seq, 64), tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    return config


# -- one scenario (runs on every rank) ---------------------------------------------------------------
def run_scenario(name: str, work: Path, cpu: bool, model_override: str | None = None, seq_override: int | None = None) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_lora import LoRACallback, QuantizationConfig, sharding
    from lightning_lora.adapter_io import adapter_state_dict
    from lightning_lora.lightning import strategies
    from lightning_lora.loading import build_quantized_model
    from lightning_lora.quantization import is_4bit

    spec = dict(SCENARIOS[name])
    model_name = model_override or ("tiny" if cpu else spec.get("model", "small"))
    seq = seq_override or (16 if cpu else spec.get("seq", 2048))
    batch, steps, devices, num_nodes = spec["batch"], spec["steps"], spec["devices"], spec.get("num_nodes", 1)
    world = devices * num_nodes
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if cpu else torch.device("cuda", local_rank)
    if not cpu:
        torch.cuda.set_device(device)
    quant = QuantizationConfig(mode="nf4", double_quant=True, compute_dtype="bfloat16", quant_storage="bfloat16")
    config = llama_config(model_name, seq)
    check_bytes = spec.get("check_bytes", True)

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            t0 = time.perf_counter()
            L.seed_everything(0, verbose=False)
            # Built here, quantized block by block on this rank's GPU and parked on the CPU; every rank builds
            # the same weights (same seed). The strategy moves (DDP) or shards (FSDP) it from there.
            self.model = build_quantized_model(config, quant, device=device, offload_to="cpu", seed=0).train()
            if spec.get("checkpointing") and spec["strategy"] != "fsdp":  # FSDPStrategy checkpoints through its policy
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.build_seconds = time.perf_counter() - t0
            self.before, self.seen = {}, {}
            if check_bytes:
                self.before = {n: m.weight.detach().reshape(-1).view(torch.uint8).clone() for n, m in self.model.named_modules() if is_4bit(m)}
            self._sharded = False

        def _record(self, name, layer) -> None:
            if name not in self.seen:  # the packed bytes this layer computes with, after any all-gather
                self.seen[name] = layer.weight.detach().reshape(-1).view(torch.uint8).cpu().clone()

        def configure_model(self) -> None:
            if check_bytes and not self._sharded:
                # Hook the LoRA layers (injected by now): their forward reads the base weight, and a hook on
                # the base layer itself would switch them to the unfused path.
                for n, m in self.model.named_modules():
                    if is_4bit(getattr(m, "base_layer", None)):
                        m.register_forward_pre_hook(lambda layer, args, n=n + ".base_layer": self._record(n, layer.base_layer))
            if spec["strategy"] == "fsdp2" and not self._sharded:
                if spec.get("lora_bf16"):
                    self.model.to(torch.bfloat16)  # every tensor of a group bf16 (the bitsandbytes #1945 set-up)
                sharding.fully_shard_lora(self.model, {LlamaDecoderLayer}, mesh=self.device_mesh["data_parallel"])
                self._sharded = True

        def training_step(self, batch_, batch_idx):
            (ids,) = batch_
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    class Meter(Callback):
        """Per-step loss (mean over ranks), per-step wall time, per-GPU peak memory after the first steps."""

        def __init__(self) -> None:
            self.losses, self.times, self.t = [], [], None
            self.setup_peak = 0

        def _sync(self):
            if not cpu:
                torch.cuda.synchronize()

        def on_train_start(self, trainer, pl_module):
            if not cpu:
                self.setup_peak = torch.cuda.max_memory_allocated()

        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            self._sync()
            if not cpu and trainer.global_step == min(2, steps - 1) + start_step:
                torch.cuda.reset_peak_memory_stats()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            self._sync()
            self.times.append(time.perf_counter() - self.t)
            loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
            self.losses.append(float(loss))

    spec_resume = spec.get("resume")
    ckpt_dir = work / f"ckpt_{spec_resume or name}"
    start_step = 0
    ckpt_path = None
    if spec_resume:
        half = SCENARIOS[spec_resume]["ckpt_every"]
        ckpt_path = str(ckpt_dir / f"step={half}.ckpt")
        start_step = half
    # One epoch = the checkpoint interval (or 10 steps): the same 10 global batches in every parity run, and
    # checkpoints on epoch boundaries, where a plain DataLoader resumes exactly.
    origin = SCENARIOS[spec_resume] if spec_resume else spec
    n_sequences = batch * world * (origin.get("ckpt_every") or min(10, origin["steps"]))
    generator = torch.Generator().manual_seed(1234)
    data = TensorDataset(torch.randint(0, config.vocab_size, (n_sequences, seq), generator=generator))
    # Our own sampler: rank r takes sequences r, r + world, ... in order, so the 2-GPU global batch is exactly
    # the 1-GPU batch of the parity run (Lightning's replacement sampler shuffles).
    rank = int(os.environ.get("RANK", int(os.environ.get("NODE_RANK", 0)) * devices + local_rank))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    loader = DataLoader(data, batch_size=batch, shuffle=False, sampler=sampler)

    strategy: object
    if spec["strategy"] == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = FSDPStrategy(
            auto_wrap_policy=sharding.lora_fsdp_policy({LlamaDecoderLayer}),
            activation_checkpointing_policy={LlamaDecoderLayer} if spec.get("checkpointing") else None,
            use_orig_params=True,
            state_dict_type=spec.get("state_dict_type", "full"),
        )
    elif spec["strategy"] == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    elif spec["strategy"] == "ddp":
        strategy = "ddp"
    else:
        strategy = "auto"
    meter = Meter()
    export_dir = work / f"export_{name}"
    lora_cb = LoRACallback(**LORA, quantize="nf4", quant_storage="bfloat16", compute_dtype="bfloat16", backbone="model",
                           export_dir=str(export_dir) if spec.get("export") else None)
    callbacks = [lora_cb, meter]
    if spec.get("ckpt_every"):
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=spec["ckpt_every"], save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(
        accelerator="cpu" if cpu else "gpu", devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision="32-true" if cpu else "bf16-mixed", max_steps=steps, callbacks=callbacks, logger=False,
        enable_checkpointing=bool(spec.get("ckpt_every")), enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, gradient_clip_algorithm="norm", num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    module = LM()
    t_fit = time.perf_counter()
    error = None
    try:
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    except Exception as err:  # keep what was measured; the driver reports the error
        import traceback

        traceback.print_exc()
        error = f"{type(err).__name__}: {err}"[:2000]
    fit_seconds = time.perf_counter() - t_fit

    # Adapter: gathered from every shard (collective on every rank); identical on every rank?
    adapter = strategies.gather_adapter_state_dict(trainer, module.model) if error is None else {}
    flat = torch.cat([v.float().reshape(-1) for v in adapter.values()]) if adapter else torch.zeros(1)
    same_on_ranks = None
    if world > 1 and error is None:
        import torch.distributed as dist

        flat_dev = flat.to(trainer.strategy.root_device)
        reference = flat_dev.clone()
        dist.broadcast(reference, 0)
        mismatch = torch.tensor([0.0 if torch.equal(reference, flat_dev) else 1.0], device=flat_dev.device)
        dist.all_reduce(mismatch)
        same_on_ranks = bool(mismatch.item() == 0)
    changed = {k: int((module.seen[k] != v).sum()) for k, v in module.before.items() if k in module.seen}
    peaks = [0.0, 0.0, 0.0]
    if not cpu:
        peaks = [torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB, meter.setup_peak / GiB]
    all_peaks = trainer.strategy.all_gather(torch.tensor(peaks, device=trainer.strategy.root_device)) if world > 1 else torch.tensor([peaks])
    all_peaks = all_peaks.reshape(-1, 3).tolist()
    changed_all = trainer.strategy.all_gather(torch.tensor([sum(changed.values())], device=trainer.strategy.root_device)) if world > 1 else torch.tensor([sum(changed.values())])

    if trainer.is_global_zero:
        times = meter.times[3:] if len(meter.times) > 4 else meter.times
        if spec.get("ckpt_every") and len(meter.times) > spec["ckpt_every"]:
            times = [t for i, t in enumerate(meter.times) if i >= 3 and i != spec["ckpt_every"]]  # the step after a save
        step_time = sorted(times)[len(times) // 2] if times else float("nan")
        tokens_per_step = batch * seq * world
        result = dict(
            scenario=name, strategy=spec["strategy"], world_size=world, num_nodes=num_nodes, model=model_name,
            hidden=config.hidden_size, layers=config.num_hidden_layers, seq=seq, batch_per_gpu=batch,
            steps_run=len(meter.losses), start_step=start_step, final_step=trainer.global_step,
            losses=meter.losses, step_times=meter.times, median_step_s=step_time, tokens_per_s=tokens_per_step / step_time,
            peak_alloc_gib=[p[0] for p in all_peaks], peak_reserved_gib=[p[1] for p in all_peaks],
            setup_peak_alloc_gib=[p[2] for p in all_peaks], build_seconds=module.build_seconds, fit_seconds=fit_seconds,
            adapter_tensors=len(adapter), adapter_params=int(flat.numel()) if adapter else 0,
            adapter_same_on_all_ranks=same_on_ranks, nf4_bytes_changed_per_rank=[int(x) for x in changed_all.reshape(-1).tolist()],
            nf4_layers_checked=len(changed), error=error, activation_checkpointing=bool(spec.get("checkpointing")),
        )
        if spec.get("ckpt_every") and ckpt_dir.exists():
            sizes = {}
            for path in sorted(ckpt_dir.iterdir()):
                sizes[path.name] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
            result["checkpoint_bytes"] = sizes
            first = sorted(ckpt_dir.iterdir())[0]
            if first.is_file():
                ckpt = torch.load(first, map_location="cpu", weights_only=False)
                keys = list(ckpt.get("state_dict", {}))
                result["checkpoint_state_dict_keys"] = len(keys)
                result["checkpoint_non_adapter_keys"] = [k for k in keys if ".lora_" not in k][:5]
        if adapter:
            torch.save(adapter, work / f"adapter_{name}.pt")
        if spec_resume and adapter and (work / f"adapter_{spec_resume}.pt").exists():
            uninterrupted = torch.load(work / f"adapter_{spec_resume}.pt")
            diffs = [float((uninterrupted[k].float() - adapter[k].float()).abs().max()) for k in adapter]
            result["resume_vs_uninterrupted_max_abs_diff"] = max(diffs)
            result["resume_bit_exact"] = all(torch.equal(uninterrupted[k], adapter[k]) for k in adapter)
        if spec.get("export") and adapter:
            result["peft_export"] = check_peft_export(export_dir / "adapter", config, adapter)
        result["estimate_gib"] = estimate(config, spec, batch, seq, world)
        (work / f"{name}.json").write_text(json.dumps(result, indent=1))


def check_peft_export(path: Path, config, adapter: dict) -> dict:
    """Load the exported adapter with PEFT into a plain model of the same shape; compare its tensors."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config)
        base = base.to_empty(device="cpu")
        model = PeftModel.from_pretrained(base, str(path))
        params = dict(model.named_parameters())
        worst, found = 0.0, 0
        for key, value in adapter.items():
            peft_key = "base_model.model." + key.replace(".lora_a.weight", ".lora_A.default.weight").replace(".lora_b.weight", ".lora_B.default.weight")
            worst = max(worst, float((params[peft_key].detach().float() - value.float()).abs().max()))
            found += 1
        return {"loaded": True, "tensors_compared": found, "max_abs_diff": worst, "files": sorted(os.listdir(path))}
    except Exception as err:
        return {"loaded": False, "error": f"{type(err).__name__}: {err}"[:1000]}


def estimate(config, spec: dict, batch: int, seq: int, world: int) -> float | None:
    try:
        from lightning_lora.estimate import estimate_memory
    except ImportError:
        return None
    strategy = {"single": "single", "ddp": "ddp", "fsdp": "fsdp", "fsdp2": "fsdp"}[spec["strategy"]]
    try:
        est = estimate_memory(
            config, quantization="nf4", double_quant=True, r=LORA["r"], target_modules="all-linear", batch_size=batch,
            seq_len=seq, strategy=strategy, num_gpus=world, activation_checkpointing=bool(spec.get("checkpointing")), dtype="bf16",
        )
        return est.total / GiB
    except Exception as err:  # the estimator is another module's; report, do not fail the benchmark
        return f"estimator failed: {err}"


# -- driver ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all_or_first_failure(procs: list[subprocess.Popen], timeout: float) -> list:
    """Return codes of all node launchers; when one fails or time runs out, the others are killed rather than
    left waiting for a peer that is gone."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)  # reap it: no zombie, and its log is complete
            timed_out = time.monotonic() > deadline
            return [("timeout" if timed_out else "killed") if c is None else c for c in codes]
        time.sleep(0.5)


def launch(name: str, work: Path, cpu: bool, timeout: float, extra: list[str] = ()) -> dict:
    spec = SCENARIOS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env["MASTER_PORT"] = str(_free_port())
    env.setdefault("PYTHONUNBUFFERED", "1")
    base = [sys.executable, __file__, "--scenario", name, "--work", str(work)] + (["--cpu"] if cpu else []) + list(extra)
    if not spec.get("resume"):
        import shutil

        shutil.rmtree(work / f"ckpt_{name}", ignore_errors=True)  # ModelCheckpoint would add -v1 copies
        (work / f"{name}.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    log = work / f"{name}.log"
    with open(log, "w") as out:
        if spec.get("num_nodes", 1) > 1:
            # Two "nodes" on one host: torchrun per node, one GPU each, rendezvous on localhost.
            procs = []
            for node in range(spec["num_nodes"]):
                node_env = dict(env)
                if not cpu:
                    node_env["CUDA_VISIBLE_DEVICES"] = str(node)
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={spec['num_nodes']}", f"--node_rank={node}",
                       "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={env['MASTER_PORT']}", *base[1:]]
                procs.append(subprocess.Popen(cmd, env=node_env, stdout=out, stderr=subprocess.STDOUT))
            rcs = _wait_all_or_first_failure(procs, timeout)
            rc = rcs if any(r != 0 for r in rcs) else 0
        else:
            try:
                rc = subprocess.run(base, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
    wall = time.perf_counter() - t0
    path = work / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {"scenario": name}
    result["returncode"], result["wall_seconds"] = rc, wall
    if rc != 0 or result.get("error") or not path.exists():
        result["log_tail"] = log.read_text()[-3000:]
    return result


def summarize(results: dict) -> dict:
    single = results.get("single_b4", {})
    summary = {}
    if single.get("tokens_per_s") and results.get("ddp", {}).get("tokens_per_s"):
        summary["ddp_scaling_vs_1gpu"] = results["ddp"]["tokens_per_s"] / single["tokens_per_s"]
    if results.get("fsdp", {}).get("tokens_per_s") and single.get("tokens_per_s"):
        summary["fsdp_ac_scaling_vs_1gpu_no_ac"] = results["fsdp"]["tokens_per_s"] / single["tokens_per_s"]
    ref = results.get("single", {}).get("losses")
    if ref:
        parity = {}
        for name in ("ddp", "fsdp", "fsdp2", "fsdp2_allbf16"):
            losses = results.get(name, {}).get("losses")
            if losses:
                n = min(len(ref), len(losses))
                parity[name] = {"first_step_abs_diff": abs(ref[0] - losses[0]), "max_abs_diff": max(abs(a - b) for a, b in zip(ref[:n], losses[:n])), "steps": n}
        summary["loss_parity_vs_single"] = parity
    return summary


def table(results: dict) -> str:
    rows = ["| scenario | GPUs | batch/GPU x seq | tokens/s | peak alloc GiB/GPU | estimate GiB | first loss | last loss | adapter same on ranks | NF4 bytes changed | notes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if name not in SCENARIOS:
            continue
        peaks = r.get("peak_alloc_gib") or []
        est = r.get("estimate_gib")
        notes = []
        if r.get("error") or r.get("returncode") not in (0, None):
            notes.append(f"FAILED rc={r.get('returncode')}: {(r.get('error') or '')[:120]}")
        if "resume_bit_exact" in r:
            notes.append(f"resume bit-exact={r['resume_bit_exact']} (max diff {r['resume_vs_uninterrupted_max_abs_diff']:.2e})")
        if r.get("checkpoint_bytes"):
            notes.append("ckpt " + ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in r["checkpoint_bytes"].items()))
        if r.get("peft_export"):
            notes.append(f"PEFT load={r['peft_export'].get('loaded')} diff={r['peft_export'].get('max_abs_diff')}")
        losses = r.get("losses") or [float("nan")]
        rows.append(
            f"| {name} | {r.get('world_size', '?')} | {r.get('batch_per_gpu', '?')} x {r.get('seq', '?')} | {r.get('tokens_per_s', float('nan')):,.0f} | "
            f"{'/'.join(f'{p:.2f}' for p in peaks)} | {est if not isinstance(est, float) else f'{est:.2f}'} | {losses[0]:.4f} | {losses[-1]:.4f} | "
            f"{r.get('adapter_same_on_all_ranks')} | {r.get('nf4_bytes_changed_per_rank')} | {'; '.join(notes)} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--all", action="store_true", help="run --only (default: all but fsdp_70b) through the driver")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--work", default="/tmp/lightning_lora_multi_gpu")
    parser.add_argument("--out", default=None, help="directory for the combined JSON")
    parser.add_argument("--cpu", action="store_true", help="tiny model on CPU (gloo): debug the code paths")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="override every scenario's model (e.g. tiny for tests)")
    parser.add_argument("--seq", type=int, default=None, help="override every scenario's sequence length")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per scenario")
    parser.add_argument("--deadline", type=float, default=1e9, help="start no scenario after this many seconds")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.scenario:
        run_scenario(args.scenario, work, args.cpu, args.model, args.seq)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # An orderly shutdown: a rank that exits with the process group alive can abort in gloo's
            # threads ("terminate called without an active exception"), failing a run that succeeded.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return
    names = args.only or DEFAULT_ORDER
    results = {}
    started = time.perf_counter()
    for name in names:
        if args.cpu and SCENARIOS[name]["strategy"] == "fsdp":
            continue  # Lightning's FSDPStrategy needs CUDA
        if time.perf_counter() - started > args.deadline:
            results[name] = {"scenario": name, "skipped": f"not run: the driver's --deadline of {args.deadline:.0f} s had passed"}
            continue
        print(f"== {name}", flush=True)
        extra = (["--model", args.model] if args.model else []) + (["--seq", str(args.seq)] if args.seq else [])
        results[name] = launch(name, work, args.cpu, args.timeout, extra)
        r = results[name]
        print(json.dumps({k: r.get(k) for k in ("returncode", "wall_seconds", "tokens_per_s", "peak_alloc_gib", "error")}), flush=True)
        if r.get("log_tail"):
            print(r["log_tail"][-1500:], flush=True)
        if args.out:  # after every scenario, so a run cut short still leaves its results
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "multi_gpu.json").write_text(json.dumps(results, indent=1))
    results["summary"] = summarize(results)
    results["versions"] = versions()
    print(table(results))
    print(json.dumps(results["summary"], indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "multi_gpu.json").write_text(json.dumps(results, indent=1))


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "lightning", "transformers", "bitsandbytes", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus"] = torch.cuda.device_count()
        out["cuda"] = torch.version.cuda
    return out


if __name__ == "__main__":
    main()
