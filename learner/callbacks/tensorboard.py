"""Logging a run to TensorBoard: per-batch loss and learning rate, per-epoch history."""

from __future__ import annotations

import os
from typing import Any

from learner.callbacks.order import ORDERS
from learner.callbacks.recorder import RecorderCB, find_recorder
from learner.checks import check_int
from learner.core import BaseLearner
from learner.distributed import is_main_process
from learner.events import Callback

__all__ = ["TensorBoardCB"]


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            'TensorBoardCB needs the tensorboard package: pip install "learner[tensorboard]" '
            "(or pip install tensorboard)."
        ) from e
    return SummaryWriter


class TensorBoardCB(Callback):
    """Writes the training loss and learning rate of every batch, and every value of each epoch's
    history row, to TensorBoard event files in `log_dir`.

    Tags: `train/loss` and `train/lr` per training batch; `epoch/<key>` per epoch for each number
    in `learn.recorder.history` (`epoch/train_loss`, `epoch/valid_loss`, each metric). The step
    is the number of training batches so far, so epoch values line up with the batch curves. A
    fit resumed from a checkpoint goes on with the saved run's steps, and hides what the saved
    run logged after its checkpoint (`SummaryWriter(purge_step=...)`).

    The values come from `learn.recorder`, which reads the losses from the device once per epoch;
    they are written and flushed when the epoch ends, so logging adds no host read per batch and
    a crash keeps the completed epochs. To watch a long epoch live, `log_every=n` also writes
    every `n` training batches (one host read each time). Under torch.distributed only rank 0
    writes. During fit, `writer` is the `SummaryWriter`, for logging more (None on other ranks).

    Needs tensorboard: `pip install "learner[tensorboard]"`.

    Args:
        log_dir: folder for the event files; None: `runs/<date>_<host>`, as SummaryWriter does.
        log_every: also write the batch values every this many training batches; None: only at
            the end of each epoch.

    Events: `before_fit`, `before_epoch`, `after_batch`, `after_epoch`, `cleanup_fit`.
    Order: -4 (just after RecorderCB, whose values it writes).

    Examples:
        >>> learn.fit(3, cbs=[TensorBoardCB("runs/mnist")])
        >>> # then: tensorboard --logdir runs
    """

    order = ORDERS["TensorBoardCB"]
    in_side_runs = False

    def __init__(
        self, log_dir: str | os.PathLike[str] | None = None, log_every: int | None = None
    ) -> None:
        self._writer_cls = _summary_writer_class()  # fail now, not at the end of an epoch
        check_int("log_every", log_every, 1, optional=True)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.log_every = log_every
        self.writer: Any = None
        self.recorder: RecorderCB | None = None
        self.n_batches = self.n_epochs = 0  # batches and history rows of the recorder written

    def before_fit(self, learn: BaseLearner) -> None:
        self.recorder = find_recorder(learn, "TensorBoardCB")
        # A resumed fit's writer waits for the saved run's records (loaded after before_fit).
        if is_main_process() and not learn.resuming:
            self.writer = self._writer_cls(log_dir=self.log_dir)

    def before_epoch(self, learn: BaseLearner) -> None:
        # What the recorder holds when the fit's first epoch starts (a resumed fit loads it after
        # before_fit) was written before: go on after it.
        if learn.epoch == learn.start_epoch and self.recorder is not None:
            self.n_batches, self.n_epochs = len(self.recorder.lrs), len(self.recorder.history)
            if learn.resuming and is_main_process() and self.writer is None:
                # Steps from the checkpoint's on, which the saved run may have logged already
                # (it went on after the checkpoint), are hidden: this fit logs them again.
                self.writer = self._writer_cls(log_dir=self.log_dir, purge_step=self.n_batches)

    def after_batch(self, learn: BaseLearner) -> None:
        rec, every = self.recorder, self.log_every
        if not (every and learn.training and self.writer is not None and rec is not None):
            return
        if len(rec.lrs) - self.n_batches >= every:
            self._write_batches(rec)
            self.writer.flush()

    def _write_batches(self, rec: RecorderCB) -> None:
        losses = rec.losses  # reads the recorder's pending losses from the device, all at once
        for step in range(self.n_batches, len(losses)):
            self.writer.add_scalar("train/loss", losses[step], step)
            self.writer.add_scalar("train/lr", rec.lrs[step], step)
        self.n_batches = len(losses)

    def after_epoch(self, learn: BaseLearner) -> None:
        rec = self.recorder
        if self.writer is None or rec is None:
            return
        self._write_batches(rec)
        for i in range(self.n_epochs, len(rec.history)):
            step = rec.epoch_iters[i]
            for key, value in rec.history[i].items():
                if key != "epoch" and _is_number(value):
                    self.writer.add_scalar(f"epoch/{key}", value, step)
        self.n_epochs = len(rec.history)
        self.writer.flush()

    def cleanup_fit(self, learn: BaseLearner) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
