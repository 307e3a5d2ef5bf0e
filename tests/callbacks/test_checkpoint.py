"""CheckpointCB: when it writes, what it keeps, its arguments and its Ctrl-C handler."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from learner import Callback, CheckpointCB, Learner


def _progress(path: Path) -> tuple[int, int]:
    p = torch.load(path, weights_only=True)["progress"]
    return p["epoch"], p["iter"]


def test_writes_every_n_epochs_and_batches(tiny: dict[str, Any], tmp_path: Path) -> None:
    cb = CheckpointCB(tmp_path / "ck.pt", every_n_epochs=2, every_n_batches=3)
    Learner(**tiny).fit(4, cbs=[cb])
    # 2 batches an epoch: batch 3 of the fit is epoch 1's first, batch 6 epoch 2's second.
    assert cb.written == [(1, 1), (2, 0), (2, 2), (4, 0)]
    assert _progress(tmp_path / "ck.pt") == (4, 0)


def test_keep_last_keeps_the_previous_ones_beside_the_newest(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    Learner(**tiny).fit(4, cbs=[CheckpointCB(tmp_path / "ck.pt", keep_last=3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.1.pt", "ck.2.pt", "ck.pt"]
    assert [_progress(tmp_path / n) for n in ("ck.pt", "ck.1.pt", "ck.2.pt")] == [
        (4, 0),
        (3, 0),
        (2, 0),
    ]


def test_mid_epoch_checkpoints_keep_the_epochs_random_states(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    cb = CheckpointCB(tmp_path / "ck.pt", every_n_epochs=None, every_n_batches=1)
    Learner(**tiny).fit(1, cbs=[cb])
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ckpt["progress"]["iter"] == 2 and ckpt["epoch_rng"] is not None
    assert cb.written == [(0, 1), (0, 2)]


def test_the_sigint_handler_is_put_back(tiny: dict[str, Any], tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    Learner(**tiny).fit(1, cbs=[CheckpointCB(tmp_path / "ck.pt")])
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize(
    "kwargs",
    [{"every_n_epochs": 0}, {"every_n_batches": 1.5}, {"keep_last": 0}, {"every_n_epochs": True}],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CheckpointCB("ck.pt", **kwargs)


class CtrlC(Callback):
    """Sends this process SIGINT `times` times at `after_loss` of the given batch and phase."""

    def __init__(self, epoch: int, iter: int, training: bool, times: int = 1) -> None:
        self.at, self.times = (epoch, iter, training), times

    def after_loss(self, learn: Learner) -> None:
        if (learn.epoch, learn.iter, learn.training) == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize(
    ("training", "times", "written", "n_losses"),
    [(True, 1, [(0, 2)], 2), (False, 1, [(1, 0)], 2), (True, 2, [], 1)],
)
def test_ctrl_c_finishes_the_step_writes_then_stops(
    tiny: dict[str, Any],
    tmp_path: Path,
    training: bool,
    times: int,
    written: list[Any],
    n_losses: int,
) -> None:
    # During training: after the batch; during validation: after the epoch; twice: at once.
    learn = Learner(**tiny)
    cb = CheckpointCB(tmp_path / "ck.pt", every_n_epochs=None)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, cbs=[cb, CtrlC(0, 1 if training else 0, training, times)])
    assert cb.written == written
    assert len(learn.recorder.losses) == n_losses
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    learn.fit(1)  # still usable
    assert len(learn.recorder.losses) == n_losses + 2
