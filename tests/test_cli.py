"""Tests for the lightning-lora command: fit end to end on the tiny CPU config, --print_config for every config,
export (PEFT adapter and merged weights) checked against PEFT, merge, estimate, and the errors of bad configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_lora import cli
from lightning_lora.cli import condense_error

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny-llama-cpu.yaml"


def tiny_config(tmp_path: Path, edit=None, name: str = "tiny.yaml") -> Path:
    """configs/tiny-llama-cpu.yaml made smaller (24 training rows, 3 steps) and writing under ``tmp_path``."""
    config = yaml.safe_load(TINY.read_text())
    config["data"]["init_args"].update(limit=24, val_fraction=0.002)
    config["trainer"].update(max_steps=3, limit_val_batches=1, default_root_dir=str(tmp_path / "run"), enable_progress_bar=False)
    config["trainer"]["callbacks"][0]["init_args"]["export_dir"] = str(tmp_path / "export")
    if edit is not None:
        edit(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One `lightning-lora fit` run of the tiny config, shared by the export and merge tests."""
    tmp_path = tmp_path_factory.mktemp("fit")
    config = tiny_config(tmp_path)
    cli.main(["fit", "--config", str(config)])
    checkpoints = sorted((tmp_path / "run").glob("**/*.ckpt"))
    assert checkpoints == [tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"]
    return {"config": config, "checkpoint": checkpoints[0], "tmp": tmp_path}


def rebuilt(config: Path, checkpoint: Path | None = None):
    """The LightningModule of ``config`` with LoRA injected (and the checkpoint loaded), in eval mode."""
    module, _, callback = cli._build_from_config(str(config))
    callback.controller.maybe_inject(module, torch.device("cpu"))
    if checkpoint is not None:
        cli.load_lora_checkpoint(module, callback, str(checkpoint))
    return module.eval()


def base_model(config: Path):
    """The config's backbone without LoRA, as training started from it (same init_seed)."""
    module, _, _ = cli._build_from_config(str(config))
    return module.model.eval()


TOKENS = torch.randint(0, 30522, (2, 12), generator=torch.Generator().manual_seed(0))


# --- fit -----------------------------------------------------------------------------------------


def test_fit_end_to_end_writes_an_adapter_only_checkpoint_and_a_peft_adapter(fitted: dict[str, Path]) -> None:
    checkpoint = torch.load(fitted["checkpoint"], map_location="cpu", weights_only=True)  # plain types only: no code can run
    keys = set(checkpoint["state_dict"])
    assert keys and all(".lora_a." in k or ".lora_b." in k for k in keys), sorted(keys)[:5]
    assert len(keys) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers
    assert checkpoint["global_step"] == 3
    assert checkpoint["hyper_parameters"]["model"]["model_type"] == "llama"
    adapter = fitted["tmp"] / "export" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (fitted["tmp"] / "run" / "lightning_logs" / "version_0" / "config.yaml").is_file()  # saved with the run


def test_fit_trains_the_adapter(fitted: dict[str, Path]) -> None:
    module = rebuilt(fitted["config"], fitted["checkpoint"])
    lora_b = [p for n, p in module.named_parameters() if n.endswith("lora_b.weight")]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: every B moved


# --- --print_config --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_print_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    assert printed["data"]["class_path"] == source["data"]["class_path"]
    callbacks = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert "lightning_lora.LoRACallback" in callbacks
    assert printed["seed_everything"] == 42


def test_every_config_key_is_commented() -> None:
    for config in CONFIGS:
        for number, line in enumerate(config.read_text().splitlines(), start=1):
            stripped = line.strip().removeprefix("- ")
            if not stripped or stripped.startswith("#"):
                continue
            key, _, value = stripped.partition(":")
            is_section = not value.strip()  # "model:", "init_args:" open a block; "- a.Class" is a list item
            if not is_section and key != "class_path" and "#" not in value:  # a class path names itself
                pytest.fail(f"{config.name}:{number} `{stripped}` has no comment saying what it means")


def test_console_script_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_lora.cli", "--help"], check=False, capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: lightning-lora [-h] {fit,validate,test,predict,export,merge,estimate} ...\n")
    assert "export|merge|estimate" in result.stdout and "--trainer.callbacks.help LoRACallback" in result.stdout


def test_fit_help_points_at_the_callbacks_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--help"])
    assert exit_info.value.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert "list its options with `lightning-lora fit --trainer.callbacks.help LoRACallback`" in out


