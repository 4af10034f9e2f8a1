"""Kill and concurrency harness for the library's writers (tests/test_io.py runs it; it prints one JSON line).

    python writers.py OUT [--kills N] [--seconds S] [--seed K]

Everything is imported and built once; then each trial forks a child that writes in a loop through a
real entry point, announcing each completed write on a pipe, and the parent SIGKILLs it at a random
moment (after at least one write), then checks what a reader finds:

- ``adapter``: ``save_adapter`` of an adapter whose every tensor holds the version, alpha = version;
- ``merged``: ``save_merged`` of a module whose merged weight and config.json both encode the version;
- ``merge-cli``: ``lightning-lora merge`` (``cli.main``) of adapter A or B into one output directory;
- ``checkpoint``: ``Trainer.save_checkpoint`` with ``LoRACallback`` (its AtomicCheckpointIO), adapter = version.

After a kill the directory (or file) must be one complete version: the last announced or the next.
Then ``concurrent``: two writer processes save different adapters (odd / even versions, alpha 8 / 16)
to one directory while three reader processes ``load_adapter`` in a loop; every read must be one
complete save (all tensors equal one version, and the scale that version's writer used).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)  # before any op: forked children then never inherit a thread pool
# No progress bars: tqdm writes under a lock shared by every forked process (a semaphore), and a child killed
# inside that lock (transformers' "Writing model shards" bar in save_pretrained) left it locked for good, so the
# next child hung on its first bar and the harness with it (seen twice in whole-suite runs).
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _models and _lightning

from torch import nn  # noqa: E402

from lightning_lora import LoRAConfig, adapter_state_dict, inject_lora, load_adapter, save_adapter  # noqa: E402
from lightning_lora.export import save_merged  # noqa: E402
from lightning_lora.layers import lora_layers  # noqa: E402

FIRST_WRITE_SECONDS = 120  # a child that has not finished one write by then is stuck: fail, do not hang

HIDDEN, R = 128, 32


def _adapter_model(alpha: float = 8.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN) for _ in range(6)])
    return inject_lora(model, LoRAConfig(r=R, alpha=alpha, target_modules="all-linear"))


@torch.no_grad()
def _fill(model: nn.Module, value: float) -> None:
    for tensor in adapter_state_dict(model).values():
        tensor.fill_(value)


def _adapter_version(directory: Path) -> tuple[int, float]:
    """(version, scale) of the adapter a reader loads, or raises if it is not one complete save."""
    model = nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN) for _ in range(6)])
    load_adapter(model, directory)
    values = {float(v) for t in adapter_state_dict(model).values() for v in t.unique()}
    scales = {layer.scale for layer in lora_layers(model).values()}
    if len(values) != 1 or len(scales) != 1:
        raise AssertionError(f"a mix: values {sorted(values)[:4]}, scales {sorted(scales)}")
    return int(values.pop()), scales.pop()


# -- writers: each returns (write(version), read() -> version) --------------------------------------
def adapter_writer(out: Path):
    model = _adapter_model()

    def write(version: int) -> None:
        _fill(model, version)
        for layer in lora_layers(model).values():
            layer.alpha, layer.scale = float(version), version / R
        model._lightning_lora.plan.config.alpha = float(version)  # the saved config says the same version
        save_adapter(model, out)

    def read() -> int:
        version, scale = _adapter_version(out)
        assert abs(scale - version / R) < 1e-9, (version, scale)
        return version

    return write, read


class _Config:
    """Just enough of a transformers config for save_merged to write config.json."""

    def __init__(self) -> None:
        self.version = 0

    def to_dict(self) -> dict:
        return {"version": self.version}


def merged_writer(out: Path):
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4)])
    with torch.no_grad():
        for layer in base:
            layer.weight.zero_()
    model = inject_lora(base, LoRAConfig(r=R, alpha=R, target_modules="all-linear"))  # scale 1
    model.config = _Config()
    from safetensors.torch import load_file

    def write(version: int) -> None:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_a.weight.fill_(1.0 / R)
                layer.lora_b.weight.fill_(float(version))  # merged weight = version everywhere
        model.config.version = version
        save_merged(model, out)

    def read() -> int:
        config = json.loads((out / "config.json").read_text())
        values = {float(v) for t in load_file(out / "model.safetensors").values() for v in t.unique()}
        assert len(values) == 1 and abs(values.pop() - config["version"]) < 1e-4, "weights and config.json from different exports"
        return int(config["version"])

    return write, read


def merge_cli_writer(out: Path):
    from _models import randomize_adapter, tiny_llama
    from safetensors.torch import load_file

    from lightning_lora import cli

    root = out.parent / "merge-inputs"
    base_dir = root / "base"
    tiny_llama().save_pretrained(base_dir)
    adapters, references = {}, {}
    for index in (0, 1):
        model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
        randomize_adapter(model, seed=10 + index)
        adapters[index] = save_adapter(model, root / f"adapter{index}")
        reference = root / f"reference{index}"
        cli.main(["merge", "--base", str(base_dir), "--adapter", str(adapters[index]), "--output", str(reference)])
        references[index] = {name: (reference / name).read_bytes() for name in os.listdir(reference)}

    def write(version: int) -> None:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["merge", "--base", str(base_dir), "--adapter", str(adapters[version % 2]), "--output", str(out)])

    def read() -> int:
        files = {name: (out / name).read_bytes() for name in os.listdir(out)}
        for index, reference in references.items():
            if files == reference:
                load_file(out / "model.safetensors")
                return index  # the parity of the version, which is all the files can tell
        raise AssertionError(f"not a complete merge output: {sorted(files)}")

    return write, read


def checkpoint_writer(out: Path):
    from _lightning import LlamaLM, token_loader, trainer

    from lightning_lora import LoRACallback
    from lightning_lora.lightning import load_checkpoint

    module = LlamaLM(build_in="init")
    t = trainer(1, [LoRACallback(r=4, target_modules=["q_proj", "v_proj"], backbone="model")])
    t.fit(module, token_loader(n=8))
    path = out / "last.ckpt"
    out.mkdir(parents=True, exist_ok=True)

    def write(version: int) -> None:
        _fill(module.model, version)
        t.save_checkpoint(path)

    def read() -> int:
        state = load_checkpoint(path)["state_dict"]
        values = {float(v) for k, t in state.items() if ".lora_" in k for v in t.unique()}
        assert len(values) == 1 and len(state) == 8, (sorted(values)[:4], len(state))
        return int(values.pop())

    return write, read


WRITERS = {"adapter": adapter_writer, "merged": merged_writer, "merge-cli": merge_cli_writer, "checkpoint": checkpoint_writer}


def _quiet_child() -> None:
    """In a forked writer: transformers' progress bars off, and tqdm's lock its own (not the parent's semaphore)."""
    import threading

    import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tqdm.tqdm.set_lock(threading.RLock())


def _first_line(reader, pid: int, what: str) -> str:
    """The child's first announcement, or an error (the child killed) if none comes within FIRST_WRITE_SECONDS."""
    import select

    ready, _, _ = select.select([reader], [], [], FIRST_WRITE_SECONDS)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise RuntimeError(f"{what}: the writer finished no write within {FIRST_WRITE_SECONDS} s (stuck): killed")
    return reader.readline()


def _child_loop(write, first_version: int, pipe_w: int, exclusive: bool = True) -> None:
    _quiet_child()
    version = first_version
    while True:
        write(version)
        os.write(pipe_w, f"{version}\n".encode())
        version += 1 if exclusive else 2


def _interrupted(target: Path) -> bool:
    """Whether a killed writer left its temp directory (or, for checkpoints, temp file) behind: it died inside a write."""
    siblings = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    inside = [p.name for p in target.iterdir() if p.name.startswith(".last.ckpt.")] if target.is_dir() else []
    return bool(siblings or inside)


def kill_trials(kind: str, out: Path, kills: int, rng: random.Random) -> dict:
    target = out / kind / "target"
    write, read = WRITERS[kind](target)
    results = {"kills": 0, "interrupted_mid_write": 0, "versions_seen": [], "stale_after_next_write": None}
    for trial in range(kills):
        first = (trial + 1) * 1000
        pipe_r, pipe_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: write until killed
            os.close(pipe_r)
            try:
                _child_loop(write, first, pipe_w)
            finally:
                os._exit(1)
        os.close(pipe_w)
        reader = os.fdopen(pipe_r)
        last = int(_first_line(reader, pid, f"{kind} trial {trial}"))  # at least one complete write before the kill
        time.sleep(rng.uniform(0.0, 0.25 if kind == "merge-cli" else 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for line in reader:  # writes announced before the kill landed
            last = int(line)
        reader.close()
        results["interrupted_mid_write"] += _interrupted(target)
        found = read()
        allowed = {last % 2, (last + 1) % 2} if kind == "merge-cli" else {last, last + 1}
        assert found in allowed, f"{kind}: after the kill the reader found version {found}, the writer had finished {last}"
        results["kills"] += 1
        results["versions_seen"].append(found - (0 if kind == "merge-cli" else first))
    write(10**6 if kind != "merge-cli" else 0)  # a later write removes what killed writers left behind
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    results["stale_after_next_write"] = leftovers
    return results


def concurrent(out: Path, seconds: float) -> dict:
    target = out / "concurrent" / "adapter"
    models = {0: _adapter_model(alpha=8.0), 1: _adapter_model(alpha=16.0)}
    _fill(models[0], 0)
    save_adapter(models[0], target)
    children, pipes = [], []
    for writer in (0, 1):  # writer 0 writes even versions (alpha 8), writer 1 odd ones (alpha 16)
        pipe_r, pipe_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(pipe_r)

            def write(version: int, model=models[writer]) -> None:
                _fill(model, version)
                save_adapter(model, target)

            try:
                _child_loop(write, writer, pipe_w, exclusive=False)
            finally:
                os._exit(1)
        os.close(pipe_w)
        children.append(pid)
        pipes.append(("writer", pipe_r))
    for reader in range(3):
        pipe_r, pipe_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(pipe_r)
            reads = mixes = 0
            problems: list[str] = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    version, scale = _adapter_version(target)
                    if abs(scale - (16.0 if version % 2 else 8.0) / R) > 1e-9:
                        mixes += 1
                        problems.append(f"version {version} with scale {scale}")
                    reads += 1
                except Exception as err:  # noqa: BLE001 - every failure is a finding
                    mixes += 1
                    problems.append(f"{type(err).__name__}: {str(err)[:200]}")
            os.write(pipe_w, json.dumps({"reads": reads, "mixes": mixes, "problems": problems[:5]}).encode())
            os._exit(0)
        os.close(pipe_w)
        children.append(pid)
        pipes.append(("reader", pipe_r))
    readers = []
    for kind, pipe_r in pipes:
        if kind == "reader":
            with os.fdopen(pipe_r) as handle:
                readers.append(json.loads(handle.read()))
    writes = 0
    for pid, (kind, pipe_r) in zip(children, pipes):
        if kind == "writer":
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with os.fdopen(pipe_r) as handle:
                writes += len(handle.read().split())
        else:
            os.waitpid(pid, 0)
    return {
        "writes": writes,
        "reads": sum(r["reads"] for r in readers),
        "mixes": sum(r["mixes"] for r in readers),
        "problems": [p for r in readers for p in r["problems"]],
        "final": _adapter_version(target)[0] >= 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=[*WRITERS, "concurrent"])
    args = parser.parse_args()
    rng = random.Random(args.seed)
    report = {}
    for kind in args.only:
        start = time.monotonic()
        if kind == "concurrent":
            report[kind] = concurrent(args.out, args.seconds)
        else:
            report[kind] = kill_trials(kind, args.out, args.kills if kind != "merge-cli" else max(2, args.kills // 2), rng)
        report[kind]["seconds"] = round(time.monotonic() - start, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
