"""_io: directories change as a whole, readers see one version, killed writers leave the old version.

The kill and concurrency figures come from ``tests/scripts/writers.py``, run once for the module: it
forks writers that go through the real entry points (``save_adapter``, ``save_merged``, ``lightning-lora
merge``, ``Trainer.save_checkpoint`` with ``LoRACallback``) and SIGKILLs them at random moments.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lora import _io
from lightning_lora._io import atomic_directory, read_files

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"}
KILLS = 6


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _write(path: Path, files: dict[str, bytes], **kwargs) -> None:
    with atomic_directory(path, **kwargs) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)


def test_a_directory_is_replaced_as_a_whole_keeping_foreign_entries(tmp_path):
    out = tmp_path / "out"
    _write(out, {"a.json": b"1", "w.bin": b"11", "model-00002.bin": b"old shard"})
    (out / "README.md").write_bytes(b"mine")
    (out / "notes").mkdir()
    (out / "notes" / "n.txt").write_bytes(b"n")
    inode = os.stat(out / "README.md").st_ino
    _write(out, {"a.json": b"2", "w.bin": b"22"}, owned=("model-*.bin",))
    assert _tree(out) == {"a.json": b"2", "w.bin": b"22", "README.md": b"mine", "notes/n.txt": b"n"}
    assert os.stat(out / "README.md").st_ino == inode  # carried over as a hard link, not copied
    assert _siblings(out) == []


def test_a_failed_write_changes_nothing_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    _write(out, {"a": b"1"})
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_directory(out) as tmp:
            (tmp / "a").write_bytes(b"2")
            raise RuntimeError("disk full")
    assert _tree(out) == {"a": b"1"} and _siblings(out) == []


def test_an_existing_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"`output`='.*f' is a file, not a directory: nothing was written"):
        with atomic_directory(tmp_path / "f", parameter="output"):
            raise AssertionError("the block must not run")
    with pytest.raises(ValueError, match=r"cannot be created: '.*f' is a file"):
        _io.require_directory_path(tmp_path / "f" / "sub", "output")
    assert sorted(os.listdir(tmp_path)) == ["f"] and (tmp_path / "f").read_bytes() == b"keep"


def test_a_symlinked_directory_keeps_its_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _write(tmp_path / "link", {"a": b"1"})
    assert (tmp_path / "link").is_symlink() and _tree(tmp_path / "real") == {"a": b"1"}


def test_new_directories_take_the_umask_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        _write(tmp_path / "out", {"a": b"1"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755


def test_without_an_atomic_exchange_the_result_is_the_same(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, {"a": b"1", "b": b"1"})
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)  # e.g. NFS: two renames
    _write(out, {"a": b"2"})
    assert _tree(out) == {"a": b"2", "b": b"1"} and _siblings(out) == []


def test_temp_directories_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    _write(out, {"a": b"1"})
    for token in ("dead", "alive"):
        (tmp_path / f".out.{token}.tmp").mkdir()
        (tmp_path / f".out.{token}.tmp" / "half").write_bytes(b"x")
    (tmp_path / ".out.dead.lock").write_bytes(b"")
    alive = _io._hold_lock(tmp_path / ".out.alive.lock")  # flock held: a writer still at work
    try:
        _write(out, {"a": b"2"})
        assert _siblings(out) == [".out.alive.lock", ".out.alive.tmp"]
    finally:
        _io._release_lock(alive, tmp_path / ".out.alive.lock")


def test_readers_get_every_file_from_one_version_even_when_it_is_swapped_meanwhile(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, {"a": b"1", "b": b"1"})
    real_read_at, calls = _io._read_at, []

    def swap_after_first_file(dir_fd, name):
        data = real_read_at(dir_fd, name)
        if not calls:
            _write(out, {"a": b"2", "b": b"2"})  # a writer replaces (and deletes) the version being read
        calls.append(name)
        return data

    monkeypatch.setattr(_io, "_read_at", swap_after_first_file)
    files = read_files(out, ["a", "b"])
    # The old version's b was gone by the time it was opened: the reader started over on the new one,
    # rather than pairing the old a with the new b.
    assert files == {"a": b"2", "b": b"2"}
    assert calls == ["a", "a", "b"]
    with pytest.raises(FileNotFoundError):
        read_files(out, ["a", "missing"])


def test_disk_full_during_the_swap_keeps_the_old_version(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, {"a": b"1"})

    def enospc(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io, "_fsync_tree", enospc)
    with pytest.raises(OSError, match="No space left"):
        _write(out, {"a": b"2"})
    assert _tree(out) == {"a": b"1"} and _siblings(out) == []


# -- killed writers and concurrent ones (tests/scripts/writers.py) -----------------------------------
@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("writers")
    proc = subprocess.run(
        [sys.executable, str(TESTS / "scripts" / "writers.py"), str(out), "--kills", str(KILLS), "--seconds", "3", "--seed", "0"],
        env=ENV, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("writer", ["adapter", "merged", "merge-cli", "checkpoint"])
def test_sigkill_at_random_moments_leaves_the_old_or_the_new_complete_version(harness, writer):
    result = harness[writer]
    kills = KILLS if writer != "merge-cli" else KILLS // 2
    assert result["kills"] == kills  # each found one complete version: the last finished write or the next
    assert len(result["versions_seen"]) == kills
    if writer != "merge-cli":
        # some kills landed inside a write (its temp files were left). The CLI's 3 kills are too few for that to
        # be sure on every machine (its write is a short end of a long command): the same atomic_directory is
        # killed mid-write through the three other writers.
        assert result["interrupted_mid_write"] >= 1
    assert result["stale_after_next_write"] == []  # and the next write removed them


def test_two_writers_and_three_readers_never_see_a_mix(harness):
    result = harness["concurrent"]
    assert result["mixes"] == 0, result["problems"]
    assert result["writes"] >= 10 and result["reads"] >= 30
