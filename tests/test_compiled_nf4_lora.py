"""The compiled nf4 LoRA route (``_routes.frozen_nf4_lora_linear``): the update and the base product summed in one
buffer by ``nf4_kernel.linear_plus_update`` (and the input gradient by ``nf4_kernel.matmul_sum``), the same output
and gradients as eager, and where it is not taken.

On CPU the Triton dequantize is not available, so these tests stand bitsandbytes' own dequantize in for it (the
route's mechanics: the op, its fake, the autograd node, the guards); ``tests/gpu/test_gpu_nf4_kernel.py`` runs the
route with the kernel on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from _nf4_route import ROWS, grads, kernel_stand_in, rel  # noqa: F401 - kernel_stand_in is a fixture
from _nf4_route import nf4_block as _model
from torch._dynamo.testing import AotEagerAndRecordGraphs

from lightning_lora import LoRAConfig, QuantizationConfig, inject_lora, nf4_kernel

def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return rel(got, want) <= tol


def test_op_schema_fake_and_autograd_registration() -> None:
    nf4_kernel.prepare()
    op = torch.ops.lightning_lora.linear_plus_update.default
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(64, 32, dtype=dtype), torch.randn(96, 32, dtype=dtype)
        for adapter_dtype in (dtype, torch.float32):  # A and B in the compute dtype, or float32 and cast by the op
            a, b = torch.randn(8, 32, dtype=adapter_dtype), torch.randn(96, 8, dtype=adapter_dtype)
            for bias in (None, torch.randn(96, dtype=dtype)):
                torch.library.opcheck(op, (x, w, bias, a, b, 0.5), test_utils=("test_schema", "test_faketensor"))
                h_want = x @ a.to(dtype).t()
                want = x @ w.t() + (0 if bias is None else bias) + 0.5 * h_want @ b.to(dtype).t()
                got, h = nf4_kernel.linear_plus_update(x, w, bias, a, b, 0.5)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                assert got.dtype == h.dtype == dtype and got.shape == (64, 96) and h.shape == (64, 8)
                assert torch.equal(h, h_want)  # the same matmul as the plain ops'
                assert _close(got.float(), want.float(), tol)
                assert h.data_ptr() not in (x.data_ptr(), a.data_ptr()) and got.data_ptr() != x.data_ptr()  # no aliasing


def test_matmul_sum_schema_fake_and_values() -> None:
    nf4_kernel.prepare()
    op = torch.ops.lightning_lora.matmul_sum.default
    torch.manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        g, w, h = torch.randn(64, 96, dtype=dtype), torch.randn(96, 32, dtype=dtype), torch.randn(64, 8, dtype=dtype)
        for adapter_dtype in (dtype, torch.float32):
            a = torch.randn(8, 32, dtype=adapter_dtype)
            torch.library.opcheck(op, (g, w, h, a), test_utils=("test_schema", "test_faketensor"))
            got = nf4_kernel.matmul_sum(g, w, h, a)
            want = g.double() @ w.double() + h.double() @ a.to(dtype).double()
            assert got.dtype == dtype and got.shape == (64, 32)
            assert _close(got.double(), want, 1e-6 if dtype == torch.float32 else 1e-2)
            assert got.data_ptr() not in (g.data_ptr(), w.data_ptr(), h.data_ptr(), a.data_ptr())  # no aliasing


def test_ops_round_the_small_product_not_the_large_one() -> None:
    """In bf16, writing the small product first and letting the large one accumulate into it is closer to the exact
    sum than rounding the large product first (the order of the functional route): over 20 draws, both ops' mean
    error against float64 is below that order's, and neither is worse by more than rounding in any draw."""
    nf4_kernel.prepare()
    gen = torch.Generator().manual_seed(9)
    errors = {"update": [], "update_after": [], "sum": [], "sum_after": []}
    for _ in range(20):
        x, w = torch.randn(256, 128, generator=gen).bfloat16(), (torch.randn(96, 128, generator=gen) / 8).bfloat16()
        a, b = torch.randn(8, 128, generator=gen) / 8, torch.randn(96, 8, generator=gen) / 8
        got, h = nf4_kernel.linear_plus_update(x, w, None, a, b, 0.5)
        exact = x.double() @ w.double().t() + 0.5 * h.double() @ b.bfloat16().double().t()
        after = torch.mm(x, w.t()).addmm_(h, b.bfloat16().t(), alpha=0.5)
        errors["update"].append(rel(got.double(), exact))
        errors["update_after"].append(rel(after.double(), exact))
        g, gh = torch.randn(256, 96, generator=gen).bfloat16(), torch.randn(256, 8, generator=gen).bfloat16()
        exact = g.double() @ w.double() + gh.double() @ a.bfloat16().double()
        errors["sum"].append(rel(nf4_kernel.matmul_sum(g, w, gh, a).double(), exact))
        errors["sum_after"].append(rel((torch.mm(g, w) + torch.mm(gh, a.bfloat16())).double(), exact))
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    assert mean["update"] < mean["update_after"] and mean["sum"] < mean["sum_after"], mean
    assert max(errors["update"]) < 4e-3 and max(errors["sum"]) < 4e-3, mean


