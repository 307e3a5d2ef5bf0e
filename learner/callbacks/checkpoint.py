"""Periodic checkpoints that a run resumes from exactly, and a clean stop on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from learner.callbacks.order import ORDERS
from learner.checks import check_int
from learner.core import BaseLearner
from learner.distributed import is_distributed, is_main_process, ranks_where
from learner.events import Callback
from learner.io import check_writable, remove_stale_temps, temp_path
from learner.rng import rng_state
from learner.saving import save

__all__ = ["CheckpointCB"]


class CheckpointCB(Callback):
    """Writes a checkpoint (`learn.save`) every `every_n_epochs` epochs, every `every_n_batches`
    training batches and/or every `every_n_steps` optimizer steps; `fit(n, resume_from=path)`
    continues from it exactly.

    Each checkpoint is written atomically to `path`, which always holds the newest complete one.
    With `keep_last=k`, the `k - 1` before it are kept beside it as `name.1.ext` (the previous
    one), `name.2.ext`, ... A checkpoint is written only between two training batches or at the
    end of an epoch, when every callback is done with them, so it is never half-updated: after
    batch `i` (at `cleanup_batch`, once the schedulers have stepped) or after the epoch's row is
    recorded (at `after_epoch`). At the start of each training phase it keeps the random states
    the epoch's shuffle is drawn from, so that a resumed epoch sees the same batches. In a fit
    budgeted in steps (`fit(steps=..., valid_every=...)`, whose epochs end at each validation)
    the checkpoint holds the position in the training loader instead (`learner.steps`), and
    `every_n_steps` counts the optimizer steps of the fit (`learn.fit_step`).

    Under torch.distributed (`DistributedCB`) every rank writes together (`learn.save`: each
    hands rank 0 its own metrics' accumulators and random states, a sharded model's weights are
    gathered whole) and rank 0 writes the file; a Ctrl-C on any rank stops every rank at the same
    batch, after one checkpoint (one small all-reduce per batch, under torch.distributed only).

    At `before_fit` it checks that it can write there (creating the folder, and a temporary file
    in it), so an unwritable path fails at once, naming it, rather than after the first epoch.

    Ctrl-C during a fit (in the main thread) does not stop it at once: the current training
    batch, or the epoch during validation, is finished, a checkpoint of that point is written,
    and then `KeyboardInterrupt` is raised, as usual. A second Ctrl-C stops at once. The SIGINT
    handler found at `before_fit` is put back at the end of the fit, whatever it was. A process
    that ignores SIGINT (`signal.SIG_IGN`: started by `nohup`, as a background job, by some
    CI runners) asked not to be interrupted by it: then this callback leaves it ignored.

    A fit stopped by `EarlyStoppingCB` is not checkpointed at the epoch that stopped it (that
    callback, order 60, ends the fit before this one's `after_epoch`): resuming from the previous
    checkpoint reproduces the stop. A callback drawing random numbers at `before_train` with an
    order above 65 would draw them after the states this one keeps.

    Events: `before_fit`, `before_train`, `after_batch`, `cleanup_batch`, `after_epoch`,
    `cleanup_fit`. Order: 65 (after the recorder, the schedulers and `EarlyStoppingCB`).

    Args:
        path: the file to write. Default "checkpoint.pt".
        every_n_epochs: write at the end of every n-th epoch; None: never. Default 1.
        every_n_batches: write after every n-th training batch of the fit; None: never.
        every_n_steps: write after every n-th optimizer step of the fit (with gradient
            accumulation, a step is several batches); None: never.
        keep_last: how many checkpoints to keep, >= 1. Default 1.

    Examples:
        >>> learn.fit(10, cbs=[CheckpointCB("run/ckpt.pt", every_n_batches=500)])
        >>> # the process dies; later, in a new one, with the same setup:
        >>> learn.fit(10, cbs=[CheckpointCB("run/ckpt.pt", every_n_batches=500)],
        ...           resume_from="run/ckpt.pt")
    """

    order = ORDERS["CheckpointCB"]
    in_side_runs = False  # the sweep is not part of the run: it writes nothing

    def __init__(
        self,
        path: str | os.PathLike[str] = "checkpoint.pt",
        every_n_epochs: int | None = 1,
        every_n_batches: int | None = None,
        keep_last: int = 1,
        every_n_steps: int | None = None,
    ) -> None:
        check_int("every_n_epochs", every_n_epochs, 1, optional=True)
        check_int("every_n_batches", every_n_batches, 1, optional=True)
        check_int("every_n_steps", every_n_steps, 1, optional=True)
        self.every_n_steps = every_n_steps
        check_int("keep_last", keep_last, 1)
        self.path = Path(path)
        self.every_n_epochs, self.every_n_batches = every_n_epochs, every_n_batches
        self.keep_last = keep_last
        self.epoch_rng: dict[str, Any] | None = None
        self.n_batches = 0  # training batches completed in this fit
        self.last_step = 0  # learn.fit_step at the last training batch
        self.batch_done = False
        self.interrupted = False
        self._old_handler: Any = None  # the SIGINT handler to put back; None: none replaced
        self.written: list[tuple[int, int]] = []  # (epoch, batches done) of each write

    # -- Ctrl-C: finish the step, write, then stop --

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, self._old_handler)  # a second Ctrl-C stops at once
        print(
            "CheckpointCB: interrupted; finishing the current step to write a checkpoint "
            "(Ctrl-C again to stop now).",
            flush=True,
        )

    def before_fit(self, learn: BaseLearner) -> None:
        self.n_batches, self.batch_done, self.interrupted = 0, False, False
        self.last_step = learn.start_step
        if is_main_process():  # the one writer: fail now rather than after an epoch
            check_writable(self.path)
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set signal handlers
        old = signal.getsignal(signal.SIGINT)
        if old == signal.SIG_IGN:  # the process asked not to be interrupted: leave it so
            return
        signal.signal(signal.SIGINT, self._on_sigint)
        # None: a handler not set from Python; the default one raises KeyboardInterrupt.
        self._old_handler = signal.default_int_handler if old is None else old

    def cleanup_fit(self, learn: BaseLearner) -> None:
        if self._old_handler is not None:
            if signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, self._old_handler)
            self._old_handler = None
        if self.interrupted:  # interrupted before a point where it could stop: stop now
            self.interrupted = False
            raise KeyboardInterrupt

    # -- when to write --

    def before_train(self, learn: BaseLearner) -> None:
        # The loop iterates the loader right after before_train: its shuffle draws from these.
        # (A fit resumed mid-epoch has put back the saved epoch's states by now: ResumeCB.)
        self.epoch_rng = rng_state(learn.dls)

    def after_batch(self, learn: BaseLearner) -> None:
        self.batch_done = learn.training

    def cleanup_batch(self, learn: BaseLearner) -> None:
        if not self.batch_done:
            return
        self.batch_done = False
        self.n_batches += 1
        due = self.every_n_batches is not None and self.n_batches % self.every_n_batches == 0
        stepped, self.last_step = learn.fit_step != self.last_step, learn.fit_step
        if stepped and self.every_n_steps is not None:
            due = due or learn.fit_step % self.every_n_steps == 0
        self._agree_on_interruption()
        if due or self.interrupted:
            self._write(learn, learn.epoch, learn.iter + 1)
        self._stop_if_interrupted()

    def after_epoch(self, learn: BaseLearner) -> None:
        n = self.every_n_epochs
        self._agree_on_interruption()
        if learn.run_train and ((n is not None and (learn.epoch + 1) % n == 0) or self.interrupted):
            self._write(learn, learn.epoch + 1, 0)
        self._stop_if_interrupted()

    def _agree_on_interruption(self) -> None:
        # Writing is a collective: a Ctrl-C seen by one rank (torchrun passes it on to each, not
        # at the same batch) stops all of them at the same point, with one checkpoint.
        if is_distributed():
            self.interrupted = bool(ranks_where(self.interrupted))

    def _stop_if_interrupted(self) -> None:
        if self.interrupted:
            self.interrupted = False
            raise KeyboardInterrupt

    # -- writing --

    def _write(self, learn: BaseLearner, epoch: int, batches: int) -> None:
        # Every rank takes part (each hands rank 0 its own states, FSDP gathers the shards);
        # rank 0 alone writes.
        if is_main_process() and self.keep_last > 1 and self.path.exists():
            self._rotate()
        progress = {"epoch": epoch, "iter": batches}
        stream = learn.train_stream  # a fit in steps: where the pass over the loader started
        if stream is not None:
            epoch_rng = stream.pass_rng if stream.pass_iter else None
        else:
            epoch_rng = self.epoch_rng if batches else None
        save(learn, self.path, progress=progress, epoch_rng=epoch_rng)
        self.written.append((epoch, batches))

    def _kept(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.{i}{self.path.suffix}")

    def _rotate(self) -> None:
        # Shift name.1 -> name.2 ..., then keep the newest as name.1 by a hard link (or a copy),
        # so `path` itself holds a complete checkpoint until the new one replaces it. The link or
        # copy goes through a temporary file of a unique name, as atomic_save's.
        start = time.time()
        for i in range(self.keep_last - 1, 1, -1):
            if self._kept(i - 1).exists():
                os.replace(self._kept(i - 1), self._kept(i))
        kept = self._kept(1)
        tmp = temp_path(kept)
        try:
            try:
                os.link(self.path, tmp)
            except OSError:  # no hard links on this file system
                shutil.copy2(self.path, tmp)
            os.replace(tmp, kept)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        remove_stale_temps(kept, before=start)
