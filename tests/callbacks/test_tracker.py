"""EarlyStoppingCB, SaveBestCB and TerminateOnNaNCB on scripted metric sequences."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_dls

import learner.io
from learner import (
    Callback,
    EarlyStoppingCB,
    Learner,
    Monitor,
    SaveBestCB,
    TerminateOnNaNCB,
)


def scripted(values: Iterable[float]) -> Any:
    """A metric returning the next value at each call: one call per epoch, since the tiny
    learner has one validation batch (the values are exact in float32)."""
    it = iter(values)

    def score(preds: torch.Tensor, targets: torch.Tensor) -> float:
        return next(it)

    return score


def learner_with(values: Iterable[float], tiny: dict[str, Any], **kwargs: Any) -> Learner:
    return Learner(**tiny, metrics={"score": scripted(values)}, **kwargs)


class WeightsPerEpochCB(Callback):
    """Keeps a copy of the weights at the end of every epoch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def after_epoch(self, learn: Learner) -> None:
        self.weights.append({k: v.clone() for k, v in learn.model.state_dict().items()})


class CleanupSeenCB(Callback):
    def __init__(self) -> None:
        self.seen = False

    def cleanup_fit(self, learn: Learner) -> None:
        self.seen = True


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- EarlyStoppingCB ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, kwargs, stop_epoch",
    [
        # best 0.25 at epoch 1, then 2 epochs without improvement
        ([0.5, 0.25, 0.375, 0.3125] + [0.0] * 6, dict(patience=2), 3),
        # patience 0: the first epoch without improvement stops
        ([0.5, 0.25, 0.375] + [0.0] * 7, dict(patience=0), 2),
        # 0.9375 and 0.875 improve on 1.0 by less than min_delta 0.125 (strictly more is needed)
        ([1.0, 0.9375, 0.875] + [0.0] * 7, dict(patience=2, min_delta=0.125), 2),
        # mode max: 0.75 at epoch 1; 0.625 and an equal 0.75 are no improvement
        ([0.5, 0.75, 0.625, 0.75] + [1.0] * 6, dict(patience=2, mode="max"), 3),
    ],
)
def test_early_stopping_stops_at_the_expected_epoch(
    tiny: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    values: list[float],
    kwargs: dict[str, Any],
    stop_epoch: int,
) -> None:
    cleanup = CleanupSeenCB()
    learn = learner_with(values, tiny, cbs=[cleanup])
    early = EarlyStoppingCB("score", **kwargs)
    learn.fit(10, cbs=[early])
    assert [h["score"] for h in learn.recorder.history] == values[: stop_epoch + 1]
    assert early.stopped_epoch == stop_epoch == learn.epoch
    assert cleanup.seen and not learn.model.training  # cleanup ran; the last phase validated
    assert early.reason is not None and f"stopped after epoch {stop_epoch}" in early.reason
    lines = capsys.readouterr().out.splitlines()
    # The epoch that triggered the stop still has its results row, then the reason is printed.
    assert [line.split()[0] for line in lines[1:-1]] == [str(e) for e in range(stop_epoch + 1)]
    assert lines[-1] == early.reason


def test_early_stopping_does_not_stop_while_improving(tiny: dict[str, Any]) -> None:
    learn = learner_with([1.0, 0.5, 0.25, 0.125], tiny)
    early = EarlyStoppingCB("score", patience=1)
    learn.fit(4, cbs=[early])
    assert len(learn.recorder.history) == 4
    assert early.stopped_epoch is None and early.reason is None
    assert early.best == 0.125 and early.best_epoch == 3


def test_early_stopping_on_valid_loss_default(tiny: dict[str, Any]) -> None:
    # The validation loss of a model that does not train (lr ~ 0) is the same every epoch.
    tiny["lr"] = 1e-30
    learn = Learner(**tiny)
    early = EarlyStoppingCB(patience=2)
    learn.fit(10, cbs=[early])
    assert early.stopped_epoch == 2 and len(learn.recorder.history) == 3


def test_unknown_monitor_is_an_error_at_before_fit(tiny: dict[str, Any]) -> None:
    learn = learner_with([0.5], tiny)
    with pytest.raises(ValueError, match="monitor='acc'") as info:
        learn.fit(1, cbs=[EarlyStoppingCB("acc")])
    assert "'epoch', 'train_loss', 'valid_loss', 'score'" in str(info.value)
    assert learn.recorder.history == [] and learn.recorder.losses == []  # nothing trained


def test_valid_loss_without_a_validation_loader_is_an_error(tiny: dict[str, Any]) -> None:
    tiny["dls"] = make_dls(valid=False)
    with pytest.raises(ValueError, match="no validation loader"):
        Learner(**tiny).fit(1, cbs=[SaveBestCB()])


