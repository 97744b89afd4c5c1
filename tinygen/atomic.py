"""Atomic file writes: write in a temp folder beside the target, then rename the file over it.

A crash or kill mid-write leaves the old file whole (rename is atomic on one filesystem), so a
checkpoint on disk is always either the previous one or the new one, never half of each.

The temp folder is hidden and named for its target and writer (`.NAME.PID.tmp/`). A folder,
not a file, because writers such as safetensors make temp files of their own beside the path
they are given; inside the folder, whatever a killed writer leaves is in one place, which the
next write of the same target removes. Nothing that looks for models (`*.safetensors`) sees it.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tinygen.errors import TinygenError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path`, on failure it is removed.

    The parent folder must exist: a typo in an output path is an error, not a new folder tree.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise TinygenError(f"cannot write {path}: there is no folder {path.parent}; create it first")
    _remove_stale(path)
    work = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(work)  # ours only by pid reuse: its writer is gone
    try:
        os.mkdir(work, 0o777)
        # The kernel applied the umask to the folder; the file gets the same, as a plain open() would
        # give it (safetensors makes its files 0600).
        mode = work.stat().st_mode & 0o666
    except OSError as e:
        raise TinygenError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        tmp = work / path.name
        yield tmp
        try:
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except OSError as e:
            raise TinygenError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        _remove(work)


def _remove_stale(path: Path) -> None:
    """Delete the temp folders of `path` whose writer process no longer exists."""
    prefix = f".{path.name}."
    for work in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = work.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(work)


def _remove(work: Path) -> None:
    if work.is_dir():
        shutil.rmtree(work, ignore_errors=True)
    else:
        work.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to another user
        return True
    return True


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise TinygenError(f"cannot write {path}: {e.strerror or e}") from e
