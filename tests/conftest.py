"""The session's warm processes for test subprocesses: ``fork_server`` (a ``_processes.ForkServer``).

Every test module whose commands or distributed ranks run as forks shares one server (two copies), so the suite
pays the 12 s of imports once per copy. It starts as soon as collection ends when a selected test uses it: its
imports overlap the tests before that one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _processes import LAUNCH_VARIABLES, ForkServer

TESTS = Path(__file__).parent

# The environment every forked command runs in (each may set other variables; see ForkServer): one torch thread per
# process (two ranks fill the 2-core CI machine), tests/scripts importable (kill_after.py, the launch scripts), no
# GPU (the commands are CPU runs, and a server whose imports initialised CUDA could not give it to a fork), output
# written as it comes (a rank that is stopped keeps what it printed), no launcher's variables.
FORK_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS / "scripts"), os.environ.get("PYTHONPATH")) if p)}
for _name in LAUNCH_VARIABLES:
    FORK_ENV.pop(_name, None)

# What the forked commands import (a CLI run, a Lightning or torchrun rank): each is imported once, by the server.
PREIMPORT = ["bitsandbytes", "lightning.pytorch", "transformers", "jsonargparse", "safetensors.torch", "torch.distributed.fsdp",
             "torch.distributed.checkpoint", "lightning_lora.lightning", "lightning_lora.tasks", "lightning_lora.loading",
             "lightning_lora.sharding"]

_server: ForkServer | None = None


def _started() -> ForkServer:
    global _server
    if _server is None:
        _server = ForkServer(PREIMPORT, env=FORK_ENV, copies=2)  # two: the ranks of a run get different hash seeds
    return _server


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.config.option.collectonly and any("fork_server" in getattr(item, "fixturenames", ()) for item in session.items):
        _started()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _server is not None:
        _server.close()


@pytest.fixture(scope="session")
def fork_server() -> ForkServer:
    return _started()
