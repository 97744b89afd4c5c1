"""Atomic file writes: write in a temp folder beside the target, then rename the file over it.

A crash or power cut mid-write leaves the old file whole: the data is fsynced before the atomic rename
and the folder after it, so a checkpoint on disk is the previous one or the new one, never a mix. The
temp is a hidden folder (`.NAME.PID.tmp/`, unseen by a search for `*.safetensors`), not a file, because
writers such as safetensors make temp files of their own beside their path; the next write of the
target removes what a killed writer left there. No rename puts a folder over a folder, so replacing
one (`export --force`) moves the old one into the temp folder first and deletes it only once the new
one is in; if the write stops between, the clean-up moves it back.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tinygen.errors import TinygenError

# What fsync of a folder fails with where the platform or filesystem cannot sync folders: there is
# nothing more to do there. Anything else (EIO) means the rename may not be on the disk.
_CANNOT_SYNC_FOLDERS = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


@contextmanager
def atomic_path(path: Path, replace_folder: bool = False) -> Iterator[Path]:
    """Yield a temp path to write (as a file or a folder); on success it replaces `path`, on failure
    it is removed.

    The parent folder must exist: a typo in an output path is an error, not a new folder tree.
    Whatever is at `path` is replaced only when it is a file, unless replace_folder says that a
    folder there may go too (a save to a path that names a folder is usually a mistake).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise TinygenError(f"cannot write {path}: there is no folder {path.parent}; create it first")
    remove_stale(path)
    work = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _clear_or_raise(work, path)  # ours only by pid reuse: its writer is gone
    try:
        os.mkdir(work, 0o777)
        # The kernel applied the umask to the folder; the files get the same, as a plain open() would
        # give them (safetensors makes its files 0600).
        mode = work.stat().st_mode & 0o666
    except OSError as e:
        raise TinygenError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        tmp = work / path.name
        yield tmp
        try:
            for f in _files(tmp):
                os.chmod(f, mode)
            _sync(tmp)
            if replace_folder and (path.is_dir() or (tmp.is_dir() and path.exists())):
                os.replace(path, _aside(work, path))
            os.replace(tmp, path)
            _sync_folder(path.parent)
        except OSError as e:
            raise TinygenError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        _clear_or_raise(work, path)


def remove_stale(path: Path) -> None:
    """Delete the temp folders of `path` whose writer process no longer exists (first moving back a
    previous `path` that one of them set aside and never replaced)."""
    prefix = f".{path.name}."
    for work in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = work.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _clear(work, path)


def _aside(work: Path, path: Path) -> Path:
    """Where a folder being replaced waits until its replacement is in."""
    return work / f"{path.name}.old"


def _clear(work: Path, path: Path) -> bool:
    """Delete a temp folder of `path`. If it holds the previous `path` and nothing is at `path`, the
    new one never went in: the previous one goes back instead. False if it could not."""
    old = _aside(work, path)
    if os.path.lexists(old) and not os.path.lexists(path):
        # Not synced: a power cut that undoes this rename leaves the state this one fixed.
        try:
            os.replace(old, path)
        except OSError:
            return False
    _remove(work)
    return True


def _clear_or_raise(work: Path, path: Path) -> None:
    if not _clear(work, path):
        raise TinygenError(f"cannot write {path}, nor move its previous version back: "
                           f"move {_aside(work, path)} to {path} by hand")


def _remove(work: Path) -> None:
    """Delete a temp folder, or as much of it as can go: the next write of its target tries again."""
    if work.is_dir():
        shutil.rmtree(work, ignore_errors=True)
    elif os.path.lexists(work):
        with suppress(OSError):
            work.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to another user
        return True
    return True


def _files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return [Path(root, name) for root, _, names in os.walk(path) for name in names]


def _sync(path: Path) -> None:
    """Put a written file, or a written folder's files and then its folders, on the disk, so that the
    rename that names it cannot reach the disk before what it names."""
    if not path.is_dir():
        _sync_file(path)
        return
    for root, _, names in os.walk(path, topdown=False):
        for name in names:
            _sync_file(Path(root, name))
        _sync_folder(Path(root))


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only a handle that may write
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Put a folder's entries (a rename into it) on the disk."""
    if os.name == "nt":  # a folder cannot be opened there: its renames are as safe as the filesystem keeps them
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:  # a folder one may write in but not read (-wx)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC_FOLDERS:
            raise
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise TinygenError(f"cannot write {path}: {e.strerror or e}") from e
