"""The LoRA layer: its math, its init, and parity with PEFT (test-only oracle) on whole models.

PEFT comparisons build the base model twice from the same seed, inject ours and PEFT's, copy our
adapter (with a random, non-zero B) into PEFT's, then compare the output and the gradient of every
trainable tensor in float32 with rtol 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from _models import (
    copy_adapter_into_peft,
    peft_param_name,
    randomize_adapter,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)
from lightning_lora import LoRAConfig, LoRALinear, inject_lora
from lightning_lora.inject import lora_state
from lightning_lora.layers import lora_layers

PARITY = {"rtol": 1e-5, "atol": 1e-6}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "") -> None:
    """assert_close with rtol, and atol = rtol x the largest magnitude of ``expected``.

    Our layer fuses ``out + scale * h @ B^T`` into one addmm where PEFT adds separately, so float32
    rounding differs by ~1 ulp per op; through a backward pass that shows up on entries near zero.
    """
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _randomize_b(layer: LoRALinear, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=generator))


def test_layer_shapes_scale_and_zero_init():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_a.weight.shape == (4, 64)
    assert layer.lora_b.weight.shape == (32, 4)
    assert layer.scale == 2.0
    assert LoRALinear(nn.Linear(64, 32), r=4, alpha=8, use_rslora=True).scale == 4.0  # 8 / sqrt(4)
    assert torch.count_nonzero(layer.lora_b.weight) == 0
    assert torch.count_nonzero(layer.lora_a.weight) == 4 * 64
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a=sqrt(5), as nn.Linear
    assert layer.lora_a.weight.abs().max() <= bound
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), base(x))


def test_layer_forward_is_base_plus_scaled_update():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=4, alpha=12, dropout=0.0)
    _randomize_b(layer)
    x = torch.randn(2, 7, 64)
    a, b = layer.lora_a.weight, layer.lora_b.weight
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), 3.0 * b @ a)


def test_layer_on_conv1d_uses_transposed_weight():
    torch.manual_seed(0)
    base = Conv1D(96, 64)  # nf=96 outputs, nx=64 inputs; weight stored (in, out) = (64, 96)
    nn.init.normal_(base.bias)
    layer = LoRALinear(base, r=4, alpha=4)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (64, 96, True)
    _randomize_b(layer)
    x = torch.randn(2, 3, 64)
    expected = x @ base.weight + base.bias + x @ layer.lora_a.weight.T @ layer.lora_b.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.merged_weight(), base.weight + layer.delta_weight().T)


def test_layer_casts_the_adapter_not_the_activation():
    torch.manual_seed(0)
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    _randomize_b(layer)
    assert layer.lora_a.weight.dtype == torch.float32
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = base(x) + 2.0 * (x @ layer.lora_a.weight.to(torch.bfloat16).T @ layer.lora_b.weight.to(torch.bfloat16).T)
    torch.testing.assert_close(out, expected)


def test_layer_rejects_unsupported_base():
    with pytest.raises(TypeError, match="LoRALinear cannot wrap LayerNorm: supported bases are nn.Linear"):
        LoRALinear(nn.LayerNorm(64), r=4, alpha=8)


@pytest.mark.parametrize(("init", "peft_init"), [("kaiming", True), ("gaussian", "gaussian")])
def test_init_matches_peft_bit_for_bit(init, peft_init):
    # Same seed right before injection -> same A in both libraries (and B is zero in both).
    base = tiny_llama()
    torch.manual_seed(5)
    ours = inject_lora(base, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init=init))
    base = tiny_llama()
    torch.manual_seed(5)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=peft_init))
    peft_params = dict(peft.named_parameters())
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.lora_a.weight, peft_params[peft_param_name(f"{name}.lora_a.weight")], rtol=0, atol=0)
        assert torch.count_nonzero(layer.lora_b.weight) == 0
    if init == "gaussian":
        a = torch.cat([layer.lora_a.weight.flatten() for layer in lora_layers(ours).values()])
        assert abs(a.std().item() - 1 / 4) < 0.02  # std 1/r over 2 layers x (4x64 + 4x64) values
        assert abs(a.mean().item()) < 0.02


# --- parity with PEFT on whole models ---------------------------------------------------------------

LLAMA_QV = ["q_proj", "v_proj"]
PARITY_CASES = {
    "llama-r4": (tiny_llama, {"r": 4, "alpha": 8, "target_modules": LLAMA_QV}),
    "llama-all-linear-r8-a32": (tiny_llama, {"r": 8, "alpha": 32, "target_modules": "all-linear"}),
    "llama-rslora": (tiny_llama, {"r": 16, "alpha": 8, "target_modules": LLAMA_QV, "use_rslora": True}),
    "llama-patterns": (
        tiny_llama,
        {
            "r": 4,
            "alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
            "alpha_pattern": {"q_proj": 3.0},
        },
    ),
    "llama-gaussian": (tiny_llama, {"r": 4, "alpha": 8, "target_modules": LLAMA_QV, "init": "gaussian"}),
    "llama-regex": (tiny_llama, {"r": 4, "alpha": 8, "target_modules": r".*layers\.1\.self_attn\.(k|o)_proj"}),
    "gpt2-conv1d": (tiny_gpt2, {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]}),
    "gpt2-bias-all": (tiny_gpt2, {"r": 4, "alpha": 8, "target_modules": ["c_attn"], "bias": "all"}),
    "bert": (tiny_bert_classifier, {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}),
    "bert-classifier": (
        tiny_bert_classifier,
        {"r": 4, "alpha": 8, "target_modules": ["query", "value", "dense"], "modules_to_save": ["classifier"]},
    ),
    "bert-bias-all": (tiny_bert_classifier, {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "bias": "all"}),
    "bert-bias-lora-only": (
        tiny_bert_classifier,
        {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "bias": "lora_only", "modules_to_save": ["classifier"]},
    ),
}


def peft_config_for(kwargs: dict, fan_in_fan_out: bool = False, **extra) -> LoraConfig:
    """The PEFT LoraConfig equivalent to ``LoRAConfig(**kwargs)``."""
    config = LoRAConfig(**kwargs)
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        bias=config.bias,
        modules_to_save=config.modules_to_save,
        use_rslora=config.use_rslora,
        rank_pattern=config.rank_pattern,
        alpha_pattern=config.alpha_pattern,
        init_lora_weights=True if config.init == "kaiming" else "gaussian",
        fan_in_fan_out=fan_in_fan_out,
        **extra,
    )


def build_pair(builder, kwargs: dict, seed: int = 1) -> tuple[nn.Module, nn.Module]:
    """Ours and PEFT's on two identical bases, with our random adapter copied into PEFT's."""
    ours = inject_lora(builder(), LoRAConfig(**kwargs))
    randomize_adapter(ours, seed)
    peft = get_peft_model(builder(), peft_config_for(kwargs, fan_in_fan_out=builder is tiny_gpt2))
    copy_adapter_into_peft(ours, peft)
    return ours, peft


def output_and_grads(model: nn.Module, x: torch.Tensor, dropout_seed: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    out = model(x).logits
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_parity(ours: nn.Module, peft: nn.Module, x: torch.Tensor, dropout_seed: int | None = None, rtol: float = 1e-5) -> None:
    to_save = lora_state(ours).modules_to_save
    out, grads = output_and_grads(ours, x, dropout_seed)
    peft_out, peft_grads = output_and_grads(peft, x, dropout_seed)
    assert_close_scaled(out, peft_out, rtol, "output")
    # The same tensors train in both, and each gets the same gradient.
    assert {peft_param_name(name, to_save) for name in grads} == set(peft_grads)
    for name, grad in grads.items():
        assert grad is not None and torch.count_nonzero(grad) > 0, name
        assert_close_scaled(grad, peft_grads[peft_param_name(name, to_save)], rtol, name)


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_forward_and_grads_match_peft(case):
    builder, kwargs = PARITY_CASES[case]
    ours, peft = build_pair(builder, kwargs)
    ours_targets = set(lora_layers(ours))
    peft_targets = {name for name, module in peft.base_model.model.named_modules() if isinstance(module, LoraLayer)}
    assert ours_targets == peft_targets
    for name, layer in lora_layers(ours).items():
        peft_layer = peft.base_model.model.get_submodule(name)
        assert (layer.r, layer.scale) == (peft_layer.r["default"], peft_layer.scaling["default"]), name
    assert_parity(ours, peft, token_batch())


def test_rank_and_alpha_patterns_pick_per_module_values():
    ours, _ = build_pair(tiny_llama, PARITY_CASES["llama-patterns"][1])
    got = {name: (layer.r, layer.scale) for name, layer in lora_layers(ours).items()}
    assert got == {
        "model.layers.0.self_attn.q_proj": (4, 0.75),
        "model.layers.0.self_attn.v_proj": (2, 4.0),
        "model.layers.0.mlp.down_proj": (4, 2.0),
        "model.layers.1.self_attn.q_proj": (4, 0.75),
        "model.layers.1.self_attn.v_proj": (2, 4.0),
        "model.layers.1.mlp.down_proj": (6, 8 / 6),
    }


@pytest.mark.parametrize("builder", [tiny_llama, tiny_bert_classifier], ids=["llama", "bert"])
def test_dropout_matches_peft_with_same_rng(builder):
    kwargs = {"r": 4, "alpha": 8, "dropout": 0.3, "target_modules": ["query", "value"] if builder is tiny_bert_classifier else LLAMA_QV}
    ours, peft = build_pair(builder, kwargs)
    x = token_batch()
    assert_parity(ours, peft, x, dropout_seed=123)
    # Dropout is really active in train mode: another seed changes the output ...
    out_a, _ = output_and_grads(ours, x, dropout_seed=123)
    out_b, _ = output_and_grads(ours, x, dropout_seed=124)
    assert (out_a - out_b).abs().max() > 1e-4
    # ... and in eval mode it is off, in both.
    ours.eval()
    peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, peft(x).logits, **PARITY)


# -- the fused training node (_FusedLoRA) and the inference path ---------------------------------------
def _frozen_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        base = Conv1D(96, 64)  # (nf=out, nx=in)
        nn.init.normal_(base.weight, std=0.05)
        nn.init.normal_(base.bias, std=0.05)
    elif kind == "nf4":
        from lightning_lora import QuantizationConfig
        from lightning_lora.quantization import quantize_linear

        base = quantize_linear(nn.Linear(64, 96), QuantizationConfig(mode="nf4", compute_dtype="float32"))
    else:
        base = nn.Linear(64, 96, bias=kind == "linear_bias")
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _step(layer: LoRALinear, x: torch.Tensor, fused: bool, autocast: bool = False, seed: int = 5) -> list[torch.Tensor]:
    from lightning_lora.layers import fused_training

    with fused_training(layer, fused):
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        torch.manual_seed(seed)  # same dropout mask in both paths
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    assert layer.fused is True  # restored
    return [y.detach(), x.grad, layer.lora_a.weight.grad, layer.lora_b.weight.grad]


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_training_path_equals_unfused_in_float32(kind, dropout):
    layer = LoRALinear(_frozen_base(kind), r=8, alpha=16, dropout=dropout)
    _randomize_b(layer)
    x = torch.randn(3, 5, 64)
    fused, unfused = _step(layer, x, fused=True), _step(layer, x, fused=False)
    for name, a, b in zip(("output", "grad x", "grad A", "grad B"), fused, unfused):
        assert_close_scaled(a, b, rtol=1e-6, name=f"{kind} {name}")


@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_fused_training_path_under_bf16_autocast_matches_dtypes_and_values(kind):
    layer = LoRALinear(_frozen_base(kind), r=8, alpha=16)
    _randomize_b(layer)
    x = torch.randn(4, 64)
    fused, unfused = _step(layer, x, fused=True, autocast=True), _step(layer, x, fused=False, autocast=True)
    for name, a, b in zip(("output", "grad x", "grad A", "grad B"), fused, unfused):
        assert a.dtype == b.dtype, name  # bf16 out of a float base under autocast; bitsandbytes returns x's dtype
        assert_close_scaled(a.float(), b.float(), rtol=1e-2, name=f"{kind} {name}")  # bf16 rounding


def test_hooks_on_the_base_layer_still_run_in_training():
    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8)
    calls = []
    layer.base_layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    layer(torch.randn(2, 64, requires_grad=True)).sum().backward()
    assert calls == [torch.Size([2, 96])]
    from lightning_lora._routes import fusable

    assert not fusable(layer)


def test_input_without_grad_trains_the_adapter_only():
    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8)
    _randomize_b(layer)
    x = torch.randn(2, 64)  # e.g. the first layer's input when the embeddings are frozen
    layer(x).sum().backward()
    assert layer.lora_a.weight.grad is not None and layer.lora_b.weight.grad is not None


def test_inference_follows_weight_updates_that_bypass_the_version_counter():
    # Fused AdamW and bitsandbytes' optimizers write parameters without bumping `_version`: nothing may be cached.
    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8).to(torch.bfloat16)
    layer.lora_a.float(), layer.lora_b.float()  # fp32 adapter on a bf16 base, as under autocast training
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for step in range(3):
        with torch.no_grad():
            a, b = layer.lora_a.weight.bfloat16(), layer.lora_b.weight.bfloat16()
            expected = layer.base_layer(x) + (x @ a.t()) @ b.t() * layer.scale
            assert_close_scaled(layer(x).float(), expected.float(), rtol=2e-2, name=f"step {step}")
            version = layer.lora_b.weight._version
            layer.lora_b.weight.data.copy_(torch.randn_like(layer.lora_b.weight))  # as a fused optimizer writes
            assert layer.lora_b.weight._version == version


def test_inference_cast_follows_a_move_of_the_layer():
    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8).eval()
    _randomize_b(layer)
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        first = layer(x)
        layer.lora_a.weight.data = layer.lora_a.weight.data * 2  # new data under the same Parameter, as .to() does
        second = layer(x)
    update = (x.float() @ layer.lora_a.weight.t() @ layer.lora_b.weight.t()) * layer.scale
    assert_close_scaled(second.float(), layer.base_layer(x).float() + update, rtol=2e-2)
    assert not torch.equal(first, second)


def test_layer_built_under_inference_mode_runs_there_and_later_with_grad():
    with torch.inference_mode():
        layer = LoRALinear(_frozen_base("linear").to(torch.bfloat16), r=4, alpha=8)
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        layer(x)  # Lightning validates under inference_mode
    layer = LoRALinear(_frozen_base("linear").to(torch.bfloat16), r=4, alpha=8)
    layer.lora_a.weight.requires_grad_(False), layer.lora_b.weight.requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(3, 64, dtype=torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()  # frozen adapter, input needing grad: nothing left over from inference mode
    assert x.grad is not None


def test_no_grad_forward_in_train_mode_applies_dropout_at_any_batch_size():
    # A reentrant checkpoint runs the training forward under no_grad: dropout must act as in training.
    layer = LoRALinear(_frozen_base("linear"), r=8, alpha=16, dropout=0.5).train()
    _randomize_b(layer)
    for tokens in (4, 400):
        x = torch.randn(tokens, 64)
        torch.manual_seed(7)
        with torch.no_grad():
            out = layer(x)
        torch.manual_seed(7)
        with torch.no_grad():
            expected = layer.base_layer(x) + (layer.dropout(x) @ layer.lora_a.weight.t() @ layer.lora_b.weight.t()) * layer.scale
        assert_close_scaled(out, expected, rtol=1e-5, name=f"{tokens} tokens")


def test_forward_hook_on_the_base_keeps_the_unmodified_base_output():
    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8).eval()
    _randomize_b(layer)
    captured = []
    layer.base_layer.register_forward_hook(lambda module, args, out: captured.append(out))
    x = torch.randn(3, 64)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(captured[0], x @ layer.base_layer.weight.t())  # what the base computed
    assert not torch.equal(out, captured[0])


def test_backward_hook_on_the_base_runs_in_training():
    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8)
    calls = []
    layer.base_layer.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(1))
    layer(torch.randn(2, 64, requires_grad=True)).sum().backward()
    assert calls == [1]


def test_torch_func_grad_through_the_layer():
    from torch.func import functional_call, grad

    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8)
    _randomize_b(layer)
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    x = torch.randn(5, 64)
    grads = grad(lambda p: functional_call(layer, p, (x,)).pow(2).sum())(params)
    layer(x).pow(2).sum().backward()
    for name, value in grads.items():
        assert_close_scaled(value, layer.get_parameter(name).grad, rtol=1e-5, name=name)


def test_float64_input_under_autocast_keeps_float64():
    layer = LoRALinear(_frozen_base("linear").double(), r=4, alpha=8).double()
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.base_layer(x).dtype == torch.float64  # autocast leaves float64 alone
        assert layer(x).dtype == torch.float64
        with torch.no_grad():
            assert layer(torch.randn(400, 64, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d", "nf4"])
def test_inference_with_many_tokens_folds_the_update_into_the_weight(kind, monkeypatch):
    from lightning_lora import _routes

    layer = LoRALinear(_frozen_base(kind), r=8, alpha=16).eval()
    _randomize_b(layer)
    folds = []
    frozen_weight = _routes._frozen_weight
    monkeypatch.setattr(_routes, "_frozen_weight", lambda *args: folds.append(1) or frozen_weight(*args))
    x = torch.randn(400, 64)  # 400 x (64 + 2 x 96) elements of activations > (2 or 3) x 64 x 96 of weight
    with torch.no_grad():
        folded = layer(x)
        assert folds, "the many-token forward should add the update to the weight"
        per_row = torch.cat([layer(row[None]) for row in x[:8]])  # one token: the update goes to the output
    assert len(folds) == 1
    assert_close_scaled(folded[:8], per_row, rtol=1e-5, name=kind)
    with torch.no_grad():
        expected = layer.base_layer(x) + (x @ layer.lora_a.weight.t() @ layer.lora_b.weight.t()) * layer.scale
    assert_close_scaled(folded, expected, rtol=1e-5, name=kind)


def test_wrapped_adapters_are_called_not_read():
    # FSDP1 units (lora_fsdp_policy) hold the full A / B weights only inside their own forward: the layer
    # must call the wrapped modules, on every path, and compute what the plain layer computes.
    class Unit(nn.Module):
        def __init__(self, inner: nn.Linear) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    plain = LoRALinear(_frozen_base("linear_bias"), r=4, alpha=8)
    _randomize_b(plain)
    x = torch.randn(5, 64, requires_grad=True)
    expected = plain(x)
    expected.sum().backward()
    wrapped = LoRALinear(_frozen_base("linear_bias"), r=4, alpha=8)
    wrapped.load_state_dict(plain.state_dict())
    wrapped.lora_a, wrapped.lora_b = Unit(wrapped.lora_a), Unit(wrapped.lora_b)
    x2 = x.detach().clone().requires_grad_(True)
    out = wrapped(x2)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(wrapped.lora_a.inner.weight.grad, plain.lora_a.weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(torch.randn(400, 64)).shape, torch.Size([400, 96]))
    assert wrapped.lora_a.calls == wrapped.lora_b.calls == 2


# -- the guards are checked on every call: nothing about hooks, dtypes, transforms or adapters is remembered -----------
def _call(layer: LoRALinear, x: torch.Tensor, training: bool) -> torch.Tensor:
    if training:
        return layer(x.clone().requires_grad_(True))
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("kind", ["linear", "nf4"])
@pytest.mark.parametrize("route", ["no_grad", "no_grad_fold", "training"])
@pytest.mark.parametrize("scope", ["module", "global"])
def test_a_hook_added_after_the_first_call_sees_the_base_run_and_its_output_kept(kind, route, scope):
    from torch.nn.modules.module import register_module_forward_hook

    # Train mode without dropout: the same math, and on CPU a 4-bit base takes its direct no-grad route only there.
    layer = LoRALinear(_frozen_base(kind), r=4, alpha=8).train()
    _randomize_b(layer)
    x = torch.randn(400 if route == "no_grad_fold" else 3, 64)
    first = _call(layer, x, route == "training")  # the fast route: fused node, weight fold or direct 4-bit op
    seen = []

    def hook(module, args, out):
        if module is layer.base_layer:
            seen.append(out.detach())  # the output itself, not a copy: an in-place add into it would show

    handle = layer.base_layer.register_forward_hook(hook) if scope == "module" else register_module_forward_hook(hook)
    try:
        second = _call(layer, x, route == "training")
    finally:
        handle.remove()
    with torch.no_grad():
        base = layer.base_layer(x)
    assert len(seen) == 1, "a hook added after the first call must see the base layer run"
    torch.testing.assert_close(seen[0], base, rtol=0, atol=0)  # left as the base computed it
    assert_close_scaled(second.detach(), first.detach(), rtol=1e-5, name=f"{kind} {route}")
    assert not torch.equal(second.detach(), base)  # the adapter is in it


@pytest.mark.parametrize("route", ["no_grad", "no_grad_fold", "training"])
@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
def test_a_dtype_change_after_the_first_call_is_cast_for(route, kind):
    layer = LoRALinear(_frozen_base(kind), r=4, alpha=8)
    _randomize_b(layer)
    x = torch.randn(400 if route == "no_grad_fold" else 3, 64)
    _call(layer, x, route == "training")  # float32 throughout: nothing to cast
    layer.base_layer.double()  # the base moves, the float32 adapter stays: it is cast for the float64 input
    x = x.double()
    out = _call(layer, x, route == "training")
    assert out.dtype == torch.float64
    a, b = layer.lora_a.weight.double(), layer.lora_b.weight.double()
    with torch.no_grad():
        expected = layer.base_layer(x) + (x @ a.t() @ b.t()) * layer.scale
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)
    if route == "training":
        out.sum().backward()
        assert layer.lora_a.weight.grad.dtype == layer.lora_b.weight.grad.dtype == torch.float32
    layer.to(torch.bfloat16)  # then the whole layer in bf16, and a bf16 input
    x = x.bfloat16()
    out = _call(layer, x, route == "training")
    assert out.dtype == torch.bfloat16
    a, b = layer.lora_a.weight.float(), layer.lora_b.weight.float()
    with torch.no_grad():
        expected = layer.base_layer(x).float() + (x.float() @ a.t() @ b.t()) * layer.scale
    assert_close_scaled(out.detach().float(), expected, rtol=2e-2, name=f"{kind} {route} bf16")


def test_a_torch_func_transform_after_the_first_call_turns_the_fused_node_off():
    from torch.func import functional_call, grad

    from lightning_lora import _routes

    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8)
    _randomize_b(layer)
    x = torch.randn(5, 64)
    layer(x).pow(2).sum().backward()  # the fused node
    assert _routes.fusable(layer) and not _routes._functorch_active()
    seen = []

    def loss(params):
        seen.append((_routes._functorch_active(), _routes.fusable(layer)))
        return functional_call(layer, params, (x,)).pow(2).sum()

    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    grads = grad(loss)(params)
    assert seen == [(True, False)]  # inside the transform: plain ops (the node defines no vmap rule)
    for name, value in grads.items():
        assert_close_scaled(value, layer.get_parameter(name).grad, rtol=1e-5, name=name)
    assert _routes.fusable(layer)  # and back once it is over


def test_switching_and_deleting_adapters_after_the_first_call():
    layer = LoRALinear(_frozen_base("linear"), r=4, alpha=8)
    _randomize_b(layer)
    other = layer.add_adapter("other", r=2, alpha=8)
    nn.init.normal_(other.lora_b.weight)

    def update(adapter: nn.Module) -> torch.Tensor:
        return (x @ adapter.lora_a.weight.t() @ adapter.lora_b.weight.t()) * adapter.scale

    x = torch.randn(3, 64)
    with torch.no_grad():
        base = layer.base_layer(x)
        assert_close_scaled(layer(x), base + update(layer), rtol=1e-5, name="default")
        layer.active_adapter = "other"
        assert_close_scaled(layer(x), base + update(other), rtol=1e-5, name="other")
        layer.delete_adapter("other")
        assert torch.equal(layer(x), base)  # the active adapter is gone: the base alone
        layer.active_adapter = "default"
        layer.delete_adapter("default")
        assert torch.equal(layer(x), base)
    assert layer.get_adapter("default") is None and layer.get_adapter("other") is None
