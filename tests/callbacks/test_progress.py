"""ProgressCB: a clean table when output is not a terminal; bars in a terminal."""

from __future__ import annotations

import io
import re
import sys
from typing import Any

import pytest

from learner import Learner, accuracy


def test_no_carriage_returns_when_not_a_terminal(tiny: dict[str, Any], capsys: Any) -> None:
    Learner(**tiny, metrics=accuracy).fit(3)
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]


def test_columns_follow_the_phases_that_run(tiny: dict[str, Any], capsys: Any) -> None:
    learn = Learner(**tiny)
    learn.fit(1, valid=False)
    assert capsys.readouterr().out.splitlines()[0].split() == ["epoch", "train_loss", "time"]
    learn.fit(1, train=False)
    assert capsys.readouterr().out.splitlines()[0].split() == ["epoch", "valid_loss", "time"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_in_a_terminal(tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    Learner(**tiny, metrics=accuracy).fit(2)
    out = term.getvalue()
    assert "Epoch 1/2" in out and "Epoch 2/2" in out and "loss " in out
    lines = [line.split() for line in re.split("[\r\n]", out)]
    assert ["epoch", "train_loss", "valid_loss", "accuracy", "time"] in lines
    assert [cells[0] for cells in lines if len(cells) == 5 and cells[4] == "00:00"] == ["0", "1"]
