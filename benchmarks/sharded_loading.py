"""Memory per rank of ``sharded_loading.build_lora_model`` (FSDP2 / FSDP1) at world sizes 1, 2, 4, against the goal.

Goal per rank (issue 12): peak host RSS <= packed model / world + 2 decoder blocks (bf16) + 3 GiB, and on
the GPU, memory while loading <= the rank's shard + 2 blocks; the packed bytes those of the 1-rank
build (a fingerprint per layer, compared with the world-1 run). Each configuration runs as its own
``torchrun`` (gloo; with ``--device cuda`` every rank on cuda:0, as one GPU is shared), or with
``--fake-world W`` as rank 0 of W under torch's fake process group (collectives do nothing: the
values are garbage, rank 0's memory is real). ``replicated`` is today's way for comparison: every
rank runs ``build_quantized_model`` on the whole model, then ``fully_shard``.

    python benchmarks/sharded_loading.py --device cpu --shape mid --runs fsdp2:1 fsdp2:2 fsdp2:4 fsdp1:2 fsdp1:4 replicated:2 --out DIR
    python benchmarks/sharded_loading.py --device cuda --shape 70b:8 --runs fsdp2:1 fsdp2:2 fsdp1:2 --out DIR       # bytes at 70B width
    python benchmarks/sharded_loading.py --device cuda --shape 70b --runs fsdp2:2 fsdp1:2 --fake-worlds 4 8 --no-hashes --out DIR

RSS is ``ru_maxrss`` (the process's peak resident set); "growth" is that peak minus the peak before
the build (Python, torch, transformers, the process group, a CUDA context); "after" is the resident
set once built. By default the ranks run with a fixed glibc mmap threshold (``--no-fixed-malloc`` for
glibc's defaults, under which freed blocks stay in per-thread arenas and peaks vary by ~1 GiB
between identical ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu import MODELS  # noqa: E402  (the shapes the multi-GPU benchmark trains: tiny, small, 70b)

GiB = 2**30
# "mid": the CPU run's shape (hidden 2048 as "small", 24 layers); "tiny" with 4 layers, so that 4 ranks each own a block.
SHAPES = {**MODELS, "tiny": {**MODELS["tiny"], "num_hidden_layers": 4}, "mid": {**MODELS["small"], "num_hidden_layers": 24}}


def _shape(spec: str) -> dict:
    """A shape name, optionally with its number of decoder layers: '70b' or '70b:8' (the 70B width, 8 layers)."""
    name, _, layers = spec.partition(":")
    if name not in SHAPES:
        raise SystemExit(f"--shape {spec!r}: the shapes are {sorted(SHAPES)}, optionally with ':<layers>'.")
    return {**SHAPES[name], **({"num_hidden_layers": int(layers)} if layers else {})}


def _configs(shape: str):
    from transformers import LlamaConfig

    from lightning_lora import LoRAConfig, QuantizationConfig

    config = LlamaConfig(**_shape(shape), tie_word_embeddings=False, use_cache=False)
    quant = QuantizationConfig(mode="nf4", double_quant=True, compute_dtype="bfloat16", quant_storage="bfloat16")
    return config, LoRAConfig(r=16, alpha=32.0, target_modules="all-linear"), quant


def sizes(shape: str) -> dict:
    """Packed model bytes (4-bit layers with their quant state, the rest bf16, LoRA fp32) and one bf16 decoder block, from meta."""
    from lightning_lora._parts import decoder_blocks, meta_model
    from lightning_lora._matching import output_head_names
    from lightning_lora.sharded_loading import _layout, empty_4bit_like

    config, lora, quant = _configs(shape)
    model = meta_model(config, torch.bfloat16)
    heads = output_head_names(model)
    packed = quant_state = 0
    layouts: dict[tuple[int, int], list] = {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and name not in heads:
            key = (module.in_features, module.out_features)
            if key not in layouts:
                layouts[key] = _layout(empty_4bit_like(module, quant, torch.bfloat16, torch.device("meta")))
            sizes_ = [torch.Size(shape).numel() * dtype.itemsize for shape, dtype in layouts[key]]
            packed += sizes_[0]
            quant_state += sum(sizes_[1:])
            lora_numel = lora.r * (module.in_features + module.out_features)
            packed += lora_numel * 4
        elif name:
            packed += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    block = sum(p.numel() for p in decoder_blocks(model)[0][1].parameters()) * 2
    return {"packed_bytes": packed + quant_state, "quant_state_bytes": quant_state, "block_bf16_bytes": block,
            "layers": config.num_hidden_layers}


def fingerprint(tensor: torch.Tensor) -> str:
    """Two int64 sums over the bytes (plain and position-weighted), on the tensor's device: equal on CPU and GPU for equal bytes."""
    data = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
    if data.numel() % 8:
        data = torch.cat([data, data.new_zeros(8 - data.numel() % 8)])
    words = data.view(torch.int64)
    weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % 1_000_003 + 1
    return f"{int(words.sum())}:{int((words * weights).sum())}"


