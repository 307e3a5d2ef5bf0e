"""Saving files so that a crash or Ctrl-C mid-write never leaves a truncated file behind."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save"]


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """`torch.save(obj, path)`, atomically: `path` holds either the old file or the new one.

    The object is written to a temporary file in the same directory, flushed and fsync'ed, then
    renamed over `path` with `os.replace` (atomic on POSIX and Windows within one file system).
    If writing fails or is interrupted, the temporary file is removed and a previous file at
    `path` is left intact. Missing parent directories are created.

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
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is a rename within one file system; a hidden, unique name, so
    # concurrent writers and directory listings do not see half-written files. open("xb") rather
    # than mkstemp: the file gets the usual umask permissions, not mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
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
