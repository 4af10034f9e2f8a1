"""Independent subprocesses of a test module, run side by side instead of one after another.

Most of a short test subprocess is Python importing torch, transformers, Lightning and bitsandbytes (about 12 s on
one core of the 2-core CI machine), and a Lightning launch of two ranks starts its second rank only once the first
has imported everything. So on a 2-core CI machine two such runs take little longer than one.

``ForkServer`` takes the imports out of such runs: a process imports the heavy modules once, and each
``python -m module``, ``python script.py`` or ``python -c code`` command given to it runs as a fork of that process,
in the state a fresh interpreter has after those imports (its own ``sys.argv``, ``__main__``, environment, output,
working directory and interpreter shutdown). ``Queue.add_ranks`` starts the ranks of one distributed run that way,
each with the variables a launcher gives its ranks (Lightning's, or torchrun's), instead of through the launcher.
What forks share is what the server's imports left: see ``ForkServer``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

# Variables a process reads when it starts or when torch, bitsandbytes, transformers, Lightning or this library are
# imported: a fork has the server's, so a forked command's environment must hold the same values (prefixes, and
# whole names). The list errs on the side of refusing.
IMPORT_TIME_PREFIXES = ("PYTHON", "LD_", "OMP_", "MKL_", "KMP_", "GOMP_", "TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE", "BNB_", "HF_",
                        "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_")
IMPORT_TIME_NAMES = ("CUDA_VISIBLE_DEVICES", "TORCH_LOGS", "TORCH_HOME", "TORCH_DISTRIBUTED_DEBUG", "TORCH_CPP_LOG_LEVEL",
                     "TORCH_SHOW_CPP_STACKTRACES", "TORCH_CUDA_SANITIZER", "POSSIBLE_USER_WARNINGS", "LIGHTNING_LORA_NF4_KERNEL")


def read_at_start(name: str) -> bool:
    return name.startswith(IMPORT_TIME_PREFIXES) or name in IMPORT_TIME_NAMES


def rank_env(style: str, rank: int, world: int, port: int, nodes: int = 1) -> dict[str, str]:
    """The variables a launcher gives rank ``rank`` of ``world`` (``nodes`` nodes, ``world // nodes`` ranks each,
    the store at 127.0.0.1:``port``):

    - ``"lightning"``: what Lightning's own launcher sets for the ranks it starts; ``Trainer`` then sees processes
      created outside it (``LightningEnvironment``) and starts none.
    - ``"torchrun"``: what ``torchrun --nnodes N --nproc_per_node W/N`` sets, without its agent (rank 0 holds the
      TCP store); Lightning sees ``TorchElasticEnvironment``.
    """
    if nodes < 1 or world % nodes or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world} on {nodes} nodes: world must split evenly over nodes.")
    per_node = world // nodes
    local, node = rank % per_node, rank // per_node
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world)}
    if style == "lightning":
        return {**common, "NODE_RANK": str(node)}
    if style == "torchrun":
        return {**common, "RANK": str(rank), "GROUP_RANK": str(node), "LOCAL_WORLD_SIZE": str(per_node), "GROUP_WORLD_SIZE": str(nodes),
                "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world), "ROLE_NAME": "default", "TORCHELASTIC_RUN_ID": "none",
                "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "False"}
    raise ValueError(f"style must be 'lightning' or 'torchrun', got {style!r}.")


# What a launcher may have left in the environment: a rank's variables come from rank_env alone.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                    "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


class Queue:
    """Commands run as many at a time as there are cores, each started in the order added once the commands it
    comes ``after`` have ended.

        queue = Queue()
        queue.add("full", [sys.executable, "train.py", "full"])
        queue.add("resume", [sys.executable, "train.py", "resume"], after="full")
        queue.add_ranks("ddp", [sys.executable, "ddp.py"], world=2, port=port, style="lightning", forks=server)
        results = queue.run(timeout=600)  # {"full": CompletedProcess, "resume": ..., "ddp": ...}
    """

    def __init__(self, *, stop_peers_after: float = 10.0) -> None:
        """``stop_peers_after``: seconds the other ranks of a run get to end on their own once one has failed."""
        self._waiting: list[dict[str, Any]] = []
        self._grace = stop_peers_after

    def add(self, name: str, command: list[str], *, after: str | list[str] | None = None, then: Callable[[], None] | None = None,
            forks: ForkServer | None = None, **popen: Any) -> None:
        """Queue ``command``; ``popen``: ``subprocess.Popen``'s env, cwd, ``stderr=subprocess.STDOUT``. ``then()`` is
        called as soon as the command has ended, before the commands ``after`` it start. With ``forks``, the command
        runs as a fork of that server instead of a process of its own (in the server's environment by default)."""
        self._queue(name, [(command, popen)], after, then, forks)

    def add_ranks(self, name: str, command: list[str], *, world: int, port: int, style: str, nodes: int = 1,
                  after: str | list[str] | None = None, then: Callable[[], None] | None = None, forks: ForkServer | None = None,
                  env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> None:
        """Queue the ``world`` ranks of one distributed run of ``command``, started together, each with its
        launcher's variables (``rank_env``) over ``env`` (default: the server's with ``forks``, else this process's).
        They count as one command of the queue, as a Lightning launch of its ranks did. The result: every rank's
        output (stdout and stderr together) under a header, rank by rank, and the exit code of the rank that failed
        first (else 0). A rank that fails stops the others after ``stop_peers_after`` seconds (they would wait for it
        until the process group's timeout)."""
        base = forks.env if env is None and forks is not None else os.environ if env is None else env
        base = {k: v for k, v in base.items() if k not in LAUNCH_VARIABLES}
        ranks = [(command, {"env": {**base, **rank_env(style, rank, world, port, nodes)}, "cwd": cwd, "stderr": subprocess.STDOUT, "rank": rank})
                 for rank in range(world)]
        self._queue(name, ranks, after, then, forks)

    def _queue(self, name: str, commands: list, after: str | list[str] | None, then: Callable[[], None] | None, forks: ForkServer | None) -> None:
        if any(job["name"] == name for job in self._waiting):
            raise ValueError(f"A command named {name!r} is queued already.")
        after = [] if after is None else [after] if isinstance(after, str) else list(after)
        self._waiting.append({"name": name, "commands": commands, "after": after, "then": then, "forks": forks})

    def run(self, timeout: float | None) -> dict[str, subprocess.CompletedProcess]:
        """Run everything queued; each result holds the exit code, the output as text and ``seconds`` (how long it
        ran). A command still running ``timeout`` seconds (None: no limit) after it started raises
        ``subprocess.TimeoutExpired``, its output so far in the exception's ``output``; every running one is killed."""
        results: dict[str, subprocess.CompletedProcess] = {}
        running: dict[str, dict[str, Any]] = {}
        names = {job["name"] for job in self._waiting}
        unknown = sorted({a for job in self._waiting for a in job["after"] if a not in names})
        if unknown:
            raise ValueError(f"Nothing queued is named {unknown}: `after` names commands of this queue.")
        try:
            while self._waiting or running:
                for name, job in list(running.items()):
                    codes = [proc.poll() for proc, *_ in job["procs"]]
                    job["failed"] += [rank for rank, code in enumerate(codes)
                                      if code not in (None, 0) and rank not in job["failed"] and rank not in job["stopped"]]  # fmt: skip
                    if any(code is None for code in codes):
                        if timeout is not None and time.monotonic() - job["started"] > timeout:
                            del running[name]
                            _stop(job["procs"])
                            raise subprocess.TimeoutExpired(job["procs"][0][0].args, timeout, output=_result(job).stdout)
                        if job["failed"] and job.setdefault("failed_at", time.monotonic()) + self._grace < time.monotonic():
                            for rank, (proc, *_) in enumerate(job["procs"]):  # its peers wait for a rank that is gone
                                if proc.poll() is None:
                                    job["stopped"].add(rank)
                                    proc.kill()
                        continue
                    del running[name]
                    results[name] = _result(job)
                    results[name].seconds = time.monotonic() - job["started"]  # how long it ran, for the figures
                    if job["then"] is not None:
                        job["then"]()
                ready = [job for job in self._waiting if all(a in results for a in job["after"])]
                if self._waiting and not ready and not running:
                    raise ValueError(f"Nothing queued comes after {sorted({a for job in self._waiting for a in job['after']})}.")
                for job in ready[: max(0, (os.cpu_count() or 1) - len(running))]:
                    self._waiting.remove(job)
                    job.update(procs=[], failed=[], stopped=set(), started=time.monotonic())  # stopped: killed after another failed
                    running[job["name"]] = job
                    for command, popen in job["commands"]:  # one by one: a start that fails leaves the others to stop
                        job["procs"].append(_start(command, popen, job["forks"]))
                time.sleep(0.05)
        finally:
            for job in running.values():
                _stop(job["procs"])
        return results


def _start(command: list[str], popen: dict[str, Any], forks: ForkServer | None) -> tuple:
    """(process, its stdout file, its stderr file: the same one with ``stderr=subprocess.STDOUT``)."""
    together = popen.get("stderr") == subprocess.STDOUT
    if forks is not None:  # a fork writes to its files by name
        out = tempfile.NamedTemporaryFile("w+")
        err = out if together else tempfile.NamedTemporaryFile("w+")
        proc = forks.start(command, out.name, err=None if together else err.name, cwd=popen.get("cwd"), env=popen.get("env"),
                           copy=popen.get("rank", 0))
        return proc, out, err
    out = tempfile.TemporaryFile("w+")  # a file, not a pipe: a command never blocks on output not read yet
    err = out if together else tempfile.TemporaryFile("w+")
    popen = {k: v for k, v in popen.items() if k not in ("stderr", "rank")}
    return subprocess.Popen(command, stdout=out, stderr=err, text=True, **popen), out, err


def _stop(procs: list[tuple]) -> None:
    """Kill and reap every process still running; one that cannot be killed does not keep the others alive."""
    for proc, *_ in procs:
        try:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - the error being raised, if any, is the one to see
            pass


def _result(job: dict[str, Any]) -> subprocess.CompletedProcess:
    """One command's result (stderr None when it went to stdout, as subprocess gives it), or a group of ranks':
    each rank's output under a header, in stdout and stderr alike, and the exit code of the rank that failed first."""
    procs, stopped = job["procs"], job["stopped"]
    texts = [(_read(out), None if err is out else _read(err)) for _, out, err in procs]
    codes = [proc.returncode for proc, *_ in procs]
    if len(procs) == 1:
        return subprocess.CompletedProcess(procs[0][0].args, codes[0], *texts[0])
    output = "".join(f"--- rank {rank} (exit {code}{', stopped' if rank in stopped else ''}) ---\n{out}{err or ''}"
                     for rank, ((out, err), code) in enumerate(zip(texts, codes)))
    failed = [codes[rank] for rank in job["failed"]] or [c for c in codes if c not in (0, None)] or [0]
    return subprocess.CompletedProcess(procs[0][0].args, failed[0], output, output)


# The server: imports the modules named in argv, then for each JSON line on stdin forks a child that runs one
# command ({"how": "-m" | "-c" | "script", "what", "args", "cwd", "env", "out", "err"}) as `python -m what args`,
# `python -c what args` or `python what args` would, stdout in the file "out" and stderr in "err" (or "out"). The
# child's pid goes to "out.pid" and, once it has ended, its exit code (as subprocess gives it: -9 for SIGKILL) to
# "out.rc", each written whole (a rename). The child ends as the interpreter ends (``finish``). It dies with the
# server (PR_SET_PDEATHSIG). The server exits when stdin is closed and every child has ended.
_SERVER = r"""
import atexit, importlib, importlib.machinery, json, os, runpy, select, signal, sys, threading, time, traceback, types

def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

def as_imported_now():
    # Module state set from the environment at import time that the job's environment changes.
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:  # Lightning reads a launched rank's RANK / LOCAL_RANK when imported
        rank_zero.rank_zero_only.rank = rank_zero._get_rank() or 0

def run(job):
    # The command's exit code, as the interpreter would end on it; never raises.
    try:
        try:
            import ctypes
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no child outlives the server
        except Exception:
            pass
        out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND) if job["err"] else out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(job["cwd"])
        if job["env"] is not None:
            os.environ.clear()
            os.environ.update(job["env"])
        as_imported_now()
        how, what = job["how"], job["what"]
        if how == "-m":
            sys.argv = [what, *job["args"]]
            if not sys.flags.safe_path:
                sys.path[0] = os.getcwd()
            runpy.run_module(what, run_name="__main__", alter_sys=True)
        elif how == "-c":
            sys.argv = ["-c", *job["args"]]
            main = types.ModuleType("__main__")
            main.__dict__.update(__builtins__=__builtins__, __spec__=None, __loader__=importlib.machinery.BuiltinImporter, __package__=None)
            sys.modules["__main__"] = main
            if not sys.flags.safe_path:
                sys.path[0] = ""
            exec(compile(what, "<string>", "exec"), main.__dict__)
        else:
            what = os.path.abspath(what)
            sys.argv = [what, *job["args"]]
            if not sys.flags.safe_path:
                sys.path[0] = os.path.dirname(os.path.realpath(what))
            runpy.run_path(what, run_name="__main__")
        return 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # as the interpreter ends on it: the traceback, then death by SIGINT
        traceback.print_exc()
        sys.stdout.flush(); sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1

def finish(code):
    # As the interpreter ends: non-daemon threads joined, then atexit functions. With a live default process group,
    # the interpreter's whole shutdown too (gloo can abort there); else not its module teardown (2 s of freeing
    # what the server imported, nothing a run can observe).
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        raise SystemExit(code)  # out of the server's loop: its shutdown, then this exit code
    try:
        sys.stdout.flush(); sys.stderr.flush()
    finally:
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
            try:
                job = json.loads(line)
                sys.stdout.flush(); sys.stderr.flush()
                pid = os.fork()
            except Exception:  # a bad job: the next one still runs
                traceback.print_exc()
                continue
            if pid == 0:
                finish(run(job))
            children[pid] = job["out"]
            try:
                write(job["out"] + ".pid", str(pid))
            except OSError:
                traceback.print_exc()
    elif not open_:
        time.sleep(0.05)
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        out = children.pop(pid)
        try:
            write(out + ".rc", str(os.waitstatus_to_exitcode(status)))
        except OSError:
            traceback.print_exc()
"""


class ForkServer:
    """Warm interpreters that run ``[sys.executable, "-m", module, *args]``, ``[sys.executable, "-c", code, *args]``
    and ``[sys.executable, script, *args]`` commands as forks of themselves.

    Each of the ``copies`` interpreters imports ``preimport`` once (most of a short run is those imports); a child
    then runs its command as the interpreter would (``sys.argv``, ``sys.path[0]``, a ``__main__`` of its own, exit
    code; at the end non-daemon threads joined and atexit functions run, and the whole interpreter shutdown where a
    default process group is still alive), in its own working directory and environment. Nothing a child does reaches the
    server or another child. What a fork cannot have of its own:

    - Variables read when a process starts or imports (``read_at_start``: ``PYTHONPATH``, ``OMP_NUM_THREADS``, ...):
      a command's environment must hold the server's value for each (``env``, fixed at the start; ``environment()``
      gives it with other variables set). Lightning's rank-zero flag, set from the environment at import, is set again.
    - The string hash seed: the forks of one copy share it. The ranks of a run go to the copies in turn
      (``copy=rank``), so two ranks never share it, as two fresh processes would not.

    Use with ``Queue.add(forks=...)`` / ``Queue.add_ranks(forks=...)``:

        with ForkServer(["torch", "lightning.pytorch"], env=env) as forks:
            queue.add("fit", [sys.executable, "-m", "lightning_lora.cli", "fit", "--config", path], forks=forks)
    """

    def __init__(self, preimport: list[str], *, env: dict[str, str] | None = None, copies: int = 1) -> None:
        self.env = dict(os.environ if env is None else env)
        self._lock, self._failure = threading.Lock(), None
        self._logs = [tempfile.TemporaryFile("w+") for _ in range(copies)]
        self._servers = [subprocess.Popen([sys.executable, "-c", _SERVER, *preimport], stdin=subprocess.PIPE, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.env) for log in self._logs]

    def environment(self, **variables: str) -> dict[str, str]:
        """The server's environment with ``variables`` set."""
        return {**self.env, **variables}

    def start(self, command: list[str], out: str, *, err: str | None = None, cwd: str | os.PathLike | None = None,
              env: dict[str, str] | None = None, copy: int = 0) -> _Forked:
        """Run ``command`` in a fork of copy ``copy % copies``, its stdout in the file ``out`` and its stderr in
        ``err`` (default: ``out`` too); a handle with Popen's pid/poll/kill/wait."""
        if len(command) < 2 or command[0] != sys.executable or (command[1] in ("-m", "-c") and len(command) < 3) or (
                command[1].startswith("-") and command[1] not in ("-m", "-c")):
            raise ValueError(f"ForkServer runs `{sys.executable} -m module ...`, `-c code ...` or `script ...` commands, got {command!r}.")
        if env is not None:
            env = dict(env)
            differ = sorted(k for k in {*env, *self.env} if read_at_start(k) and env.get(k) != self.env.get(k))
            if differ:
                raise ValueError(f"{differ} are read when a process starts: a forked command runs with the server's values "
                                 f"({ {k: self.env.get(k) for k in differ} }); start a ForkServer with this env.")
        how, what, args = (command[1], command[2], command[3:]) if command[1] in ("-m", "-c") else ("script", command[1], command[2:])
        job = {"how": how, "what": what, "args": args, "cwd": os.fspath(cwd or os.getcwd()), "env": env, "out": out, "err": err}
        index = copy % len(self._servers)
        with self._lock:  # one job per line, whichever thread starts it
            if (failure := self._failed()) is not None:
                raise RuntimeError(f"The fork server ended before running {command!r}:\n{failure[-3000:]}")
            self._servers[index].stdin.write((json.dumps(job) + "\n").encode())
            self._servers[index].stdin.flush()
        return _Forked(command, out, self)

    def server_failure(self) -> str | None:
        """A copy's output if it has ended (a failed import), else None."""
        with self._lock:
            return self._failed()

    def _failed(self) -> str | None:
        if self._failure is None:
            for server, log in zip(self._servers, self._logs):
                if server.poll() is not None:
                    self._failure = _read(log)
        return self._failure

    def close(self) -> None:
        for server in self._servers:
            server.stdin.close()  # a copy ends once its children have
        for server in self._servers:
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()  # its children die with it
                server.wait()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Forked:
    """A command run by a ``ForkServer``: ``pid`` and ``returncode`` as ``subprocess.Popen`` gives them."""

    def __init__(self, args: list[str], out: str, server: ForkServer) -> None:
        self.args, self.returncode, self._out, self._server, self._pid = args, None, out, server, None

    def poll(self) -> int | None:
        if self.returncode is None:
            if os.path.exists(self._out + ".rc"):
                with open(self._out + ".rc") as f:
                    self.returncode = int(f.read())
                self._read_pid()
                for side in (".rc", ".pid"):  # the server's notes on this child: nothing is left beside the output
                    os.unlink(self._out + side)
            elif (failure := self._server.server_failure()) is not None:
                raise RuntimeError(f"The fork server ended before running {self.args!r}:\n{failure[-3000:]}")
        return self.returncode

    def _read_pid(self) -> None:
        if self._pid is None:
            with open(self._out + ".pid") as f:
                self._pid = int(f.read())

    @property
    def pid(self) -> int:
        deadline = time.monotonic() + 120
        while self._pid is None and not os.path.exists(self._out + ".pid"):  # not forked yet: it will be soon
            if self.poll() is None and time.monotonic() > deadline:
                raise RuntimeError(f"The fork server has not started {self.args!r} in 120 s.")
            time.sleep(0.02)
        self._read_pid()
        return self._pid

    def kill(self) -> None:
        pid = self.pid
        if self.poll() is None:
            try:
                os.kill(pid, signal.SIGKILL)
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
    commands: dict[str, list[str]], *, timeout: float, env: dict[str, dict[str, str]] | None = None, forks: ForkServer | None = None
) -> dict[str, subprocess.CompletedProcess]:
    """``Queue`` without order: every command, as many at a time as there are cores; ``env`` maps a command's
    name to its environment (default: this process's, or with ``forks`` the server's)."""
    queue = Queue()
    for name, command in commands.items():
        queue.add(name, command, env=(env or {}).get(name), forks=forks)
    return queue.run(timeout)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (each held until all are chosen, so none repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
