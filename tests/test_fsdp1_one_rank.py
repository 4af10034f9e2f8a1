"""FSDP1 on one rank runs NO_SHARD; after a step its frozen units hold plain tensors instead of parameters, and
state_dict lacks them (FSDP's hook then fails). sharding.restore_unsharded_params reshards them (registers them
again); sharding.unsharded_fsdp1_state_dict takes the module's state dict without FSDP's hooks, which
strategies._one_rank_fsdp1_state_dict uses for adapter-only and whole-model checkpoints. Lightning's FSDPStrategy
needs CUDA (tests/gpu and benchmarks/multi_gpu.py cover it through Lightning); this runs torch's FSDP1 on CPU, also
as Lightning sets it up on the GPU (bf16 mixed precision, activation checkpointing, optimizer steps)."""

import json
import sys
import textwrap

import pytest

from _processes import run_side_by_side

# One gloo rank, and the tiny nf4 Llama with LoRA on every linear that both scripts shard.
PRELUDE = textwrap.dedent(
    """
    import atexit, json, torch, torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # gloo can abort at exit otherwise
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType, FullStateDictConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from lightning_lora import LoRAConfig, QuantizationConfig, inject_lora, sharding

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=128)

    def lora_llama():
        return inject_lora(LlamaForCausalLM(config).to(torch.bfloat16), LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
                           QuantizationConfig(mode="nf4", quant_storage="bfloat16", compute_dtype="bfloat16"))
    """
)


