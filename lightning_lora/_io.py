"""Atomic writes: a reader sees the old file or directory or the new one, never half of one or a mix.

- ``atomic_write(path, write)``: one file (temp file beside it, fsync, rename over it).
- ``atomic_directory(path)``: a whole directory. Everything is written into a fresh sibling directory,
  fsynced file by file, then swapped in with one ``renameat2(RENAME_EXCHANGE)`` (Linux; ``renamex_np``
  on macOS), so ``path`` always names a complete directory: the old one until the swap, the new one
  after. Entries of the old directory that the writer neither wrote nor owns (a README, a tokenizer the
  user put there) are carried over as hard links.
- ``read_files(directory, names)``: the reader's half. Each file is opened relative to one open handle
  of the directory, so all of them come from the same version even if a writer swaps it meanwhile (a
  reader that opened ``a/x`` and then ``a/y`` by path could get ``x`` of one save and ``y`` of the next).

A killed writer leaves ``path`` untouched and, at worst, a hidden ``.<name>.*.tmp`` sibling; the next
write to the same path removes those whose writer is gone (each holds an ``flock`` while it lives).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fnmatch
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, so stale temp directories are left for the user to remove
    fcntl = None  # type: ignore[assignment]


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a file should get what open() would give it
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc), else set-and-restore."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    atomic_write(path, write)


def require_path_argument(path: object, parameter: str, *, none_allowed: bool = False) -> None:
    """Refuse a directory argument that is not a path (a str or os.PathLike naming a str path), or is the empty
    string: ``Path("")`` is the current directory, so a write there would land beside whatever it holds."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(
            f"`{parameter}` must be a directory path (a str or os.PathLike){' or None' if none_allowed else ''}, got {path!r}; "
            "pass the directory to write, e.g. 'runs/exp1/export'."
        )
    if os.fspath(path) == "":
        raise ValueError(
            f"`{parameter}`='' is an empty path, which would write into the current directory: pass the directory to write, "
            "e.g. 'runs/exp1/export' (or '.' if the current directory is meant)."
        )


def require_directory_path(path: str | os.PathLike, parameter: str) -> Path:
    """``path`` as a Path, after refusing a non-path or empty argument (``require_path_argument``) and a path that
    exists as something other than a directory, or that cannot be created (a parent is a file, or is not
    writable). Checks only: creates nothing."""
    require_path_argument(path, parameter)
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise ValueError(
            f"`{parameter}`={str(path)!r} is a file, not a directory: nothing was written. "
            "Pass a directory path (it is created if missing), or move the file away."
        )
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"`{parameter}`={str(path)!r} cannot be created: {str(ancestor)!r} is a file. Pass a path under a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"`{parameter}`={str(path)!r} cannot be written: {str(ancestor)!r} is not writable. Pass a path you can write to.")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, owned: Iterable[str] = (), parameter: str = "directory") -> Iterator[Path]:
    """Yield an empty directory to write into; when the block ends without error, it replaces ``path`` as a whole.

    ``owned`` lists glob patterns of entry names that belong to this writer: old entries matching them
    are dropped even when the new write lacks them (an earlier export's ``merged/``, stale weight shards).
    Other old entries the new write lacks are carried over. On error nothing changes and the temporary
    directory is removed. ``path`` may be a symlink to a directory: its target is replaced.

    Example::

        with atomic_directory("out/adapter") as tmp:
            (tmp / "adapter_config.json").write_text(config)
            save_file(tensors, tmp / "adapter_model.safetensors")
    """
    path = require_directory_path(path, parameter)
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    token = secrets.token_hex(8)
    lock_path = path.parent / f".{path.name}.{token}.lock"
    tmp = path.parent / f".{path.name}.{token}.tmp"
    lock = _hold_lock(lock_path)
    try:
        os.mkdir(tmp)  # not mkdtemp: that makes 0700 directories; this one gets the umask's mode
        try:
            yield tmp
            _umask_modes(tmp)  # before the carry-over: the user's files keep their own modes
            _carry_over(path, tmp, list(owned))
            if path.is_dir():
                shutil.copymode(path, tmp)
            _fsync_tree(tmp)
            cwd = _cwd_under(path)
            _swap_in(tmp, path)
            if cwd is not None:
                _follow_cwd(path, cwd)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after the swap this is the old version
    finally:
        _release_lock(lock, lock_path)