def test_no_command_prints_the_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: lightning-lora [-h] {fit,")
    assert "give a command" in captured.err


def test_the_entry_point_imports_no_lightning_or_transformers() -> None:
    code = (
        "import sys, lightning_lora.cli as c; c.main(['--help']); "
        "print(sorted(m for m in ('lightning', 'transformers', 'bitsandbytes', 'jsonargparse') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.splitlines()[-1] == "[]"


# --- export ------------------------------------------------------------------------------------------


def test_export_writes_a_peft_adapter_with_identical_outputs(fitted: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "adapter"
    cli.main(["export", "--checkpoint", str(fitted["checkpoint"]), "--config", str(fitted["config"]), "--output", str(out)])
    ours = rebuilt(fitted["config"], fitted["checkpoint"])
    peft_model = PeftModel.from_pretrained(base_model(fitted["config"]), str(out)).eval()
    with torch.no_grad():
        expected = ours.model(input_ids=TOKENS).logits
        got = peft_model(input_ids=TOKENS).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(input_ids=TOKENS).logits
    torch.testing.assert_close(got, expected)
    assert (got - plain).abs().max() > 1e-3  # the adapter does change the outputs
    # the exported adapter is the one the callback wrote at the end of fit
    written = json.loads((fitted["tmp"] / "export" / "adapter" / "adapter_config.json").read_text())
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == written["target_modules"]


def test_export_merged_loads_with_from_pretrained(fitted: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    cli.main(
        ["export", "--checkpoint", str(fitted["checkpoint"]), "--config", str(fitted["config"]), "--output", str(out), "--merged"]
    )
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        expected = rebuilt(fitted["config"], fitted["checkpoint"]).model(input_ids=TOKENS).logits
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_base_config_and_adapter_into_a_model_directory(fitted: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    adapter = fitted["tmp"] / "export" / "adapter"
    cli.main(["merge", "--base", str(fitted["config"]), "--adapter", str(adapter), "--output", str(out)])
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        expected = rebuilt(fitted["config"], fitted["checkpoint"]).model(input_ids=TOKENS).logits
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    # and merging into a model directory (the base saved by save_pretrained) gives the same weights
    base_dir = tmp_path / "base"
    base_model(fitted["config"]).save_pretrained(base_dir)
    cli.main(["merge", "--base", str(base_dir), "--adapter", str(adapter), "--output", str(tmp_path / "merged2")])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged2", local_files_only=True).eval()
    for (name, p), q in zip(merged.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(q, p, msg=name)


def test_export_with_the_wrong_config_names_the_problem(fitted: dict[str, Path], tmp_path: Path, capsys) -> None:
    def rank_4(config: dict) -> None:
        config["trainer"]["callbacks"][0]["init_args"]["r"] = 4

    other = tiny_config(tmp_path, rank_4, name="r4.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--checkpoint", str(fitted["checkpoint"]), "--config", str(other), "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "`r`=8" in capsys.readouterr().err


def test_export_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--checkpoint", str(tmp_path / "none.ckpt"), "--config", str(TINY), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "none.ckpt" in err and "does not exist" in err


# --- estimate ----------------------------------------------------------------------------------------


def test_estimate_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightning_lora.estimate")
    config = yaml.safe_load(TINY.read_text())["model"]["init_args"]["model"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    cli.main(["estimate", "--model", str(tmp_path), "--r", "16", "--batch-size", "2", "--seq-len", "128", "--no-double-quant"])
    assert "total (peak per GPU)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["estimate", "--model", str(tmp_path), "--r", "0"])
    assert "`r` must be a positive integer, got 0" in capsys.readouterr().err


# --- bad configs -------------------------------------------------------------------------------------


def _set(path: str, value):
    def edit(config: dict) -> None:
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[leaf] = value

    return edit


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("model.init_args.lrr", 0.1, "model (lightning_lora.tasks.CausalLMModule): Option 'lrr' is not accepted"),
        (
            "model.init_args.lr",
            "fast",
            "model.init_args.lr (lightning_lora.tasks.CausalLMModule): Expected a <class 'float'>. Got value: fast",
        ),
        (
            "trainer.callbacks.0.init_args.r",
            "eight",
            "trainer.callbacks.init_args.r (lightning_lora.LoRACallback): Expected a <class 'int'>. Got value: eight",
        ),
        ("trainer.max_stepz", 3, "max_stepz"),
        ("model.init_args.lr", -1.0, "`lr` must be a positive number, got -1.0"),
        ("trainer.callbacks.0.init_args.quantize", "nf3", "quantize"),
    ],
)
def test_bad_config_values_give_one_clear_line(tmp_path: Path, capsys, path: str, value, expected: str) -> None:
    config = tiny_config(tmp_path, _set(path, value))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Given value" not in err and "Subtypes" not in err and "usage:" not in err  # no jsonargparse dump


def test_condense_error_keeps_plain_messages() -> None:
    assert condense_error("plain problem") == "plain problem"


# --- CPU threads -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 4),  # one process: every CPU it may use
        ({"LOCAL_WORLD_SIZE": "2"}, 2),  # torchrun started 2 processes on this node: half each
        ({"SLURM_NTASKS_PER_NODE": "8"}, 1),  # more processes than CPUs: still one thread each
        ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, None),  # the user's choice wins
    ],
)
def test_cpu_threads_are_shared_between_the_processes_of_a_node(monkeypatch, env: dict, expected) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator

    from lightning_lora.lightning.lora_cli import set_cpu_threads

    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})  # a cpuset of 4 CPUs
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # torch's default: every core of the machine
    assert set_cpu_threads(SimpleNamespace(accelerator=CPUAccelerator())) == expected
    assert calls == ([] if expected is None else [expected])
    assert set_cpu_threads(SimpleNamespace(accelerator=object())) is None  # GPUs: untouched


def test_yaml_reaches_dora_named_adapters_and_inits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_lora import LoRACallback

    source = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny-llama-cpu.yaml").read_text())
    new = {"use_dora": True, "init": "pissa_niter_4", "adapter_name": "sentiment", "convert_init_on_export": True}
    source["trainer"]["callbacks"][0]["init_args"].update(new)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(source))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    init_args = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"][0]["init_args"]
    assert {key: init_args[key] for key in new} == new
    callback = LoRACallback(**init_args)
    assert (callback.lora_config.use_dora, callback.lora_config.init, callback.controller.adapter_name) == (True, "pissa_niter_4", "sentiment")
