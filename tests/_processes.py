"""Independent subprocesses of a test module, run side by side instead of one after another.

Most of a short test subprocess is Python importing torch, transformers and Lightning on one core (about 7 s), and
a Lightning launch of two ranks starts its second rank only once the first has imported everything; the suite
itself runs on one core too. So on a 2-core CI machine two such runs take little longer than one. Each result is
the process's own: nothing is shared between them but the machine.

``ForkServer`` takes the imports out of such runs: one process imports the heavy modules once, and each
``python -m module args...`` command given to it runs as a fork of that process, in the state a fresh interpreter has
after those imports (the child runs the module as ``__main__`` with its own ``sys.argv``, output and working directory).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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
            forks: ForkServer | None = None, **popen: Any) -> None:
        """Queue ``command``; ``popen``: ``subprocess.Popen``'s env, cwd, ``stderr=subprocess.STDOUT``. ``then()`` is
        called as soon as the command has ended, before the commands ``after`` it start. With ``forks``, the command
        (``python -m module args...``) runs as a fork of that server instead of a process of its own."""
        self._waiting.append((name, command, after, then, {**popen, "forks": forks} if forks else popen))

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
                    if popen.get("forks") is not None:  # one file for both: a fork writes to it by name
                        out = err = tempfile.NamedTemporaryFile("w+")
                        proc = popen["forks"].start(command, out.name, cwd=popen.get("cwd"), env=popen.get("env"))
                    else:
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


# The server: imports the modules named in argv, then for each JSON line on stdin ({"module", "args", "cwd", "out"})
# forks a child that runs `python -m module args` (runpy, as __main__) with stdout and stderr in the file "out".
# The child's pid goes to "out.pid" and, once it has ended, its exit code (as subprocess gives it: -9 for SIGKILL)
# to "out.rc", each written whole (a rename). It exits when stdin is closed and every child has ended.
_SERVER = r"""
import importlib, json, os, runpy, select, signal, sys, time, traceback

def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

def child(job):
    code = 1
    try:
        out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(job["cwd"])
        sys.argv = [job["module"], *job["args"]]
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:  # as the interpreter ends on it
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except KeyboardInterrupt:  # as the interpreter ends on it: the traceback, then death by SIGINT
        traceback.print_exc()
        sys.stdout.flush(); sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)

for name in sys.argv[1:]:
    importlib.import_module(name)
children, pending, open_ = {}, b"", True
while open_ or children:
    if open_ and select.select([0], [], [], 0.05)[0]:
        chunk = os.read(0, 1 << 16)
        open_ = bool(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            job = json.loads(line)
            sys.stdout.flush(); sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(job)
            children[pid] = job["out"]
            write(job["out"] + ".pid", str(pid))
    elif not open_:
        time.sleep(0.05)
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        write(children.pop(pid) + ".rc", str(os.waitstatus_to_exitcode(status)))
"""


class ForkServer:
    """A warm interpreter that runs ``[sys.executable, "-m", module, *args]`` commands as forks of itself.

    The server imports ``preimport`` once (most of a short CLI run is those imports); each child then runs the module
    as ``__main__``, as ``python -m`` does, in the server's environment (``env``, fixed at the start) and its own
    working directory. Nothing a child does reaches the server or another child. Use with ``Queue.add(forks=...)``:

        with ForkServer(["torch", "lightning.pytorch"], env=env) as forks:
            queue.add("fit", [sys.executable, "-m", "lightning_lora.cli", "fit", "--config", path], forks=forks, env=env)
    """

    def __init__(self, preimport: list[str], *, env: dict[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self._log = tempfile.TemporaryFile("w+")
        self._server = subprocess.Popen([sys.executable, "-c", _SERVER, *preimport], stdin=subprocess.PIPE, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=self.env)

    def start(self, command: list[str], out: str, *, cwd: str | os.PathLike | None = None,
              env: dict[str, str] | None = None) -> _Forked:
        """Run ``command`` in a fork, its output in the file ``out``; a handle with Popen's poll/kill/wait."""
        if command[:2] != [sys.executable, "-m"] or len(command) < 3:
            raise ValueError(f"ForkServer runs `{sys.executable} -m module ...` commands, got {command!r}.")
        if env is not None and dict(env) != self.env:
            raise ValueError("A forked command runs in the server's environment: start a ForkServer with this env.")
        job = {"module": command[2], "args": command[3:], "cwd": os.fspath(cwd or os.getcwd()), "out": out}
        self._server.stdin.write((json.dumps(job) + "\n").encode())
        self._server.stdin.flush()
        return _Forked(command, out, self)

    def server_failure(self) -> str | None:
        """The server's output if it has ended (a failed import), else None."""
        if self._server.poll() is None:
            return None
        if not self._log.closed:
            self._failure = _read(self._log)
        return self._failure

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stdin.close()  # the server ends once its children have
        try:
            self._server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()


class _Forked:
    """A command run by a ``ForkServer``: ``returncode`` as ``subprocess.Popen`` gives it."""

    def __init__(self, args: list[str], out: str, server: ForkServer) -> None:
        self.args, self.returncode, self._out, self._server = args, None, out, server

    def poll(self) -> int | None:
        if self.returncode is None:
            if os.path.exists(self._out + ".rc"):
                with open(self._out + ".rc") as f:
                    self.returncode = int(f.read())
                for side in (".rc", ".pid"):  # the server's notes on this child: nothing is left beside the output
                    os.unlink(self._out + side)
            elif (failure := self._server.server_failure()) is not None:
                raise RuntimeError(f"The fork server ended before running {self.args!r}:\n{failure[-3000:]}")
        return self.returncode

    def kill(self) -> None:
        while self.poll() is None and not os.path.exists(self._out + ".pid"):  # not forked yet: it will be soon
            time.sleep(0.05)
        if self.returncode is None:
            with open(self._out + ".pid") as f:
                try:
                    os.kill(int(f.read()), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode


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
