"""Several adapters in one model: add / load / switch / disable / delete, PEFT's on-disk layout both ways, per-sample
adapters in one batch (PEFT's ``adapter_names``), training one adapter while the others stay frozen (callback and
mixin), and swapping an adapter's weights into a compiled model without recompiling. PEFT is the test-only oracle.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from _lightning import LlamaLM, MixinLlamaLM, token_loader, trainer
from _models import randomize_adapter, tiny_llama, token_batch
from lightning_lora import LoRACallback, LoRAConfig, adapter_state_dict, disable_lora, inject_lora, load_adapter, save_adapter
from lightning_lora.adapter_io import load_adapters
from lightning_lora.adapters import active_adapter, add_adapter, adapter_names, delete_adapter, per_sample_adapters, set_active_adapter
from lightning_lora.inject import lora_state
from lightning_lora.layers import lora_layers

SQL = LoRAConfig(r=8, alpha=8, target_modules=["q_proj", "k_proj", "o_proj"])
CHAT = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)


def _saved(tmp_path, name: str, config: LoRAConfig, seed: int):
    """A single-adapter model with random adapter values, saved to ``tmp_path / name``; returns (model, directory)."""
    model = inject_lora(tiny_llama(), config)
    randomize_adapter(model, seed=seed)
    save_adapter(model, tmp_path / name)
    return model.eval(), tmp_path / name


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def test_load_switch_disable_delete_and_peft_agrees(tmp_path):
    sql, sql_dir = _saved(tmp_path, "sql", SQL, seed=1)
    chat, chat_dir = _saved(tmp_path, "chat", CHAT, seed=2)
    x = token_batch()
    model = load_adapter(tiny_llama(), sql_dir, adapter_name="sql").eval()
    load_adapter(model, chat_dir, adapter_name="chat")
    assert adapter_names(model) == ["sql", "chat"] and active_adapter(model) == "sql"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{path}.adapters.sql.lora_{ab}.weight" for path in lora_state(model).plans["sql"].layers for ab in "ab"}
    peft = PeftModel.from_pretrained(tiny_llama(), sql_dir, adapter_name="sql").eval()
    peft.load_adapter(str(chat_dir), adapter_name="chat")
    assert torch.equal(_logits(model, x), _logits(sql, x))
    assert_close_scaled(_logits(model, x), _logits(peft, x))
    set_active_adapter(model, "chat")
    peft.set_adapter("chat")
    assert torch.equal(_logits(model, x), _logits(chat, x))  # DoRA, in a holder, on layers shared with 'sql'
    assert_close_scaled(_logits(model, x), _logits(peft, x))
    with disable_lora(model):
        assert torch.equal(_logits(model, x), _logits(tiny_llama().eval(), x))
    with pytest.raises(ValueError, match="is the active adapter and cannot be deleted: make another one active first"):
        delete_adapter(model, "chat")
    delete_adapter(model, "sql")
    assert adapter_names(model) == ["chat"]
    assert not [key for key in model.state_dict() if ".sql." in key]
    assert {type(m).__name__ for m in model.model.layers[0].self_attn.k_proj.modules()} == {"LoRALinear", "Linear", "Identity", "ModuleDict"}
    assert torch.equal(_logits(model, x), _logits(chat, x))


def test_add_adapter_to_an_injected_model_keeps_the_default_keys():
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    keys = set(adapter_state_dict(model))
    add_adapter(model, "extra", LoRAConfig(r=2, target_modules="all-linear"))
    assert set(adapter_state_dict(model)) == keys  # the active adapter's, as a single-adapter model keys them
    extra = set(adapter_state_dict(model, "extra"))
    assert len(extra) == 2 * 7 * 2 and all(".adapters.extra.lora_" in key for key in extra)
    assert not any("lora_a.adapters" in key or ".lora_a.lora_" in key for key in extra)  # all-linear saw base layers only
    x = token_batch()
    randomize_adapter(model, seed=4)  # the active adapter, 'default'
    expected = _logits(model, x)
    with torch.no_grad():
        for tensor in adapter_state_dict(model, "extra").values():
            tensor.normal_()
    assert torch.equal(_logits(model, x), expected)  # an inactive adapter changes nothing ...
    set_active_adapter(model, "extra")
    assert not torch.allclose(_logits(model, x), expected)  # ... until it is made active
    set_active_adapter(model, "default")
    assert torch.equal(_logits(model, x), expected)


def test_our_multi_adapter_layout_loads_in_peft_and_peft_layout_loads_here(tmp_path):
    x = token_batch()
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model, seed=1)
    add_adapter(model, "sql", SQL)
    set_active_adapter(model, "sql")
    randomize_adapter(model, seed=2)
    save_adapter(model, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "sql"]
    assert sorted(p.name for p in (tmp_path / "ours" / "sql").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    peft.load_adapter(str(tmp_path / "ours"), adapter_name="sql", subfolder="sql")
    model.eval()
    for name in ("default", "sql"):
        set_active_adapter(model, name)
        peft.set_adapter(name)
        assert_close_scaled(_logits(peft, x), _logits(model, x))
    # PEFT -> ours: two adapters by get_peft_model + add_adapter, saved by save_pretrained
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.add_adapter("chat", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        for i, (name, param) in enumerate(peft.named_parameters()):
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    peft.save_pretrained(tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match=r"Its subfolders \['chat'\] hold named adapters: load them with load_adapters"):
        load_adapter(tiny_llama(), _only_named(tmp_path))
    ours = load_adapters(tiny_llama(), tmp_path / "peft").eval()
    assert adapter_names(ours) == ["default", "chat"] and lora_state(ours).plans["chat"].config.use_dora
    peft.eval()
    for name in ("default", "chat"):
        set_active_adapter(ours, name)
        peft.set_adapter(name)
        assert_close_scaled(_logits(ours, x), _logits(peft, x))


def test_per_sample_adapters_match_peft_adapter_names(tmp_path):
    _, a_dir = _saved(tmp_path, "a", LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    _, b_dir = _saved(tmp_path, "b", SQL, seed=2)
    model = load_adapter(tiny_llama(), a_dir, adapter_name="a").eval()
    load_adapter(model, b_dir, adapter_name="b")
    peft = PeftModel.from_pretrained(tiny_llama(), a_dir, adapter_name="a").eval()
    peft.load_adapter(str(b_dir), adapter_name="b")
    names = ["b", "__base__", "a", "b"]
    x = token_batch(batch=4)
    with per_sample_adapters(model, names):
        mixed = _logits(model, x)
    with torch.no_grad():
        assert_close_scaled(mixed, peft(x, adapter_names=names).logits)
    assert active_adapter(model) == "a" and all(layer.sample_adapters is None for layer in lora_layers(model).values())
    # each row is what its adapter alone computes for it (DoRA too, which PEFT refuses in mixed batches)
    load_adapter(model, tmp_path / "a", adapter_name="c")
    add_adapter(model, "d", CHAT)
    set_active_adapter(model, "d")
    randomize_adapter(model, seed=5)
    names = ["d", "a", "d"]
    x = token_batch(batch=3)
    with per_sample_adapters(model, names):
        mixed = _logits(model, x)
    for row, name in enumerate(names):
        set_active_adapter(model, name)
        assert_close_scaled(mixed[row], _logits(model, x[row : row + 1])[0])
    with pytest.raises(ValueError, match="The batch has 3 samples but the per-sample adapter list names 2"), per_sample_adapters(model, ["a", "d"]):
        model(x)


def test_callback_trains_one_adapter_while_the_loaded_one_stays_frozen(tmp_path):
    _, frozen_dir = _saved(tmp_path, "frozen", LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)

    class WithLoadedAdapter(LlamaLM):
        def configure_model(self):
            if self.model is None:
                self.model = load_adapter(tiny_llama(), frozen_dir)  # the backbone comes with adapter 'default'

    module = WithLoadedAdapter(build_in="configure_model")
    callback = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], backbone="model", adapter_name="sql", export_dir=str(tmp_path / "export"))
    from lightning.pytorch.callbacks import ModelCheckpoint

    t = trainer(3, [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], enable_checkpointing=True)
    t.fit(module, token_loader(n=12))
    frozen = load_adapter(tiny_llama(), frozen_dir)
    assert active_adapter(module.model) == "sql"
    for key, value in adapter_state_dict(frozen).items():
        assert torch.equal(adapter_state_dict(module.model, "default")[key], value), key  # untouched
    trained = adapter_state_dict(module.model, "sql")
    assert all(torch.count_nonzero(v) for k, v in trained.items() if "lora_b" in k)  # it trained
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.{key}" for key in trained}
    assert checkpoint["lightning_lora"]["adapter_name"] == "sql"
    exported = load_adapter(tiny_llama(), tmp_path / "export" / "adapter" / "sql")  # PEFT's layout: a named subfolder
    for key, value in adapter_state_dict(exported).items():
        assert torch.equal(trained[key.replace(".lora_", ".adapters.sql.lora_")], value), key


def test_mixin_trains_its_named_adapter():
    class Named(MixinLlamaLM):
        lora_adapter_name = "task-2"

    module = Named(LoRAConfig(r=4, target_modules=["q_proj"]), build_in="init")
    trainer(2).fit(module, token_loader(n=8))
    assert adapter_names(module.model) == ["task-2"]
    assert {name for name, p in module.named_parameters() if p.requires_grad} == {
        f"model.model.layers.{i}.self_attn.q_proj.adapters.task-2.lora_{ab}.weight" for i in range(2) for ab in "ab"
    }


def test_swapping_adapter_weights_into_a_compiled_model_does_not_recompile(tmp_path):
    one, one_dir = _saved(tmp_path, "one", CHAT, seed=1)
    two, two_dir = _saved(tmp_path, "two", CHAT, seed=2)
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(len(graph_module.graph.nodes))
        return graph_module.forward

    torch._dynamo.reset()
    model = load_adapter(tiny_llama(), one_dir).eval()
    compiled = torch.compile(model, backend=counting_backend)
    x = token_batch()
    with torch.no_grad():
        first = compiled(x).logits
        assert_close_scaled(first, _logits(one, x))
        count = len(compiles)
        assert count >= 1
        load_adapter(compiled, two_dir)  # into the same adapter, in place
        second = compiled(x).logits
    assert len(compiles) == count  # no recompilation
    assert_close_scaled(second, _logits(two, x))
    assert not torch.allclose(first, second)


def test_checkpoint_written_before_dora_and_named_adapters_still_resumes(tmp_path):
    # Checkpoints of earlier versions lack `use_dora` in their LoRA config and the adapter's name: they mean the
    # defaults (False, 'default'), and the keys of single-adapter runs are unchanged.
    callback = lambda: LoRACallback(r=4, target_modules=["q_proj", "v_proj"], backbone="model")  # noqa: E731
    module = LlamaLM(build_in="init")
    t = trainer(1, [callback()])
    t.fit(module, token_loader(n=8))
    t.save_checkpoint(tmp_path / "old.ckpt")
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.model.layers.{i}.self_attn.{n}.lora_{ab}.weight" for i in range(2) for n in ("q_proj", "v_proj") for ab in "ab"}
    del checkpoint["lightning_lora"]["lora_config"]["use_dora"], checkpoint["lightning_lora"]["adapter_name"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed = LlamaLM(build_in="init")
    trainer(2, [callback()]).fit(resumed, token_loader(n=8), ckpt_path=str(tmp_path / "old.ckpt"))
    assert active_adapter(resumed.model) == "default"


def _only_named(tmp_path):
    """A directory in PEFT's layout with no 'default' adapter: only the subfolder 'chat'."""
    import shutil

    shutil.copytree(tmp_path / "peft" / "chat", tmp_path / "named" / "chat")
    return tmp_path / "named"
