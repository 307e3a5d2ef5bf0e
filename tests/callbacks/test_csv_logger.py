"""CSVLoggerCB: rows equal the recorder's history, survive a crash, resume by appending."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pytest

import learner.callbacks.csv_logger
from learner import (
    Callback,
    CancelFitException,
    CSVLoggerCB,
    Learner,
    MetricsCB,
    RecorderCB,
    accuracy,
)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _as_history(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    def value(cell: str) -> Any:
        return None if cell == "" else float(cell)

    return [{k: value(v) for k, v in row.items()} for row in rows]


def test_rows_equal_the_history_exactly(tiny: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "logs" / "history.csv"  # the folder is created
    learn = Learner(**tiny, metrics=accuracy, cbs=[CSVLoggerCB(path)])
    learn.fit(3)
    assert path.read_text().splitlines()[0] == "epoch,train_loss,valid_loss,accuracy"
    assert _as_history(_read(path)) == learn.recorder.history  # full precision: equal, not close
    learn.fit(1, valid=False)  # the same callback goes on adding; no validation: an empty cell
    rows = _read(path)
    assert _as_history(rows) == learn.recorder.history and rows[-1]["valid_loss"] == ""


class Spy(Callback):
    """At each epoch's start, the file's lines as another process would read them."""

    order = 100

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def before_epoch(self, learn: Learner) -> None:
        self.seen.append(len(self.path.read_text().splitlines()))


class Crash(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def before_batch(self, learn: Learner) -> None:
        if learn.epoch == self.epoch and learn.iter == 1:
            raise RuntimeError("crash")


def test_each_epoch_is_on_disk_when_it_ends_and_survives_a_crash(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "h.csv"
    synced: list[int] = []  # lines in the file, as the OS has it, when it is synced
    fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(len(path.read_text().splitlines())), fsync(fd))[1]
    )
    spy = Spy(path)
    learn = Learner(**tiny, cbs=[CSVLoggerCB(path), spy])
    with pytest.raises(RuntimeError, match="crash"):
        learn.fit(4, cbs=[Crash(epoch=2)])
    assert spy.seen == [0, 2, 3]  # the file was readable (flushed) as each epoch ended
    assert synced == [2, 3]  # flushed before each sync, so the sync covers the row
    assert _as_history(_read(path)) == learn.recorder.history and len(learn.recorder.history) == 2


def test_resuming_appends_under_the_same_header(tiny: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    first = Learner(**tiny, metrics=accuracy)
    first.fit(2, cbs=[CSVLoggerCB(path)])
    second = Learner(**tiny, metrics=accuracy)  # a new process resuming the run
    second.fit(1, cbs=[CSVLoggerCB(path, append=True)])
    lines = path.read_text().splitlines()
    assert sum(line.startswith("epoch,") for line in lines) == 1 and len(lines) == 4
    assert _as_history(_read(path)) == first.recorder.history + second.recorder.history


def test_append_creates_a_missing_file_and_overwrite_replaces(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "h.csv"
    learn = Learner(**tiny)
    learn.fit(1, cbs=[CSVLoggerCB(path, append=True)])
    assert len(_read(path)) == 1
    learn.fit(1, cbs=[CSVLoggerCB(path)])  # append=False: a fresh file
    assert _as_history(_read(path)) == learn.recorder.history[1:]


def test_appending_to_other_columns_fails_before_training(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "h.csv"
    path.write_text("epoch,train_loss,valid_loss\n0,1.0,2.0\n")
    learn = Learner(**tiny, metrics=accuracy)
    with pytest.raises(ValueError) as info:
        learn.fit(1, cbs=[CSVLoggerCB(path, append=True)])
    assert str(info.value).startswith(
        f"{str(path)!r} has columns ['epoch', 'train_loss', 'valid_loss'] but this run's history "
        "has ['epoch', 'train_loss', 'valid_loss', 'accuracy']: log to another file, or pass "
        "append=False to overwrite it."
    )
    assert learn.recorder.history == [] and learn.recorder.losses == []  # nothing trained
    assert path.read_text() == "epoch,train_loss,valid_loss\n0,1.0,2.0\n"  # left as it was


def test_a_resumed_fit_checks_the_columns_it_will_write(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    # At before_fit a resumed fit's recorder is still empty (its history is loaded after every
    # before_fit): the columns come from the metrics, so a matching file is appended to ...
    path, ckpt = tmp_path / "h.csv", tmp_path / "ckpt.pt"
    first = Learner(**tiny, metrics=accuracy)
    first.fit(2, cbs=[CSVLoggerCB(path)])
    first.save(ckpt)
    second = Learner(**tiny, metrics=accuracy)
    second.fit(3, resume_from=ckpt, cbs=[CSVLoggerCB(path, append=True)])
    assert _as_history(_read(path)) == second.recorder.history and len(_read(path)) == 3
    # ... and one with other columns is an error before the resumed run trains.
    written = path.read_text()
    third = Learner(**tiny)
    with pytest.raises(ValueError, match=r"has columns \[.*'accuracy'\] but this run's"):
        third.fit(3, resume_from=ckpt, cbs=[CSVLoggerCB(path, append=True)])
    assert third.recorder.losses == [] and path.read_text() == written


def test_a_later_fit_with_other_metrics_fails_before_training(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "h.csv"
    learn = Learner(**tiny, cbs=[CSVLoggerCB(path)])
    learn.fit(1)
    learn.add_cb(MetricsCB(accuracy))  # replaces the metrics: the rows get another column
    with pytest.raises(ValueError, match=r"has columns .* but this run's history has .*accuracy"):
        learn.fit(1)
    assert len(learn.recorder.history) == 1 and len(_read(path)) == 1


def test_other_ranks_stop_with_rank_zero(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 1 (as torchrun sets it) does not read the file; rank 0 found it has other columns.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(learner.callbacks.csv_logger, "ranks_where", lambda flag: [0])
    learn = Learner(**tiny)
    with pytest.raises(ValueError, match="rank 0 cannot log to"):
        learn.fit(1, cbs=[CSVLoggerCB(tmp_path / "h.csv", append=True)])
    assert learn.recorder.losses == []


def test_an_epoch_cancelled_after_recording_is_still_written(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    class StopAtEpochEnd(Callback):
        order = RecorderCB.order  # runs after the recorder and before the logger

        def after_epoch(self, learn: Learner) -> None:
            raise CancelFitException()

    path = tmp_path / "h.csv"
    learn = Learner(**tiny, cbs=[StopAtEpochEnd(), CSVLoggerCB(path)])
    learn.fit(3)
    assert _as_history(_read(path)) == learn.recorder.history and len(learn.recorder.history) == 1


def test_bad_setups(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a folder"):
        CSVLoggerCB(tmp_path)
    learn = Learner(**tiny, default_cbs=False, cbs=[CSVLoggerCB(tmp_path / "h.csv")])
    with pytest.raises(ValueError, match=r"add a RecorderCB\(\)"):
        learn.fit(1)


def test_a_resumed_fit_goes_on_with_the_file_by_itself(tmp_path: Path) -> None:
    # The saved run wrote rows 0-2 but its last checkpoint is at the end of epoch 1: resumed, the
    # file holds epochs 0-3 once each, exactly as an uninterrupted run's file.
    import torch
    import torch.nn.functional as F
    from conftest import make_dls, make_model

    from learner import Callback, CancelFitException, CheckpointCB, Learner

    class StopAfterEpoch2(Callback):
        def after_epoch(self, learn: Learner) -> None:
            if learn.epoch == 2:
                raise CancelFitException()

    def learner() -> Learner:
        return Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD)

    learner().fit(4, cbs=CSVLoggerCB(tmp_path / "whole.csv"))
    ckpt, log = tmp_path / "ckpt.pt", tmp_path / "run.csv"
    cbs = [CSVLoggerCB(log), CheckpointCB(ckpt, every_n_epochs=2), StopAfterEpoch2()]
    learner().fit(4, cbs=cbs)
    assert len(log.read_text().splitlines()) == 1 + 3  # rows of epochs 0-2
    learner().fit(4, cbs=CSVLoggerCB(log), resume_from=ckpt)  # append=False, as by default
    assert log.read_text() == (tmp_path / "whole.csv").read_text()
