"""More cases of the compiled nf4 LoRA route (``_routes.frozen_nf4_lora_linear``) for cases
``tests/test_compiled_nf4_lora.py`` does not cover: agreement with the functional ``addmm`` route it
replaces (frozen A or B, frozen input, 2-D and non-contiguous inputs, bias, autocast), switching adapters and scales
after compiling, dynamic shapes, and the fallbacks when the op cannot be registered or the module is reloaded.

As there, bitsandbytes' CPU dequantize stands in for the Triton kernel.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from _nf4_route import ROWS, float64_reference, grads, kernel_stand_in, nf4_block, rel  # noqa: F401 - kernel_stand_in is a fixture
from torch import nn
from torch._dynamo.testing import AotEagerAndRecordGraphs

from lightning_lora import _routes, nf4_kernel
from lightning_lora.layers import lora_layers


def _model(bias: bool = False) -> nn.Module:
    return nf4_block(bias)


def _compiled(model, backend, **kwargs):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True, **kwargs)


def _forward_code(backend) -> str:
    return "\n".join(g.code for g in backend.fw_graphs)


def rel(got, want) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


CASES = ["a_frozen", "b_frozen", "x_no_grad", "b_frozen_x_no_grad", "two_d", "non_contiguous", "bias", "autocast_bf16"]


@pytest.mark.parametrize("case", CASES)
def test_route_equals_the_functional_addmm(kernel_stand_in, monkeypatch, case) -> None:
    """The route computes what the plain ops (``frozen_nf4_linear`` + ``addmm``) compute, up to the order of one
    rounding (the ops sum the two products in one buffer): against the same computation in float64, the output
    and every gradient are as close as the plain ops' (within a quarter of their error), none lost, and the
    input gradient goes through ``matmul_sum`` wherever the input needs one."""
    model = _model(bias=case == "bias")
    for layer in lora_layers(model).values():
        if case.startswith("a_frozen"):
            layer.lora_a.weight.requires_grad_(False)
        if case.startswith("b_frozen"):
            layer.lora_b.weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    if case == "two_d":
        x = torch.randn(ROWS, 64, dtype=torch.bfloat16, generator=gen)
    elif case == "non_contiguous":
        x = torch.randn(ROWS // 2, 2, 64, dtype=torch.bfloat16, generator=gen).transpose(0, 1)
    else:
        x = torch.randn(2, ROWS // 2, 64, dtype=torch.bfloat16, generator=gen)
    x_grad = "x_no_grad" not in case
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if case == "autocast_bf16" else contextlib.nullcontext

    in_place = _routes.frozen_nf4_lora_linear
    monkeypatch.setattr(_routes, "frozen_nf4_lora_linear", lambda *args: None)
    old_backend = AotEagerAndRecordGraphs()
    old_out, old = grads(model, _compiled(model, old_backend), x, x_grad, ctx)
    monkeypatch.setattr(_routes, "frozen_nf4_lora_linear", in_place)
    new_backend = AotEagerAndRecordGraphs()
    new_out, new = grads(model, _compiled(model, new_backend), x, x_grad, ctx)

    assert "linear_plus_update" not in _forward_code(old_backend)
    assert _forward_code(new_backend).count("lightning_lora.linear_plus_update") == 2  # both layers took the route
    # The second layer's input always needs a gradient; the first's only where x does.
    backward = "\n".join(g.code for g in new_backend.bw_graphs)
    assert backward.count("lightning_lora.matmul_sum") == (2 if x_grad else 1), backward
    exact_out, exact = float64_reference(model, x, x_grad)
    assert rel(new_out.double(), exact_out) <= 1.25 * rel(old_out.double(), exact_out)
    assert new.keys() == old.keys() and len(new) == (4 if case == "x_no_grad" else 2 if case == "b_frozen_x_no_grad" else 3 if "frozen" in case else 5)
    bias_grads = {f"{n}.base_layer.bias" for n in ("up", "down")}
    assert new.keys() - bias_grads == exact.keys() - bias_grads, (new.keys(), exact.keys())
    for name in new:
        assert new[name].abs().sum() > 0, name
        errors = rel(new[name].double(), exact[name]), rel(old[name].double(), exact[name])
        assert errors[0] <= 1.25 * errors[1] + 1e-4, (name, errors)


def test_switching_adapter_and_scale_after_compiling(kernel_stand_in) -> None:
    """Another active adapter, or a new scale, recompiles: no adapter's tensors or scale stay baked into the graph."""
    model = _model()
    for layer in lora_layers(model).values():
        layer.add_adapter("other", r=4, alpha=3.0, dtype=torch.bfloat16)
        nn.init.normal_(layer.adapters["other"].lora_b.weight, std=0.1)
    backend = AotEagerAndRecordGraphs()
    compiled = _compiled(model, backend)
    x = torch.randn(2, ROWS // 2, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(6))

    def check(tag: str) -> None:
        want_out, want = grads(model, model, x)
        got_out, got = grads(model, compiled, x)
        assert "linear_plus_update" in _forward_code(backend), tag
        assert got.keys() == want.keys(), tag
        assert rel(got_out, want_out) <= 1e-2, tag
        for name in want:
            assert got[name].abs().sum() > 0 and rel(got[name], want[name]) <= 2e-2, (tag, name)

    check("default")
    for layer in lora_layers(model).values():
        layer.active_adapter = "other"
    check("other")
    for layer in lora_layers(model).values():
        layer.active_adapter = "default"
        layer.scale = 5.0  # e.g. a rescaled adapter
    check("default, new scale")


def test_dynamic_shapes_with_changing_sequence_lengths(kernel_stand_in) -> None:
    model = _model()
    backend = AotEagerAndRecordGraphs()
    compiled = _compiled(model, backend, dynamic=True)
    gen = torch.Generator().manual_seed(7)
    for batch, seq in ((2, 800), (4, 600), (3, 700), (2, 500)):  # the last: 1,000 rows, the plain ops
        x = torch.randn(batch, seq, 64, dtype=torch.bfloat16, generator=gen)
        want_out, want = grads(model, model, x)
        got_out, got = grads(model, compiled, x)
        assert got_out.shape == (batch, seq, 64)
        assert rel(got_out, want_out) <= 1e-2
        for name in want:
            assert rel(got[name], want[name]) <= 2e-2, (batch, seq, name)
    assert "linear_plus_update" in backend.fw_graphs[0].code
    assert "linear_plus_update" not in backend.fw_graphs[-1].code


def test_op_that_cannot_be_registered_keeps_the_functional_route(kernel_stand_in, monkeypatch) -> None:
    """A torch whose custom-op API refuses the op: ``prepare`` records that, and compiled graphs keep the plain ops."""

    def refuse() -> None:
        raise TypeError("unsupported annotation")

    monkeypatch.setattr(nf4_kernel, "_LINEAR", [])
    monkeypatch.setattr(nf4_kernel, "_build_linear", refuse)
    nf4_kernel.prepare()
    assert not nf4_kernel.linear_plus_update_ready()
    with pytest.raises(RuntimeError, match="prepare"):
        nf4_kernel.linear_plus_update(*(torch.ones(2, 2) for _ in range(5)), 1.0)  # x, weight, bias, a, b
    model = _model()
    x = torch.randn(2, ROWS // 2, 64, dtype=torch.bfloat16)
    want_out, want = grads(model, model, x)
    backend = AotEagerAndRecordGraphs()
    got_out, got = grads(model, _compiled(model, backend), x)
    assert "linear_plus_update" not in _forward_code(backend)
    assert rel(got_out, want_out) <= 1e-2
    for name in want:
        assert rel(got[name], want[name]) <= 2e-2, name


def test_reload_finds_the_registered_op() -> None:
    """A reload of ``nf4_kernel`` (as ``test_environment_switch_turns_it_off`` does) does not register the op twice
    and does not drop it: the fragment that defines it survives the reload, so a handle taken before (a compiled
    graph's) still runs, and ``prepare`` finds the registered op, which still computes the update."""
    nf4_kernel.prepare()
    registered, unavailable = list(nf4_kernel._OP), list(nf4_kernel._UNAVAILABLE)
    handle, sum_handle = torch.ops.lightning_lora.linear_plus_update.default, torch.ops.lightning_lora.matmul_sum.default
    torch.manual_seed(2)
    x, w, a, b = (torch.randn(s) for s in ((16, 8), (12, 8), (4, 8), (12, 4)))
    bias = torch.randn(12)
    try:
        module = importlib.reload(nf4_kernel)
        assert not module.linear_plus_update_ready()  # a fresh module: prepare looks the op up again
        torch.testing.assert_close(handle(x, w, bias, a, b, 0.25)[1], x @ a.t())  # not unregistered meanwhile
        g, gh = torch.randn(16, 12), torch.randn(16, 4)
        torch.testing.assert_close(sum_handle(g, w, gh, a), g @ w + gh @ a)
        module.prepare()
        assert module.linear_plus_update_ready()
        assert module._LINEAR[0]["linear_plus_update"] is handle and module._LINEAR[0]["matmul_sum"] is sum_handle
        got, h = module.linear_plus_update(x, w, bias, a, b, 0.25)
        torch.testing.assert_close(h, x @ a.t())
        torch.testing.assert_close(got, x @ w.t() + bias + 0.25 * (x @ a.t()) @ b.t())
    finally:
        importlib.reload(nf4_kernel)
        nf4_kernel._OP[:], nf4_kernel._UNAVAILABLE[:] = registered, unavailable
        nf4_kernel.prepare()


@pytest.mark.parametrize("schema, old, new", [("_LINEAR_SCHEMA", "Tensor a,", "Tensor h,"), ("_SUM_SCHEMA", "Tensor h,", "Tensor grad_h,")])
def test_op_registered_with_another_schema_is_not_used(monkeypatch, schema, old, new) -> None:
    """An op of that name with another schema (another version of this module in the process) is refused by
    ``prepare``, which then keeps the functional route, rather than called with the wrong arguments."""
    nf4_kernel.prepare()
    monkeypatch.setattr(nf4_kernel, schema, getattr(nf4_kernel, schema).replace(old, new))
    with pytest.raises(RuntimeError, match="another schema"):
        nf4_kernel._build_linear()
    monkeypatch.setattr(nf4_kernel, "_LINEAR", [])
    nf4_kernel.prepare()
    assert not nf4_kernel.linear_plus_update_ready()
