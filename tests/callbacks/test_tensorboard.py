"""TensorBoardCB: event files read back equal the recorder's values; rank 0 only; no host sync."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, count_host_syncs, make_data, make_model

from learner import Callback, Learner, TensorBoardCB, accuracy

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason='tensorboard not installed: pip install "learner[tensorboard]"',
)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _f32(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.float32).tolist()  # how event files store them


@needs_tensorboard
def test_event_files_hold_the_recorded_values(tiny: dict[str, Any], tmp_path: Path) -> None:
    learn = Learner(**tiny, metrics=accuracy, cbs=[TensorBoardCB(tmp_path)])
    learn.fit(2)
    learn.fit(1, lr=0.05)  # a second fit continues the steps
    rec = learn.recorder
    got = _scalars(tmp_path)
    assert set(got) == {
        "train/loss",
        "train/lr",
        "epoch/train_loss",
        "epoch/valid_loss",
        "epoch/accuracy",
    }
    steps = list(range(6))
    assert got["train/loss"] == list(zip(steps, _f32(rec.losses)))
    assert got["train/lr"] == list(zip(steps, _f32(rec.lrs)))
    for key in ("train_loss", "valid_loss", "accuracy"):
        values = _f32([h[key] for h in rec.history])
        assert got[f"epoch/{key}"] == list(zip([2, 4, 6], values))  # at the batch count


class ReadBack(Callback):
    """Reads the event files as TensorBoard would while the run goes on."""

    order = 10

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.seen, self.epoch_values = log_dir, [], []

    def before_epoch(self, learn: Learner) -> None:
        self.epoch_values.append(len(_scalars(self.log_dir).get("epoch/train_loss", [])))

    def after_batch(self, learn: Learner) -> None:
        if learn.training:
            self.seen.append(len(_scalars(self.log_dir).get("train/loss", [])))


@needs_tensorboard
def test_log_every_writes_during_the_epoch(tmp_path: Path) -> None:
    x, y = make_data(20)
    dls = SimpleNamespace(train=batches(x, y, 4), valid=None)  # 5 batches an epoch
    learn = Learner(make_model(), dls, F.cross_entropy)
    spy = ReadBack(tmp_path)
    learn.fit(2, cbs=[TensorBoardCB(tmp_path, log_every=2), spy])
    assert spy.seen == [0, 2, 2, 4, 4, 5, 7, 7, 9, 9]  # and the rest at each epoch end
    spy = ReadBack(tmp_path / "per_epoch")
    learn.fit(2, cbs=[TensorBoardCB(tmp_path / "per_epoch"), spy])
    assert spy.seen == [0] * 5 + [5] * 5  # by default, at the end of each epoch
    assert spy.epoch_values == [0, 1]  # flushed then: TensorBoard shows each epoch as it ends


@needs_tensorboard
def test_only_rank_zero_writes(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rank as torchrun sets it (learner.distributed.rank() reads it without a process group).
    monkeypatch.setenv("RANK", "1")
    learn = Learner(**tiny, cbs=[TensorBoardCB(tmp_path / "rank1")])
    learn.fit(2)
    assert not (tmp_path / "rank1").exists() and learn.tensor_board.writer is None
    monkeypatch.setenv("RANK", "0")
    learn.fit(1)
    assert len(_scalars(tmp_path / "rank1")["train/loss"]) == 2


@needs_tensorboard
def test_no_host_sync_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def syncs(n_batches: int) -> int:
        x, y = make_data(n_batches * 4, seed=7)
        dls = SimpleNamespace(train=batches(x, y, 4), valid=batches(x, y, 4))
        learn = Learner(make_model(), dls, F.cross_entropy, opt_func=torch.optim.SGD)
        tb = TensorBoardCB(tmp_path / str(n_batches))
        return count_host_syncs(monkeypatch, lambda: learn.fit(2, cbs=[tb]))

    assert syncs(3) == syncs(30)


def test_missing_tensorboard_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ImportError, match=r'pip install "learner\[tensorboard\]"'):
        TensorBoardCB()


@needs_tensorboard
def test_bad_setups(tiny: dict[str, Any], tmp_path: Path) -> None:
    for log_every in (0, 1.5, True):
        with pytest.raises(ValueError, match="log_every"):
            TensorBoardCB(tmp_path, log_every=log_every)  # type: ignore[arg-type]
    learn = Learner(**tiny, default_cbs=False, cbs=[TensorBoardCB(tmp_path)])
    with pytest.raises(ValueError, match=r"add a RecorderCB\(\)"):
        learn.fit(1)


def test_a_resumed_fit_goes_on_with_the_saved_runs_steps(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoardCB needs tensorboard")
    from conftest import make_dls

    from learner import CheckpointCB

    made: list[dict[str, Any]] = []

    class FakeWriter:
        def __init__(self, **kwargs: Any) -> None:
            self.steps: list[int] = []
            made.append({"kwargs": kwargs, "steps": self.steps})

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            if tag == "train/loss":
                self.steps.append(step)

        def flush(self) -> None: ...
        def close(self) -> None: ...

    def learner() -> tuple[Learner, TensorBoardCB]:
        tb = TensorBoardCB(tmp_path / "runs")
        tb._writer_cls = FakeWriter  # type: ignore[attr-defined]
        return Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, cbs=tb), tb

    learn, _ = learner()
    learn.fit(2, cbs=CheckpointCB(tmp_path / "ckpt.pt"))  # 2 batches an epoch
    learn, _ = learner()
    learn.fit(4, resume_from=tmp_path / "ckpt.pt")
    first, resumed = made
    assert "purge_step" not in first["kwargs"] and first["steps"] == [0, 1, 2, 3]
    assert resumed["kwargs"]["purge_step"] == 4 and resumed["steps"] == [4, 5, 6, 7]
