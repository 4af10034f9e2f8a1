"""_regex: module paths are matched in bounded time whatever the pattern, with the same results as re."""

from __future__ import annotations

import random
import re
import time

import pytest

from lightning_lora import LoRAConfig, _regex, inject_lora, load_adapter, save_adapter
from lightning_lora._matching import matches_any, pattern_value
from lightning_lora._regex import _Automaton, _parse
from _models import tiny_llama

_ATOMS = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", r"\w", r"\W", r"\s", "(a|b)", "(ab|a)", "(?:a.)", "x", "^", "$", r"\b", r"\B", "[a-c1]", "(a|)"]
_QUANTIFIERS = ["", "*", "+", "?", "{2}", "{1,3}", "*?", "{0,2}"]


def _random_pattern(rng: random.Random, depth: int = 0) -> str:
    out = ""
    for _ in range(rng.randint(1, 4)):
        if depth < 2 and rng.random() < 0.25:
            atom = "(" + _random_pattern(rng, depth + 1) + ("|" + _random_pattern(rng, depth + 1) if rng.random() < 0.5 else "") + ")"
        else:
            atom = rng.choice(_ATOMS)
        out += atom + rng.choice(_QUANTIFIERS)
    return out


def test_the_automaton_agrees_with_re_on_random_patterns():
    rng = random.Random(0)
    checked = 0
    for _ in range(1500):
        pattern = _random_pattern(rng)
        try:
            re.compile(pattern)
        except re.error:
            continue  # the generator makes some invalid ones ("^*")
        tree, flags = _parse(pattern)
        automaton = _Automaton(tree, flags)
        for _ in range(4):
            text = "".join(rng.choice("ab.x1 _") for _ in range(rng.randint(0, 8)))
            assert automaton.fullmatch(text) == (re.fullmatch(pattern, text) is not None), (pattern, text)
            checked += 1
    assert checked >= 2500  # about 2,700 (pattern, path) pairs with this seed


PATH = "model.layers.10.self_attn." + "a" * 40  # a path that drives each pattern below into its worst case

HOSTILE = [r"(a+)+b", r"(a|a)*c", r"(.*)*x", r"(a?){40}a{40}", r"(.*a){15}", r"(\w+\.?)+!", r".*.*.*.*.*.*.*=", r"((a|aa)+)+c"]


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_patterns_match_in_milliseconds(pattern):
    start = time.perf_counter()
    got = _regex.fullmatch(pattern, PATH)
    assert time.perf_counter() - start < 0.5
    assert got == (pattern == r"(.*a){15}")  # the only one that matches this path


def test_plain_patterns_take_re_and_hostile_ones_the_automaton(monkeypatch):
    used = []
    monkeypatch.setattr(_regex, "_automaton", lambda p: used.append(p) or _Automaton(*_parse(p)))
    assert matches_any("model.layers.0.self_attn.q_proj", r".*\.(q_proj|v_proj)")
    assert pattern_value("model.layers.3.mlp.up_proj", {r"layers\.3\..*": 16}, 8) == 16
    assert used == []
    assert not matches_any(PATH, r"(a+)+b")
    assert used == [r"(a+)+b"]


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        (r"(?=(a+)+b)(a+)+c", "cannot be matched in bounded time"),
        (r"(a+)+\1", "cannot be matched in bounded time"),
        ("(" * 300 + "a" + ")" * 300, "levels deep"),
        ("a" * 300_000, "cannot be matched in bounded time"),
    ],
    ids=["lookahead", "backreference", "nested-300", "300k-chars"],
)
def test_patterns_that_cannot_be_bounded_are_refused_by_the_config(pattern, problem):
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        LoRAConfig(target_modules=pattern)
    assert "`target_modules` entry" in str(info.value)


def test_a_hostile_target_regex_in_an_adapter_file_fails_fast(tmp_path):
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    directory = save_adapter(model, tmp_path / "adapter")
    config_path = directory / "adapter_config.json"
    import json

    config = json.loads(config_path.read_text())
    config["target_modules"] = r"(\w+\.?)+!"  # hangs re.fullmatch on every module path of the model
    config_path.write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"matches no linear layer"):
        load_adapter(tiny_llama(), directory)
    assert time.perf_counter() - start < 5.0
