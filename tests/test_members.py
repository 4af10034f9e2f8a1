"""_members.member: the object getattr returns, in every state a module's parameter or submodule can be in."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_lora._members import member


def test_registered_parameters_and_submodules_are_the_objects_getattr_returns() -> None:
    torch.manual_seed(0)
    outer = nn.Sequential()
    outer.inner = nn.Linear(4, 3, bias=False)
    for module, name in ((outer, "inner"), (outer.inner, "weight"), (outer.inner, "bias")):
        assert member(module, name) is getattr(module, name)
    assert member(outer.inner, "bias") is None  # registered as None
    outer.inner = None  # a registered submodule set to None
    assert "inner" in outer._modules and member(outer, "inner") is None
    assert member(outer, "missing") is None  # what getattr(module, name, None) gives


def test_plain_attributes_and_replaced_parameters_go_through_getattr() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    # FSDP1 (flat parameters without use_orig_params) puts a plain tensor in the parameter's place.
    view = linear.weight.detach().clone()
    del linear.weight
    linear.weight = view
    assert "weight" not in linear._parameters and member(linear, "weight") is view
    linear.note = "plain"
    assert member(linear, "note") == "plain"


def test_a_parametrized_weight_is_the_parametrized_value() -> None:
    class Double(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight * 2

    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    original = linear.weight.detach().clone()
    parametrize.register_parametrization(linear, "weight", Double())
    torch.testing.assert_close(member(linear, "weight"), original * 2, rtol=0, atol=0)


def test_torch_func_functional_call_swaps_what_member_reads() -> None:
    from torch.func import functional_call

    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    swapped = torch.zeros(3, 4)
    seen = []

    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(member(member(self, "linear"), "weight"))
            return x

    functional_call(Reader(), {"linear.weight": swapped}, (torch.ones(1),))
    assert seen[0] is swapped
    assert member(linear, "weight") is linear._parameters["weight"] and not torch.equal(linear.weight, swapped)
