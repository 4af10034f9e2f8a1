"""Tests that need CUDA: run them on a GPU machine (`pytest -m gpu tests/gpu`); CI on CPU skips them.

- Loading block by block on the GPU gives the bytes and outputs of quantizing the full model on the GPU.
- LoRA on a CUDA ``Linear4bit`` equals LoRA on its dequantized weight (bf16 compute tolerance), in
  training and in both inference routes (update into the output; update into the weight, many tokens).
- One-GPU QLoRA through ``Trainer`` + ``LoRACallback`` quantizes on the move to the GPU, trains only
  the adapter and writes an adapter-only checkpoint.
- The fused LoRA training node and regional compilation (``compile_blocks``) give the gradients of
  the unfused eager path on a CUDA nf4 Llama (each tensor within bf16 noise; a compiled custom
  autograd node once lost whole layers' gradients here while the loss looked right).
- Two ranks (``multigpu``; on a machine with one GPU both ranks share it through gloo, each launched as
  its own node): ``benchmarks/multi_gpu.py`` on a tiny Llama under DDP, FSDP1 (full and sharded state
  dicts) and FSDP2: first-step loss and gradient norm equal to one rank's within bf16 rounding, norm
  clipping by the global norm on every step, the adapter identical on both ranks, the NF4 bytes each
  layer computes with equal to those before sharding, bit-exact resume from the adapter-only checkpoint,
  a PEFT-loadable export, the all-bf16 FSDP2 group refused; FSDP1 checkpoints resumed on another number
  of ranks with the adapter, optimizer state and step as saved; a two-node launch on one host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: _models, _lightning

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/gpu)")]


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
    """Results of ``scenarios`` from ``benchmarks/multi_gpu.py``: with fewer GPUs than ranks, the ranks share GPU 0 (gloo).

    ``LL_MULTI_GPU_RESULTS=<multi_gpu.json>`` reuses a driver run that holds every scenario (the GPU command runs
    the benchmark first, so its runs are not repeated here); otherwise the driver runs them on a tiny Llama.
    """
    reuse = os.environ.get("LL_MULTI_GPU_RESULTS")
    if reuse and Path(reuse).exists():
        results = json.loads(Path(reuse).read_text())["results"]
        if all(name in results and "skipped" not in results[name] for name in scenarios):
            return {name: results[name] for name in scenarios}
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--model", "tiny", "--seq", "64", "--work", str(tmp_path / "work"),
           "--out", str(out), "--timeout", "240", "--only", *scenarios]
    subprocess.run(cmd, check=True, timeout=1500, cwd=ROOT)
    return json.loads((out / "multi_gpu.json").read_text())["results"]


def _assert_trained_like_one_rank(name: str, result: dict) -> None:
    checks, lora_layers = result["checks"], 7 * result["layers"]  # q, k, v, o, gate, up, down per decoder layer
    assert result["error"] is None, (name, result.get("log_tail"))
    assert result["nf4_layers_checked_per_rank"] == [lora_layers] * result["world_size"] and set(result["nf4_bytes_changed_per_rank"]) == {0}, name
    assert result["adapter_same_on_all_ranks"] in ((None,) if result["world_size"] == 1 else (True,)), name
    assert checks["clipped_steps"] == result["steps_run"] and checks["clip_max_rel_error"] < 1e-3, (name, checks)  # global norm, every step
    if "loss_first_abs_diff" in checks:
        assert checks["loss_first_abs_diff"] < 2e-2 and checks["grad_norm_first_rel_diff"] < 2e-2, (name, checks)  # bf16 rounding
        assert checks["same_global_batches"] is True, name


@pytest.mark.multigpu
def test_ddp_fsdp1_fsdp2_parity_bytes_resume_and_export(tmp_path):
    results = _run_multi_gpu(tmp_path, "single", "ddp@2", "ddp_resume@2", "fsdp@2", "fsdp_resume@2", "fsdp_sharded@2", "fsdp_sharded_resume@2",
                             "fsdp2@2", "fsdp2_resume@2", "fsdp2_allbf16@2")
    for name, result in results.items():
        if name == "fsdp2_allbf16@2":  # every tensor bf16 on a GPU: FSDP2's all-gather copy would rewrite NaN bytes
            assert result["checks"]["refused_as_expected"] is True and result["steps_run"] == 0, result.get("error")
            continue
        _assert_trained_like_one_rank(name, result)
    for name in ("ddp_resume@2", "fsdp_resume@2", "fsdp_sharded_resume@2", "fsdp2_resume@2"):
        assert results[name]["checks"]["resume_bit_exact"] is True and results[name]["checks"]["resume_losses_equal"] is True, (name, results[name]["checks"])
        assert results[name]["checks"]["resume_state"]["adapter_exact"] and results[name]["checks"]["resume_state"]["optimizer_exact"], name
    for name in ("fsdp@2", "fsdp_sharded@2", "fsdp2@2"):
        export = results[name]["peft_export"]
        assert export["loaded"] is True and export["max_abs_diff"] == 0.0 and export["file_keys_match"] is True, (name, export)
        assert results[name]["checkpoints"]["non_adapter_keys"] == [] and results[name]["checkpoints"]["state_dict_keys"] == 14 * results[name]["layers"], name


@pytest.mark.multigpu
def test_fsdp1_checkpoints_resume_on_another_number_of_ranks(tmp_path):
    results = _run_multi_gpu(tmp_path, "fsdp@1", "fsdp@2", "fsdp_sharded@1", "fsdp_sharded@2", "fsdp_resume@2->1", "fsdp_sharded_resume@1->2")
    for name in ("fsdp_resume@2->1", "fsdp_sharded_resume@1->2"):
        result, checks = results[name], results[name]["checks"]
        assert result["error"] is None, (name, result.get("log_tail"))
        assert checks["resume_state"] == {**checks["resume_state"], "adapter_exact": True, "optimizer_exact": True, "step_exact": True}, name
        assert checks["resume_state"]["optimizer_tensors"] == 14 * result["layers"] and result["start_step"] == 10 and result["final_step"] == 20, name
        assert checks["resume_same_global_batches"] is True, name
        assert checks["continuation_loss_max_abs_diff"] < 2e-2, (name, checks)  # like an uninterrupted run on the new ranks


@pytest.mark.multigpu
def test_two_node_launch_on_one_host(tmp_path):
    result = _run_multi_gpu(tmp_path, "single", "ddp_2node")["ddp_2node"]
    assert result["error"] is None and result["num_nodes"] == 2 and result["world_size"] == 2 and result["devices_per_node"] == 1
    assert result["adapter_same_on_all_ranks"] is True and result["steps_run"] == 10
    assert result["checks"]["loss_first_abs_diff"] < 2e-2


@pytest.mark.multigpu
def test_fsdp1_whole_model_checkpoints_on_one_and_two_ranks(tmp_path):
    # adapter_only_checkpoint=False: on one rank FSDPStrategy's own state dict lacked the frozen units' weights
    results = _run_multi_gpu(tmp_path, "single", "fsdp_full@1", "fsdp_full_resume@1", "fsdp_full@2")
    for name in ("fsdp_full@1", "fsdp_full@2"):
        result = results[name]
        _assert_trained_like_one_rank(name, result)
        ckpt = result["checkpoints"]
        assert ckpt["missing_keys"] == [] and ckpt["non_adapter_keys"] and ckpt["state_dict_keys"] > 14 * result["layers"], (name, ckpt)
    checks = results["fsdp_full_resume@1"]["checks"]
    assert results["fsdp_full_resume@1"]["error"] is None, results["fsdp_full_resume@1"].get("log_tail")
    assert checks["resume_bit_exact"] is True and checks["resume_state"]["adapter_exact"] and checks["resume_state"]["optimizer_exact"], checks
