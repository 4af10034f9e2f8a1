"""Low-memory loading and the distributed code paths that run on CPU (gloo).

- ``build_quantized_model`` gives the same packed 4-bit bytes, the same other weights and the same
  outputs as building the full model and quantizing it, from one safetensors file or a sharded
  directory; its random init is seeded and has HF's init std.
- FSDP2 (``ModelParallelStrategy``) runs on CPU with gloo: two ranks train a quantized tiny Llama
  through ``LoRACallback``, the adapter gathered from both shards equals the one each rank saw
  (full tensors), and the packed NF4 bytes each layer holds are those from before sharding.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from _models import tiny_llama, token_batch
from _processes import Queue, free_ports
from lightning_lora import QuantizationConfig, quantize_model
from lightning_lora.loading import build_quantized_model
from lightning_lora.quantization import bitsandbytes_available, is_4bit, quantized_paths

pytestmark = pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes is not usable here")

NF4 = QuantizationConfig(mode="nf4", compute_dtype="bfloat16")


def _reference(dtype: torch.dtype = torch.bfloat16):
    """tiny_llama's weights in a model built as from_pretrained builds it (inv_freq stays float32)."""
    source = tiny_llama()
    model = AutoModelForCausalLM.from_config(source.config, dtype=dtype).train()
    model.load_state_dict(source.state_dict())
    return model


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(torch.uint8)


def _assert_same_model(expected, actual) -> None:
    expected_params, actual_params = dict(expected.named_parameters()), dict(actual.named_parameters())
    assert expected_params.keys() == actual_params.keys()
    for name, param in expected_params.items():
        assert param.dtype == actual_params[name].dtype, name
        assert torch.equal(_bytes(param), _bytes(actual_params[name])), name
    for name, buffer in expected.named_buffers():
        assert torch.equal(buffer, dict(actual.named_buffers())[name]), name
    for name, module in expected.named_modules():
        if is_4bit(module):
            other = actual.get_submodule(name)
            assert is_4bit(other), name
            assert torch.equal(module.weight.quant_state.absmax, other.weight.quant_state.absmax), name


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded-dir"])
def test_loaded_model_equals_model_built_then_quantized(tmp_path, sharded):
    reference = _reference()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if sharded:  # two files, split between the layers: each block reads only its own tensors
        first = {k: v for k, v in state.items() if ".layers.1." not in k}
        save_file(first, tmp_path / "model-00001-of-00002.safetensors")
        save_file({k: v for k, v in state.items() if k not in first}, tmp_path / "model-00002-of-00002.safetensors")
        checkpoint = tmp_path
    else:
        checkpoint = tmp_path / "model.safetensors"
        save_file(state, checkpoint)

    loaded = build_quantized_model(reference.config, NF4, device="cpu", offload_to=None, checkpoint=checkpoint).train()
    quantized = quantized_paths(quantize_model(reference, NF4, skip={"lm_head"}, device="cpu"))

    assert len(quantized) == 14 and all(is_4bit(loaded.get_submodule(name)) for name in quantized)
    assert loaded.lm_head.weight.dtype == torch.bfloat16 and not is_4bit(loaded.lm_head)
    assert loaded.is_loaded_in_4bit is True
    _assert_same_model(reference, loaded)
    ids = token_batch()
    torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_config_directory_with_weights_is_the_checkpoint(tmp_path):
    reference = _reference()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "model.safetensors")
    reference.config.save_pretrained(tmp_path)
    loaded = build_quantized_model(tmp_path, NF4, device="cpu", offload_to=None)
    quantize_model(reference, NF4, skip={"lm_head"}, device="cpu")
    _assert_same_model(reference, loaded)


def test_tied_embeddings_stay_tied_and_load_from_one_tensor(tmp_path):
    config = tiny_llama().config
    config.tie_word_embeddings = True
    source = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in source.state_dict().items() if k != "lm_head.weight"}  # as HF saves tied models
    save_file(state, tmp_path / "model.safetensors")
    loaded = build_quantized_model(config, NF4, device="cpu", offload_to=None, checkpoint=tmp_path / "model.safetensors")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, source.model.embed_tokens.weight)


