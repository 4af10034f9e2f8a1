"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it over ``path``.

    A crash or an error (disk full) at any point leaves ``path`` as it was; the temporary file is
    removed on error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    atomic_write(path, write)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_files(directory: str | os.PathLike, write: Callable[[str], None], stale: tuple[str, ...] = ()) -> list[str]:
    """Call ``write(tmp_dir)``, then move each file it made into ``directory`` atomically; returns their names.

    For writers that produce several files (``save_pretrained``): each file in ``directory`` is the old
    one or the new one, never half of one, and nothing is moved if ``write`` fails. Afterwards, files in
    ``directory`` matching one of the ``stale`` glob patterns that this write did not produce (e.g. weight
    shards of an earlier, differently sharded export) are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        write(str(tmp))
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in names:
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        for name in names:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for pattern in stale:
        for old in directory.glob(pattern):
            if old.name not in names and old.is_file():
                old.unlink()
    _fsync_dir(directory)
    return names
