"""``sharded_loading.build_lora_model``: each FSDP rank builds, reads and keeps only its share.

- Unsharded, it gives the packed bytes, other weights and outputs of ``build_quantized_model`` with
  the same seed, plus LoRA whose init does not depend on the global RNG.
- The empty 4-bit layout the non-owning ranks allocate is exactly what ``quantize_linear`` produces.
- On 2 and 4 gloo ranks (CPU), FSDP2 and FSDP1, from a random init and from a sharded safetensors
  checkpoint: every layer's packed bytes and quant state hash as in the 1-rank build, each rank holds
  ~1/world of the parameter bytes, reads exactly the checkpoint tensors of the parts it owns, and the
  model computes the 1-rank logits with the 1-rank adapter.
- Through Lightning (ModelParallelStrategy, 2 gloo ranks): built in configure_model, trained by
  LoRACallback without injecting again, NF4 bytes unchanged by training.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from _models import tiny_llama, token_batch
from _processes import Queue, free_ports
from _sharded_worker import LORA, QUANT, layer_hashes
from lightning_lora import LoRAConfig, QuantizationConfig
from lightning_lora.inject import lora_state
from lightning_lora.loading import build_quantized_model
from lightning_lora.quantization import bitsandbytes_available, dequantize_weight, is_4bit, quantize_linear
from lightning_lora.sharded_loading import _state_tensors, build_lora_model, empty_4bit_like, lora_init, sharded_param_init_fn

pytestmark = pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes is not usable here")
TESTS = Path(__file__).parent


def _plain_checkpoint(directory: Path, config, seed: int = 11) -> dict[str, torch.Tensor]:
    """A bf16 model of ``config`` saved as three safetensors files (embeddings + block 0 | other blocks | the rest)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    first = {k: v for k, v in state.items() if k.startswith("model.embed_tokens.") or k.startswith("model.layers.0.")}
    blocks = {k: v for k, v in state.items() if k.startswith("model.layers.") and k not in first}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(first, directory / "model-00001-of-00003.safetensors")
    save_file(blocks, directory / "model-00002-of-00003.safetensors")
    save_file({k: v for k, v in state.items() if k not in first and k not in blocks}, directory / "model-00003-of-00003.safetensors")
    return state


def _reference(config, checkpoint=None, device: str = "cpu"):
    """The 1-rank build the sharded ones must equal: hashes per layer, adapter, logits, parameter bytes."""
    model = build_lora_model(config, LORA, QUANT, device=device, checkpoint=checkpoint, seed=5)
    full = {n: m.weight for n, m in model.named_modules() if is_4bit(m)}
    with torch.no_grad():
        logits = model(input_ids=token_batch(batch=2, seq=8).to(device)).logits.float().cpu()
    return {
        "hashes": layer_hashes(model, full),
        "adapter": {n: p.detach().float().cpu() for n, p in model.named_parameters() if "lora_" in n},
        "logits": logits,
        "packed": sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if is_4bit(m)),
        "total": sum(p.numel() * p.element_size() for p in model.parameters()),
        "quant_state": sum(t.numel() * t.element_size() for m in model.modules() if is_4bit(m) for t in _state_tensors(m.quant_state)),
    }


# -- one process -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["random", "checkpoint"])
def test_unsharded_build_is_build_quantized_model_plus_lora(tmp_path, source):
    config = tiny_llama().config
    checkpoint = None
    if source == "checkpoint":
        _plain_checkpoint(tmp_path, config)
        checkpoint = tmp_path
    expected = build_quantized_model(config, QUANT, device="cpu", offload_to=None, checkpoint=checkpoint, seed=5)
    rng = torch.get_rng_state()
    model = build_lora_model(config, LORA, QUANT, device="cpu", checkpoint=checkpoint, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)

    state = lora_state(model)
    assert state.config == LORA and state.quantization == QUANT
    quantized = sorted(n for n, m in expected.named_modules() if is_4bit(m))
    assert len(quantized) == 14 and sorted(state.quantized) == quantized and model.is_loaded_in_4bit
    params = dict(model.named_parameters())
    for name, param in expected.named_parameters():
        mine = params[name.replace(".weight", ".base_layer.weight") if name.rpartition(".")[0] in quantized else name]
        assert mine.dtype == param.dtype and torch.equal(mine.view(torch.uint8), param.view(torch.uint8)), name
        assert mine.requires_grad is False, name
    for name in quantized:
        torch.testing.assert_close(model.get_submodule(name).base_layer.quant_state.absmax, expected.get_submodule(name).quant_state.absmax, rtol=0, atol=0)
    adapters = {n: p for n, p in params.items() if "lora_" in n}
    assert len(adapters) == 28 and all(p.requires_grad and p.dtype == torch.float32 for p in adapters.values())
    assert all(torch.count_nonzero(p) == 0 for n, p in adapters.items() if ".lora_b." in n)
    ids = token_batch()
    torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=0, atol=0)  # B = 0: the base model's output

    again = build_lora_model(config, LORA, QUANT, device="cpu", checkpoint=checkpoint, seed=5)
    other_seed = build_lora_model(config, LORA, QUANT, device="cpu", checkpoint=checkpoint, seed=6)
    for name, param in adapters.items():
        assert torch.equal(dict(again.named_parameters())[name], param), name
    a = "model.layers.0.self_attn.q_proj.lora_a.weight"
    assert not torch.equal(dict(other_seed.named_parameters())[a], params[a])


