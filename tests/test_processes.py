"""``_processes``: a command run as a fork of ``ForkServer`` gives what a process of its own gives; ``Queue`` starts
the ranks of a distributed run with their launcher's variables, together, and stops them when one fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from _processes import ForkServer, Queue, free_ports, rank_env

MODULE = """
import os, signal, sys
how = sys.argv[1]
print("argv", sys.argv[1:], "cwd", os.getcwd(), "main", __name__, flush=True)
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if how == "interrupt":
    raise KeyboardInterrupt
if how == "message":
    sys.exit("a message")
sys.exit(int(how))
"""


def test_a_forked_command_has_its_argv_cwd_output_and_exit_code(tmp_path):
    (tmp_path / "probe_module.py").write_text(MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    queue = Queue()
    cases = {"0": 0, "3": 3, "300": 44, "kill": -9, "interrupt": -2, "message": 1}  # 300: the low 8 bits, as the OS keeps
    with ForkServer(["json"], env=env) as forks:
        for how in cases:
            (tmp_path / how).mkdir()
            queue.add(how, [sys.executable, "-m", "probe_module", how], cwd=tmp_path / how, env=env, forks=forks)
        ended = queue.run(timeout=60)
    assert {how: r.returncode for how, r in ended.items()} == cases
    for how, result in ended.items():
        assert result.stdout.startswith(f"argv ['{how}'] cwd {tmp_path / how} main __main__\n"), result.stdout
    assert "KeyboardInterrupt" in ended["interrupt"].stderr and ended["message"].stderr.endswith("a message\n")  # stderr apart
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "probe_module.py"])  # every output went to its own file
    alone = tmp_path / "alone"
    alone.mkdir()
    with ForkServer([], env=env) as forks:
        assert forks.start([sys.executable, "-m", "probe_module", "5"], str(alone / "out"), cwd=alone).wait(timeout=60) == 5
        assert [p.name for p in alone.iterdir()] == ["out"]  # the server's .pid / .rc notes are gone once read
        with pytest.raises(ValueError, match=r"\['OMP_NUM_THREADS'\] are read when a process starts"):
            forks.start([sys.executable, "-m", "probe_module", "0"], str(alone / "other"), env={**env, "OMP_NUM_THREADS": "7"})


def test_a_server_whose_import_fails_says_so_instead_of_waiting(tmp_path):
    with ForkServer(["no_such_module_here"]) as forks:
        run = forks.start([sys.executable, "-m", "json.tool", "--help"], str(tmp_path / "out"))
        with pytest.raises(RuntimeError, match="(?s)fork server ended before running.*No module named 'no_such_module_here'"):
            run.wait(timeout=60)


SCRIPT = """
import atexit, json, os, sys, threading, time
atexit.register(lambda: print("atexit ran", flush=True))  # the interpreter's shutdown runs in a fork too
threading.Thread(target=lambda: (time.sleep(0.2), print("thread ran", flush=True))).start()  # joined before atexit
main = sys.modules["__main__"]
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "name": __name__, "x": os.environ.get("LL_X"), "gone": "LL_GONE" in os.environ,
                  "own_main": main.__dict__ is globals() and "children" not in globals(), "file": globals().get("__file__")}))
"""


def test_scripts_and_code_run_as_the_interpreter_runs_them_with_their_own_environment(tmp_path):
    script = tmp_path / "sub" / "probe_script.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    env = {**os.environ, "LL_GONE": "1"}
    with ForkServer(["json"], env=env) as forks:
        mine = {k: v for k, v in env.items() if k != "LL_GONE"}
        runs = {"script": forks.start([sys.executable, os.path.relpath(script, tmp_path), "a", "b"], str(tmp_path / "script.out"),
                                      cwd=tmp_path, env={**mine, "LL_X": "1"}),
                "code": forks.start([sys.executable, "-c", SCRIPT, "c"], str(tmp_path / "code.out"), cwd=tmp_path),
                "unchanged": forks.start([sys.executable, "-c", SCRIPT], str(tmp_path / "unchanged.out"))}
        assert all(run.wait(timeout=60) == 0 for run in runs.values())
        with pytest.raises(ValueError, match="ForkServer runs"):
            forks.start([sys.executable, "-u", str(script)], str(tmp_path / "refused.out"))
    lines = {name: (tmp_path / f"{name}.out").read_text().splitlines() for name in runs}
    assert all(text[-2:] == ["thread ran", "atexit ran"] for text in lines.values()), lines
    seen = {name: json.loads(text[0]) for name, text in lines.items()}
    assert seen["script"] == {"argv": [str(script), "a", "b"], "path0": str(script.parent), "name": "__main__", "x": "1", "gone": False,
                              "own_main": True, "file": str(script)}  # fmt: skip
    assert seen["code"] == {"argv": ["-c", "c"], "path0": "", "name": "__main__", "x": None, "gone": True, "own_main": True, "file": None}
    assert seen["unchanged"]["gone"] is True and seen["unchanged"]["x"] is None  # no env: the server's


RANK = """
import json, os, sys, time
from lightning.fabric.utilities.rank_zero import rank_zero_only
names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
print(json.dumps({**{k: os.environ.get(k) for k in names}, "zero_rank": rank_zero_only.rank, "hash": hash("a string")}))
rank, fail = int(os.environ["LOCAL_RANK"]) + int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))), sys.argv[1]
if fail == "fail" and rank == 1:
    time.sleep(0.5)
    sys.exit(7)
