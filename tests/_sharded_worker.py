"""One rank of a sharded build (run by torchrun with gloo on CPU, or on one GPU): what it holds, reads and computes.

    python -m torch.distributed.run --nproc_per_node N tests/_sharded_worker.py OUT SHARD SOURCE [SHARD SOURCE ...]

With ``LL_WORKER_LAYERS`` decoder layers (default 2), for each (SHARD, SOURCE) pair (SHARD: fsdp1 / fsdp2; SOURCE: 'random' or a checkpoint directory) the
rank builds tests' tiny Llama with ``build_lora_model`` (the LoRA / quantization configs below), then
writes ``OUT/<shard>-<source name>-rank<r>.pt``: per-layer hashes of the packed bytes as FSDP gathers
them and of the quant state this rank holds, the bytes of parameters it holds, the checkpoint tensors
it read, the gathered adapter and the logits of one forward.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _models import tiny_llama, token_batch  # noqa: E402

from lightning_lora import LoRAConfig, QuantizationConfig  # noqa: E402
from lightning_lora.quantization import is_4bit  # noqa: E402
from lightning_lora.sharded_loading import build_lora_model, sharded_param_init_fn  # noqa: E402

LORA = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
QUANT = QuantizationConfig(mode="nf4", compute_dtype="bfloat16", quant_storage="bfloat16")


def layer_hashes(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of each 4-bit layer's packed bytes (``full``: name -> gathered weight) followed by its quant state's tensors."""
    out = {}
    for name, module in model.named_modules():
        if not is_4bit(module):
            continue
        clean = name.replace("_fsdp_wrapped_module.", "").replace(".base_layer", "")
        digest = hashlib.sha256(full[name].detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        state = module.quant_state
        for tensor in (state.code, state.absmax, *((state.offset, state.state2.code, state.state2.absmax) if state.nested else ())):
            digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        out[clean] = digest.hexdigest()
    return out


class ReadCounter:
    """Wraps safetensors.safe_open and records every tensor key read through get_tensor / get_slice."""

    def __init__(self) -> None:
        import safetensors

        self.keys: list[str] = []
        self.original = safetensors.safe_open
        counter = self

        class Counted:
            def __init__(self, *args, **kwargs):
                self.handle = counter.original(*args, **kwargs)

            def __enter__(self):
                self.inner = self.handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, key):
                counter.keys.append(key)
                return self.inner.get_tensor(key)

            def get_slice(self, key):
                counter.keys.append(key)
                return self.inner.get_slice(key)

        safetensors.safe_open = Counted


def worker_config():
    """tests' tiny Llama, with LL_WORKER_LAYERS decoder layers (default 2)."""
    config = tiny_llama().config
    config.num_hidden_layers = int(os.environ.get("LL_WORKER_LAYERS", "2"))
    return config


def run(shard: str, source: str, device: torch.device) -> dict:
    counter = ReadCounter()
    checkpoint = None if source == "random" else source
    config = worker_config()
    model = build_lora_model(config, LORA, QUANT, shard=shard, device=device, checkpoint=checkpoint, seed=5)
    if shard == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from lightning_lora.sharding import lora_fsdp_policy

        # bf16 compute for the float32 LoRA units, as Lightning's bf16-mixed sets it (a wrapped adapter meets bf16 inputs)
        model = FSDP(model, auto_wrap_policy=lora_fsdp_policy({LlamaDecoderLayer}), param_init_fn=sharded_param_init_fn(model),
                     device_id=device, use_orig_params=True, mixed_precision=MixedPrecision(param_dtype=torch.bfloat16))
    held_by_kind = {"packed": 0, "other": 0, "quant_state": 0}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2: a DTensor's shard on this rank
            held_by_kind["packed" if is_4bit(module) and param is module.weight else "other"] += local.numel() * local.element_size()
        if is_4bit(module):  # replicated on every rank
            state = module.quant_state
            for tensor in (state.code, state.absmax, *((state.offset, state.state2.code, state.state2.absmax) if state.nested else ())):
                held_by_kind["quant_state"] += tensor.numel() * tensor.element_size()
    held = held_by_kind["packed"] + held_by_kind["other"]
    ids = token_batch(batch=2, seq=8).to(device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    if shard == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            full = {n: m.weight.detach().clone() for n, m in model.named_modules() if is_4bit(m)}
            adapter = {n.replace("_fsdp_wrapped_module.", ""): p.detach().float().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
    else:
        from lightning_lora.sharding import gather_full_tensor  # not full_tensor(): gloo ranks sharing one GPU crash in it

        full = {n: gather_full_tensor(m.weight) for n, m in model.named_modules() if is_4bit(m)}
        adapter = {n: gather_full_tensor(p).float().cpu() for n, p in model.named_parameters() if "lora_" in n}
    import safetensors

    safetensors.safe_open = counter.original
    return {"hashes": layer_hashes(model, full), "held_bytes": held, "held_by_kind": held_by_kind, "read": counter.keys,
            "adapter": adapter, "logits": logits, "world": dist.get_world_size()}


def main() -> None:
    out, pairs = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available() and os.environ.get("LL_WORKER_CUDA") == "1":
        torch.cuda.set_device(0)  # every rank on one GPU, as the lead runs multi-rank checks
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")
    for shard, source in zip(pairs[::2], pairs[1::2]):
        result = run(shard, source, device)
        name = "random" if source == "random" else Path(source).name
        torch.save(result, out / f"{shard}-{name}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()  # an orderly shutdown: gloo can abort a process that exits with its group alive


if __name__ == "__main__":
    main()
