"""atomic_save: a failed or interrupted write leaves the previous file intact, and a killed one's
leftover is removed by the next; check_writable fails early, naming the path."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import learner.io
from learner import atomic_save
from learner.io import check_writable, remove_stale_temps, temp_path


def test_round_trip_and_parent_dirs(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    path = atomic_save(state, tmp_path / "a" / "b" / "model.pt")
    assert path == tmp_path / "a" / "b" / "model.pt"
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_save(obj: Any, f: Any) -> None:
        real_save(obj, f)
        f.truncate(10)  # half-written, then the failure
        raise exc

    monkeypatch.setattr(learner.io.torch, "save", half_save)
    with pytest.raises(type(exc)):
        atomic_save({"w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_overwrites_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, path)
    atomic_save({"w": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(2))


def _leftover(path: Path, age_s: float, name: str | None = None) -> Path:
    # What a write killed by SIGKILL leaves: a half-written temporary file of `path`'s pattern.
    tmp = path.with_name(name or f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(b"half a checkpoint")
    t = time.time() - age_s
    os.utime(tmp, (t, t))
    return tmp


def test_the_next_write_removes_what_a_killed_write_left(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    stale = _leftover(path, age_s=3600)
    in_progress = _leftover(path, age_s=0)  # another process' write of the same file, going on
    others = [
        _leftover(tmp_path / "other.pt", age_s=3600),  # another target's
        _leftover(path, age_s=3600, name=".model.pt.tmp"),  # not the pattern
        _leftover(path, age_s=3600, name=".model.pt.x.pt.0123456789abcdef0123456789abcdef.tmp"),
        _leftover(path, age_s=3600, name="model.pt.bak"),
    ]
    atomic_save({"w": torch.ones(3)}, path)
    assert not stale.exists()
    assert in_progress.exists() and all(p.exists() for p in others)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_a_failed_write_removes_no_leftover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.pt"
    stale = _leftover(path, age_s=3600)

    def failing_save(obj: Any, f: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(learner.io.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.ones(3)}, path)
    assert stale.exists()  # only a successful write cleans up
    assert remove_stale_temps(path) == [stale] and not stale.exists()


def test_temp_names_are_unique_and_hidden(tmp_path: Path) -> None:
    names = {temp_path(tmp_path / "ck.pt").name for _ in range(100)}
    assert len(names) == 100
    assert all(re.fullmatch(r"\.ck\.pt\.[0-9a-f]{32}\.tmp", n) for n in names)


def test_check_writable_makes_the_folder_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ck.pt"
    assert check_writable(path) == path
    assert path.parent.is_dir() and list(path.parent.iterdir()) == []


def test_check_writable_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    path = tmp_path / "file" / "sub" / "ck.pt"
    with pytest.raises(OSError, match=f"Cannot save to {re.escape(str(path))}"):
        check_writable(path)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_writable(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX, not root")
def test_check_writable_refuses_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=re.escape(str(folder / "ck.pt"))):
            check_writable(folder / "ck.pt")
    finally:
        folder.chmod(0o700)
