"""Independent subprocesses of a test module, run side by side instead of one after another.

Most of a short test subprocess is Python importing torch, transformers and Lightning on one core (about 7 s), and
a Lightning launch of two ranks starts its second rank only once the first has imported everything; the suite
itself runs on one core too. So on a 2-core CI machine two such runs take little longer than one. Each result is
the process's own: nothing is shared between them but the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any


class Queue:
    """Commands run as many at a time as there are cores, each started in the order added once the command it
    comes ``after`` has ended.

        queue = Queue()
        queue.add("full", [sys.executable, "train.py", "full"])
        queue.add("resume", [sys.executable, "train.py", "resume"], after="full")
        results = queue.run(timeout=600)  # {"full": CompletedProcess, "resume": CompletedProcess}
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[str, list[str], str | None, Callable[[], None] | None, dict[str, Any]]] = []

    def add(self, name: str, command: list[str], *, after: str | None = None, then: Callable[[], None] | None = None,
            **popen: Any) -> None:
        """Queue ``command``; ``popen``: ``subprocess.Popen``'s env, cwd, ``stderr=subprocess.STDOUT``. ``then()`` is
        called as soon as the command has ended, before the commands ``after`` it start."""
        self._waiting.append((name, command, after, then, popen))

    def run(self, timeout: float) -> dict[str, subprocess.CompletedProcess]:
        """Run everything queued; each result holds the exit code and the output as text. A command still running
        ``timeout`` seconds after it started raises ``subprocess.TimeoutExpired`` (every running one is killed)."""
        results: dict[str, subprocess.CompletedProcess] = {}
        running: dict[str, tuple[subprocess.Popen, Any, Any, float, Callable[[], None] | None]] = {}
        try:
            while self._waiting or running:
                for name, (proc, out, err, started, then) in list(running.items()):
                    if proc.poll() is None:
                        if time.monotonic() - started > timeout:
                            raise subprocess.TimeoutExpired(proc.args, timeout)
                        continue
                    del running[name]
                    stdout, stderr = _read(out), (None if err is out else _read(err))
                    results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
                    if then is not None:
                        then()
                ready = [job for job in self._waiting if job[2] is None or job[2] in results]
                if self._waiting and not ready and not running:
                    raise ValueError(f"Nothing queued comes after {sorted({job[2] for job in self._waiting})}.")
                for job in ready[: max(0, (os.cpu_count() or 1) - len(running))]:
                    self._waiting.remove(job)
                    name, command, _, then, popen = job
                    out = tempfile.TemporaryFile("w+")  # a file, not a pipe: a command never blocks on output not read yet
                    err = out if popen.get("stderr") == subprocess.STDOUT else tempfile.TemporaryFile("w+")
                    popen = {k: v for k, v in popen.items() if k != "stderr"}
                    proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, **popen)
                    running[name] = (proc, out, err, time.monotonic(), then)
                time.sleep(0.05)
        finally:
            for proc, *_ in running.values():
                proc.kill()
                proc.wait()
        return results


def _read(file: Any) -> str:
    file.seek(0)
    text = file.read()
    file.close()
    return text


def run_side_by_side(
    commands: dict[str, list[str]], *, timeout: float, env: dict[str, dict[str, str]] | None = None
) -> dict[str, subprocess.CompletedProcess]:
    """``Queue`` without order: every command, as many at a time as there are cores; ``env`` maps a command's
    name to its environment (default: this process's)."""
    queue = Queue()
    for name, command in commands.items():
        queue.add(name, command, env=(env or {}).get(name))
    return queue.run(timeout)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (each held until all are chosen, so none repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
