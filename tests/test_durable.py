"""Writes that promise "whole or not at all" across a power cut: each file is on the disk before the
rename that names it, and the rename before the write returns. A failure at any step leaves the
target whole (old or new), keeps a previous export until the new one is in, and leaves no temp
folder that the next write does not clear.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from itertools import count
from pathlib import Path

import pytest

from tinygen.atomic import atomic_path, remove_stale, write_bytes
from tinygen.errors import TinygenError
from tinygen.formats.export import export

# The calls that touch the disk, through the os module as atomic.py and shutil.rmtree make them
# (Path.mkdir, os.walk's folders, rmtree's unlinks: all of them, not only atomic.py's own).
STEPS = ("mkdir", "open", "chmod", "fsync", "replace", "unlink", "rmdir")

OLD_FOLDER = {"config.json": b'{"old": 1}', "model.safetensors": b"old weights" * 100}
NEW_FOLDER = {"config.json": b'{"new": 2}', "model.safetensors": b"new weights" * 100, "tokenizer.json": b"{}"}
OLD_FILE = b"GGUF old" * 100
NEW_FILE = b"GGUF new" * 200


class FailAt:
    """Patches STEPS so that the calls numbered in `at` (counting all of them together) raise EIO."""

    def __init__(self, monkeypatch, at: set[int], steps: tuple[str, ...] = STEPS) -> None:
        self.at, self.calls, self.failed = at, [], []
        for name in steps:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            self.calls.append(name)
            if len(self.calls) in self.at:
                self.failed.append(name)
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(*args, **kwargs)

        return call


def attempt(write) -> TinygenError | None:
    """Run write(); the only error it may end in is a one-line TinygenError."""
    try:
        write()
    except TinygenError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        return e
    return None


def snapshot(path: Path):
    """What is at path: a file's bytes, a folder's files, or None."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in path.iterdir()}
    return path.read_bytes() if path.exists() else None