# -- one rank -----------------------------------------------------------------------------------------------
def rank_run(shard: str, shape: str, device_kind: str, fake_world: int | None, hashes: bool) -> dict:
    import torch.distributed as dist

    if fake_world:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", rank=0, world_size=fake_world, store=FakeStore())
    else:
        dist.init_process_group("gloo")
    device = torch.device("cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(0)  # every rank on one GPU
        device = torch.device("cuda", 0)
        torch.zeros(1, device=device)  # the CUDA context belongs to the baseline
    rank, world = dist.get_rank(), dist.get_world_size()
    config, lora, quant = _configs(shape)
    # Everything the build imports is imported before the baseline, so "growth" is the model's.
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard  # noqa: F401

    from lightning_lora.quantization import _bnb, is_4bit

    _bnb()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if shard == "replicated":
        from lightning_lora import inject_lora
        from lightning_lora.sharding import fully_shard_lora
        from lightning_lora.loading import build_quantized_model
        from torch.distributed.device_mesh import init_device_mesh

        model = build_quantized_model(config, quant, device=device, offload_to=None, seed=5)
        inject_lora(model, lora)
        if world > 1:
            fully_shard_lora(model, mesh=init_device_mesh(device.type, (world,)))
    else:
        from lightning_lora.sharded_loading import build_lora_model, sharded_param_init_fn

        model = build_lora_model(config, lora, quant, shard=shard if world > 1 or fake_world else None, device=device, seed=5)
        if shard == "fsdp1" and (world > 1 or fake_world):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer

            from lightning_lora.sharding import lora_fsdp_policy

            model = FSDP(model, auto_wrap_policy=lora_fsdp_policy({LlamaDecoderLayer}), param_init_fn=sharded_param_init_fn(model),
                         device_id=device, use_orig_params=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = quant_state = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            local = param.to_local() if hasattr(param, "to_local") else param
            held += local.numel() * local.element_size()
        if is_4bit(module):
            s = module.quant_state
            for t in (s.code, s.absmax, *((s.offset, s.state2.code, s.state2.absmax) if s.nested else ())):
                quant_state += t.numel() * t.element_size()
    import gc

    gc.collect()
    result = {"rank": rank, "world": world, "shard": shard, "fake": bool(fake_world), "seconds": seconds,
              "rss_before_gib": before / GiB, "rss_peak_gib": peak / GiB, "rss_growth_gib": (peak - before) / GiB,
              "rss_after_gib": _current_rss() / GiB,
              "held_param_gib": held / GiB, "quant_state_gib": quant_state / GiB}
    if device.type == "cuda":
        result.update(gpu_peak_gib=torch.cuda.max_memory_allocated() / GiB, gpu_after_gib=torch.cuda.memory_allocated() / GiB)
    if hashes and not fake_world:
        result["fingerprints"] = _fingerprints(model, shard, world)
    dist.barrier()
    dist.destroy_process_group()
    return result


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fingerprints(model: torch.nn.Module, shard: str, world: int) -> dict[str, str]:
    """Each 4-bit layer's packed bytes as FSDP gathers them, one layer (FSDP1: one unit) at a time."""
    from lightning_lora.quantization import is_4bit
    from lightning_lora.sharding import gather_full_tensor  # not full_tensor(): gloo ranks sharing one GPU crash in it

    out = {}
    clean = lambda name: name.replace("_fsdp_wrapped_module.", "").replace(".base_layer", "")  # noqa: E731
    if shard == "fsdp1" and world > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        names = {module: clean(name) for name, module in model.named_modules() if is_4bit(module)}
        for unit in FSDP.fsdp_modules(model):
            nested = {m for inner in FSDP.fsdp_modules(unit) if inner is not unit for m in inner.modules()}
            own = [m for m in unit.modules() if m in names and m not in nested]
            if own:
                with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                    out.update({names[m]: fingerprint(m.weight) for m in own})
        return out
    for name, module in model.named_modules():
        if is_4bit(module):
            weight = module.weight
            out[clean(name)] = fingerprint(gather_full_tensor(weight))
    return out


# -- driver ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(shard: str, world: int, args, work: Path, fake_world: int | None = None) -> list[dict]:
    tag = f"{shard}-fake{fake_world}" if fake_world else f"{shard}-w{world}"
    common = ["--rank-run", shard, "--shape", args.shape, "--device", args.device, "--work", str(work)]
    common += ["--hashes"] if args.hashes else []
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    if args.fixed_malloc:
        # glibc keeps freed blocks below its dynamic mmap threshold (it rises to 32 MiB) in per-thread arenas, so the
        # peak RSS of identical ranks differed by up to 1 GiB; with a fixed threshold, tensors are mapped and returned.
        env.update(MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_ARENA_MAX="2")
    if fake_world:
        cmd = [sys.executable, __file__, *common, "--fake-world", str(fake_world), "--tag", tag]
        env.update(RANK="0", WORLD_SIZE=str(fake_world))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", __file__, *common, "--tag", tag]
    t0 = time.perf_counter()
    log = work / f"{tag}.log"
    with open(log, "w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(f"{tag}-rank*.json"))]
    if rc != 0 or not ranks:
        raise RuntimeError(f"{tag} failed (rc={rc}):\n" + log.read_text()[-4000:])
    for r in ranks:
        r["wall_seconds"] = time.perf_counter() - t0
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", default="mid", help=f"one of {sorted(SHAPES)}, optionally ':<layers>' (e.g. 70b:8)")
    parser.add_argument("--runs", nargs="*", default=["fsdp2:1", "fsdp2:2", "fsdp2:4", "fsdp1:2", "fsdp1:4", "replicated:2"],
                        help="shard:world pairs (shard: fsdp2, fsdp1 or replicated)")
    parser.add_argument("--fake-worlds", nargs="*", type=int, default=[], help="FSDP2 as rank 0 of W under the fake process group")
    parser.add_argument("--hashes", action=argparse.BooleanOptionalAction, default=True, help="fingerprint every layer (gathers)")
    parser.add_argument("--fixed-malloc", action=argparse.BooleanOptionalAction, default=True,
                        help="run the ranks with MALLOC_MMAP_THRESHOLD_=1MiB, MALLOC_ARENA_MAX=2 (RSS then follows live tensors)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--work", default="/tmp/lightning_lora_sharded_loading")
    parser.add_argument("--timeout", type=float, default=1800)
    # one rank (internal)
    parser.add_argument("--rank-run", default=None)
    parser.add_argument("--fake-world", type=int, default=None)
    parser.add_argument("--tag", default="run")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.rank_run:
        result = rank_run(args.rank_run, args.shape, args.device, args.fake_world, args.hashes)
        (work / f"{args.tag}-rank{result['rank']}.json").write_text(json.dumps(result))
        return

    for stale in work.glob("*-rank*.json"):
        stale.unlink()
    size = sizes(args.shape)
    plan = [(spec.split(":")[0], int(spec.split(":")[1]), None) for spec in args.runs] + [("fsdp2", w, w) for w in args.fake_worlds]
    runs: list[list[dict]] = []
    for shard, world, fake in plan:
        print(f"== fsdp2 as rank 0 of {world} (fake process group)" if fake else f"== {shard} x {world}", flush=True)
        try:
            runs.append(launch(shard, world, args, work, fake_world=fake))
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # keep what the other runs measured
            print(f"   failed: {str(err)[-2000:]}", flush=True)
            runs.append([{"rank": 0, "world": world, "shard": shard, "fake": bool(fake), "error": str(err)[-2000:]}])
        write_report(args, size, runs, final=False)  # after every run: a command cut short keeps its results
    print(table(write_report(args, size, runs, final=True)))


def write_report(args, size: dict, runs: list[list[dict]], final: bool) -> dict:
    reference = next((r[0].get("fingerprints") for r in runs if r[0]["world"] == 1 and r[0]["shard"] != "replicated"), None)
    rows = []
    for ranks in runs:
        for r in ranks:
            if "error" in r:
                rows.append(r)
                continue
            world = r["world"]
            goal_host = size["packed_bytes"] / world / GiB + 2 * size["block_bf16_bytes"] / GiB + 3
            goal_growth = size["packed_bytes"] / world / GiB + 2 * size["block_bf16_bytes"] / GiB
            row = {**{k: v for k, v in r.items() if k != "fingerprints"}, "goal_host_gib": goal_host, "goal_growth_gib": goal_growth,
                   "host_ok": r["rss_peak_gib"] <= goal_host}
            if "gpu_peak_gib" in r:
                row["goal_gpu_gib"] = r["held_param_gib"] + r["quant_state_gib"] + 2 * size["block_bf16_bytes"] / GiB
                row["gpu_ok"] = r["gpu_peak_gib"] <= row["goal_gpu_gib"]
            if reference is not None and "fingerprints" in r:
                row["bytes_equal_world1"] = r["fingerprints"] == reference
                row["layers_compared"] = len(reference)
            rows.append(row)
    report = {"fixed_malloc": args.fixed_malloc, "shape": args.shape, "model": _shape(args.shape), "device": args.device,
              "sizes_gib": {k: v / GiB for k, v in size.items() if k.endswith("bytes")}, "rows": rows, "complete": final,
              "versions": versions(), "command": " ".join(sys.argv)}
    if args.out:
        stem = f"sharded_loading_{args.device}_{args.shape.replace(':', '-L')}"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"{stem}.json").write_text(json.dumps(report, indent=1))
        Path(args.out, f"{stem}.md").write_text(table(report) + "\n")
    return report


def table(report: dict) -> str:
    s = report["sizes_gib"]
    lines = [f"shape {report['shape']} on {report['device']}: packed model {s['packed_bytes']:.2f} GiB (quant state {s['quant_state_bytes']:.3f}), "
             f"one bf16 block {s['block_bf16_bytes']:.3f} GiB", "",
             f"allocator: {'MALLOC_MMAP_THRESHOLD_=1MiB MALLOC_ARENA_MAX=2' if report['fixed_malloc'] else 'glibc defaults'}", "",
             "| build | world | rank | seconds | RSS before | RSS peak | goal (packed/W + 2 blocks + 3) | growth | packed/W + 2 blocks | RSS after | params held | GPU peak | GPU goal | bytes = world 1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['shard']} | {r['world']} | - | FAILED: {r['error'][-150:]!r} |")
            continue
        gpu = f"{r['gpu_peak_gib']:.2f}" if "gpu_peak_gib" in r else "-"
        gpu_goal = f"{r['goal_gpu_gib']:.2f}" if "goal_gpu_gib" in r else "-"
        build = r["shard"] + (" (fake group)" if r["fake"] else "")
        lines.append(f"| {build} | {r['world']} | {r['rank']} | {r['seconds']:.1f} | {r['rss_before_gib']:.2f} | {r['rss_peak_gib']:.2f} | "
                     f"{r['goal_host_gib']:.2f} {'ok' if r['host_ok'] else 'OVER'} | {r['rss_growth_gib']:.2f} | {r['goal_growth_gib']:.2f} | "
                     f"{r.get('rss_after_gib', float('nan')):.2f} | "
                     f"{r['held_param_gib']:.3f} | {gpu} | {gpu_goal} | {r.get('bytes_equal_world1', '-')} |")
    return "\n".join(lines)


def versions() -> dict:
    import platform

    from multi_gpu import versions as package_versions

    return {**package_versions(), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}


if __name__ == "__main__":
    main()
