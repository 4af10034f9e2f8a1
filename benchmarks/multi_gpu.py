"""Multi-rank QLoRA through Lightning: DDP, FSDP1 (FSDPStrategy), FSDP2 (ModelParallelStrategy), resume on another
world size, a 70B-shaped model, a two-node launch; on real GPUs, or with N ranks sharing ONE GPU (gloo), or on CPU.

Every scenario trains a random Llama built block by block (nf4 + double quant, bf16 storage) through ``Trainer`` +
``LoRACallback`` (r=16, alpha=32, all linear layers), AdamW, norm clipping at 0.1 (``CLIP``), on a fixed global batch (8
sequences; per-rank batch = 8 / ranks), and is compared with the 1-rank run: first-step loss, 20-step loss curve,
global gradient norm before clipping on every step (and after it: clipping must use the global norm), adapter
identical on every rank, the NF4 bytes each layer computes with against those before sharding (every rank),
bit-exact resume from the adapter-only checkpoint, and for a checkpoint written by W ranks and resumed on W' the
adapter, optimizer state and step found after the restore against those saved, then the continuation against an
uninterrupted W'-rank run. See ``multi_gpu_rank.py`` for what each rank does.

Scenario names: ``<template>@<ranks>``, ``<template>_resume@<ranks>`` (resume its step-10 checkpoint, same
ranks) and ``<template>_resume@<W>-><W'>`` (written by W ranks, resumed on W'). Templates: ``single``, ``ddp``,
``fsdp`` (full state dict), ``fsdp_sharded``, ``fsdp2``, ``fsdp2_allbf16`` (bitsandbytes #1945's set-up: refused
on a GPU), ``fsdp2_allbf16_unchecked`` (the same with the refusal switched off, to measure the bytes it changes),
``fsdp_full`` (FSDP1 with whole-model checkpoints, not adapter-only), ``ddp_2node``, ``single_b4``, ``single_70b``, ``fsdp_70b``, ``fsdp2_70b``.

How ranks are launched: each group of scenarios with the same rank count runs in one process group, one scenario
after another. With fewer GPUs than ranks (or ``--shared-gpu``, or ``--cpu``) every rank is its own "node": W
``torchrun --nnodes W --node_rank i --nproc_per_node 1`` on localhost, ``Trainer(num_nodes=W, devices=1)``, gloo,
every rank on ``cuda:0`` (NCCL refuses two ranks on one GPU; gloo runs the collectives on CUDA tensors). That is
also how to check a cluster configuration on one GPU before renting the cluster. With enough GPUs: one
``torchrun --nproc_per_node W``, NCCL.

    python benchmarks/multi_gpu.py --suite shared --ranks 2 4 --out DIR          # one GPU (or --cpu): everything
    python benchmarks/multi_gpu.py --only fsdp2@2 fsdp2_resume@2->1 --out DIR    # a selection
    python benchmarks/multi_gpu.py --suite 70b --out DIR                         # the 70B shape, 2 ranks
    python benchmarks/multi_gpu.py --suite two-gpu --out DIR                     # 2 real GPUs, throughput too
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "mid": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, vocab_size=16384),
    "small": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}
LORA = dict(r=16, alpha=32.0, target_modules="all-linear")
GLOBAL_BATCH = 8
# Norm clipping this low engages on every step, so each step checks that the clipper scaled by the *global* norm
# (a per-shard norm would leave the gradient with norm CLIP * sqrt(ranks)); Adam's update hardly depends on it.
CLIP = 0.1

# template -> how it runs; `world` fixes the rank count, `batch_per_rank` makes the global batch follow the ranks.
TEMPLATES: dict[str, dict] = {
    "single": dict(strategy="single", world=1, steps=20, ckpt_every=10),
    "single_b4": dict(strategy="single", world=1, steps=20, global_batch=4),  # throughput baseline: ddp@2's batch per GPU
    "ddp": dict(strategy="ddp", steps=20, ckpt_every=10),
    "fsdp": dict(strategy="fsdp", steps=20, ckpt_every=10, checkpointing=True, export=True),
    "fsdp_sharded": dict(strategy="fsdp", steps=20, ckpt_every=10, checkpointing=True, state_dict_type="sharded", export=True),
    # Whole-model (not adapter-only) checkpoints: on one rank FSDPStrategy's own state dict misses the frozen weights.
    "fsdp_full": dict(strategy="fsdp", steps=20, ckpt_every=10, checkpointing=True, adapter_only=False),
    "fsdp2": dict(strategy="fsdp2", steps=20, ckpt_every=10, export=True),
    "fsdp2_allbf16": dict(strategy="fsdp2", steps=5, lora_bf16=True, expect_error_on_gpu="FSDP2 would silently change the packed 4-bit weights"),
    "fsdp2_allbf16_unchecked": dict(strategy="fsdp2", steps=5, lora_bf16=True, unchecked=True),
    "ddp_2node": dict(strategy="ddp", world=2, steps=10, two_nodes=True),
    # The 70B shape: batch 1 x 2048 per rank, activation checkpointing, adapter-only checkpoint at step 2, PEFT export.
    "single_70b": dict(own_launch=True, epoch_steps=5, strategy="single", world=1, steps=5, ckpt_every=5, checkpointing=True, model="70b", seq=2048, batch_per_rank=1,
                       check_bytes=False, capture_state=False),
    "fsdp_70b": dict(own_launch=True, epoch_steps=3, strategy="fsdp", steps=3, ckpt_every=2, checkpointing=True, model="70b", seq=2048, batch_per_rank=1,
                     state_dict_type="sharded", check_bytes=False, capture_state=False, export=True, sharded_build=True),
    "fsdp2_70b": dict(own_launch=True, epoch_steps=3, strategy="fsdp2", steps=3, ckpt_every=2, checkpointing=True, model="70b", seq=2048, batch_per_rank=1,
                      check_bytes=False, capture_state=False, export=True, sharded_build=True),
    # Each rank builds only its shard (sharded_loading.build_lora_model), as the 70B runs do, at the small size.
    "fsdp2_rankbuild": dict(strategy="fsdp2", steps=6, ckpt_every=3, export=True, sharded_build=True, check_bytes=False),
    "fsdp_rankbuild": dict(strategy="fsdp", steps=6, ckpt_every=3, checkpointing=True, export=True, sharded_build=True, check_bytes=False),
}
WRITERS = ("ddp", "fsdp", "fsdp_sharded", "fsdp2")
_NAME = re.compile(r"(?P<template>[a-z0-9_]+?)(?P<resume>_resume)?(?:@(?P<world>\d+)(?:->(?P<to>\d+))?)?")


def llama_config(name: str, seq: int):
    from transformers import LlamaConfig

    config = LlamaConfig(**MODELS[name], max_position_embeddings=max(seq, 64), tie_word_embeddings=False, use_cache=False)
    # Correctness runs use eager attention, whose backward is deterministic (bit-exact resume on a GPU); the
    # memory and speed runs use PyTorch's fused attention.
    config._attn_implementation = "sdpa" if name in ("small", "70b") else "eager"
    return config


def suite(name: str, ranks: list[int]) -> list[str]:
    if name == "shared":
        names = ["single"] + [f"{t}@1" for t in WRITERS]
        for world in ranks:
            names += [f"{t}@{world}" for t in WRITERS] + [f"{t}_resume@{world}" for t in WRITERS]
            names += [f"fsdp2_allbf16@{world}", f"fsdp2_allbf16_unchecked@{world}"]
        names += ["ddp_2node", "fsdp2_rankbuild@2", "fsdp2_rankbuild_resume@2", "fsdp_rankbuild@2", "fsdp_rankbuild_resume@2"]
        for src, dst in ((2, 1), (1, 2), (4, 2)):
            if src in ranks + [1] and dst in ranks + [1]:
                names += [f"{t}_resume@{src}->{dst}" for t in WRITERS]
        return names
    if name == "two-gpu":
        return ["single", "single_b4", "ddp@2", "ddp_resume@2", "fsdp@2", "fsdp_resume@2", "fsdp_sharded@2", "fsdp_sharded_resume@2",
                "fsdp2@2", "fsdp2_resume@2", "ddp_2node", "fsdp2_allbf16@2", "fsdp2_allbf16_unchecked@2"]
    if name == "70b":
        return ["fsdp2_70b@2", "fsdp2_70b_resume@2"]
    raise ValueError(f"`--suite`={name!r} is not one of 'shared', 'two-gpu', '70b'.")


def slug(name: str) -> str:
    return name.replace("->", "-to-").replace("@", "-w")


def resolve(name: str, defaults: dict) -> dict:
    """Everything a rank needs to run scenario ``name`` (``defaults``: model, seq and cpu of this run)."""
    match = _NAME.fullmatch(name)
    if not match or match["template"] not in TEMPLATES:
        raise ValueError(f"Unknown scenario {name!r}: use <template>[_resume][@ranks[->ranks]] with a template among {sorted(TEMPLATES)}.")
    template = TEMPLATES[match["template"]]
    written_by = int(match["world"]) if match["world"] else template.get("world", 2)
    world = int(match["to"]) if match["to"] else written_by
    if "world" in template and written_by != template["world"]:
        raise ValueError(f"Scenario {name!r}: template {match['template']!r} runs with {template['world']} ranks only.")
    model = defaults["model"] or template.get("model") or defaults["default_model"]
    seq = defaults["seq"] or (template["seq"] if template.get("model") == model else defaults["default_seq"])
    spec = {k: v for k, v in template.items() if k not in ("world", "model", "seq")}
    if defaults.get("steps"):  # shorter runs (tests): the checkpoint stays in the middle
        spec["steps"] = defaults["steps"]
        if "ckpt_every" in spec:
            spec["ckpt_every"] = max(1, defaults["steps"] // 2)
    spec.update(name=name, slug=slug(name), template=match["template"], world=world, model=model, seq=seq)
    spec["global_batch"] = template.get("global_batch") or (template["batch_per_rank"] * written_by if "batch_per_rank" in template else GLOBAL_BATCH)
    if spec["global_batch"] % world:
        raise ValueError(f"Scenario {name!r}: the global batch of {spec['global_batch']} does not split over {world} ranks.")
    # One epoch of the reference run's length for every scenario (the same data in the same order; a checkpoint
    # mid-epoch); the 70B runs have their own.
    spec["steps_per_epoch"] = template.get("epoch_steps") or defaults.get("steps") or TEMPLATES["single"]["steps"]
    if defaults["cpu"] and spec.pop("expect_error_on_gpu", None):
        pass  # on CPU FSDP2's copy is a memcpy: the all-bf16 group is allowed (and measured)
    elif "expect_error_on_gpu" in spec:
        spec["expect_error"] = spec.pop("expect_error_on_gpu")
    if match["resume"]:
        if not template.get("ckpt_every"):
            raise ValueError(f"Scenario {name!r}: template {match['template']!r} writes no checkpoint to resume.")
        writer = f"{match['template']}@{written_by}"
        spec.update(resume_from=writer, writer_slug=slug(writer), start_step=spec["ckpt_every"], export=False,
                    reference=f"{match['template']}@{world}")
        spec.pop("ckpt_every")
    return spec


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


def _style(spec: dict, gpus: int, cpu: bool, shared_gpu: bool) -> str:
    if spec["world"] == 1:
        return "single"
    if cpu or shared_gpu or gpus < spec["world"]:
        return "nodes-shared"  # every rank its own node, all on cuda:0 (or the CPU), gloo
    return "nodes-gpus" if spec.get("two_nodes") else "local"  # a node per GPU / one node, NCCL


def plan(specs: list[dict], gpus: int, cpu: bool, shared_gpu: bool) -> list[dict]:
    """Launches in order: each runs, in one process group, every scenario of one rank count whose writer has run.

    Few launches (each costs a process start per rank): first the rank counts whose checkpoints other rank
    counts wait for and that wait for the fewest themselves; within a launch, writers before resumes.
    """
    pending = sorted(specs, key=lambda s: bool(s.get("resume_from")))
    done: set[str] = set()
    groups = []
    while pending:
        by_key: dict[tuple, list[dict]] = {}
        for spec in pending:
            alone = spec["name"] if spec.get("own_launch") else ""  # a fresh process: nothing of the last run left in memory
            by_key.setdefault((spec["world"], _style(spec, gpus, cpu, shared_gpu), alone), []).append(spec)
        ready = {}
        for key, members in by_key.items():
            names, ready[key] = set(done), []
            for spec in members:  # writers come first: a resume may follow its writer in the same launch
                if not spec.get("resume_from") or spec["resume_from"] in names:
                    ready[key].append(spec)
                    names.add(spec["name"])
        ready = {k: v for k, v in ready.items() if v}
        if not ready:
            raise ValueError(f"Scenarios {[s['name'] for s in pending]} resume checkpoints no selected scenario writes: add their writers.")
        waited_for = {s["resume_from"] for s in pending if s.get("resume_from")}
        key = min(ready, key=lambda k: (not any(s["name"] in waited_for for s in ready[k]), len(by_key[k]) - len(ready[k]), k))
        groups.append({"index": len(groups), "world": key[0], "style": key[1], "specs": ready[key][:1] if key[2] else ready[key]})
        done |= {s["name"] for s in groups[-1]["specs"]}
        pending = [s for s in pending if s["name"] not in done]
    return groups


def start_torchrun(rank_cmd: list[str], *, world: int, nodes: int, gpus_per_node: bool, env: dict[str, str], port: int, log, timeout: float) -> list:
    """Run ``rank_cmd`` (one rank's command line after the interpreter) on ``world`` ranks: ``nodes`` torchrun
    launchers on localhost (one process each when nodes > 1, ``CUDA_VISIBLE_DEVICES`` = its node with
    ``gpus_per_node``), their output in ``log``. The launchers' return codes (see ``_wait_all_or_first_failure``)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--master_addr=127.0.0.1", f"--master_port={port}"]
    procs = []
    if nodes > 1:
        for node in range(nodes):
            node_env = dict(env)
            if gpus_per_node:
                node_env["CUDA_VISIBLE_DEVICES"] = str(node)
            cmd = [*run, f"--nnodes={nodes}", f"--node_rank={node}", "--nproc_per_node=1", *rank_cmd]
            procs.append(subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT))
    else:
        procs.append(subprocess.Popen([*run, "--nnodes=1", "--node_rank=0", f"--nproc_per_node={world}", *rank_cmd], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return _wait_all_or_first_failure(procs, timeout)


def launch(group: dict, work: Path, cpu: bool, timeout: float, start=start_torchrun) -> dict:
    """Run one group of ``plan`` on its ranks through ``start`` (``start_torchrun``'s signature; a test may start
    the same ranks another way); what it ran, its return code and its log's tail."""
    world, style, specs = group["world"], group["style"], group["specs"]
    for spec in specs:
        (work / f"{spec['slug']}.json").unlink(missing_ok=True)
        if not spec.get("resume_from"):
            shutil.rmtree(work / f"ckpt_{spec['slug']}", ignore_errors=True)  # ModelCheckpoint would add -v1 copies
    key = f"group{group['index']}-w{world}-{style}"
    (work / f"{key}.json").write_text(json.dumps(specs))
    shared = style == "nodes-shared"
    nodes = world if style.startswith("nodes") else 1
    ctx = dict(cpu=cpu, shared_gpu=shared and not cpu, num_nodes=nodes, backend="gloo" if (shared or cpu) else None, timeout=timeout)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")}
    port = _free_port()
    env.update(MASTER_PORT=str(port), PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=env.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    rank_cmd = [__file__, "--rank-group", str(work / f"{key}.json"), "--work", str(work), "--ctx", json.dumps(ctx)]
    t0 = time.perf_counter()
    with open(work / f"{key}.log", "w") as out:
        codes = start(rank_cmd, world=world, nodes=nodes, gpus_per_node=style == "nodes-gpus", env=env, port=port, log=out,
                      timeout=timeout * len(specs) + 120)
    log = (work / f"{key}.log").read_text(errors="replace")
    return {"group": key, "returncode": 0 if all(c == 0 for c in codes) else codes, "wall_seconds": time.perf_counter() - t0,
            "scenarios": [s["name"] for s in specs], "log_tail": log[-3000:]}


def collect(groups: list[tuple[dict, dict]], work: Path) -> dict:
    results = {}
    for group, info in groups:
        for spec in group["specs"]:
            path = work / f"{spec['slug']}.json"
            r = json.loads(path.read_text()) if path.exists() else {"scenario": spec["name"], "error": "no result: its group failed or ran out of time"}
            r["group"], r["group_returncode"] = info["group"], info["returncode"]
            if r.get("error") and info.get("log_tail"):
                r["log_tail"] = info["log_tail"]
            results[spec["name"]] = r
    return results


# -- checks ------------------------------------------------------------------------------------------------
def _adapter(work: Path, name: str) -> dict | None:
    path = work / f"adapter_{slug(name)}.pt"
    return torch.load(path, weights_only=True) if path.exists() else None


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")


def _curve_diff(a: list, b: list) -> float | None:
    n = min(len(a), len(b))
    return max(abs(x - y) for x, y in zip(a[:n], b[:n])) if n else None


def analyse(results: dict, specs: dict, work: Path) -> None:
    """Add ``checks`` to every result: parity with the 1-rank run, clipping, bytes, ranks, resume."""
    ref = results.get("single") or {}
    for name, r in results.items():
        spec, checks = specs[name], {}
        if r.get("losses") and r.get("grad_norm_pre_clip"):
            pre, post = r["grad_norm_pre_clip"], r["grad_norm_post_clip"]
            if len(post) == len(pre):
                checks["clip_max_rel_error"] = max(abs(q - min(p, CLIP)) / min(p, CLIP) for p, q in zip(pre, post) if p > 0)
                checks["clipped_steps"] = sum(p > CLIP for p in pre)
        if (name != "single" and not spec.get("resume_from") and r.get("losses") and ref.get("losses") and spec["model"] == ref.get("model")
                and spec["seq"] == ref.get("seq") and spec["global_batch"] == ref.get("global_batch")):
            checks["loss_first_abs_diff"] = abs(r["losses"][0] - ref["losses"][0])
            checks["loss_max_abs_diff"] = _curve_diff(r["losses"], ref["losses"])
            a, b = r["grad_norm_pre_clip"], ref["grad_norm_pre_clip"]
            checks["grad_norm_first_rel_diff"] = abs(a[0] - b[0]) / b[0]
            checks["grad_norm_max_rel_diff"] = max(abs(x - y) / y for x, y in zip(a, b))
            checks["steps_compared"] = min(len(r["losses"]), len(ref["losses"]))
            checks["same_global_batches"] = r.get("batch_fingerprints") == ref.get("batch_fingerprints")[: len(r["losses"])]
        if spec.get("resume_from") and r.get("losses"):
            k = spec["start_step"]
            writer, reference = results.get(spec["resume_from"], {}), results.get(spec["reference"], {})
            mine = _adapter(work, name)
            checks["resume_state"] = r.get("resume_state_check")
            # the resumed run sees the global batches the uninterrupted runs saw from step k on (mid-epoch)
            checks["resume_same_global_batches"] = r.get("batch_fingerprints") == writer.get("batch_fingerprints", [])[k:] == (
                reference.get("batch_fingerprints", [])[k:])
            if spec["resume_from"] == spec["reference"]:  # same ranks: the continuation must be the uninterrupted run, bit for bit
                final = _adapter(work, spec["resume_from"])
                checks["resume_bit_exact"] = bool(mine is not None and final is not None and mine.keys() == final.keys()
                                                  and all(torch.equal(mine[t], final[t]) for t in mine))
                checks["resume_adapter_max_abs_diff"] = _max_diff(mine, final) if mine and final else None
                checks["resume_losses_equal"] = writer.get("losses", [])[k:] == r["losses"]
            else:  # another world size: like an uninterrupted run at the new one, within rounding
                final = _adapter(work, spec["reference"])
                checks["continuation_loss_max_abs_diff"] = _curve_diff(r["losses"], reference.get("losses", [])[k:])
                checks["continuation_adapter_max_abs_diff"] = _max_diff(mine, final) if mine and final else None
                checks["continuation_vs_writer_loss_max_abs_diff"] = _curve_diff(r["losses"], writer.get("losses", [])[k:])
        if spec.get("expect_error"):
            checks["refused_as_expected"] = bool(r.get("error") and spec["expect_error"] in r["error"])
        r["checks"] = checks


def _fmt(value, spec: str = ".1e") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(results: dict) -> str:
    rows = ["| scenario | ranks | loss0 Δ vs 1 rank | max loss Δ | grad norm Δ rel (step 0 / max) | clip error | adapter same on ranks | "
            "NF4 bytes changed per rank | resume | export | peak GiB per rank | notes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        c = r.get("checks", {})
        resume = "-"
        if "resume_bit_exact" in c:
            resume = "bit-exact" if c["resume_bit_exact"] else f"differs {_fmt(c.get('resume_adapter_max_abs_diff'))}"
        elif "continuation_loss_max_abs_diff" in c:
            state = c.get("resume_state") or {}
            exact = "/".join(str(state.get(f"{k}_exact", "?"))[0] for k in ("adapter", "optimizer", "step"))
            resume = (f"state a/o/s exact {exact}; cont. Δloss {_fmt(c['continuation_loss_max_abs_diff'])} "
                      f"(vs writer {_fmt(c.get('continuation_vs_writer_loss_max_abs_diff'))}), Δadapter {_fmt(c.get('continuation_adapter_max_abs_diff'))}")
        if "resume_same_global_batches" in c:
            resume += "; same batches" if c["resume_same_global_batches"] else "; OTHER BATCHES"
        export = r.get("peft_export")
        export = "-" if not export else (f"PEFT ok, Δ {_fmt(export.get('max_abs_diff'))}" if export.get("loaded") else "PEFT FAILED")
        notes = []
        if c.get("refused_as_expected"):
            notes.append("refused as expected")
        elif r.get("error"):
            notes.append(f"ERROR: {r['error'][:100]}")
        if r.get("unchecked"):
            notes.append("library check off")
        if c.get("same_global_batches") is False:
            notes.append("OTHER GLOBAL BATCHES than 1 rank")
        ckpt = r.get("checkpoints")
        if ckpt:
            notes.append(f"ckpt {sum(ckpt['bytes'].values()) / 2**20 / max(1, len(ckpt['bytes'])):.1f} MiB, non-adapter keys {len(ckpt.get('non_adapter_keys', []))}")
        checked = r.get("nf4_layers_checked_per_rank") or []
        nf4 = _fmt(r.get("nf4_bytes_changed_per_rank")) + (f" ({min(checked)} layers)" if any(checked) else " (not checked)")
        peaks, setup = r.get("peak_alloc_gib") or [], r.get("setup_peak_alloc_gib") or []
        est = r.get("estimate_gib")
        memory = "-"
        if any(peaks):
            memory = f"{'/'.join(f'{p:.2f}' for p in peaks)} (setup {max(setup):.2f}"
            memory += f", est. {est:.2f})" if isinstance(est, float) else ")"
        rows.append(
            f"| {name} | {r.get('world_size', '?')} | {_fmt(c.get('loss_first_abs_diff'))} | {_fmt(c.get('loss_max_abs_diff'))} | "
            f"{_fmt(c.get('grad_norm_first_rel_diff'))} / {_fmt(c.get('grad_norm_max_rel_diff'))} | {_fmt(c.get('clip_max_rel_error'))} | "
            f"{_fmt(r.get('adapter_same_on_all_ranks'))} | {nf4} | {resume} | {export} | "
            f"{memory} | {'; '.join(notes)} |"
        )
    return "\n".join(rows)


def summarize(results: dict) -> dict:
    out: dict = {}
    single = results.get("single_b4", {})
    if single.get("tokens_per_s") and results.get("ddp@2", {}).get("tokens_per_s"):
        out["ddp_scaling_vs_1gpu"] = results["ddp@2"]["tokens_per_s"] / single["tokens_per_s"]
    failed = [n for n, r in results.items() if r.get("error") and not r.get("checks", {}).get("refused_as_expected")]
    out["failed"] = failed
    out["bytes_changed"] = [n for n, r in results.items() if any(r.get("nf4_bytes_changed_per_rank") or [])]
    return out


def versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": sys.version.split()[0], "machine": platform.node(), "cpus": os.cpu_count()}
    for pkg in ("torch", "lightning", "transformers", "bitsandbytes", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return out


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["shared", "two-gpu", "70b"], default=None, help="a named set of scenarios")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="rank counts of --suite shared")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names (see the module docstring)")
    parser.add_argument("--also", nargs="*", default=[], help="scenario names added to --suite (e.g. a 4-rank subset)")
    parser.add_argument("--all", action="store_true", help="kept for old command lines: same as --suite shared (or two-gpu with 2+ GPUs)")
    parser.add_argument("--work", default="/tmp/lightning_lora_multi_gpu")
    parser.add_argument("--out", default=None, help="directory for multi_gpu.json")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (gloo): tiny model unless --model")
    parser.add_argument("--shared-gpu", action="store_true", help="every rank on cuda:0 through gloo, even with more GPUs")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="override every scenario's model (e.g. tiny for tests)")
    parser.add_argument("--seq", type=int, default=None, help="override every scenario's sequence length")
    parser.add_argument("--steps", type=int, default=None, help="override every scenario's steps (checkpoint at half)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per scenario (a group gets the sum)")
    parser.add_argument("--deadline", type=float, default=1e9, help="start no group after this many seconds")
    parser.add_argument("--rank-group", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ctx", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    drive(parser().parse_args())


def drive(args: argparse.Namespace, start=start_torchrun) -> dict:
    """What ``main`` does with its parsed arguments; ``start`` starts each launch's ranks (see ``launch``). The report
    written to ``--out`` (none for one rank of a launch)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.rank_group:  # one rank of a launch
        from multi_gpu_rank import run_group

        run_group(json.loads(Path(args.rank_group).read_text()), work, json.loads(args.ctx))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # An orderly shutdown: a rank that exits with the process group alive can abort in gloo's threads.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return {}

    gpus = 0 if args.cpu else torch.cuda.device_count()
    name = args.suite or ("two-gpu" if gpus >= 2 and not args.shared_gpu else "shared")
    names = args.only or suite(name, args.ranks) + [n for n in args.also if n not in suite(name, args.ranks)]
    shared_mode = args.cpu or args.shared_gpu or gpus < 2
    defaults = dict(model=args.model, seq=args.seq, steps=args.steps, cpu=args.cpu, default_model="tiny" if args.cpu else ("mid" if shared_mode else "small"),
                    default_seq=16 if args.cpu else (256 if shared_mode else 2048))
    specs = {n: resolve(n, defaults) for n in names}
    skipped = {n: "Lightning's FSDPStrategy needs CUDA" for n, s in specs.items() if args.cpu and s["strategy"] == "fsdp"}
    runnable = [s for n, s in specs.items() if n not in skipped]
    groups, started = [], time.perf_counter()
    report = _report(args, groups, specs, skipped, work)
    for group in plan(runnable, gpus, args.cpu, args.shared_gpu):
        if time.perf_counter() - started > args.deadline:
            info = {"group": "not run", "returncode": f"--deadline of {args.deadline:.0f} s had passed"}
        else:
            print(f"== {len(group['specs'])} scenarios on {group['world']} ranks ({group['style']}): {' '.join(s['name'] for s in group['specs'])}", flush=True)
            info = launch(group, work, args.cpu, args.timeout, start)
            print(json.dumps({k: info[k] for k in ("group", "returncode", "wall_seconds")}), flush=True)
            if info["returncode"] != 0:
                print(info["log_tail"][-2000:], flush=True)
        groups.append((group, info))
        report = _report(args, groups, specs, skipped, work)  # after every launch: a run cut short keeps what it measured
    print(report["table"])
    print(json.dumps(report["summary"], indent=1))
    return report


def _report(args, groups: list, specs: dict, skipped: dict, work: Path) -> dict:
    results = collect(groups, work)
    analyse(results, specs, work)
    results.update({n: {"scenario": n, "skipped": why} for n, why in skipped.items()})
    ran = {n: r for n, r in results.items() if "skipped" not in r}
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv), "versions": versions(),
              "groups": [info for _, info in groups], "results": results, "summary": summarize(ran), "table": table(ran)}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "multi_gpu.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