# Runs the scripts named after the output path, one after another after the prelude, each in a namespace of its own
# (the prelude's names); prints "RESULT <name> <the script's last line>", or the script's traceback as {"error": ...}.
RUNNER = textwrap.dedent(
    """
    import contextlib, io, sys, traceback
    for name in sys.argv[2:]:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(SCRIPTS[name], dict(globals()))
            print("RESULT", name, out.getvalue().strip().splitlines()[-1], flush=True)
        except Exception:
            print("RESULT", name, json.dumps({"error": traceback.format_exc()}), flush=True)
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fork_server) -> dict:
    """The four scripts below, two to a process (one gloo rank each), the two processes started side by side, each
    a fork of the session's warm process (``python -c``)."""
    full = tmp_path_factory.mktemp("fsdp1") / "full.pt"
    scripts = {"restore": CODE, "strategy": CODE_STRATEGY, "as_lightning": CODE_AS_LIGHTNING, "round_trip": CODE_FULL_ROUND_TRIP}
    code = PRELUDE + f"SCRIPTS = {scripts!r}\n" + RUNNER
    processes = {"restore+strategy": ["restore", "strategy"], "as_lightning+round_trip": ["as_lightning", "round_trip"]}
    results = run_side_by_side({key: [sys.executable, "-c", code, str(full), *names] for key, names in processes.items()}, timeout=300,
                               forks=fork_server)
    return {name: results[key] for key, names in processes.items() for name in names}


def _output(runs: dict, name: str) -> dict:
    result = runs[name]
    lines = [line.split(" ", 2)[2] for line in result.stdout.splitlines() if line.startswith(f"RESULT {name} ")]
    assert lines, f"exit code {result.returncode}: " + result.stderr[-3000:]
    out = json.loads(lines[0])
    assert "error" not in out, out.get("error")
    return out


CODE = textwrap.dedent(
    """
    model = lora_llama()
    before = sorted(model.state_dict())
    root = FSDP(model, auto_wrap_policy=sharding.lora_fsdp_policy({LlamaDecoderLayer}), use_orig_params=True,
                device_id=torch.device("cpu"))

    def full_keys():
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            return sorted(root.state_dict())

    def step():
        x = torch.randint(0, 128, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = root(input_ids=x, labels=x).loss
        loss.backward()

    step()
    try:
        full_keys()
        unpatched = "ok"
    except AssertionError as err:
        unpatched = "FSDP assumes" if "FSDP assumes" in str(err) else str(err)
    restored = sharding.restore_unsharded_params(root)
    keys = full_keys()
    step()  # training goes on after the restore
    sharding.restore_unsharded_params(root)
    again = full_keys()
    print(json.dumps({"strategy": str(root.sharding_strategy), "unpatched": unpatched, "restored": restored,
                      "same_keys": keys == before == again}))
    """
)


def test_restore_unsharded_params_gives_the_whole_state_dict_after_a_step(runs) -> None:
    out = _output(runs, "restore")
    assert out["strategy"] == "ShardingStrategy.NO_SHARD"
    assert out["unpatched"] == "FSDP assumes"  # the fault is real in this torch (if it goes away, so can the helper)
    assert out["restored"] > 0 and out["same_keys"] is True


CODE_STRATEGY = textwrap.dedent(
    """
    import types
    from torch import nn
    from lightning_lora.lightning import checkpoints
    from lightning_lora.lightning.strategies import _one_rank_fsdp1_state_dict

    class Module(nn.Module):  # a LightningModule's layout: the backbone in .model, a trained head outside it
        def __init__(self):
            super().__init__()
            self.model = lora_llama()
            self.head = nn.Linear(128, 2)

        def forward(self, x):
            return self.model(input_ids=x, labels=x).loss + self.head(torch.randn(2, 128)).float().sum()

    module = Module()
    root = FSDP(module, auto_wrap_policy=sharding.lora_fsdp_policy({LlamaDecoderLayer}), use_orig_params=True,
                device_id=torch.device("cpu"))

    def lightning_state_dict():  # what Lightning's FSDPStrategy does for a full state dict
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            return root.state_dict()

    strategy = types.SimpleNamespace(world_size=1, model=root, lightning_module_state_dict=lightning_state_dict)
    keys = checkpoints.adapter_keys(module.model, "model")
    _one_rank_fsdp1_state_dict(strategy, module, lambda: keys)
    x = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = root(x)
    loss.backward()
    try:
        lightning_state_dict()
        unpatched = "ok"
    except AssertionError as err:
        unpatched = "FSDP assumes" if "FSDP assumes" in str(err) else str(err)
    state = strategy.lightning_module_state_dict()
    checkpoint = {"state_dict": dict(state)}
    checkpoints.filter_checkpoint(checkpoint, module.model, backbone="model", adapter_only=True, refuse_nonfinite=True)
    kept = set(checkpoint["state_dict"])
    lora_a = sorted(k for k in keys if k.endswith("lora_a.weight"))[0]
    with FSDP.summon_full_params(root, writeback=False):
        same = bool(torch.equal(state[lora_a], module.get_parameter(lora_a)))
    print(json.dumps({"unpatched": unpatched, "kept_is_adapter_and_head": kept == keys | {"head.weight", "head.bias"},
                      "flat": [k for k in state if "flat_param" in k],
                      "same_values": same,
                      "adapter_keys": len(keys)}))
    """
)


def test_one_rank_fsdp1_checkpoints_the_adapter_and_what_lies_outside_the_backbone(runs) -> None:
    out = _output(runs, "strategy")
    assert out["unpatched"] == "FSDP assumes"
    assert out["kept_is_adapter_and_head"] is True and out["flat"] == [] and out["adapter_keys"] == 2 * 7 * 2
    assert out["same_values"] is True


# As FSDPStrategy runs it on the GPU: bf16 mixed precision, non-reentrant activation checkpointing of the decoder
# layers, AdamW steps; the state dict must hold every tensor the unwrapped model had, frozen ones unchanged.
CODE_AS_LIGHTNING = textwrap.dedent(
    """
    import functools
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    model = lora_llama()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    root = FSDP(model, auto_wrap_policy=sharding.lora_fsdp_policy({LlamaDecoderLayer}), use_orig_params=True,
                device_id=torch.device("cpu"), mixed_precision=MixedPrecision(torch.bfloat16, torch.bfloat16, torch.bfloat16))
    apply_activation_checkpointing(root, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                                   check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    optimizer = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=1e-2)

    def step():
        x = torch.randint(0, 128, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = root(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fsdp_full():
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            return root.state_dict()

    def same(a, b):  # bit for bit: packed 4-bit bytes stored as bf16 hold NaN patterns, which torch.equal calls unequal
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))

    step(); step()
    try:
        fsdp_full()
        unpatched = "ok"
    except AssertionError as err:
        unpatched = "FSDP assumes" if "FSDP assumes" in str(err) else str(err)
    ours = sharding.unsharded_fsdp1_state_dict(root)
    frozen_same = all(same(ours[k], v) for k, v in before.items() if k not in trainable)
    trained = sorted(k for k in trainable if "lora_b" in k)
    moved = all(not same(ours[k], before[k]) for k in trained)
    theirs = fsdp_full()  # after the reshard FSDP's own works too: the same tensors
    agree = set(theirs) == set(ours) and all(same(theirs[k], ours[k]) for k in ours)
    step()
    again = sharding.unsharded_fsdp1_state_dict(root)
    print(json.dumps({"unpatched": unpatched, "same_keys": set(ours) == set(before) == set(again), "frozen_same": frozen_same,
                      "quant_keys": sum(k.endswith(".absmax") for k in ours), "lora_b_moved": moved, "n_lora_b": len(trained),
                      "agrees_with_fsdp": agree}))
    """
)


def test_one_rank_state_dict_without_fsdp_hooks_as_lightning_runs_it(runs) -> None:
    out = _output(runs, "as_lightning")
    assert out["unpatched"] == "FSDP assumes"
    assert out["same_keys"] is True and out["frozen_same"] is True and out["quant_keys"] == 2 * 7
    assert out["n_lora_b"] == 2 * 7 and out["lora_b_moved"] is True
    assert out["agrees_with_fsdp"] is True


# A whole-model checkpoint of a trained one-rank FSDP1 model, read back lazily (as FSDPStrategy.load_checkpoint
# does) into another FSDP1-wrapped model: every packed 4-bit byte and quant-state entry restored, in place.
CODE_FULL_ROUND_TRIP = textwrap.dedent(
    """
    import sys
    from lightning.fabric.utilities.load import _lazy_load

    def wrap(module):
        return FSDP(module, auto_wrap_policy=sharding.lora_fsdp_policy({LlamaDecoderLayer}), use_orig_params=True,
                    device_id=torch.device("cpu"))

    def raw(t):
        return t.contiguous().view(-1).view(torch.uint8)

    torch.manual_seed(0)
    first = wrap(lora_llama())
    optimizer = torch.optim.AdamW([p for p in first.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        x = torch.randint(0, 128, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = {k: v.clone() for k, v in sharding.unsharded_fsdp1_state_dict(first).items()}
    torch.save(saved, sys.argv[1])
    torch.manual_seed(1)  # another base: every frozen byte must come from the file
    second = wrap(lora_llama())
    weights_before = {id(p) for p in second.parameters()}
    differed = sum(not torch.equal(raw(v), raw(saved[k])) for k, v in sharding.unsharded_fsdp1_state_dict(second).items())
    with FSDP.state_dict_type(second, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
        second.load_state_dict(_lazy_load(sys.argv[1]), strict=True)
    loaded = sharding.unsharded_fsdp1_state_dict(second)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        same_logits = torch.equal(first(input_ids=x).logits, second(input_ids=x).logits)
    print(json.dumps({"keys": len(saved), "differed_before": differed,
                      "differ_after": [k for k in saved if not torch.equal(raw(saved[k]), raw(loaded[k]))][:3],
                      "same_parameters": weights_before == {id(p) for p in second.parameters()}, "same_logits": same_logits}))
    """
)


def test_whole_model_checkpoint_of_one_rank_fsdp1_loads_back_into_fsdp1(runs) -> None:
    out = _output(runs, "round_trip")
    assert out["differed_before"] > 50 and out["differ_after"] == [] and out["keys"] > 100
    assert out["same_parameters"] is True and out["same_logits"] is True