def put(path: Path, content) -> None:
    """Make path hold content (bytes: a file; a dict: a folder of files), whatever is there now."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if isinstance(content, dict):
        path.mkdir()
        for name, data in content.items():
            (path / name).write_bytes(data)
    else:
        path.write_bytes(content)


def own_temp(path: Path) -> str:
    return f".{path.name}.{os.getpid()}.tmp"


def sweep(target: Path, old, new, write, monkeypatch, steps: tuple[str, ...] = STEPS) -> list[str]:
    """Fail the 1st, 2nd, ... disk call of write() until it runs through, checking after each failure
    that the target is whole. Returns the kinds of call that were failed, in order."""
    failed = []
    for n in count(1):
        put(target, old)
        with monkeypatch.context() as m:
            faults = FailAt(m, {n}, steps)
            error = attempt(write)
        if not faults.failed:
            assert error is None and snapshot(target) == new
            break
        failed += faults.failed
        state = snapshot(target)
        assert state in (old, new), f"call {n} ({faults.failed[0]}) failed and left {state!r:.80}"
        if "replace" not in faults.calls[:-1]:  # nothing was renamed: the new one is not in
            assert state == old, f"call {n} ({faults.failed[0]})"
        if error is None:  # a failure the write may shrug off (a temp file it could not delete)
            assert state == new, f"call {n} ({faults.failed[0]})"
        # Left behind at most: this process's temp folder, which its next write clears.
        assert {p.name for p in target.parent.iterdir()} <= {target.name, own_temp(target)}
        if (target.parent / own_temp(target)).exists():
            write()
            assert snapshot(target) == new
        assert [p.name for p in target.parent.iterdir()] == [target.name]
    return failed


def test_a_failed_file_write_at_any_step_leaves_the_old_file_or_the_new(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    failed = sweep(target, OLD_FILE, NEW_FILE, lambda: write_bytes(target, NEW_FILE), monkeypatch)
    # The sweep reached every kind of step, the syncs (file, then folder) and the rename included.
    assert {"mkdir", "open", "chmod", "replace", "rmdir"} <= set(failed)
    assert failed.count("fsync") == 2


@pytest.mark.parametrize("old, new", [(OLD_FOLDER, NEW_FOLDER), (OLD_FILE, NEW_FOLDER), (OLD_FOLDER, NEW_FILE)],
                         ids=["folder-over-folder", "folder-over-file", "file-over-folder"])
def test_a_failed_replace_at_any_step_keeps_the_previous_export(tmp_path, monkeypatch, old, new):
    target = tmp_path / "out"

    def write():
        with atomic_path(target, replace_folder=True) as tmp:
            try:
                put(tmp, new)
            except OSError as e:  # as export turns its writers' errors into one line
                raise TinygenError(f"cannot write {target}: {e.strerror}") from e

    failed = sweep(target, old, new, write, monkeypatch)
    assert failed.count("replace") == 2  # the old one aside, the new one in


def test_a_folder_is_replaced_only_when_asked(tmp_path):
    target = tmp_path / "m.safetensors"
    put(target, OLD_FOLDER)
    with pytest.raises(TinygenError, match=f"cannot write {target}"):
        write_bytes(target, NEW_FILE)
    assert snapshot(target) == OLD_FOLDER
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_an_old_folder_that_cannot_go_back_is_named_and_restored_by_the_next_write(tmp_path, monkeypatch):
    target = tmp_path / "hf"
    put(target, OLD_FOLDER)
    with monkeypatch.context() as m:
        FailAt(m, {2, 3}, ("replace",))  # the new one in, then the old one back
        with pytest.raises(TinygenError) as e, atomic_path(target, replace_folder=True) as tmp:
            put(tmp, NEW_FOLDER)
    aside = tmp_path / own_temp(target) / "hf.old"
    assert "\n" not in str(e.value) and str(aside) in str(e.value)
    assert not target.exists() and snapshot(aside) == OLD_FOLDER

    with pytest.raises(RuntimeError), atomic_path(target, replace_folder=True):
        raise RuntimeError("the next export fails too")
    assert snapshot(target) == OLD_FOLDER
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.fixture()
def dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_a_writer_killed_between_the_two_renames_loses_nothing(tmp_path, dead_pid):
    """It left the old folder set aside in its temp folder, and nothing (or the new one) in its place."""
    target = tmp_path / "hf"
    work = tmp_path / f".hf.{dead_pid}.tmp"
    work.mkdir()
    put(work / "hf.old", OLD_FOLDER)
    put(work / "hf", NEW_FOLDER)
    with pytest.raises(RuntimeError), atomic_path(target, replace_folder=True):
        raise RuntimeError("the next export fails")
    assert snapshot(target) == OLD_FOLDER
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]

    work.mkdir()
    put(work / "hf.old", OLD_FOLDER)  # killed after the new one went in: the old one goes
    put(target, NEW_FOLDER)
    remove_stale(target)
    assert snapshot(target) == NEW_FOLDER
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def record(monkeypatch, events: list) -> None:
    """Log each fsync (by the inode it flushes), rename and tree removal, in order."""
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def logged_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def logged_replace(src, dst, **kwargs):
        events.append(("replace", Path(src), Path(dst)))
        replace(src, dst, **kwargs)

    def logged_rmtree(path, *args, **kwargs):
        events.append(("rmtree", Path(path)))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    monkeypatch.setattr(shutil, "rmtree", logged_rmtree)


def test_a_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    events = []
    record(monkeypatch, events)
    write_bytes(target, b"{}")
    work = tmp_path / own_temp(target)
    assert events == [("fsync", target.stat().st_ino), ("replace", work / "m.json", target),
                      ("fsync", tmp_path.stat().st_ino), ("rmtree", work)]


def test_a_folder_replace_syncs_the_new_files_first_and_removes_the_old_folder_last(tmp_path, monkeypatch):
    target = tmp_path / "hf"
    put(target, OLD_FOLDER)
    events = []
    record(monkeypatch, events)
    with atomic_path(target, replace_folder=True) as tmp:
        put(tmp, NEW_FOLDER)
    work = tmp_path / own_temp(target)
    new = {p.stat().st_ino for p in target.iterdir()}
    assert len(events) == len(new) + 5
    assert {e[1] for e in events[: len(new)]} == new  # the files, then the folder that holds them
    assert events[len(new) :] == [("fsync", target.stat().st_ino), ("replace", target, work / "hf.old"),
                                  ("replace", work / "hf", target), ("fsync", tmp_path.stat().st_ino),
                                  ("rmtree", work)]


@pytest.mark.parametrize("call, err", [("fsync", errno.EINVAL), ("fsync", errno.ENOTSUP), ("fsync", errno.EBADF),
                                       ("open", errno.EACCES)])
def test_a_filesystem_that_cannot_sync_folders_still_gets_the_write(tmp_path, monkeypatch, call, err):
    real = getattr(os, call)

    def refuse_folders(*args, **kwargs):
        folder = stat.S_ISDIR(os.fstat(args[0]).st_mode) if call == "fsync" else args[1] & os.O_DIRECTORY
        if folder:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, call, refuse_folders)
    write_bytes(tmp_path / "m.json", b"whole")
    assert (tmp_path / "m.json").read_bytes() == b"whole"


def test_a_folder_sync_that_fails_is_an_error(tmp_path, monkeypatch):
    fsync = os.fsync

    def fsync_fails_on_folders(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_folders)
    target = tmp_path / "m.json"
    error = attempt(lambda: write_bytes(target, b"new"))
    assert error is not None and str(error) == f"cannot write {target}: Input/output error"


# -- export --force, end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory, model_path, gpt2_arch_path) -> dict[str, object]:
    """What an HF export of two different models, and a GGUF of one, hold."""
    folder = tmp_path_factory.mktemp("exports")
    export(gpt2_arch_path, "hf", folder / "old")
    export(model_path, "hf", folder / "new")
    export(model_path, "gguf", folder / "new.gguf")
    return {"old": snapshot(folder / "old"), "new": snapshot(folder / "new"), "gguf": snapshot(folder / "new.gguf")}


def test_export_force_replaces_the_old_folder_whole_or_not_at_all(tmp_path, monkeypatch, model_path, exports):
    out = tmp_path / "hf"
    failed = sweep(out, exports["old"], exports["new"], lambda: export(model_path, "hf", out, force=True), monkeypatch)
    assert failed.count("replace") == 2 and failed.count("fsync") == len(exports["new"]) + 2


def test_export_force_puts_a_gguf_in_place_of_a_folder(tmp_path, model_path, exports):
    out = tmp_path / "m"
    put(out, exports["old"])
    export(model_path, "gguf", out, force=True)
    assert snapshot(out) == exports["gguf"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_an_export_cut_off_between_its_renames_is_recovered_before_the_exists_check(tmp_path, model_path, exports,
                                                                                      dead_pid):
    """The killed export left the target missing and the old one set aside: an export without --force
    still finds the old one there (moved back) and refuses, rather than writing over it."""
    out = tmp_path / "hf"
    work = tmp_path / f".hf.{dead_pid}.tmp"
    work.mkdir()
    put(work / "hf.old", exports["old"])
    with pytest.raises(TinygenError, match="exists; pass --force"):
        export(model_path, "hf", out)
    assert snapshot(out) == exports["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