def test_lora_init_is_lora_linears_distribution_seeded_per_layer():
    a = lora_init(torch.Size([8, 512]), "lora_a", "model.layers.0.mlp.up_proj", "kaiming", 8, seed=0)
    assert a.dtype == torch.float32 and a.abs().max() <= 1 / 512**0.5  # kaiming-uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
    assert abs(a.std().item() - 1 / (3 * 512) ** 0.5) < 0.002
    assert torch.equal(a, lora_init(torch.Size([8, 512]), "lora_a", "model.layers.0.mlp.up_proj", "kaiming", 8, seed=0))
    assert not torch.equal(a, lora_init(torch.Size([8, 512]), "lora_a", "model.layers.1.mlp.up_proj", "kaiming", 8, seed=0))
    g = lora_init(torch.Size([16, 4096]), "lora_a", "x", "gaussian", 16, seed=0)
    assert abs(g.std().item() - 1 / 16) < 0.002 and abs(g.mean().item()) < 0.002
    assert torch.count_nonzero(lora_init(torch.Size([64, 8]), "lora_b", "x", "kaiming", 8, seed=0)) == 0


@pytest.mark.parametrize("mode,double_quant,storage", [("nf4", True, "bfloat16"), ("nf4", False, "uint8"), ("fp4", True, "uint8")])
def test_empty_4bit_layout_is_quantize_linears(mode, double_quant, storage):
    config = QuantizationConfig(mode=mode, double_quant=double_quant, quant_storage=storage, compute_dtype="bfloat16")
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True).to(torch.bfloat16)
    real = quantize_linear(linear, config, "cpu")
    with torch.device("meta"):
        meta_linear = nn.Linear(128, 96, bias=True, dtype=torch.bfloat16)
    empty = empty_4bit_like(meta_linear, config, torch.bfloat16, torch.device("cpu"))
    assert type(empty) is type(real) and empty.training == real.training
    for attr in ("in_features", "out_features", "compute_dtype", "quant_storage"):
        assert getattr(empty, attr) == getattr(real, attr), attr
    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized"):
        assert getattr(empty.weight, attr) == getattr(real.weight, attr), attr
    assert empty.quant_state is empty.weight.quant_state and empty.weight.module is empty
    real_state, empty_state = real.weight.quant_state, empty.weight.quant_state
    for attr in ("shape", "dtype", "blocksize", "quant_type", "nested"):
        assert getattr(empty_state, attr) == getattr(real_state, attr), attr
    # Filled with the real layer's tensors, it is the real layer.
    with torch.no_grad():
        empty.weight.data.copy_(real.weight.data)
        empty.bias.copy_(real.bias)
        pairs = [(empty_state.code, real_state.code), (empty_state.absmax, real_state.absmax)]
        if double_quant:
            pairs += [(empty_state.offset, real_state.offset), (empty_state.state2.code, real_state.state2.code),
                      (empty_state.state2.absmax, real_state.state2.absmax)]
        for target, source in pairs:
            assert target.shape == source.shape and target.dtype == source.dtype
            target.copy_(source)
    torch.testing.assert_close(dequantize_weight(empty), dequantize_weight(real), rtol=0, atol=0)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(empty(x), real(x), rtol=0, atol=0)
    # Quantizing on meta left bitsandbytes' codebook cache usable for real tensors.
    assert torch.equal(quantize_linear(linear, config, "cpu").weight.view(torch.uint8), real.weight.view(torch.uint8))


