"""Tests that need CUDA: run them on a GPU machine (`pytest -m gpu tests/gpu`); CI on CPU skips them.

- Loading block by block on the GPU gives the bytes and outputs of quantizing the full model on the GPU.
- LoRA on a CUDA ``Linear4bit`` equals LoRA on its dequantized weight (bf16 compute tolerance), in
  training and in both inference routes (update into the output; update into the weight, many tokens).
- One-GPU QLoRA through ``Trainer`` + ``LoRACallback`` quantizes on the move to the GPU, trains only
  the adapter and writes an adapter-only checkpoint.
- The fused LoRA training node and regional compilation (``compile_blocks``) give the gradients of
  the unfused eager path on a CUDA nf4 Llama (each tensor within bf16 noise; a compiled custom
  autograd node once lost whole layers' gradients here while the loss looked right).
- Two GPUs (skipped with fewer): ``benchmarks/multi_gpu.py`` on a tiny Llama under DDP, FSDP1 and
  FSDP2: first-step loss equal to one GPU's, the adapter identical on both ranks, the NF4 bytes each
  layer computes with equal to those before sharding, resume from the adapter-only checkpoint, and a
  PEFT-loadable export from FSDP.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: _models, _lightning

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/gpu)")]
two_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")


def _nf4(**kwargs):
    from lightning_lora import QuantizationConfig

    return QuantizationConfig(mode="nf4", compute_dtype="bfloat16", **kwargs)


def test_block_by_block_loading_on_gpu_equals_quantizing_the_full_model(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from _models import tiny_llama, token_batch
    from lightning_lora import quantize_model
    from lightning_lora.loading import build_quantized_model

    source = tiny_llama()
    reference = AutoModelForCausalLM.from_config(source.config, dtype=torch.bfloat16).train()
    reference.load_state_dict(source.state_dict())
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "model.safetensors")

    loaded = build_quantized_model(reference.config, _nf4(), device="cuda", offload_to="cpu", checkpoint=tmp_path / "model.safetensors")
    assert all(p.device.type == "cpu" for p in loaded.parameters())  # parked on the host, packed
    loaded = loaded.cuda().train()
    reference = reference.cuda()
    quantize_model(reference, _nf4(), skip={"lm_head"}, device="cuda")
    for (name, a), (_, b) in zip(reference.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8)), name
    ids = token_batch().cuda()
    torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


def _cuda_nf4_llama_grads(use_fused: bool, compile_: bool) -> dict[str, torch.Tensor]:
    from _models import tiny_llama, token_batch
    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.compiling import compile_blocks
    from lightning_lora.layers import fused_training

    torch._dynamo.reset()
    model = tiny_llama().to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"  # the attention the benchmarks use
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                _nf4(), device="cuda")
    model.cuda().train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    ids = token_batch(batch=4, seq=32).cuda()
    with fused_training(model, use_fused):
        if compile_:
            compile_blocks(model)
        for _ in range(2 if compile_ else 1):  # compiled: the first pass compiles
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("use_fused", "compile_"), [(True, False), (True, True), (False, True)], ids=["fused", "compiled", "compiled-unfused"])
def test_fused_and_compiled_paths_give_the_eager_gradients_on_cuda(use_fused, compile_):
    reference = _cuda_nf4_llama_grads(use_fused=False, compile_=False)
    grads = _cuda_nf4_llama_grads(use_fused, compile_)
    assert grads.keys() == reference.keys()
    errors = {n: float((grads[n] - g).norm() / g.norm()) for n, g in reference.items()}
    assert max(errors.values()) < 0.05, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("tokens", [4, 4096], ids=["update-into-output", "update-into-weight"])
def test_inference_paths_on_cuda_linear4bit_equal_the_reference(tokens):
    from torch import nn

    from lightning_lora import LoRALinear
    from lightning_lora.quantization import dequantize_weight, quantize_linear

    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(512, 256, bias=False), _nf4(), device="cuda")
    layer = LoRALinear(base, r=8, alpha=16).cuda().eval()
    nn.init.normal_(layer.lora_b.weight, std=0.02)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    expected = x.float() @ (dequantize_weight(base) + layer.delta_weight()).t()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_lora_on_cuda_linear4bit_equals_lora_on_dequantized_weight():
    from torch import nn

    from lightning_lora import LoRALinear
    from lightning_lora.quantization import dequantize_weight, quantize_linear

    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(256, 128), _nf4(), device="cuda")
    layer = LoRALinear(base, r=8, alpha=16).cuda()
    nn.init.normal_(layer.lora_b.weight, std=0.02)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ (dequantize_weight(base) + layer.delta_weight()).t() + base.bias.float()
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)


def test_single_gpu_qlora_trains_adapter_only_and_checkpoints_it(tmp_path):
    import lightning as L

    from _lightning import LlamaLM, token_loader
    from lightning_lora import LoRACallback
    from lightning_lora.quantization import is_4bit

    class Probe(L.Callback):  # where the 4-bit layers live while training (teardown moves the module to the CPU after fit)
        def on_train_end(self, trainer, pl_module):
            self.devices = [m.weight.device.type for m in pl_module.model.modules() if is_4bit(m)]

    L.seed_everything(0)
    module, probe = LlamaLM(build_in="configure_model"), Probe()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=8, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LoRACallback(r=4, alpha=8, quantize="nf4", backbone="model"), probe],
                        default_root_dir=tmp_path)
    trainer.fit(module, token_loader())
    assert probe.devices == ["cuda"] * 14
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all(".lora_a." in k or ".lora_b." in k for k in state)


def _run_multi_gpu(tmp_path: Path, *scenarios: str) -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--all", "--model", "tiny", "--seq", "64", "--work", str(tmp_path / "work"),
           "--out", str(out), "--timeout", "240", "--only", *scenarios]
    subprocess.run(cmd, check=True, timeout=1500, cwd=ROOT)
    return json.loads((out / "multi_gpu.json").read_text())


@two_gpus
@pytest.mark.multigpu
def test_ddp_fsdp1_fsdp2_parity_bytes_resume_and_export(tmp_path):
    results = _run_multi_gpu(tmp_path, "single", "ddp", "ddp_resume", "fsdp", "fsdp_resume", "fsdp2", "fsdp2_resume", "fsdp_sharded", "fsdp_sharded_resume")
    for name, result in results.items():
        if name in ("summary", "versions"):
            continue
        assert result["returncode"] == 0 and result["error"] is None, (name, result.get("log_tail"))
        assert set(result["nf4_bytes_changed_per_rank"]) == {0}, name
        if result["world_size"] > 1:
            assert result["adapter_same_on_all_ranks"] is True, name
    parity = results["summary"]["loss_parity_vs_single"]
    for name in ("ddp", "fsdp", "fsdp2"):
        assert parity[name]["first_step_abs_diff"] < 2e-2, (name, parity[name])  # bf16 rounding of one step's loss
    for name in ("ddp_resume", "fsdp_resume", "fsdp2_resume", "fsdp_sharded_resume"):
        assert results[name]["resume_vs_uninterrupted_max_abs_diff"] < 1e-2, (name, results[name])
    assert results["fsdp"]["peft_export"]["loaded"] is True and results["fsdp"]["peft_export"]["max_abs_diff"] == 0.0
    assert results["fsdp"]["checkpoint_non_adapter_keys"] == []


@two_gpus
@pytest.mark.multigpu
def test_two_node_launch_on_one_host(tmp_path):
    result = _run_multi_gpu(tmp_path, "ddp_2node")["ddp_2node"]
    assert result["returncode"] == 0 and result["num_nodes"] == 2 and result["world_size"] == 2
    assert result["adapter_same_on_all_ranks"] is True