def _cwd_under(path: Path) -> Path | None:
    """The process's working directory relative to ``path`` if it is ``path`` or inside it, else None."""
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:
        return None
    return cwd.relative_to(path) if cwd == path or path in cwd.parents else None


def _follow_cwd(path: Path, relative: Path) -> None:
    """After the swap the old version, which the working directory still is, gets removed: move the process into
    the same place in the new version (or ``path`` itself where the new version lacks it), so relative paths
    (``save_adapter(model, ".")`` then ``load_adapter(model, ".")``) keep working."""
    target = path / relative
    with contextlib.suppress(OSError):
        os.chdir(target if target.is_dir() else path)


def _umask_modes(directory: Path) -> None:
    """Give every file written into ``directory`` the mode ``open()`` would: writers such as safetensors'
    ``save_file`` create 0600 files, which others on a shared cluster could not read."""
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def read_files(directory: str | os.PathLike, names: Iterable[str], attempts: int = 5) -> dict[str, bytes]:
    """The bytes of ``directory/<name>`` for each of ``names``, all from one version of the directory.

    Raises FileNotFoundError naming the first missing file. Where the platform cannot open files
    relative to a directory handle (Windows), the files are read by path.
    """
    names = list(names)
    directory = Path(directory)
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_DIRECTORY"):
        return {name: (directory / name).read_bytes() for name in names}
    for _ in range(attempts):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                return {name: _read_at(dir_fd, name) for name in names}
            except FileNotFoundError:
                # The directory may have been swapped and its old version removed while we read: try the new one.
                if _same_directory(dir_fd, directory):
                    raise
        finally:
            os.close(dir_fd)
    raise OSError(errno.EAGAIN, f"{str(directory)!r} was replaced {attempts} times while being read; try again", str(directory))


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _same_directory(dir_fd: int, directory: Path) -> bool:
    try:
        now = os.stat(directory)
    except FileNotFoundError:
        return False
    held = os.fstat(dir_fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


# -- the swap ------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h, for renamex_np
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc() if sys.platform in ("linux", "darwin") else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths atomically; False where the platform or filesystem cannot."""
    if _LIBC is None:
        return False
    if sys.platform == "linux" and hasattr(_LIBC, "renameat2"):
        result = _LIBC.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    elif sys.platform == "darwin" and hasattr(_LIBC, "renamex_np"):
        result = _LIBC.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_SWAP)
    else:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Make the complete directory ``tmp`` be ``path``; afterwards ``tmp`` holds the old version (if any)."""
    if not path.exists():
        try:
            os.rename(tmp, path)  # atomic; replaces nothing (or an empty directory made meanwhile)
            _fsync_dir(path.parent)
            return
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # another writer created ``path`` meanwhile: swap with its version instead
    if not _exchange(tmp, path):
        # No atomic exchange here (e.g. NFS): two renames, with a moment in which ``path`` is absent.
        old = path.parent / f".{path.name}.{secrets.token_hex(8)}.old"
        os.rename(path, old)
        os.rename(tmp, path)
        os.rename(old, tmp)
    _fsync_dir(path.parent)


def _carry_over(old: Path, new: Path, owned: list[str]) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` that ``new`` lacks and the writer does not own."""
    if not old.is_dir():
        return
    for entry in os.scandir(old):
        if (new / entry.name).exists() or any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in owned):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.copytree(entry.path, new / entry.name, symlinks=True, copy_function=_link_or_copy)
            elif entry.is_symlink():
                os.symlink(os.readlink(entry.path), new / entry.name)
            else:
                _link_or_copy(entry.path, new / entry.name)
        except FileNotFoundError:
            continue  # removed meanwhile (another writer swapped the directory): nothing to keep


def _link_or_copy(source: str, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


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


# -- temp directories of killed writers ----------------------------------------------------------------
def _hold_lock(lock_path: Path) -> int | None:
    fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _release_lock(fd: int | None, lock_path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path)
    if fd is not None:
        os.close(fd)


def _remove_stale_siblings(path: Path) -> None:
    """Remove the temp directories of writers to ``path`` that died (their lock is free)."""
    if fcntl is None or not path.parent.is_dir():
        return
    for lock_path in path.parent.glob(f".{_glob_escape(path.name)}.*.lock"):
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer holds it
        try:
            stem = lock_path.name[: -len(".lock")]
            shutil.rmtree(path.parent / f"{stem}.tmp", ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
        finally:
            os.close(fd)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
