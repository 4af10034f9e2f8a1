"""Set-ups that would silently rewrite packed 4-bit bytes are refused before any step (CPU, real bitsandbytes).

- A precision plugin that casts the module ('16-true', '64-true', FSDPStrategy's '32-true') would cast
  bf16-stored NF4 bytes by value: refused before LoRA is injected; uint8 storage is never cast and trains.
- FSDPStrategy's mixed precision casts every flat parameter to its ``param_dtype`` before the all-gather:
  a ``param_dtype`` other than the storage dtype is refused ('16-mixed', '32-true'); 'bf16-mixed' passes.
  Lightning refuses FSDPStrategy on CPU by exact type, so a subclass reaches the callback's check here.
- FSDP2 groups: a mixed-precision ``param_dtype`` that casts the packed weights is refused by
  ``fully_shard_lora`` and, for a module sharded with plain ``fully_shard``, by the callback before the
  optimizer is built; a group whose tensors are all bf16 is reported at risk on CUDA (the foreach copy
  into the all-gather buffer rewrites NaN patterns, bitsandbytes #1945) and not on CPU.
"""

from __future__ import annotations

import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from _lightning import LlamaLM, token_loader, trainer
from _models import tiny_llama
from lightning_lora import LoRACallback, LoRAConfig, QuantizationConfig, inject_lora, quantize_model
from lightning_lora.sharding import fsdp2_4bit_risks, fully_shard_lora, packed_4bit_bytes
from lightning_lora.inject import lora_state
from lightning_lora.quantization import bitsandbytes_available

pytestmark = pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes is not usable here")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Lightning's launcher sets LOCAL_RANK / NODE_RANK in this process; left behind, a later test's child
    processes would think they were started by an outside launcher and wait for peers that never come."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def one_rank_group(monkeypatch):
    """Lightning (or the test) starts a one-process gloo group here; it is torn down afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _callback(storage: str) -> LoRACallback:
    return LoRACallback(r=4, alpha=8, quantize="nf4", quant_storage=storage, compute_dtype="bfloat16", backbone="model")


@pytest.mark.parametrize(("precision", "cast_to"), [("16-true", "float16"), ("64-true", "float64")])
def test_precision_that_casts_bf16_stored_4bit_weights_is_refused_before_injection(precision, cast_to):
    module = LlamaLM(build_in="init")
    with pytest.raises(ValueError, match=rf"`precision`='{precision}' casts every floating-point weight to {cast_to}.*stored as bfloat16"):
        trainer(1, [_callback("bfloat16")], precision=precision).fit(module, token_loader())
    assert lora_state(module.model) is None  # refused before anything was injected or quantized


def test_precision_check_sees_an_already_quantized_backbone_and_uint8_storage_trains():
    module = LlamaLM(build_in="init")
    quantize_model(module.model, QuantizationConfig(mode="nf4", quant_storage="bfloat16", compute_dtype="bfloat16"), skip={"lm_head"})
    with pytest.raises(ValueError, match=r"packed 4-bit weights of 'model\.layers\.0\.self_attn\.q_proj' \(stored as bfloat16\)"):
        trainer(1, [LoRACallback(r=4, backbone="model")], precision="16-true").fit(module, token_loader())

    module = LlamaLM(build_in="init")
    quantize_model(module.model, QuantizationConfig(mode="nf4", compute_dtype="bfloat16"), skip={"lm_head"})  # uint8 storage
    before = packed_4bit_bytes(module.model)
    run = trainer(2, [LoRACallback(r=4, backbone="model")], precision="16-true")
    run.fit(module, token_loader())
    after = packed_4bit_bytes(module.model)
    assert run.global_step == 2 and len(before) == 14
    assert list(after) == [name + ".base_layer" for name in before]  # now wrapped by LoRA layers
    assert all(torch.equal(before[name], after[name + ".base_layer"]) for name in before)


class _FSDPOnCPU(FSDPStrategy):
    """Lightning refuses ``FSDPStrategy`` itself on CPU; a subclass gets as far as the callback's setup."""


@pytest.mark.parametrize(("precision", "message"), [
    ("16-mixed", r"FSDPStrategy's mixed precision casts every parameter to float16 before its all-gather"),
    ("32-true", r"`precision`='32-true' casts every floating-point weight to float32"),
])
def test_fsdp1_precision_that_casts_the_flat_parameters_is_refused(one_rank_group, precision, message):
    module = LlamaLM(build_in="init")
    run = L.Trainer(accelerator="cpu", devices=1, strategy=_FSDPOnCPU(process_group_backend="gloo"), precision=precision, max_steps=1,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[_callback("bfloat16")])
    with pytest.raises(ValueError, match=message):
        run.fit(module, token_loader())
    assert lora_state(module.model) is None


def test_fsdp1_bf16_mixed_passes_the_check(one_rank_group):
    # The check lets it through; FSDP1 itself then needs a GPU, which is the error that proves it.
    run = L.Trainer(accelerator="cpu", devices=1, strategy=_FSDPOnCPU(process_group_backend="gloo"), precision="bf16-mixed", max_steps=1,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[_callback("bfloat16")])
    with pytest.raises(RuntimeError, match="non-CPU accelerator"):
        run.fit(LlamaLM(build_in="init"), token_loader())


def _injected(bf16: bool):
    model = tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"),
                QuantizationConfig(mode="nf4", quant_storage="bfloat16", compute_dtype="bfloat16"), device="cpu")
    return model.to(torch.bfloat16) if bf16 else model


def test_fsdp2_groups_at_risk(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    mixed = fully_shard_lora(_injected(bf16=False), mesh=mesh)  # fp32 LoRA next to bf16-stored NF4: gathered as bytes
    assert fsdp2_4bit_risks(mixed) == [] and fsdp2_4bit_risks(mixed, device_type="cuda") == []
    all_bf16 = fully_shard_lora(_injected(bf16=True), mesh=mesh)  # allowed on CPU (memcpy), at risk on a GPU
    assert fsdp2_4bit_risks(all_bf16) == []
    assert fsdp2_4bit_risks(all_bf16, device_type="cuda") == [
        f"group 'model.layers.{i}': every tensor is all-gathered as bfloat16 on cuda" for i in (0, 1)
    ]
    with pytest.raises(ValueError, match=r"group 'model\.layers\.0': mixed precision casts the packed 4-bit weights from bfloat16 to float32"):
        fully_shard_lora(_injected(bf16=False), {LlamaDecoderLayer}, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))


class _PlainFullyShard(LlamaLM):
    """Shards with torch's ``fully_shard`` (not ours) and a policy that casts every parameter to float32."""

    def configure_model(self) -> None:
        policy = MixedPrecisionPolicy(param_dtype=torch.float32)
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=self.device_mesh["data_parallel"], mp_policy=policy)
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"], mp_policy=policy)


def test_callback_refuses_an_fsdp2_group_that_casts_4bit_weights_before_building_the_optimizer(one_rank_group):
    module = _PlainFullyShard(build_in="init")
    run = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), max_steps=1,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[_callback("bfloat16")])
    with pytest.raises(ValueError, match=r"FSDP2 would silently change the packed 4-bit weights of 2 parameter groups \(group 'model\.model\.layers\.0': mixed precision casts"):
        run.fit(module, token_loader())
    assert run.global_step == 0 and run.optimizers == []