if fail == "fail" and rank == 2:
    time.sleep(1.5)
    sys.exit(5)  # fails on its own too, after rank 1
if fail == "fail":
    time.sleep(600)  # a peer waiting for the rank that failed
"""


def test_ranks_start_together_with_their_launchers_variables_and_a_failed_rank_stops_the_others(fork_server):
    assert rank_env("torchrun", 3, 4, 1234, nodes=2) == {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "RANK": "3", "GROUP_RANK": "1",
        "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "3", "ROLE_WORLD_SIZE": "4", "ROLE_NAME": "default",
        "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "False"}
    assert rank_env("lightning", 1, 2, 99) == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0"}
    with pytest.raises(ValueError, match="split evenly"):
        rank_env("torchrun", 0, 3, 1, nodes=2)
    # The session's server (two copies) imported Lightning with no rank in its environment: its rank-zero flag must
    # follow each rank's. A launcher's leftovers in env are replaced, rank by rank.
    forks, ports = fork_server, free_ports(3)
    assert "RANK" not in forks.env and "LOCAL_RANK" not in forks.env
    queue = Queue(stop_peers_after=3)
    queue.add_ranks("lightning", [sys.executable, "-c", RANK, "ok"], world=2, port=ports[0], style="lightning", forks=forks,
                    env=forks.environment(RANK="5", LOCAL_RANK="5"))
    queue.add_ranks("nodes", [sys.executable, "-c", RANK, "ok"], world=2, nodes=2, port=ports[1], style="torchrun", forks=forks)
    queue.add_ranks("failing", [sys.executable, "-c", RANK, "fail"], world=4, port=ports[2], style="torchrun", forks=forks,
                    after=["lightning", "nodes"])
    started = time.monotonic()
    ended = queue.run(timeout=300)
    assert time.monotonic() - started < 40  # not the 600 s the peers of the failed rank would wait
    lines = {name: [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")] for name, result in ended.items()}
    assert ended["lightning"].returncode == ended["nodes"].returncode == 0
    assert [(r["LOCAL_RANK"], r["NODE_RANK"], r["RANK"], r["MASTER_PORT"], r["zero_rank"]) for r in lines["lightning"]] == [
        ("0", "0", None, str(ports[0]), 0), ("1", "0", None, str(ports[0]), 1)]
    assert [(r["RANK"], r["LOCAL_RANK"], r["GROUP_RANK"], r["LOCAL_WORLD_SIZE"], r["zero_rank"]) for r in lines["nodes"]] == [
        ("0", "0", "0", "1", 0), ("1", "0", "1", "1", 1)]
    assert lines["nodes"][0]["hash"] != lines["nodes"][1]["hash"]  # two ranks: two hash seeds, as two fresh processes have
    assert ended["failing"].returncode == 7  # rank 1 failed first; rank 2 failed later; ranks 0 and 3 were stopped
    assert [line for line in ended["failing"].stdout.splitlines() if line.startswith("---")] == [
        "--- rank 0 (exit -9, stopped) ---", "--- rank 1 (exit 7) ---", "--- rank 2 (exit 5) ---", "--- rank 3 (exit -9, stopped) ---"]
    assert ended["failing"].stderr == ended["failing"].stdout
    with pytest.raises(ValueError, match=r"Nothing queued is named \['missing'\]"):
        other = Queue()
        other.add("x", [sys.executable, "-c", "pass"], after="missing")
        other.run(timeout=60)


def test_a_command_past_its_timeout_is_killed_and_its_output_so_far_kept(tmp_path):
    with ForkServer(["json"]) as forks:
        queue = Queue()
        queue.add("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"], forks=forks,
                  stderr=subprocess.STDOUT)
        started = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired) as info:
            queue.run(timeout=3)
    assert time.monotonic() - started < 30 and info.value.output == "started\n"
