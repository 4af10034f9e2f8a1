"""lightning_lora.lightning.patches: one marker idiom, idempotent per purpose, several purposes on one attribute."""

from __future__ import annotations

import contextlib

from lightning_lora.lightning import patches


class Module:
    def configure_optimizers(self):
        calls.append("original")
        return "optimizer"


calls: list[str] = []


def test_two_patches_of_one_attribute_both_apply_and_each_applies_once():
    calls.clear()
    module = Module()

    @contextlib.contextmanager
    def inside():
        calls.append("enter")
        yield
        calls.append("exit")

    for _ in range(2):  # setup runs once per stage: the second round must change nothing
        patches.run_inside(module, "configure_optimizers", inside, purpose="lora_plus")
        patches.run_before(module, "configure_optimizers", lambda *_: calls.append("check"), purpose="fsdp2_4bit_bytes")
    assert module.configure_optimizers() == "optimizer"
    assert calls == ["check", "enter", "original", "exit"]
    assert patches.is_patched(module.configure_optimizers)
    assert getattr(module.configure_optimizers, patches.MARKER) == {"lora_plus", "fsdp2_4bit_bytes"}


def test_the_same_purpose_is_not_stacked():
    calls.clear()
    module = Module()
    for _ in range(3):
        patches.run_after(module, "configure_optimizers", lambda *_: calls.append("after"))
    module.configure_optimizers()
    assert calls == ["original", "after"]
