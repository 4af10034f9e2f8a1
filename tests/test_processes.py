"""``_processes.ForkServer``: a ``python -m`` command run as a fork gives what a process of its own gives."""

from __future__ import annotations

import os
import sys

import pytest

from _processes import ForkServer, Queue

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
    cases = {"0": 0, "3": 3, "kill": -9, "interrupt": -2, "message": 1}
    with ForkServer(["json"], env=env) as forks:
        for how in cases:
            (tmp_path / how).mkdir()
            queue.add(how, [sys.executable, "-m", "probe_module", how], cwd=tmp_path / how, env=env, forks=forks)
        ended = queue.run(timeout=60)
    assert {how: r.returncode for how, r in ended.items()} == cases
    for how, result in ended.items():
        assert result.stdout.startswith(f"argv ['{how}'] cwd {tmp_path / how} main __main__\n"), result.stdout
    assert "KeyboardInterrupt" in ended["interrupt"].stdout and ended["message"].stdout.endswith("a message\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "probe_module.py"])  # every output went to its own file
    alone = tmp_path / "alone"
    alone.mkdir()
    with ForkServer([], env=env) as forks:
        assert forks.start([sys.executable, "-m", "probe_module", "5"], str(alone / "out"), cwd=alone).wait(timeout=60) == 5
        assert [p.name for p in alone.iterdir()] == ["out"]  # the server's .pid / .rc notes are gone once read
        with pytest.raises(ValueError, match="runs in the server's environment"):
            forks.start([sys.executable, "-m", "probe_module", "0"], str(alone / "other"), env={**env, "X": "1"})


def test_a_server_whose_import_fails_says_so_instead_of_waiting(tmp_path):
    with ForkServer(["no_such_module_here"]) as forks:
        run = forks.start([sys.executable, "-m", "json.tool", "--help"], str(tmp_path / "out"))
        with pytest.raises(RuntimeError, match="(?s)fork server ended before running.*No module named 'no_such_module_here'"):
            run.wait(timeout=60)
