"""ProgressCB: a clean table when output is not a terminal; bars in a terminal."""

from __future__ import annotations

import io
import re
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_data, make_model
from fastprogress import fastprogress as fp

from learner import Learner, ProgressCB, accuracy
from learner.data import DataLoaders


def test_no_carriage_returns_when_not_a_terminal(tiny: dict[str, Any], capsys: Any) -> None:
    Learner(**tiny, metrics=accuracy).fit(3)
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[0].split() == [
        "epoch",
        "train_loss",
        "valid_loss",
        "accuracy",
        "samples/s",
        "time",
    ]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
    # 16 training samples an epoch, over the training phase's time: a whole number of samples/s
    assert all(int(line.split()[4]) > 0 for line in lines[1:])


def test_columns_follow_the_phases_that_run(tiny: dict[str, Any], capsys: Any) -> None:
    learn = Learner(**tiny)
    learn.fit(1, valid=False)
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["epoch", "train_loss", "samples/s", "time"]
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
    assert ["epoch", "train_loss", "valid_loss", "accuracy", "samples/s", "time"] in lines
    assert [cells[0] for cells in lines if len(cells) == 6 and cells[5] == "00:00"] == ["0", "1"]


def test_bars_can_be_forced_on_or_off(
    tiny: dict[str, Any], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    Learner(**tiny, cbs=[ProgressCB(bars=True)]).fit(2)
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "\r" in out  # drawn, though output is not a terminal
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    Learner(**tiny, cbs=[ProgressCB(bars=False)]).fit(2)
    assert "\r" not in term.getvalue() and "Epoch" not in term.getvalue()
    assert term.getvalue().splitlines()[0].split()[:2] == ["epoch", "train_loss"]


def test_bar_is_updated_only_when_it_redraws(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"update": 0, "update_bar": 0}
    for name in calls:
        real = getattr(fp.ConsoleProgressBar, name)

        def counting(self: Any, val: int, name: str = name, real: Any = real) -> Any:
            calls[name] += 1
            return real(self, val)

        monkeypatch.setattr(fp.ConsoleProgressBar, name, counting)
    x, y = make_data(400)
    dls = DataLoaders.from_tensors(x[:320], y[:320], x[320:], y[320:], bs=4)
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD)
    learn.fit(1, cbs=[ProgressCB(bars=True, update_every=60.0)])
    # 90 batches, but update() is called only to draw: at 0, the first 5 and the last of each
    # phase (fastprogress' own schedule), and twice for the epoch bar; never to do nothing.
    assert calls["update"] == calls["update_bar"] == 2 * 7 + 2