def test_random_init_is_seeded_with_hf_std_and_leaves_the_global_rng_alone():
    config = tiny_llama().config
    rng = torch.get_rng_state()
    first = build_quantized_model(config, NF4, device="cpu", offload_to=None, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    second = build_quantized_model(config, NF4, device="cpu", offload_to=None, seed=3)
    other = build_quantized_model(config, NF4, device="cpu", offload_to=None, seed=4)
    _assert_same_model(first, second)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    std = first.model.embed_tokens.weight.float().std().item()
    assert abs(std - config.initializer_range) < 0.002
    assert torch.equal(first.model.norm.weight, torch.ones_like(first.model.norm.weight))
    assert first.model.rotary_emb.inv_freq.dtype == torch.float32  # computed buffers are kept, not re-allocated


def test_loading_errors_name_the_problem(tmp_path):
    reference = _reference()
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        build_quantized_model(reference.config, NF4, device="cpu", offload_to=None, checkpoint=tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        build_quantized_model(reference.config, NF4, device="cpu", checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="QuantizationConfig"):
        build_quantized_model(reference.config, "nf4", device="cpu")
    state["model.norm.weight"] = torch.ones(3, dtype=torch.bfloat16)
    state["model.layers.1.mlp.up_proj.weight"] = reference.model.layers[1].mlp.up_proj.weight.detach().contiguous()
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\), the model expects \(64,\)"):
        build_quantized_model(reference.config, NF4, device="cpu", offload_to=None, checkpoint=tmp_path / "bad.safetensors")


def test_quantized_layer_recovers_its_quant_state_when_sharding_replaces_the_weight():
    # FSDP1 (use_orig_params) and FSDP2 hand the layer a plain tensor view of its packed weight: bitsandbytes
    # re-attaches the quant_state from the module in forward, so quantize_linear must have set it there.
    from torch import nn

    from lightning_lora.quantization import quantize_linear

    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(64, 32), NF4, device="cpu")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = layer(x)
    assert layer.quant_state is layer.weight.quant_state
    layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)  # what a sharding wrapper leaves
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


# -- FSDP2 through Lightning on CPU (two gloo ranks) --------------------------------------------------
_FSDP2_SCRIPT = r'''
import json, os, sys
sys.path.insert(0, os.environ["LL_TESTS_DIR"])
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from _lightning import LlamaLM, token_loader
from lightning_lora import LoRACallback
from lightning_lora.lightning.strategies import gather_adapter_state_dict
from lightning_lora.quantization import is_4bit
from lightning_lora.sharding import fully_shard_lora, packed_4bit_bytes

out, phase, quant_storage = sys.argv[1], sys.argv[2], sys.argv[3]
compile_blocks = len(sys.argv) > 4 and sys.argv[4] == "compile"


class Sharded(LlamaLM):
    def configure_model(self):
        if getattr(self, "seen", None) is not None:
            return
        self.before, self.seen = packed_4bit_bytes(self.model), {}
        def record(name, layer):  # the bytes each layer computes with, as FSDP2 all-gathers them
            if name not in self.seen:
                self.seen[name] = layer.weight.detach().reshape(-1).view(torch.uint8).cpu().clone()

        for name, module in self.model.named_modules():
            if is_4bit(getattr(module, "base_layer", None)):  # the LoRA layer: its forward reads the base weight
                module.register_forward_pre_hook(lambda layer, args, name=name + ".base_layer": record(name, layer.base_layer))
        if quant_storage == "bfloat16":
            self.model.to(torch.bfloat16)  # every tensor of a group in bf16: the set-up bitsandbytes #1945 reports
        fully_shard_lora(self.model, mesh=self.device_mesh["data_parallel"])


L.seed_everything(0)
module = Sharded(build_in="init", lr=1e-2)
callbacks = [LoRACallback(r=4, alpha=8, quantize="nf4", quant_storage=quant_storage, backbone="model", export_dir=os.path.join(out, "export"),
                          compile_blocks=compile_blocks)]
if phase == "full":
    callbacks.append(ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=3, save_top_k=-1, filename="{step}"))
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    max_steps=6, callbacks=callbacks, logger=False, enable_checkpointing=phase == "full", enable_progress_bar=False,
    enable_model_summary=False, gradient_clip_val=0.05, gradient_clip_algorithm="norm", deterministic=True,
)
# 12 sequences, 2 per rank and step: 3 steps an epoch, so the step-3 checkpoint sits on an epoch boundary.
trainer.fit(module, token_loader(n=12, seq=16, batch_size=2), ckpt_path=os.path.join(out, "ckpt", "step=3.ckpt") if phase == "resume" else None)
adapter = gather_adapter_state_dict(trainer, module.model)
if trainer.is_global_zero:
    changed = {k: int((module.seen[k] != v).sum()) for k, v in module.before.items()}
    torch.save({"adapter": adapter, "changed": changed, "step": trainer.global_step}, os.path.join(out, f"{phase}.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # an orderly shutdown: gloo can abort a process that exits with its group alive
'''


# name: the script's arguments after the output directory, and the launch whose checkpoint it resumes
_LAUNCHES = {
    "full-uint8": (("full", "uint8"), None),
    "compile-uint8": (("full", "uint8", "compile"), None),
    "full-bfloat16": (("full", "bfloat16"), None),
    "resume-uint8": (("resume", "uint8"), "full-uint8"),
    "resume-bfloat16": (("resume", "bfloat16"), "full-bfloat16"),
}


def _needs(item) -> set[str]:
    """The launches a test of this module reads."""
    if item.originalname == "test_fsdp2_with_compiled_blocks_trains_like_eager":
        return {"full-uint8", "compile-uint8"}
    if item.originalname == "test_fsdp2_trains_resumes_sharded_adapter_checkpoint_and_keeps_nf4_bytes":
        return {f"full-{item.callspec.params['quant_storage']}", f"resume-{item.callspec.params['quant_storage']}"}
    return set()