def test_op_is_not_a_custom_op_wrapper() -> None:
    """The ops are defined through ``torch.library.Library`` (one dispatcher call into a Python kernel), not
    ``torch.library.custom_op``, whose wrapper costs more host time per call in every compiled forward."""
    nf4_kernel.prepare()
    ops = nf4_kernel._LINEAR[0]
    assert nf4_kernel._LIBRARY and sorted(ops) == ["linear_plus_update", "matmul_sum"]
    for name, op in ops.items():
        assert op is getattr(torch.ops.lightning_lora, name).default
        assert not isinstance(op, torch._library.custom_ops.CustomOpDef)
        assert torch._C._dispatch_has_kernel_for_dispatch_key("lightning_lora::" + name, "CompositeExplicitAutograd")


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_route_equals_eager_and_adds_in_place(kernel_stand_in, bias) -> None:
    model = _model(bias=bias)
    x = torch.randn(2, ROWS // 2, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    want_out, want = grads(model, model, x)  # eager: the fused autograd node
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got_out, got = grads(model, compiled, x)
    forward = "\n".join(g.code for g in backend.fw_graphs)
    assert forward.count("lightning_lora.linear_plus_update") == 2, forward  # both layers took the route
    assert "aten.addmm" not in forward, forward  # no functional addmm (it copies the base output first)
    backward = "\n".join(g.code for g in backend.bw_graphs)
    assert backward.count("lightning_lora.matmul_sum") == 2, backward  # both layers' input gradients in one buffer
    assert _close(got_out, want_out, 1e-2)
    assert got.keys() == want.keys() and len(got) == 5
    for name in got:
        assert got[name].abs().sum() > 0, name  # no lost gradient
        assert _close(got[name], want[name], 2e-2), (name, float((got[name] - want[name]).norm() / want[name].norm()))


def test_compiled_route_with_inductor_equals_eager(kernel_stand_in) -> None:
    model = _model()
    x = torch.randn(2, ROWS // 2, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(4))
    want_out, want = grads(model, model, x)
    got_out, got = grads(model, torch.compile(model, fullgraph=True), x)
    assert _close(got_out, want_out, 1e-2)
    for name in want:
        assert _close(got[name], want[name], 2e-2), name


@pytest.mark.parametrize("case", ["dropout", "autocast_fp16", "x_float32", "few_rows"])
def test_compiled_route_not_taken_where_the_plain_ops_must_cast_or_drop(kernel_stand_in, case) -> None:
    model = _model(dropout=0.1 if case == "dropout" else 0.0)
    rows = 1024 if case == "few_rows" else ROWS
    x = torch.randn(2, rows // 2, 64, dtype=torch.float32 if case == "x_float32" else torch.bfloat16)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.float16, enabled=case == "autocast_fp16"):
        compiled(x.requires_grad_(True)).float().sum().backward()
    forward = "\n".join(g.code for g in backend.fw_graphs)
    assert "linear_plus_update" not in forward, forward


def test_grads_flow_only_where_asked(kernel_stand_in) -> None:
    """A frozen input (first layer of a model) gets no input gradient: the weight is not dequantized in backward."""
    model = _model()
    calls = []
    stand_in = nf4_kernel.dequantize

    def counting(packed, state, dtype, pass_id=0):
        calls.append(pass_id)
        return stand_in(packed, state, dtype, pass_id)

    nf4_kernel.dequantize = counting  # restored by the fixture's monkeypatch
    x = torch.randn(2, ROWS // 2, 64, dtype=torch.bfloat16)
    torch.compile(model.up, backend="aot_eager", fullgraph=True)(x).float().sum().backward()
    assert model.up.lora_a.weight.grad is not None and model.up.lora_b.weight.grad is not None
    assert 1 not in calls  # traced once: forward's dequantize only


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("grad", [True, False])
def test_compiled_nf4_llama_blocks_trace_as_one_graph_each(grad, device) -> None:
    """Every route a compiled nf4 LoRA block takes (training, and no-grad inference) traces without a graph break:
    ``fullgraph=True`` raises at the first one (a 4-bit weight's ``as_subclass`` once broke every layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_lora.compiling import compile_blocks

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=128, max_position_embeddings=1024)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    model = inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                        QuantizationConfig(mode="nf4", compute_dtype="bfloat16"), device=device)  # fmt: skip
    ids = torch.randint(0, 128, (2, 900), generator=torch.Generator().manual_seed(1)).to(device)  # 1,800 rows
    model(input_ids=ids[:, :8])  # bitsandbytes sets the compute dtypes on the first call
    torch._dynamo.reset()
    compile_blocks(model, backend="eager", fullgraph=True)
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids, labels=ids)
        if grad:
            out.loss.backward()
    assert torch.isfinite(out.loss)
    if grad:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_b" in n)  # B is zero at init: A gets no gradient yet

