"""Untrusted files: no checkpoint runs code through any entry point, our own checkpoints still load
weights-only (configs in hparams, nf4 full checkpoints), a hostile YAML config is refused in a moment,
and ``load_adapter`` either loads exactly what was saved or names what is wrong (a fuzz of both files)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from _lightning import LlamaLM, MixinLlamaLM, token_loader, trainer
from _models import tiny_llama
from lightning_lora import LoRACallback, LoRAConfig, QuantizationConfig, adapter_state_dict, inject_lora, load_adapter, save_adapter
from lightning_lora.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.layers import lora_layers
from lightning_lora.lightning import AtomicCheckpointIO, load_checkpoint
from lightning_lora.lightning.checkpoints import CheckpointError, check_checkpoint

ROOT = Path(__file__).resolve().parent.parent
QV = ["q_proj", "v_proj"]


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint does to torch.load(weights_only=False)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path, where: str = "top") -> Path:
    checkpoint = {"state_dict": {}, "epoch": 0, "global_step": 1, "lightning_lora": {"fingerprint": "x", "lora_config": {}}}
    if where == "top":
        checkpoint["payload"] = _RunsCode(marker)
    elif where == "state_dict":
        checkpoint["state_dict"]["model.model.layers.0.self_attn.q_proj.lora_a.weight"] = _RunsCode(marker)
    else:
        checkpoint["hyper_parameters"] = {"lora_config": _RunsCode(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def test_the_crafted_checkpoint_does_run_code_without_weights_only(tmp_path):
    # The control: the file below really is an exploit, so the refusals in the other tests mean something.
    path = _evil_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("where", ["top", "state_dict", "hyper_parameters"])
def test_the_checked_reader_refuses_it_and_runs_nothing(tmp_path, where):
    path = _evil_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker", where)
    for read in (lambda: load_checkpoint(path), lambda: AtomicCheckpointIO().load_checkpoint(path, weights_only=False), lambda: check_checkpoint(path)):
        with pytest.raises(CheckpointError, match=r"holds a pickled posix\.system .* nothing of it was run"):
            read()
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("front", ["callback", "callback-weights_only-False", "mixin", "custom-checkpoint-io"])
def test_trainer_fit_with_a_crafted_ckpt_path_runs_nothing(tmp_path, front):
    from lightning.pytorch.plugins import TorchCheckpointIO

    class CarelessIO(TorchCheckpointIO):  # a user's plugin that unpickles anything
        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return torch.load(path, map_location="cpu", weights_only=False)

    path = _evil_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker")
    if front == "mixin":
        module, callbacks = MixinLlamaLM(LoRAConfig(r=4, target_modules=QV), build_in="init"), []
    else:
        module, callbacks = LlamaLM(build_in="init"), [LoRACallback(r=4, target_modules=QV, backbone="model")]
    kwargs = {"plugins": [CarelessIO()]} if front == "custom-checkpoint-io" else {}
    fit_kwargs = {"weights_only": False} if front.endswith("False") else {}
    with pytest.raises(CheckpointError, match="nothing of it was run"):
        trainer(2, callbacks, **kwargs).fit(module, token_loader(n=8), ckpt_path=str(path), **fit_kwargs)
    assert not (tmp_path / "marker").exists()


def test_lightning_lora_export_with_a_crafted_checkpoint_runs_nothing_and_says_so_in_one_line(tmp_path, capsys):
    from lightning_lora import cli

    path = _evil_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker")
    config = ROOT / "configs" / "tiny-llama-cpu.yaml"
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--checkpoint", str(path), "--config", str(config), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "nothing of it was run" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()


def _dcp_directory(directory: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with contextlib.redirect_stderr(io.StringIO()), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        dcp.save({"model": {"w": torch.randn(4, 4, dtype=torch.bfloat16)}, "step": 3}, checkpoint_id=directory, no_dist=True)
    torch.save({"epoch": 1, "loops": {}}, directory / "meta.pt")
    return directory


@pytest.mark.parametrize("poisoned", [None, ".metadata", "meta.pt"])
def test_sharded_checkpoint_directories_are_checked_before_fsdp_reads_them(tmp_path, poisoned):
    # Lightning's FSDP strategies read these themselves: torch's .metadata reader is a plain pickle.load.
    directory = _dcp_directory(tmp_path / "sharded")
    if poisoned is None:
        check_checkpoint(directory)  # a real distributed checkpoint passes
        return
    if poisoned == ".metadata":
        (directory / ".metadata").write_bytes(pickle.dumps(_RunsCode(tmp_path / "marker"), protocol=4))
    else:
        _evil_checkpoint(directory / "meta.pt", tmp_path / "marker")
    with pytest.raises(CheckpointError, match=r"posix\.system .* nothing of it was run"):
        check_checkpoint(directory)
    assert not (tmp_path / "marker").exists()


# -- our own checkpoints keep loading weights-only -----------------------------------------------------
class _HparamsLM(MixinLlamaLM):
    """A LoRAMixin module whose configs are constructor arguments saved with save_hyperparameters()."""

    def __init__(self, lora_config: LoRAConfig, quantization_config: QuantizationConfig | None = None) -> None:
        super().__init__(lora_config, quantization_config, build_in="init")
        self.save_hyperparameters()


def test_a_mixin_with_configs_in_its_hparams_resumes_and_reloads_weights_only(tmp_path):
    config, quant = LoRAConfig(r=4, alpha=8, target_modules=QV, rank_pattern={"v_proj": 2}), QuantizationConfig(mode="nf4", compute_dtype="float32")
    t = trainer(1)
    t.fit(_HparamsLM(config, quant), token_loader(n=8))
    t.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)  # no allowlist needed beyond lightning_lora's own
    assert checkpoint["hyper_parameters"]["lora_config"] == config and checkpoint["hyper_parameters"]["quantization_config"] == quant
    resumed = trainer(2)
    resumed.fit(_HparamsLM(config, quant), token_loader(n=8), ckpt_path=str(tmp_path / "a.ckpt"))
    assert resumed.global_step == 2
    reloaded = _HparamsLM.load_from_checkpoint(tmp_path / "a.ckpt")
    assert isinstance(reloaded.hparams.lora_config, LoRAConfig) and reloaded.hparams.lora_config == config


def test_a_pickled_config_is_rebuilt_through_its_checks(tmp_path):
    from lightning_lora.config import _rebuild_config

    class Forged:
        def __init__(self, *args):
            self.args = args

        def __reduce__(self):
            return (_rebuild_config, self.args)

    for args, message in ((("LoRAConfig", {"r": 0}), "`r` must be a positive integer"), (("Popen", {"args": "id"}), "names 'Popen'")):
        torch.save({"hyper_parameters": {"c": Forged(*args)}}, tmp_path / "forged.ckpt")
        with pytest.raises(ValueError, match=message):
            torch.load(tmp_path / "forged.ckpt", weights_only=True)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_a_full_checkpoint_of_a_quantized_run_resumes_with_its_own_backbone(tmp_path, mode):
    from lightning_lora import quantization

    compute_dtype = None if mode == "int8" else "float32"  # a 4-bit option: int8 refuses it (it would change nothing)

    def callback():
        return LoRACallback(r=4, target_modules=QV, backbone="model", quantize=mode, compute_dtype=compute_dtype, adapter_only_checkpoint=False)

    first = LlamaLM(build_in="init")
    t = trainer(1, [callback()])
    t.fit(first, token_loader(n=8))
    t.save_checkpoint(tmp_path / "full.ckpt")
    other = LlamaLM(build_in="init")
    other.model = tiny_llama(seed=1)  # another base: resuming must bring back the checkpoint's
    resumed = trainer(1, [callback()])
    resumed.fit(other, token_loader(n=8), ckpt_path=str(tmp_path / "full.ckpt"))  # max_steps reached: restore only
    layers = {n: m for n, m in first.model.named_modules() if quantization.is_quantized(m)}
    now = dict(other.model.named_modules())
    assert len(layers) == 14
    for name, layer in layers.items():
        torch.testing.assert_close(quantization.dequantize_weight(now[name]), quantization.dequantize_weight(layer), rtol=0, atol=0, msg=name)


# -- YAML ----------------------------------------------------------------------------------------------
def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    lines.append(f"trainer: {{max_steps: *a{levels - 1}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("document", ["laughs", "self-deep"])
def test_a_hostile_yaml_config_is_refused_in_a_moment_with_one_line(tmp_path, capsys, document):
    from lightning_lora import cli

    text = _billion_laughs() if document == "laughs" else "trainer: " + "[" * 150 + "1" + "]" * 150 + "\n"
    (tmp_path / "c.yaml").write_text(text)
    assert len(text) < 2000
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--config", str(tmp_path / "c.yaml")])
    assert time.perf_counter() - start < 10.0 and info.value.code == 2
    err = capsys.readouterr().err
    assert ("more than 100,000 values once its aliases" if document == "laughs" else "nests more than 100 levels") in err
    assert "Traceback" not in err


# -- a fuzz of load_adapter ----------------------------------------------------------------------------
class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.o_proj(self.v_proj(self.q_proj(x))))


_HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 3, 8, 10**20, 0.5, 16.0, float("nan"), float("inf"), "", "8", "false", "true", "none", "all",
    "lora_only", "gaussian", "pissa", "loftq", "all-linear", r"(a+)+$", r"(\w+\.?)+!", "(", [], ["q_proj"], ["nope"], [1], ["q_proj", 3],
    {}, {"q_proj": 2}, {"q_proj": 0}, {"(": 4}, {"v_proj": float("nan")}, {"a": {"b": []}}, "x" * 10_000, [[[[[[]]]]]],
]


def _mutate_config(rng: random.Random, config: dict) -> tuple[bytes, str]:
    kind = rng.random()
    if kind < 0.08:
        data = json.dumps(config).encode()
        return data[: rng.randrange(len(data))], ADAPTER_CONFIG_NAME  # truncated
    if kind < 0.12:
        return rng.choice([b"\xff\xfe\x00", b"[1, 2]", b"null", b"[" * 5000 + b"]" * 5000, b'"LORA"']), ADAPTER_CONFIG_NAME
    config = dict(config)
    if kind < 0.22:
        key = rng.choice(sorted(config))
        del config[key]
    elif kind < 0.35:
        key = rng.choice(["use_dora", "layers_to_transform", "loftq_config", "target_parameters", "alora_invocation_tokens", "lora_bias", "use_qalora", "trainable_token_indices", "ensure_weight_tying", "layer_replication", "megatron_config", "use_bdlora", "future_math"])
        config[key] = rng.choice([True, [0], {"bits": 4}, ["x"], 2])
    else:
        key = rng.choice(sorted(config))
        config[key] = rng.choice(_HOSTILE_VALUES)
    return json.dumps(config).encode(), key


def _mutate_weights(rng: random.Random, data: bytes) -> bytes:
    header = int.from_bytes(data[:8], "little") + 8
    kind = rng.random()
    out = bytearray(data)
    if kind < 0.3:  # bytes of the header (names, dtypes, shapes, offsets, metadata)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(8, header)] = rng.randrange(32, 127)
    elif kind < 0.6:  # bytes of the tensors
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(header, len(out))] ^= 1 << rng.randrange(8)
    elif kind < 0.75:
        out = out[: rng.randrange(len(out))]
    elif kind < 0.85:
        out[:8] = rng.randrange(2**40).to_bytes(8, "little")
    else:  # a consistent file whose metadata says other things
        head = json.loads(bytes(out[8:header]))
        meta = head["__metadata__"]
        target = rng.choice(["lora_config", "tensors_sha256", "lightning_lora_version"])
        meta[target] = rng.choice(["{}", "not json", json.dumps({**json.loads(meta["lora_config"]), "alpha": 99.0}), "0" * 64])
        encoded = json.dumps(head).encode()
        encoded += b" " * (-len(encoded) % 8)
        out = bytearray(len(encoded).to_bytes(8, "little") + encoded + bytes(out[header:]))
    return bytes(out)


class _Timeout(Exception):
    pass


def test_fuzzed_adapter_files_load_exactly_or_raise_a_named_error(tmp_path):
    source = inject_lora(_Small(), LoRAConfig(r=4, alpha=8, target_modules=QV + ["o_proj"], modules_to_save=["head"], rank_pattern={"o_proj": 2}))
    with torch.no_grad():
        for i, tensor in enumerate(adapter_state_dict(source).values()):
            tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(i)))
    directory = save_adapter(source, tmp_path / "saved")
    saved = {k: v.clone() for k, v in adapter_state_dict(source).items()}
    scales = {name: layer.scale for name, layer in lora_layers(source).items()}
    good_config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
    good_weights = (directory / ADAPTER_WEIGHTS_NAME).read_bytes()
    rng = random.Random(1234)
    outcomes = {"loaded exactly": 0, "refused": 0}

    def on_alarm(*_):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for case in range(300):
            case_dir = tmp_path / f"case{case}"
            case_dir.mkdir()
            config_bytes, weights, names = json.dumps(good_config).encode(), good_weights, [ADAPTER_CONFIG_NAME]
            if case % 2:
                weights, names = _mutate_weights(rng, good_weights), [ADAPTER_WEIGHTS_NAME]
            else:
                config_bytes, key = _mutate_config(rng, good_config)
                names = [key, {"lora_alpha": "alpha", "lora_dropout": "dropout"}.get(key, key), ADAPTER_CONFIG_NAME]
            (case_dir / ADAPTER_CONFIG_NAME).write_bytes(config_bytes)
            (case_dir / ADAPTER_WEIGHTS_NAME).write_bytes(weights)
            model = _Small()
            signal.alarm(3)  # a hang (e.g. a backtracking regex) fails the case instead of the suite
            try:
                load_adapter(model, case_dir)
            except (ValueError, TypeError) as err:
                # The field by name: short names ("r") as `r` or r=, longer ones anywhere in the message.
                named = [n for n in names if (n in str(err) if len(n) > 3 else f"`{n}`" in str(err) or f"{n}=" in str(err))]
                assert named, (case, names, str(err)[:300])
                outcomes["refused"] += 1
            except _Timeout:
                pytest.fail(f"case {case} hung: {config_bytes[:200]!r}")
            else:
                got = adapter_state_dict(model)
                assert got.keys() == saved.keys(), case
                assert all(torch.equal(got[k], saved[k]) for k in saved), f"case {case} loaded other values"
                assert {n: layer.scale for n, layer in lora_layers(model).items()} == scales, f"case {case} loaded another scale"
                outcomes["loaded exactly"] += 1
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["loaded exactly"] + outcomes["refused"] == 300
    assert outcomes["refused"] >= 200 and outcomes["loaded exactly"] >= 10, outcomes