@pytest.fixture(scope="module")
def fsdp2_runs(request, tmp_path_factory, fork_server) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The launches of ``_FSDP2_SCRIPT`` this session's tests read, each with its output directory: ``full-*``
    (six eager steps, a checkpoint every three), ``compile-uint8`` (the same with compiled blocks) and ``resume-*``
    (a copy of the full run's directory, resumed from its step-3 checkpoint). Each launch's two ranks are forks of
    the session's warm process, started with the variables Lightning's launcher sets (the launcher itself runs in
    test_dora's two-rank runs); launches that do not wait for each other run side by side."""
    wanted = set().union(*(_needs(item) for item in request.session.items if item.module is request.module))
    root = tmp_path_factory.mktemp("fsdp2")
    script = root / "fsdp2_train.py"
    script.write_text(_FSDP2_SCRIPT)
    names = [name for name in _LAUNCHES if name in wanted]
    queue = Queue()
    env = fork_server.environment(LL_TESTS_DIR=str(Path(__file__).parent))
    for name, port in zip(names, free_ports(len(names))):
        args, resumes = _LAUNCHES[name]
        if resumes is None:
            (root / name).mkdir()
        # A resumed run writes beside a copy of the uninterrupted one (which other tests read as it was), made as
        # soon as that one ends.
        resumed_by = [other for other in names if _LAUNCHES[other][1] == name]
        copy = functools.partial(shutil.copytree, root / name, root / resumed_by[0]) if resumed_by else None
        queue.add_ranks(name, [sys.executable, str(script), str(root / name), *args], world=2, port=port, style="lightning",
                        after=resumes, then=copy, forks=fork_server, env=env)
    results = queue.run(timeout=600)
    return {name: (root / name, results[name]) for name in names}


def _output(fsdp2_runs: dict, name: str) -> Path:
    out, result = fsdp2_runs[name]
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_fsdp2_with_compiled_blocks_trains_like_eager(fsdp2_runs):
    # compile_blocks=True under ModelParallelStrategy (FSDP2): the blocks are compiled at injection, before
    # fully_shard; six steps on two gloo ranks end where the eager run ends, NF4 bytes untouched.
    eager = torch.load(_output(fsdp2_runs, "full-uint8") / "full.pt", weights_only=True)
    compiled = torch.load(_output(fsdp2_runs, "compile-uint8") / "full.pt", weights_only=True)
    assert compiled["step"] == eager["step"] == 6
    assert sum(compiled["changed"].values()) == 0 and len(compiled["changed"]) == 14
    assert compiled["adapter"].keys() == eager["adapter"].keys()
    for key, value in eager["adapter"].items():
        torch.testing.assert_close(compiled["adapter"][key], value, rtol=1e-3, atol=1e-3 * value.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("quant_storage", ["uint8", "bfloat16"])
def test_fsdp2_trains_resumes_sharded_adapter_checkpoint_and_keeps_nf4_bytes(fsdp2_runs, quant_storage):
    _output(fsdp2_runs, f"full-{quant_storage}")
    out = _output(fsdp2_runs, f"resume-{quant_storage}")  # the full run's files, then the resumed run's
    full, resumed = torch.load(out / "full.pt"), torch.load(out / "resume.pt")

    assert full["step"] == resumed["step"] == 6
    assert len(full["changed"]) == 14 and set(full["changed"].values()) == {0}  # bytes each layer saw = before sharding
    assert set(resumed["changed"].values()) == {0}
    adapter = full["adapter"]
    assert len(adapter) == 28 and all(not torch.equal(v, torch.zeros_like(v)) for k, v in adapter.items() if "lora_b" in k)
    for key, value in adapter.items():  # every rank's shard came back: resumed run == uninterrupted run
        assert torch.equal(value, resumed["adapter"][key]), key
    # the checkpoint is a distributed (sharded) checkpoint holding the adapter and its optimizer state only
    files = list((out / "ckpt" / "step=3.ckpt").iterdir())
    assert {f.name for f in files if f.suffix != ".distcp"} == {".metadata", "meta.pt"} and len(files) == 4
    assert sum(f.stat().st_size for f in files) < 600_000
    from safetensors.torch import load_file

    exported = load_file(out / "export" / "adapter" / "adapter_model.safetensors")
    for key, value in adapter.items():
        peft_key = "base_model.model." + key.replace("lora_a", "lora_A").replace("lora_b", "lora_B")
        assert torch.equal(exported[peft_key], value), key


def test_multi_gpu_driver_stops_the_other_node_when_one_fails():
    # A node launcher that fails must not leave the driver waiting out its timeout for the other node.
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("multi_gpu", Path(__file__).parents[1] / "benchmarks" / "multi_gpu.py")
    multi_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(multi_gpu)
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    start = time.monotonic()
    assert multi_gpu._wait_all_or_first_failure([failing, waiting], timeout=100) == [3, "killed"]
    assert time.monotonic() - start < 20 and waiting.poll() is not None
    quick = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert multi_gpu._wait_all_or_first_failure(quick, timeout=100) == [0, 0]
