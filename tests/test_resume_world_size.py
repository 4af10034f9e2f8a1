"""Resume on another number of ranks, and N ranks trained like one (CPU, gloo, through benchmarks/multi_gpu.py).

The driver (``drive``, as ``main`` runs it) plans every multi-rank group as N one-process "nodes", exactly as on one
shared GPU, where it starts N ``torchrun --nnodes N``; here each rank is a fork of the session's warm process with
the variables torchrun would give it. Each scenario goes through ``Trainer.fit`` + ``LoRACallback`` on a tiny nf4 Llama, 8 steps of a
fixed global batch of 8 sequences (per-rank batch 8 / N), one epoch, an adapter-only checkpoint at step 4
(mid-epoch: the library's ResumableDataLoader counts global batches when the global batch is fixed).

- DDP and FSDP2 (``ModelParallelStrategy`` + ``fully_shard_lora``) at 2 and 4 ranks (and two nodes): first-step
  loss and gradient norm equal to one rank's, the same global batches, clipping by the global norm every step,
  the adapter identical on every rank, the NF4 bytes each layer computed with equal to those before sharding.
- A checkpoint written by W ranks resumes on W' (2 -> 1, 1 -> 2, 4 -> 2) with the adapter, the optimizer state
  (full tensors, by parameter name) and the step exactly as saved, sees the global batches the uninterrupted
  runs saw from the checkpoint on, and ends within rounding of the uninterrupted W'-rank run; on the same
  ranks the resumed run is the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from _processes import Queue, read_at_start

ROOT = Path(__file__).resolve().parents[1]
WRITERS = ("ddp", "fsdp2")
MOVES = ("2->1", "1->2", "4->2")


def _driver():
    spec = importlib.util.spec_from_file_location("multi_gpu", ROOT / "benchmarks" / "multi_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scenario_names_resolve_to_writer_ranks_and_mid_epoch_checkpoint():
    driver = _driver()
    defaults = dict(model=None, seq=None, steps=None, cpu=True, default_model="tiny", default_seq=16)
    spec = driver.resolve("fsdp_sharded_resume@4->2", defaults)
    assert {k: spec[k] for k in ("world", "resume_from", "reference", "start_step", "global_batch", "steps", "steps_per_epoch", "state_dict_type")} == {
        "world": 2, "resume_from": "fsdp_sharded@4", "reference": "fsdp_sharded@2", "start_step": 10, "global_batch": 8, "steps": 20,
        "steps_per_epoch": 20, "state_dict_type": "sharded"}
    assert driver.resolve("fsdp2_70b_resume@2", {**defaults, "model": "tiny"})["global_batch"] == 2  # batch 1 per rank
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        driver.resolve("ddp@3", defaults)
    with pytest.raises(ValueError, match="Unknown scenario 'dpp@2'"):
        driver.resolve("dpp@2", defaults)
    # Few launches: the rank counts others resume from first; a resume may share its writer's launch.
    names = ["single", "ddp@1", "ddp@2", "ddp@4", "ddp_resume@2->1", "ddp_resume@1->2", "ddp_resume@4->2", "ddp_resume@2", "ddp_2node"]
    groups = driver.plan([driver.resolve(n, defaults) for n in names], 0, True, False)
    assert [(g["world"], g["style"], [s["name"] for s in g["specs"]]) for g in groups] == [
        (4, "nodes-shared", ["ddp@4"]), (1, "single", ["single", "ddp@1"]),
        (2, "nodes-shared", ["ddp@2", "ddp_2node", "ddp_resume@1->2", "ddp_resume@4->2", "ddp_resume@2"]), (1, "single", ["ddp_resume@2->1"])]
    with pytest.raises(ValueError, match=r"resume checkpoints no selected scenario writes"):
        driver.plan([driver.resolve("ddp_resume@2->1", defaults)], 0, True, False)


@pytest.fixture(scope="module")
def results(tmp_path_factory, fork_server):
    """The driver's report on every scenario, its ranks started as forks of the session's warm process with the
    variables torchrun gives them (``--nnodes N --nproc_per_node 1`` for N ranks), not by torchrun itself: the
    driver's own launches each paid every rank's imports (test_multi_node_examples runs two real torchrun nodes)."""
    work = tmp_path_factory.mktemp("multi_rank")
    names = ["single", *(f"{t}@{w}" for t in WRITERS for w in (1, 2, 4)), *(f"{t}_resume@{m}" for t in WRITERS for m in MOVES),
             "ddp_resume@2", "fsdp2_resume@2", "ddp_2node"]
    driver = _driver()
    args = driver.parser().parse_args(["--cpu", "--steps", "8", "--work", str(work / "work"), "--out", str(work), "--timeout", "300",
                                       "--only", *names])
    # One thread per rank (the server's OMP_NUM_THREADS=1): each rank is its own one-process "node", so Lightning
    # would give it every core; 4 ranks x 2 threads on a 2-core machine took 10 s for the 8 steps of ddp@4 (1.7 s
    # with one thread each).
    assert fork_server.env["OMP_NUM_THREADS"] == "1"

    def start(rank_cmd, *, world, nodes, gpus_per_node, env, port, log, timeout):
        assert not gpus_per_node
        variables = {k: v for k, v in env.items() if not read_at_start(k)}  # PYTHONUNBUFFERED: only how output is written
        queue = Queue()
        queue.add_ranks("ranks", [sys.executable, *rank_cmd], world=world, nodes=nodes, port=port, style="torchrun", forks=fork_server,
                        env=fork_server.environment(**variables))
        try:
            result = queue.run(timeout)["ranks"]
        except subprocess.TimeoutExpired as err:
            log.write(err.output or "")  # what the ranks had printed, as torchrun's log kept it
            return ["timeout"] * nodes
        log.write(result.stdout)
        return [result.returncode] * nodes

    return driver.drive(args, start=start)["results"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{t}@{w}" for t in WRITERS for w in (2, 4)] + ["ddp_2node"])
def test_n_ranks_train_like_one_rank(results, name):
    result = results[name]
    checks = result["checks"]
    assert result["error"] is None, result.get("log_tail")
    assert result["nf4_layers_checked_per_rank"] == [14] * result["world_size"] and set(result["nf4_bytes_changed_per_rank"]) == {0}
    assert result["adapter_same_on_all_ranks"] is True
    assert checks["same_global_batches"] is True and checks["steps_compared"] == result["steps_run"]
    assert checks["loss_first_abs_diff"] < 1e-5 and checks["grad_norm_first_rel_diff"] < 1e-3  # 4-bit layers compute in bf16
    assert checks["loss_max_abs_diff"] < 1e-3
    assert checks["clipped_steps"] == result["steps_run"] and checks["clip_max_rel_error"] < 1e-4  # the global norm, every step
    if name != "ddp_2node":
        assert result["checkpoints"]["non_adapter_keys"] == [] and result["checkpoints"]["state_dict_keys"] == 28
    else:
        assert result["num_nodes"] == 2 and result["devices_per_node"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("move", MOVES)
def test_checkpoint_resumes_on_another_number_of_ranks(results, writer, move):
    result = results[f"{writer}_resume@{move}"]
    checks = result["checks"]
    assert result["error"] is None, result.get("log_tail")
    assert result["world_size"] == int(move.split("->")[1]) and result["start_step"] == 4 and result["final_step"] == 8
    assert checks["resume_state"] == {"adapter_exact": True, "optimizer_exact": True, "step_exact": True, "saved_step": 4, "restored_step": 4,
                                      "optimizer_tensors": 28, "adapter_max_abs_diff": 0.0}
    assert checks["resume_same_global_batches"] is True
    # Like the uninterrupted run on the new ranks, within what any two rank counts differ by (test above).
    assert checks["continuation_loss_max_abs_diff"] < 1e-3 and checks["continuation_adapter_max_abs_diff"] < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("writer", WRITERS)
def test_resume_on_the_same_ranks_is_bit_exact(results, writer):
    checks = results[f"{writer}_resume@2"]["checks"]
    assert checks["resume_bit_exact"] is True and checks["resume_losses_equal"] is True and checks["resume_same_global_batches"] is True