def test_bad_sharded_builds_say_what_to_fix():
    config = tiny_llama().config
    with pytest.raises(TypeError, match="`lora_config` must be a LoRAConfig"):
        build_lora_model(config, {"r": 8}, QUANT, device="cpu")
    with pytest.raises(TypeError, match="`quantization_config` must be a QuantizationConfig or None"):
        build_lora_model(config, LORA, "nf4", device="cpu")
    with pytest.raises(ValueError, match=r"`shard` must be 'fsdp1', 'fsdp2' or None, got 'ddp'"):
        build_lora_model(config, LORA, QUANT, shard="ddp", device="cpu")
    with pytest.raises(ValueError, match="`mesh` is FSDP2's"):
        build_lora_model(config, LORA, QUANT, mesh=object(), device="cpu")
    with pytest.raises(ValueError, match="needs the default process group"):
        build_lora_model(config, LORA, QUANT, shard="fsdp2", device="cpu")
    with pytest.raises(ValueError, match="needs the default process group"):
        build_lora_model(config, LORA, QUANT, shard="fsdp1", device="cpu")
    with pytest.raises(ValueError, match="`model` .*LlamaForCausalLM.* has nothing left to build"):
        sharded_param_init_fn(build_lora_model(config, LORA, QUANT, device="cpu"))


