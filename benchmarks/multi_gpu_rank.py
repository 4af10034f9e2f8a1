"""What every rank of a ``benchmarks/multi_gpu.py`` launch runs: its scenarios, one after another, in one process group.

Each scenario builds a random Llama (``build_backbone``: nf4 + double quant, bf16 storage), trains it through
``Trainer`` + ``LoRACallback`` (r=16, alpha=32, all linear layers), AdamW, norm clipping (``CLIP``), and records on
every step the loss (mean over ranks), the global gradient norm before and after clipping, and the step time;
then the adapter (gathered, compared across ranks), the NF4 bytes each layer computed with against those before
sharding (every rank), peak memory, checkpoint contents, the PEFT export, and, for resumed runs, the adapter,
optimizer state and step found after the restore against those the writer had at its checkpoint.
Rank 0 writes ``<work>/<slug>.json`` per scenario; the driver (``multi_gpu.py``) reads and compares them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

GiB = 2**30


def build_backbone(config, quant, device):
    """The quantized backbone every scenario trains. Swap the builder here (one line) to change how models load."""
    from lightning_lora.loading import build_quantized_model

    return build_quantized_model(config, quant, device=device, offload_to="cpu", seed=0)


def _global_grad_norm(trainer, module, kind: str) -> float:
    """sqrt(sum of every gradient element squared) over the whole model, whatever the sharding."""
    import torch.distributed as dist

    total = torch.zeros((), dtype=torch.float64, device=trainer.strategy.root_device)
    for param in module.parameters():
        if param.grad is None or getattr(param, "_is_flat_param", False):  # FSDP1: the original parameters hold shard views
            continue
        grad = param.grad
        if type(grad).__name__ == "DTensor":
            grad = grad.to_local()
        total += grad.detach().double().pow(2).sum()
    if kind in ("fsdp", "fsdp2") and trainer.world_size > 1:  # each rank holds a disjoint shard of the gradients
        dist.all_reduce(total)
    return math.sqrt(float(total))


def _global_batch_fingerprint(trainer, ids: torch.Tensor) -> int:
    """A number that depends on which sequences the global batch holds, not on how the ranks split it."""
    import torch.distributed as dist

    weights = torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=torch.int64)
    value = ((ids.long() * weights).sum(dim=1) % 1_000_003).pow(2).sum().reshape(1)
    if trainer.world_size > 1:
        dist.all_reduce(value)
    return int(value)


def _full_optimizer_state(trainer) -> dict[str, Any]:
    """The optimizer state with full tensors on CPU, keyed by parameter name (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from lightning_lora.lightning.strategies import strategy_kind
    from lightning_lora.sharding import gather_full_tensor

    # FSDP2: local DTensor state, gathered by gather_full_tensor (full_state_dict=True would go through
    # full_tensor(), whose functional collective crashes gloo ranks sharing one GPU). FSDP1: its local state is
    # flat shards, so torch gathers it.
    full = strategy_kind(trainer) != "fsdp2"
    state = get_optimizer_state_dict(trainer.strategy.model, trainer.optimizers, options=StateDictOptions(full_state_dict=full))
    out = {}
    for name, entry in state["state"].items():
        out[name] = {k: gather_full_tensor(v).detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
    return out


def _compare_states(saved: dict, now: dict) -> dict[str, Any]:
    adapter_same = saved["adapter"].keys() == now["adapter"].keys() and all(torch.equal(v, now["adapter"][k]) for k, v in saved["adapter"].items())
    optimizer_same = saved["optimizer"].keys() == now["optimizer"].keys() and all(
        entry.keys() == now["optimizer"][name].keys()
        and all(torch.equal(torch.as_tensor(v), torch.as_tensor(now["optimizer"][name][k])) for k, v in entry.items())
        for name, entry in saved["optimizer"].items()
    )
    worst = max([float((v.float() - now["adapter"][k].float()).abs().max()) for k, v in saved["adapter"].items() if k in now["adapter"]] or [float("nan")])
    return {"adapter_exact": adapter_same, "optimizer_exact": optimizer_same, "step_exact": saved["step"] == now["step"],
            "saved_step": saved["step"], "restored_step": now["step"], "optimizer_tensors": len(saved["optimizer"]), "adapter_max_abs_diff": worst}


def run_group(specs: list[dict], work: Path, ctx: dict) -> None:
    for spec in specs:
        try:
            run_scenario(spec, work, ctx)
        except Exception as err:  # recorded; the group goes on (every rank raises alike in a deterministic set-up)
            traceback.print_exc()
            if int(os.environ.get("RANK", 0)) == 0:
                (work / f"{spec['slug']}.json").write_text(json.dumps({"scenario": spec["name"], "error": f"{type(err).__name__}: {err}"[:2000]}))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def run_scenario(spec: dict, work: Path, ctx: dict) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch.utils.data import DistributedSampler, TensorDataset
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_lora import LoRACallback, LoRAConfig, QuantizationConfig, sharding
    from lightning_lora.lightning import strategies
    from lightning_lora.data._resumable import ResumableDataLoader
    from lightning_lora.quantization import is_4bit
    from multi_gpu import CLIP, LORA, llama_config

    cpu, world, kind = ctx["cpu"], spec["world"], spec["strategy"]
    nodes = ctx["num_nodes"] if world > 1 else 1
    devices = world // nodes
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if cpu else torch.device("cuda", 0 if ctx["shared_gpu"] else local_rank)
    if not cpu:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats()
    steps, seq, per_rank = spec["steps"], spec["seq"], spec["global_batch"] // world
    quant = QuantizationConfig(mode="nf4", double_quant=True, compute_dtype="bfloat16", quant_storage="bfloat16")
    config = llama_config(spec["model"], seq)
    check_bytes = spec.get("check_bytes", True)
    capture = spec.get("capture_state", True)
    rank = int(os.environ.get("RANK", 0))
    start_step = spec.get("start_step", 0)
    sharded_build = bool(spec.get("sharded_build")) and kind in ("fsdp", "fsdp2")

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            t0 = time.perf_counter()
            L.seed_everything(0, verbose=False)
            self.model = None
            if not sharded_build:
                # Built here (block by block on this rank's device, parked on the CPU): the same weights on every rank.
                self.model = build_backbone(config, quant, device).train()
                self._checkpointing()
            self.build_seconds = time.perf_counter() - t0
            self.before: dict[str, torch.Tensor] = {}
            self.seen: dict[str, torch.Tensor] = {}
            self._sharded = False

        def _checkpointing(self) -> None:
            if spec.get("checkpointing") and kind != "fsdp":  # FSDPStrategy checkpoints through its policy
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def _record(self, name, layer) -> None:
            if name not in self.seen:  # the packed bytes this layer computes with, after any all-gather
                self.seen[name] = layer.weight.detach().reshape(-1).contiguous().view(torch.uint8).cpu().clone()

        def configure_model(self) -> None:
            if self._sharded:
                return
            if sharded_build:
                # Each rank materializes, quantizes and keeps only its FSDP shard (lightning_lora.sharded_loading).
                from lightning_lora.sharded_loading import build_lora_model

                t0 = time.perf_counter()
                self.model = build_lora_model(config, LoRAConfig(**LORA), quant, strategy=self.trainer.strategy, seed=0).train()
                self._checkpointing()
                self.build_seconds = time.perf_counter() - t0
                self._sharded = True
                return
            if check_bytes:  # LoRA is injected by now; the bytes before sharding, then hook the LoRA layers (their forward reads the base weight)
                self.before = sharding.packed_4bit_bytes(self.model)
                for n, m in self.model.named_modules():
                    if is_4bit(getattr(m, "base_layer", None)):
                        m.register_forward_pre_hook(lambda layer, args, n=n + ".base_layer": self._record(n, layer.base_layer))
            if not spec.get("adapter_only", True):  # what a whole-model checkpoint must hold (LoRA is injected by now)
                self.full_keys = sorted(self.state_dict())
            if kind == "fsdp2":
                if spec.get("lora_bf16"):
                    self.model.to(torch.bfloat16)  # every tensor of a group bf16 (the bitsandbytes #1945 set-up)
                sharding.fully_shard_lora(self.model, {LlamaDecoderLayer}, mesh=self.device_mesh["data_parallel"])
            self._sharded = True

        def training_step(self, batch_, batch_idx):
            (ids,) = batch_
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    class Meter(Callback):
        """Per step: loss (mean over ranks), global grad norm before / after clipping, wall time; peaks; states."""

        def __init__(self) -> None:
            self.losses, self.times, self.pre_norms, self.post_norms, self.fingerprints = [], [], [], [], []
            self.setup_peak, self.t, self.resume_check = 0, None, None

        def _sync(self):
            if not cpu:
                torch.cuda.synchronize()

        def on_train_start(self, trainer, pl_module):
            if not cpu:
                self.setup_peak = torch.cuda.max_memory_allocated()
            trainer.optimizers[0].register_step_post_hook(lambda *_: self.post_norms.append(_global_grad_norm(trainer, pl_module, kind)))
            if spec.get("resume_from") and capture:  # what the restore produced, against what the writer had
                try:
                    saved = torch.load(work / f"state_{spec['writer_slug']}_step{start_step}.pt", weights_only=True)
                    self.resume_check = _compare_states(saved, self._state(trainer, pl_module))
                except Exception as err:  # the measurement failed, not necessarily the resume: report it, train on
                    self.resume_check = {"error": f"{type(err).__name__}: {err}"[:500]}

        def _state(self, trainer, pl_module):
            return {"adapter": strategies.gather_adapter_state_dict(trainer, pl_module.model), "optimizer": _full_optimizer_state(trainer),
                    "step": trainer.global_step}

        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            self.fingerprints.append(_global_batch_fingerprint(trainer, batch_[0]))
            self._sync()
            if not cpu and trainer.global_step == min(2, steps - 1) + start_step:
                torch.cuda.reset_peak_memory_stats()
            self.t = time.perf_counter()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.pre_norms.append(_global_grad_norm(trainer, pl_module, kind))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            self._sync()
            self.times.append(time.perf_counter() - self.t)
            self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")))
            if capture and spec.get("ckpt_every") and trainer.global_step == spec["ckpt_every"]:
                try:
                    state = self._state(trainer, pl_module)  # every rank gathers; rank 0 keeps it for the resumes
                except Exception as err:  # the resumes then report the missing file
                    print(f"state capture failed: {type(err).__name__}: {err}", flush=True)
                    return
                if trainer.is_global_zero:
                    torch.save(state, work / f"state_{spec['slug']}_step{trainer.global_step}.pt")

    # One epoch of `steps` global batches: the step-10 checkpoint sits mid-epoch. The order is a permutation drawn from
    # seed + epoch (the same at any world size); rank r takes its entries r, r + W, ..., so global batch j is entries
    # [j*G, (j+1)*G) of it whatever W is, as long as the global batch G stays fixed. ResumableDataLoader counts the
    # batches it handed out; Lightning saves that count (rank 0's) and every rank skips as many on resume.
    n_sequences = spec["global_batch"] * spec["steps_per_epoch"]
    generator = torch.Generator().manual_seed(1234)
    data = TensorDataset(torch.randint(0, config.vocab_size, (n_sequences, seq), generator=generator))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=1234)
    loader = ResumableDataLoader(data, batch_size=per_rank, sampler=sampler)

    backend = ctx["backend"]
    timeout = timedelta(seconds=ctx["timeout"])
    if kind == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        strategy: Any = FSDPStrategy(
            auto_wrap_policy=sharding.lora_fsdp_policy({LlamaDecoderLayer}),
            activation_checkpointing_policy={LlamaDecoderLayer} if spec.get("checkpointing") else None,
            use_orig_params=True, state_dict_type=spec.get("state_dict_type", "full"), process_group_backend=backend, timeout=timeout,
        )
    elif kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        from lightning_lora.lightning.strategies import share_one_gpu

        # several gloo ranks on one GPU: torch's DeviceMesh cannot split a GPU-bound gloo group (see share_one_gpu)
        strategy = share_one_gpu(ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, process_group_backend=backend, timeout=timeout))
    elif kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend=backend, timeout=timeout)
    else:
        strategy = "auto"
    meter = Meter()
    export_dir = work / f"export_{spec['slug']}"
    export = str(export_dir) if spec.get("export") else None
    lora_callback = (
        LoRACallback(from_backbone=True, backbone="model", export_dir=export)
        if sharded_build
        else LoRACallback(
            **LORA, quantize="nf4", quant_storage="bfloat16", compute_dtype="bfloat16", backbone="model", export_dir=export,
            adapter_only_checkpoint=spec.get("adapter_only", True),
        )
    )
    callbacks: list[Any] = [lora_callback, meter]
    ckpt_dir = work / f"ckpt_{spec['writer_slug'] if spec.get('resume_from') else spec['slug']}"
    if spec.get("ckpt_every") and not spec.get("resume_from"):
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=spec["ckpt_every"], save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(
        accelerator="cpu" if cpu else "gpu", devices=devices, num_nodes=nodes, strategy=strategy,
        precision="32-true" if cpu else "bf16-mixed", max_steps=steps, callbacks=callbacks, logger=False,
        enable_checkpointing=bool(spec.get("ckpt_every")) and not spec.get("resume_from"), enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=CLIP, gradient_clip_algorithm="norm", num_sanity_val_steps=0,
        use_distributed_sampler=False, deterministic=True if cpu else "warn",
    )
    module = LM()
    ckpt_path = str(ckpt_dir / f"step={start_step}.ckpt") if spec.get("resume_from") else None
    unchecked = spec.get("unchecked")
    saved_check = sharding.check_fsdp2_keeps_4bit_bytes
    if unchecked:  # measure what the refused set-up does to the bytes: the library's check switched off for this run
        sharding.check_fsdp2_keeps_4bit_bytes = lambda model: None
    t_fit = time.perf_counter()
    error = None
    try:
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    except Exception as err:  # keep what was measured; the driver reports the error
        traceback.print_exc()
        error = f"{type(err).__name__}: {err}"[:2000]
    finally:
        sharding.check_fsdp2_keeps_4bit_bytes = saved_check
    fit_seconds = time.perf_counter() - t_fit

    adapter = strategies.gather_adapter_state_dict(trainer, module.model) if error is None else {}
    flat = torch.cat([v.float().reshape(-1) for v in adapter.values()]) if adapter else torch.zeros(1)
    root = trainer.strategy.root_device
    same_on_ranks = None
    if world > 1 and error is None:
        import torch.distributed as dist

        flat_dev = flat.to(root)
        reference = flat_dev.clone()
        dist.broadcast(reference, 0)
        mismatch = torch.tensor([0.0 if torch.equal(reference, flat_dev) else 1.0], device=root)
        dist.all_reduce(mismatch)
        same_on_ranks = bool(mismatch.item() == 0)
    changed = {k: int((module.seen[k] != v).sum()) if module.seen[k].shape == v.shape else int(v.numel())
               for k, v in module.before.items() if k in module.seen}
    peaks = [torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB, meter.setup_peak / GiB] if not cpu else [0.0] * 3
    import resource

    max_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux reports KiB
    mine = [peaks, [sum(changed.values()), len(changed)], max_rss_gib]
    gathered: list[Any] = [None] * world
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]

    if rank != 0:
        return
    times = [t for i, t in enumerate(meter.times) if i >= 2 and (not spec.get("ckpt_every") or i + start_step != spec["ckpt_every"])]
    step_time = sorted(times)[len(times) // 2] if times else float("nan")
    result = dict(
        scenario=spec["name"], strategy=kind, world_size=world, num_nodes=nodes, devices_per_node=devices, shared_gpu=ctx["shared_gpu"],
        backend=backend or "default", model=spec["model"], hidden=config.hidden_size, layers=config.num_hidden_layers, seq=seq,
        global_batch=spec["global_batch"], batch_per_rank=spec["global_batch"] // world, steps_run=len(meter.losses), start_step=start_step,
        final_step=trainer.global_step, losses=meter.losses, batch_fingerprints=meter.fingerprints, grad_norm_pre_clip=meter.pre_norms, grad_norm_post_clip=meter.post_norms,
        step_times=meter.times, median_step_s=step_time, tokens_per_s=spec["global_batch"] * seq / step_time if times else None,
        peak_alloc_gib=[g[0][0] for g in gathered], peak_reserved_gib=[g[0][1] for g in gathered], setup_peak_alloc_gib=[g[0][2] for g in gathered],
        build_seconds=module.build_seconds, fit_seconds=fit_seconds, adapter_tensors=len(adapter), adapter_params=int(flat.numel()) if adapter else 0,
        adapter_same_on_all_ranks=same_on_ranks, nf4_bytes_changed_per_rank=[g[1][0] for g in gathered],
        nf4_layers_checked_per_rank=[g[1][1] for g in gathered], error=error, activation_checkpointing=bool(spec.get("checkpointing")),
        resume_from=spec.get("resume_from"), resume_state_check=meter.resume_check, expect_error=spec.get("expect_error"),
        unchecked=bool(unchecked), sharded_build=sharded_build, max_host_rss_gib=[g[2] for g in gathered],
    )
    if spec.get("ckpt_every") and not spec.get("resume_from") and ckpt_dir.exists():
        result["checkpoints"] = _describe_checkpoints(ckpt_dir, getattr(module, "full_keys", None))
        if result["checkpoints"].get("missing_keys") and error is None:
            error = result["error"] = f"the whole-model checkpoint lacks {result['checkpoints']['missing_keys']}"
    if adapter:
        torch.save(adapter, work / f"adapter_{spec['slug']}.pt")
    if spec.get("export") and adapter:
        result["peft_export"] = check_peft_export(export_dir / "adapter", config, adapter)
    result["estimate_gib"] = estimate(config, spec, seq)
    (work / f"{spec['slug']}.json").write_text(json.dumps(result, indent=1))


def _describe_checkpoints(ckpt_dir: Path, full_keys: list[str] | None = None) -> dict[str, Any]:
    """Sizes and keys of the checkpoints in ``ckpt_dir``; with ``full_keys`` (whole-model checkpoints), the first
    few of those the first checkpoint lacks."""
    sizes = {}
    for path in sorted(ckpt_dir.iterdir()):
        sizes[path.name] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    out: dict[str, Any] = {"bytes": sizes}
    first = sorted(ckpt_dir.iterdir())[0]
    if first.is_file():  # a full-state checkpoint: which tensors it holds
        ckpt = torch.load(first, map_location="cpu", weights_only=True)
        keys = list(ckpt.get("state_dict", {}))
        out["state_dict_keys"] = len(keys)
        out["non_adapter_keys"] = [k for k in keys if ".lora_" not in k][:5]
    else:  # a distributed checkpoint: which tensors its metadata lists
        import torch.distributed.checkpoint as dcp

        keys = list(dcp.FileSystemReader(str(first)).read_metadata().state_dict_metadata)
        model_keys = [k for k in keys if not k.startswith("optimizer")]
        out["state_dict_keys"] = len(model_keys)
        out["non_adapter_keys"] = [k for k in model_keys if ".lora_" not in k][:5]
    if full_keys is not None:
        found = set(keys)
        out["missing_keys"] = [k for k in full_keys if k not in found and f"state_dict.{k}" not in found and f"model.{k}" not in found][:5]
    return out


def check_peft_export(path: Path, config, adapter: dict) -> dict:
    """Load the exported adapter with PEFT into a plain model of the same shape and compare its tensors.

    Above 8 layers the plain model is cut to its first 2 (a 70B model would need 140 GB of host memory);
    the file's key set is still checked in full.
    """
    try:
        import copy

        from peft import PeftModel
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            file_keys = set(f.keys())
        expected = {_peft_key(k, default=False) for k in adapter}
        keep = None
        if config.num_hidden_layers > 8:
            config = copy.deepcopy(config)
            config.num_hidden_layers, keep = 2, ("model.layers.0.", "model.layers.1.")
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config)
        model = PeftModel.from_pretrained(base.to_empty(device="cpu"), str(path))
        params = dict(model.named_parameters())
        worst, found = 0.0, 0
        for key, value in adapter.items():
            if keep and not key.startswith(keep):
                continue
            worst = max(worst, float((params[_peft_key(key, default=True)].detach().float() - value.float()).abs().max()))
            found += 1
        return {"loaded": True, "tensors_compared": found, "max_abs_diff": worst, "file_keys_match": file_keys == expected,
                "files": sorted(os.listdir(path))}
    except Exception as err:
        return {"loaded": False, "error": f"{type(err).__name__}: {err}"[:1000]}


def _peft_key(key: str, default: bool) -> str:
    name = ".default.weight" if default else ".weight"
    return "base_model.model." + key.replace(".lora_a.weight", ".lora_A" + name).replace(".lora_b.weight", ".lora_B" + name)


def estimate(config, spec: dict, seq: int) -> float | str | None:
    try:
        from lightning_lora.estimate import estimate_memory
    except ImportError:
        return None
    from multi_gpu import LORA

    strategy = {"single": "single", "ddp": "ddp", "fsdp": "fsdp", "fsdp2": "fsdp2"}[spec["strategy"]]
    try:
        est = estimate_memory(
            config, quantization="nf4", double_quant=True, r=LORA["r"], target_modules="all-linear", batch_size=spec["global_batch"] // spec["world"],
            seq_len=seq, strategy=strategy if spec["world"] > 1 or strategy == "single" else "single", num_gpus=spec["world"],
            activation_checkpointing=bool(spec.get("checkpointing")), dtype="bf16",
        )
        return est.total / GiB
    except Exception as err:  # the estimator is another module's; report, do not fail the benchmark
        return f"estimator failed: {err}"
