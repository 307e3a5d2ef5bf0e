"""atomic_save: a failed or interrupted write leaves the previous file intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import learner.io
from learner import atomic_save


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