def test_monitor_needs_a_recorder(tiny: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="no RecorderCB"):
        Learner(**tiny, default_cbs=False).fit(1, cbs=[EarlyStoppingCB()])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="best"), "mode must be 'min'"),
        (dict(min_delta=-1), "min_delta must be"),
        (dict(patience=-1), "patience must be"),
        (dict(monitor=3), "monitor must be"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        EarlyStoppingCB(**kwargs)


def test_monitor_better() -> None:
    m = Monitor("x", "min", min_delta=0.5)
    assert m.better(1.0, 2.0) and not m.better(1.5, 2.0) and not m.better(float("nan"), 2.0)
    assert m.better(1e300, m.worst)
    assert Monitor("x", "max").better(2.0, 1.0) and not Monitor("x", "max").better(1.0, 1.0)


# -- SaveBestCB -----------------------------------------------------------------------------------


@pytest.mark.parametrize("load_best", [True, False])
def test_save_best_keeps_the_best_epoch(
    tiny: dict[str, Any], tmp_path: Path, load_best: bool
) -> None:
    path = tmp_path / "best.pt"
    probe = WeightsPerEpochCB()
    learn = learner_with([0.5, 0.25, 0.375, 0.3125], tiny, cbs=[probe])
    save = SaveBestCB(path, monitor="score", load_best=load_best)
    learn.fit(4, cbs=[save])
    assert save.best == 0.25 and save.best_epoch == 1
    assert same_weights(torch.load(path, weights_only=True), probe.weights[1])
    final = learn.model.state_dict()
    assert same_weights(final, probe.weights[1] if load_best else probe.weights[3])
    assert not same_weights(probe.weights[1], probe.weights[3])


def test_save_best_loads_after_early_stopping(tiny: dict[str, Any], tmp_path: Path) -> None:
    # EarlyStoppingCB cancels the fit, so after_fit does not run: the load happens at cleanup.
    probe = WeightsPerEpochCB()
    learn = learner_with([0.5, 0.25, 0.375, 0.3125] + [0.0] * 6, tiny, cbs=[probe])
    cbs = [
        SaveBestCB(tmp_path / "best.pt", "score", load_best=True),
        EarlyStoppingCB("score", patience=2),
    ]
    learn.fit(10, cbs=cbs)
    assert len(probe.weights) == 4
    assert same_weights(learn.model.state_dict(), probe.weights[1])


def test_save_best_failed_write_keeps_the_previous_best(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "best.pt"
    probe = WeightsPerEpochCB()
    learn = learner_with([0.5, 0.25, 0.125], tiny, cbs=[probe])
    real_save, calls = torch.save, []

    def save_fails_third_time(obj: Any, f: Any) -> None:
        calls.append(1)
        real_save(obj, f)
        if len(calls) == 3:
            f.truncate(5)
            raise OSError("disk full")

    monkeypatch.setattr(learner.io.torch, "save", save_fails_third_time)
    with pytest.raises(OSError, match="disk full"):
        learn.fit(3, cbs=[SaveBestCB(path, "score")])
    assert same_weights(torch.load(path, weights_only=True), probe.weights[1])
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


class FolderSeenCB(Callback):
    """What is in `folder` at `before_fit`, just after SaveBestCB's."""

    order = SaveBestCB.order + 1

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, None

    def before_fit(self, learn: Learner) -> None:
        self.seen = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else None


def test_save_best_makes_its_folder_before_training_and_leaves_no_trace(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    folder = tmp_path / "models" / "run1"
    spy = FolderSeenCB(folder)
    learn = learner_with([0.5, 0.25], tiny, cbs=[spy])
    learn.fit(2, cbs=[SaveBestCB(folder / "best.pt", "score")])
    assert spy.seen == []  # created, writable, and the probe file is gone
    assert [p.name for p in folder.iterdir()] == ["best.pt"]


def _fails_before_training(learn: Learner, save: SaveBestCB, error: Any, match: str) -> None:
    with pytest.raises(error, match=match):
        learn.fit(2, cbs=[save])
    assert learn.recorder.history == [] and learn.recorder.losses == []  # nothing trained


def test_save_best_into_a_folder_that_cannot_be_made_fails_before_training(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "models").write_text("a file where the folder should be")
    path = tmp_path / "models" / "best.pt"
    learn = learner_with([0.5, 0.25], tiny)
    match = rf"SaveBestCB cannot write {re.escape(repr(str(path)))}.*in a folder you can write to"
    _fails_before_training(learn, SaveBestCB(path, "score"), OSError, match)
    _fails_before_training(learn, SaveBestCB(tmp_path, "score"), ValueError, "is a folder")


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="needs a POSIX user that permissions stop"
)
def test_save_best_into_a_read_only_folder_fails_before_training(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        learn = learner_with([0.5, 0.25], tiny)
        save = SaveBestCB(folder / "best.pt", "score")
        _fails_before_training(learn, save, PermissionError, "SaveBestCB cannot write")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# -- TerminateOnNaNCB ------------------------------------------------------------------------------


class NaNLossAtCB(Callback):
    """Makes the loss of the `n`-th training batch (0-based, over the whole fit) NaN."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, -1

    def after_loss(self, learn: Learner) -> None:
        if learn.training:
            self.seen += 1
            if self.seen == self.n:
                learn.loss = learn.loss * float("nan")  # keeps the graph: backward would run


class WeightsPerStepCB(Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def after_step(self, learn: Learner) -> None:
        self.weights.append({k: v.clone() for k, v in learn.model.state_dict().items()})


def test_nan_stops_before_the_update(
    tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    probe = WeightsPerStepCB()
    learn = Learner(**tiny, cbs=[NaNLossAtCB(3), probe])  # epoch 1, batch 1
    nan = TerminateOnNaNCB()
    learn.fit(5, cbs=[nan])
    assert len(probe.weights) == 3  # steps of batches 0, 1, 2 only
    assert same_weights(learn.model.state_dict(), probe.weights[-1])
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert (nan.stopped_epoch, nan.stopped_batch) == (1, 1)
    assert nan.reason is not None and "epoch 1, batch 1" in nan.reason
    assert "nan" in nan.reason and nan.reason in capsys.readouterr().out
    assert len(learn.recorder.losses) == 3 and len(learn.recorder.history) == 1


def test_nan_check_ignores_finite_and_validation_losses(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    nan = TerminateOnNaNCB()
    learn.add_cb(nan)
    assert learn.terminate_on_nan is nan
    learn.fit(2)
    assert nan.reason is None and len(learn.recorder.history) == 2