def test_sharded_builds_refuse_int8_uint8_storage_under_fsdp1_and_ties_across_blocks(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the checks run before any collective
    config = tiny_llama().config
    with pytest.raises(ValueError, match="`quantization_config.mode`='int8' cannot be sharded"):
        build_lora_model(config, LORA, QuantizationConfig(mode="int8"), shard="fsdp1", device="cpu")
    with pytest.raises(ValueError, match=r"`quantization_config.quant_storage`='uint8' .* Set quant_storage='bfloat16'"):
        build_lora_model(config, LORA, QuantizationConfig(mode="nf4"), shard="fsdp1", device="cpu")

    from lightning_lora._parts import plan_parts
    from lightning_lora.sharded_loading import _refuse_ties_across_parts, lora_slots

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is the same parameter as 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        _refuse_ties_across_parts(plan_parts(model, lora_slots(model)[0], 0))


# -- several ranks -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(args: list[str], layers: int, cuda: bool = False) -> tuple[list[str], dict[str, str]]:
    """One rank's ``_sharded_worker.py`` command, and the variables it reads."""
    return [sys.executable, str(TESTS / "_sharded_worker.py"), *args], {"LL_WORKER_LAYERS": str(layers), "LL_WORKER_CUDA": "1" if cuda else "0"}


def _torchrun(world: int, worker: tuple[list[str], dict[str, str]]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run ``worker`` on ``world`` gloo ranks through torchrun."""
    command, variables = worker
    env = {**os.environ, **variables, "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *command[1:]]
    return cmd, env


def _assert_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def check_sharded_builds(tmp_path: Path, world: int, layers: int, device: str = "cpu") -> None:
    """``world`` gloo ranks (all on cuda:0 with device='cuda') build FSDP2 and FSDP1 models, random and from a checkpoint, like the 1-rank build."""
    expected, worker = prepare_sharded_builds(tmp_path, world, layers, device)
    cmd, env = _torchrun(world, worker)
    _assert_ran(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600))
    check_built(**expected)


def prepare_sharded_builds(tmp_path: Path, world: int, layers: int, device: str = "cpu") -> tuple[dict, tuple]:
    """The checkpoint and the 1-rank references (``check_built``'s arguments), and the worker to run on ``world``
    ranks (``_worker``: one rank's command, the variables it reads)."""
    config = _config(layers)
    state = _plain_checkpoint(tmp_path / "ckpt", config)
    references = {"random": _reference(config, device=device), "ckpt": _reference(config, tmp_path / "ckpt", device=device)}
    assert references["random"]["hashes"] != references["ckpt"]["hashes"]
    out = tmp_path / "out"
    out.mkdir()
    pairs = ["fsdp2", "random", "fsdp2", str(tmp_path / "ckpt"), "fsdp1", "random", "fsdp1", str(tmp_path / "ckpt")]
    expected = dict(out=out, world=world, layers=layers, device=device, references=references, state=state)
    return expected, _worker([str(out), *pairs], layers, cuda=device == "cuda")


def check_built(out: Path, world: int, layers: int, device: str, references: dict, state: dict[str, torch.Tensor]) -> None:
    """What the ranks of ``prepare_sharded_builds``'s launch wrote to ``out`` against the 1-rank builds."""
    for shard in ("fsdp2", "fsdp1"):
        for source, ref in references.items():
            ranks = [torch.load(out / f"{shard}-{source}-rank{r}.pt", weights_only=False) for r in range(world)]
            for rank, got in enumerate(ranks):
                where = f"{shard} {source} rank {rank}/{world}"
                assert got["world"] == world
                assert got["hashes"] == ref["hashes"], where  # bytes as FSDP gathers them, and the quant state held
                assert len(got["hashes"]) == 7 * layers
                assert got["adapter"].keys() == ref["adapter"].keys(), where
                for key, value in ref["adapter"].items():
                    assert torch.equal(got["adapter"][key], value), (where, key)
                # Exact on CPU. On CUDA the wrapped-adapter route (FSDP1 units) and the fused route may pick other 4-bit kernels.
                tolerance = 0 if device == "cpu" else 1e-3
                torch.testing.assert_close(got["logits"], ref["logits"], rtol=tolerance, atol=tolerance, msg=where)
                # ~1/world of the parameter bytes: FSDP pads each shard by less than world elements per tensor / unit
                share = got["held_by_kind"]["packed"] / ref["packed"]
                assert abs(share - 1 / world) < 0.02, (where, share)
                assert abs(got["held_bytes"] / ref["total"] - 1 / world) < 0.02, (where, got["held_bytes"], ref["total"])
                assert got["held_by_kind"]["quant_state"] == ref["quant_state"], where  # whole on every rank (absmax, codebooks)
                # reads: exactly the checkpoint tensors of the parts this rank owns (part i: rank i % world), each once
                if source == "ckpt":
                    owned = sorted(k for k in state if _part_index(k, layers) % world == rank)
                    assert sorted(got["read"]) == owned, where
                else:
                    assert got["read"] == [], where
            assert sum(r["held_bytes"] for r in ranks) - ref["total"] < 2 * world * 64 * 7 * layers  # padding only


def _config(layers: int):
    """The worker's model (``_sharded_worker.worker_config`` with LL_WORKER_LAYERS=layers)."""
    config = tiny_llama().config
    config.num_hidden_layers = layers
    return config


def _part_index(key: str, layers: int) -> int:
    return int(key.split(".")[2]) if key.startswith("model.layers.") else layers


# The launches of this module's multi-rank tests (name: the test that reads it), the longest first.
_LAUNCHES = {
    "four": "test_four_ranks_build_and_keep_only_their_shard_fsdp1_and_fsdp2",
    "lightning": "test_model_parallel_strategy_builds_sharded_in_configure_model_and_trains",
    "two": "test_two_ranks_build_and_keep_only_their_shard_fsdp1_and_fsdp2",
}


@pytest.fixture(scope="module")
def launches(request, tmp_path_factory, fork_server) -> dict[str, tuple]:
    """The launches this session's tests read, in one queue, as many at a time as there are cores. Each launch's
    ranks are forks of the session's warm process, started with the variables torchrun (the worker) or Lightning's
    launcher (the Lightning run) sets; the GPU test runs the worker through torchrun itself. Each: (what its test
    checks the result against, the finished ranks)."""
    wanted = [name for name, test in _LAUNCHES.items()
              if any(item.module is request.module and item.originalname == test for item in request.session.items)]  # fmt: skip
    queue, expected = Queue(), {}
    for name, port in zip(wanted, free_ports(len(wanted))):
        tmp = tmp_path_factory.mktemp(name)
        if name == "lightning":
            expected[name], command = _lightning_fsdp2(tmp)
            queue.add_ranks(name, command, world=2, port=port, style="lightning", forks=fork_server,
                            env=fork_server.environment(LL_TESTS_DIR=str(TESTS)))
        else:
            world, layers = (4, 6) if name == "four" else (2, 2)
            expected[name], (command, variables) = prepare_sharded_builds(tmp, world, layers)
            queue.add_ranks(name, command, world=world, port=port, style="torchrun", forks=fork_server,
                            env=fork_server.environment(**variables))
    results = queue.run(timeout=600)
    return {name: (expected[name], results[name]) for name in wanted}


def test_two_ranks_build_and_keep_only_their_shard_fsdp1_and_fsdp2(launches):
    expected, result = launches["two"]
    _assert_ran(result)
    check_built(**expected)


@pytest.mark.slow
def test_four_ranks_build_and_keep_only_their_shard_fsdp1_and_fsdp2(launches):
    expected, result = launches["four"]
    _assert_ran(result)
    check_built(**expected)


# -- through Lightning -------------------------------------------------------------------------------------
class _BuiltLM:
    """A LightningModule (made lazily: Lightning is imported only here) whose configure_model calls build_lora_model."""

    @staticmethod
    def make(lora: LoRAConfig = LORA, quant: QuantizationConfig = QUANT, with_lora: bool = True):
        import lightning as L

        class BuiltLM(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = None

            def configure_model(self) -> None:
                if self.model is None:
                    if with_lora:
                        self.model = build_lora_model(tiny_llama().config, lora, quant, strategy=self.trainer.strategy, seed=5)
                    else:
                        self.model = build_quantized_model(tiny_llama().config, quant, device="cpu", offload_to=None)

            def training_step(self, batch, batch_idx):
                (ids,) = batch
                return self.model(input_ids=ids, labels=ids).loss

            def configure_optimizers(self):
                return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

        return BuiltLM()


def test_callback_trains_a_built_model_and_refuses_another_lora_config():
    from _lightning import token_loader, trainer

    from lightning_lora import LoRACallback

    module = _BuiltLM.make()
    callback = LoRACallback(from_backbone=True, backbone="model")
    trainer(2, [callback]).fit(module, token_loader(n=8, seq=16, batch_size=4))
    assert callback.lora_config == LORA and lora_state(module.model).config is LORA
    assert sum(1 for n, _ in module.model.named_parameters() if "lora_" in n) == 28  # injected once, not again
    assert any(torch.count_nonzero(p) for n, p in module.model.named_parameters() if ".lora_b." in n)  # it trained

    same = LoRACallback(r=4, alpha=8, quantize="nf4", compute_dtype="bfloat16", quant_storage="bfloat16", backbone="model")
    trainer(1, [same]).fit(_BuiltLM.make(), token_loader(n=4, seq=16, batch_size=4))
    with pytest.raises(ValueError, match=r"built with LoRA `r`=4, but this LoRACallback/LoRAMixin has `r`=8"):
        trainer(1, [LoRACallback(r=8, alpha=8, backbone="model")]).fit(_BuiltLM.make(), token_loader(n=4, seq=16, batch_size=4))
    with pytest.raises(ValueError, match=r"built with quantization `quant_storage`='bfloat16', but .* has `quant_storage`='uint8'"):
        other = LoRACallback(r=4, alpha=8, quantize="nf4", compute_dtype="bfloat16", backbone="model")
        trainer(1, [other]).fit(_BuiltLM.make(), token_loader(n=4, seq=16, batch_size=4))
    with pytest.raises(RuntimeError, match=r"LoRACallback\(from_backbone=True\) expects `self\.model` to come with LoRA"):
        trainer(1, [LoRACallback(from_backbone=True, backbone="model")]).fit(_BuiltLM.make(with_lora=False), token_loader(n=4, seq=16, batch_size=4))


_LIGHTNING_FSDP2 = r'''
import os, sys
sys.path.insert(0, os.environ["LL_TESTS_DIR"])
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from _lightning import token_loader
from _models import tiny_llama
from test_loading_sharded import _BuiltLM
from lightning_lora import LoRACallback
from lightning_lora.lightning.strategies import gather_adapter_state_dict
from lightning_lora.sharding import packed_4bit_bytes
from lightning_lora.inject import lora_state

L.seed_everything(0)
module = _BuiltLM.make()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                    max_steps=3, callbacks=[LoRACallback(from_backbone=True, backbone="model")], logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, token_loader(n=12, seq=16, batch_size=2))
packed = packed_4bit_bytes(module.model)  # gathered from both shards (collective)
adapter = gather_adapter_state_dict(trainer, module.model)
held = sum(p.to_local().numel() * p.element_size() for p in module.model.parameters())
if trainer.is_global_zero:
    torch.save({"packed": packed, "adapter": adapter, "step": trainer.global_step, "held": held,
                "config": lora_state(module.model).config.to_dict()}, sys.argv[1])
'''


def _lightning_fsdp2(tmp_path: Path) -> tuple[Path, list[str]]:
    """Where ``_LIGHTNING_FSDP2`` writes its result, and the command of its ranks (they read ``LL_TESTS_DIR``)."""
    script = tmp_path / "fsdp2_lightning.py"
    script.write_text(_LIGHTNING_FSDP2)
    return tmp_path / "out.pt", [sys.executable, str(script), str(tmp_path / "out.pt")]


def test_model_parallel_strategy_builds_sharded_in_configure_model_and_trains(launches):
    # Two gloo ranks on CPU: configure_model builds each rank's shard, LoRACallback takes the model's config.
    from lightning_lora.sharding import packed_4bit_bytes

    out, result = launches["lightning"]
    assert result.returncode == 0, result.stderr[-5000:]
    got = torch.load(out, weights_only=True)
    reference = build_lora_model(tiny_llama().config, LORA, QUANT, device="cpu", seed=5)
    expected = packed_4bit_bytes(reference)
    assert got["step"] == 3 and got["config"] == LORA.to_dict()
    assert got["packed"].keys() == expected.keys() and len(expected) == 14
    for name, value in expected.items():  # three optimizer steps left every frozen byte as the 1-rank build made it
        assert torch.equal(got["packed"][name], value), name
    total = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert abs(got["held"] / total - 0.5) < 0.02
    assert len(got["adapter"]) == 28 and all(torch.count_nonzero(v) for k, v in got["adapter"].items() if "lora_b" in k)


def test_fsdp_strategy_gets_the_param_init_fn_and_a_lora_policy_and_refuses_casting_precisions():
    # Lightning's FSDPStrategy needs CUDA to run; what build_lora_model does to it is checked here on one CPU rank.
    import torch.distributed as dist
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def strategy(precision: str, **kwargs) -> FSDPStrategy:
        made = FSDPStrategy(precision_plugin=FSDPPrecision(precision), **kwargs)
        made.parallel_devices = [torch.device("cpu")]
        return made

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = tiny_llama().config
        fsdp = strategy("bf16-mixed")
        model = build_lora_model(config, LORA, QUANT, strategy=fsdp, seed=5)
        assert all(p.is_meta for p in model.parameters())  # built by FSDP, unit by unit
        assert fsdp.kwargs["param_init_fn"] == sharded_param_init_fn(model)
        wrapped = FSDP(model, device_id=torch.device("cpu"), mixed_precision=fsdp.mixed_precision_config, **fsdp.kwargs)
        units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
        assert len(units) == 1 + 2 + 2 * 14  # the root, the decoder layers, every LoRA A and B
        assert not any(p.is_meta for p in wrapped.parameters())
        with FSDP.summon_full_params(wrapped, writeback=False):
            from lightning_lora.sharding import packed_4bit_bytes

            got = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in packed_4bit_bytes(model).items()}
        expected = packed_4bit_bytes(build_lora_model(config, LORA, QUANT, device="cpu", seed=5))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())

        with pytest.raises(ValueError, match=r"casts every flat parameter to torch.float32 for compute \(precision='32-true'\)"):
            build_lora_model(config, LORA, QUANT, strategy=strategy("32-true"))
        with pytest.raises(ValueError, match="does not make every LoRA linear its own FSDP unit"):
            build_lora_model(config, LORA, QUANT, strategy=strategy("bf16-mixed", auto_wrap_policy={LlamaDecoderLayer}))
        with pytest.raises(ValueError, match=r"does not make every decoder block \(LlamaDecoderLayer\) its own FSDP unit"):
            build_lora_model(config, LORA, QUANT, strategy=strategy("bf16-mixed", auto_wrap_policy=lambda module, recurse, nonwrapped_numel: recurse))
    finally:
        dist.destroy_process_group()


def test_mixin_passes_its_configs_to_the_builder_and_injects_nothing_more():
    from _lightning import token_loader, trainer

    from lightning_lora import LoRAMixin

    class MixinBuilt(LoRAMixin, type(_BuiltLM.make())):
        lora_config, quantization_config, lora_backbone = LORA, QUANT, "model"

        def configure_model(self):
            if self.model is None:
                self.model = build_lora_model(tiny_llama().config, self.lora_config, self.quantization_config,
                                              strategy=self.trainer.strategy, seed=5)

    module = MixinBuilt()
    trainer(2).fit(module, token_loader(n=8, seq=16, batch_size=4))
    assert module.lora_model is module.model and lora_state(module.model).config is LORA
    assert sum(1 for n, _ in module.model.named_parameters() if "lora_" in n) == 28
    assert any(torch.count_nonzero(p) for n, p in module.model.named_parameters() if ".lora_b." in n)
