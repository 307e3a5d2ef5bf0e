"""Saving files so that a crash or Ctrl-C mid-write never leaves a truncated file behind."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import torch

__all__ = ["STALE_AFTER_S", "atomic_save", "check_writable", "remove_stale_temps", "temp_path"]

StrPath = str | os.PathLike[str]

# A temporary file older than this (before the write that finds it) is a leftover, not another
# writer's file in progress: file systems keep modification times to the second or two at best,
# and a live writer touches its file far more often than this.
STALE_AFTER_S = 60.0


def temp_path(path: StrPath) -> Path:
    """A new temporary name for writing `path`: `.NAME.<32 hex digits>.tmp`, beside it.

    Same directory, so `os.replace` is a rename within one file system; hidden and unique, so
    concurrent writers and directory listings do not see half-written files. Only names of this
    pattern are ever removed as leftovers (`remove_stale_temps`).

    Examples:
        >>> temp_path("run/ckpt.pt").name  # a new one each time
        '.ckpt.pt.3f2a0c9d5b7e4a61b8d2c4e6f0a1b3c5.tmp'
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def remove_stale_temps(path: StrPath, before: float | None = None) -> list[Path]:
    """Remove the temporary files a killed write of `path` left behind; returns those removed.

    A write killed without a chance to clean up (SIGKILL, a power cut, the out-of-memory killer)
    leaves its `temp_path` file. This removes the files beside `path` whose names follow that
    pattern for `path` exactly (no other file, not those of other targets) and that were last
    modified more than `STALE_AFTER_S` seconds before `before` (default: now), so that another
    process' write in progress is left alone. Best effort: a file that cannot be removed stays.

    Args:
        path: the target whose leftovers to remove.
        before: a `time.time()`; files modified within `STALE_AFTER_S` before it are kept.

    Examples:
        >>> remove_stale_temps("run/ckpt.pt")  # what atomic_save does after each write
        []
    """
    path = Path(path)
    before = time.time() if before is None else before
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.tmp")
    removed = []
    for tmp in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        if not pattern.fullmatch(tmp.name):
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
            if tmp.stat().st_mtime < before - STALE_AFTER_S:
                tmp.unlink()
                removed.append(tmp)
    return removed


def check_writable(path: StrPath) -> Path:
    """Fail now, naming `path`, if a file cannot be written there; for savers to call before a
    run rather than fail at its first save.

    Creates the missing parent folders, then creates and removes a temporary file (`temp_path`)
    beside `path`. Raises the `OSError` of the failure (`PermissionError`, `FileExistsError`
    when a parent is a file, ...) with a message that names `path`; `IsADirectoryError` if
    `path` is a folder.

    Args:
        path: the file a saver will write.

    Returns:
        `path`, as a `Path`.

    Examples:
        >>> check_writable("run/ckpt.pt")  # creates run/ if needed
        PosixPath('run/ckpt.pt')
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"Cannot save to {path}: it is a folder; give a file path in it"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        with open(tmp, "xb"):
            pass
        tmp.unlink()
    except OSError as e:
        raise type(e)(
            e.errno,
            f"Cannot save to {path}: a file cannot be written in {path.parent} "
            f"({e.strerror or e}). Give a path in a writable folder",
            str(path),
        ) from e
    return path


def atomic_save(obj: Any, path: StrPath) -> Path:
    """`torch.save(obj, path)`, atomically: `path` holds either the old file or the new one.

    The object is written to a temporary file in the same directory (`temp_path`), flushed and
    fsync'ed, then renamed over `path` with `os.replace` (atomic on POSIX and Windows within one
    file system). If writing fails or is interrupted, the temporary file is removed and a previous
    file at `path` is left intact. A write killed without a chance to clean up (SIGKILL) leaves
    its temporary file: the next successful write of `path` removes it (`remove_stale_temps`:
    only temporary files of `path`, modified more than a minute before that write began). Missing
    parent directories are created.

    Args:
        obj: anything `torch.save` accepts, e.g. a `state_dict()`.
        path: the file to write.

    Returns:
        The path written, as a `Path`.

    Examples:
        >>> atomic_save(model.state_dict(), "best.pt")
        >>> model.load_state_dict(torch.load("best.pt", weights_only=True))
    """
    path = Path(path)
    start = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    # open("xb") rather than mkstemp: the file gets the usual umask permissions, not 0600.
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    remove_stale_temps(path, before=start)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable across a power cut; POSIX only (Windows cannot open a
    # directory, and its rename is durable once it returns).
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
