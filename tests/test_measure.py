"""Tests of lightning_lora.measure: rank 0 of W under torch's fake process group, on the CPU, against the estimator's FSDP terms."""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from _processes import ForkServer, Queue
from lightning_lora import measure as measure_module
from lightning_lora.estimate import estimate_memory
from lightning_lora.measure import MeasuredMemory, _device, _make_spec, measure_memory

pytest.importorskip("bitsandbytes")

# Multiples of 32 (bitsandbytes' CPU kernels), q width (4 x 32) != hidden, GQA, untied head.
TINY = dict(
    hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=160, vocab_size=128
)
RUN = dict(r=16, batch_size=1, seq_len=32, activation_checkpointing=True, steps=2, device="cpu", timeout=600)
LORA_TENSORS = 2 * 7 * 2  # layers x projections x (A, B)


_MEASURED: dict[str, MeasuredMemory] = {}  # a measurement's spec (as JSON) -> what its process measured
_measure_in_a_subprocess = measure_module._measure  # the library's own: the fixture below replaces it in this module


def _measure_once(spec: dict, timeout: float | None, forks: ForkServer) -> MeasuredMemory:
    """``measure._measure``, run once per spec and module (`estimate --measure` below asks for a set-up the fixture
    measured), its ``python -m lightning_lora.measure SPEC`` a fork of the session's warm process: no process group
    and no allocator statistics exist there yet, as in the fresh process ``_measure`` starts."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _MEASURED:
        queue = Queue()
        queue.add("measure", measure_module._command(spec), forks=forks)
        _MEASURED[key] = measure_module._read_result(queue.run(timeout)["measure"])
    return _MEASURED[key]


def test_the_measurement_runs_in_a_process_of_its_own_and_a_timeout_says_what_to_do():
    # _measure itself (the other tests replace it): its process killed at the timeout, the error naming the fix.
    spec = _make_spec(TINY, strategy="fsdp2", num_gpus=2, quantization="nf4", double_quant=True, r=16, target_modules="all-linear",
                      batch_size=1, seq_len=32, activation_checkpointing=True, offload_activations=False, lora_dtype="fp32", steps=2,
                      device="cpu")  # fmt: skip
    assert _measure_in_a_subprocess.__module__ == "lightning_lora.measure"
    with pytest.raises(RuntimeError, match=r"did not finish within `timeout`=0\.05 s; give it more time or a smaller model"):
        _measure_in_a_subprocess(spec, 0.05)


@pytest.fixture(scope="module", autouse=True)
def _each_set_up_measured_once(fork_server):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure_module, "_measure", functools.partial(_measure_once, forks=fork_server))
        yield


@pytest.fixture(scope="module")
def measured(_each_set_up_measured_once) -> dict[tuple[str, int], MeasuredMemory]:
    # Each measurement is its own process (a fork: no imports), on one core: two at a time use both cores of CI.
    runs = [(s, w) for s in ("fsdp2", "fsdp") for w in (2, 4)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda run: measure_memory(TINY, num_gpus=run[1], strategy=run[0], **RUN), runs)
        return dict(zip(runs, results))


def _estimate(strategy: str, world: int):
    return estimate_memory(TINY, strategy=strategy, num_gpus=world, r=16, batch_size=1, seq_len=32, activation_checkpointing=True)


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp"])
@pytest.mark.parametrize("world", [2, 4])
def test_shards_quant_states_and_optimizer_states_match_the_estimator_exactly(measured, strategy, world):
    m, est = measured[(strategy, world)], _estimate(strategy, world)
    assert (m.strategy, m.num_gpus, m.device) == (strategy, world, "cpu")
    frozen = m.sharded_bytes["4bit"] + m.sharded_bytes["frozen"]
    assert frozen == est.base_weights - est.unsharded_weights  # FSDP2 dim-0 chunks / FSDP1 aligned, padded flat units
    assert m.quant_state_bytes == est.unsharded_weights  # block scales and code tables: never sharded
    assert m.sharded_bytes["lora"] == est.lora_params
    # AdamW: exp_avg and exp_avg_sq per LoRA tensor, plus its `step` (a 4-byte tensor kept on the CPU even on CUDA).
    assert m.optimizer_state_bytes == est.optimizer_states + 4 * LORA_TENSORS


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp"])
def test_per_rank_memory_falls_with_the_world_size(measured, strategy):
    two, four = measured[(strategy, 2)], measured[(strategy, 4)]
    for kind in ("4bit", "frozen", "lora"):
        assert four.sharded_bytes[kind] < two.sharded_bytes[kind]
    assert four.quant_state_bytes == two.quant_state_bytes > 0
    assert four.optimizer_state_bytes < two.optimizer_state_bytes
    assert four.step_start_allocated < two.step_start_allocated
    assert four.peak_allocated < two.peak_allocated
    for m in (two, four):
        held = sum(m.sharded_bytes.values()) + m.quant_state_bytes + m.optimizer_state_bytes
        assert held <= m.step_start_allocated < m.peak_allocated
        assert m.peak_reserved is None  # only the CUDA allocator reserves
        assert m.setup_peak_allocated > 0 and m.seconds > 0 and "torch" in m.versions
    # Above the held tensors the peak is what one rank computes with: activations, a layer in flight, the loss.
    assert (two.peak_allocated - two.step_start_allocated) > 0.5 * (four.peak_allocated - four.step_start_allocated)


def test_table_names_the_set_up(measured):
    text = measured[("fsdp2", 2)].table()
    assert "rank 0 of 2 (fsdp2" in text and "quant states (not sharded)" in text and "garbage" in text


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_gpus=1), ["`num_gpus`", "1", "at least 2"]),
        (dict(num_gpus=2, steps=1), ["`steps`", "1", "at least 2"]),
        (dict(num_gpus=2, strategy="ddp"), ["`strategy`", "'ddp'", "'fsdp2'"]),
        (dict(num_gpus=2, quantization="int8"), ["`quantization`", "'int8'", "'nf4'"]),
        (dict(num_gpus=2, activation_checkpointing=False, offload_activations=True), ["`offload_activations`", "`activation_checkpointing`"]),
        (dict(num_gpus=2, device="tpu"), ["`device`", "'tpu'", "'cpu'"]),
        (dict(num_gpus=2, target_modules=["lm_head"]), ["`target_modules`", "'lm_head'"]),
    ],
)
def test_bad_arguments_raise_before_any_process_starts(kwargs, words):
    base = dict(strategy="fsdp2", quantization="nf4", double_quant=True, r=16, target_modules="all-linear", batch_size=1, seq_len=32,
                activation_checkpointing=True, offload_activations=False, lora_dtype="fp32", steps=2, device="cpu")  # fmt: skip
    with pytest.raises(ValueError) as info:
        _make_spec(TINY, **{**base, **kwargs})
    for word in words:
        assert word in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_without_a_gpu_the_default_device_says_what_to_do():
    with pytest.raises(RuntimeError, match="No CUDA GPU is visible: pass device='cpu'"):
        _device(None)


def test_fully_shard_lora_gives_the_embedding_and_head_groups_of_their_own():
    # In the root group they would stay gathered through backward; tied, they must share the root's group.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_lora.sharding import fully_shard_lora

    groups = {}
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())  # rank 0 of 2, no other process
    try:
        mesh = init_device_mesh("cpu", (2,))
        for tied in (False, True):
            model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                 vocab_size=128, tie_word_embeddings=tied))
            fully_shard_lora(model, mesh=mesh)
            groups[tied] = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    finally:
        dist.destroy_process_group()
    assert groups[False] == ["", "lm_head", "model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert groups[True] == ["", "model.layers.0", "model.layers.1"]


# --- lightning-lora estimate --measure ------------------------------------------------------------------


def test_cli_estimate_measure_prints_the_measurement_beside_the_formula(measured, tmp_path, capsys):
    from lightning_lora import cli

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    common = ["estimate", "--model", str(tmp_path), "--r", "16", "--seq-len", "32", "--activation-checkpointing"]
    # The set-up of measured[("fsdp2", 2)]: its measurement is reused, and it is the one printed (another set-up's
    # numbers, e.g. from a flag the CLI dropped, would be measured anew and differ).
    cli.main([*common, "--strategy", "fsdp2", "--num-gpus", "2", "--measure", "--measure-device", "cpu"])
    out = capsys.readouterr().out
    assert "total (peak per GPU)" in out  # the formula's table first
    assert "Measured as rank 0 of 2 (fsdp2, fake process group) on cpu" in out
    assert measured[("fsdp2", 2)].table() in out
    assert "estimate, without the CUDA context" in out and "against the measured peak" in out
    with pytest.raises(SystemExit):
        cli.main([*common, "--measure"])  # strategy 'single': nothing to simulate
    assert "--measure simulates sharding across GPUs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*common, "--strategy", "fsdp", "--num-gpus", "2", "--chunked-ce", "--measure"])
    assert "chunked_ce=False" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.main([*common, "--strategy", "fsdp2", "--num-gpus", "64", "--measure"])
        assert "No CUDA GPU is visible: pass device='cpu'" in capsys.readouterr().err
