"""Resuming a saved run exactly where it stopped: what `fit(n, resume_from=path)` adds."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from learner.callbacks.order import ORDERS
from learner.core import BaseLearner, Callback
from learner.rng import set_rng_state
from learner.saving import check_model, read_checkpoint, restore

__all__ = ["ResumeCB"]


class ResumeCB(Callback):
    """Continues the run saved in a checkpoint (`learn.save`, `CheckpointCB`).

    `fit(n_epochs, resume_from=path)` adds it for that fit; the file is read and checked against
    the model when the fit is called, and the fit starts where the run stopped
    (`learn.start_epoch`, `learn.start_iter`, with `learn.resuming` True). The protocol:

    1. Every callback's `before_fit` runs as in a fresh fit: callbacks set themselves up (build
       their scheduler or GradScaler, reset their counters).
    2. Then, last at `before_fit`, this callback puts the run back: the weights, the gradients
       held between steps, the optimizer state, every callback's `load_state_dict`, and the
       random states (mid-epoch: those the epoch's shuffle was drawn from).
    3. Mid-epoch, at the first `before_train`, it hands the loop a loader that skips the
       batches the saved run trained on (without running them), then puts back the random
       states of the moment the checkpoint was written. Callbacks that accumulate over a
       training phase keep their loaded accumulators when `learn.start_iter > 0`.

    So a callback reads its own restored state from `before_epoch` on (and other callbacks'
    too), never at `before_fit`.

    Events: `before_fit`, `before_train`. Order: 1000 (after every other callback's
    `before_fit`).
    """

    order = ORDERS["ResumeCB"]

    def __init__(self, learn: BaseLearner, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.ckpt = read_checkpoint(path)
        check_model(learn.model, self.ckpt["model"], path)  # before anything runs

    def start(self, n_epochs: int) -> tuple[int, int]:
        """`(epoch, batch)` where a fit of `n_epochs` epochs resumes the saved run."""
        epoch, batch = self.ckpt["progress"]["epoch"], self.ckpt["progress"]["iter"]
        if epoch >= n_epochs:
            print(
                f"resume_from={str(self.path)!r}: the checkpoint is at the end of epoch "
                f"{epoch - 1}, and this fit has {n_epochs} epochs: nothing to train.",
                flush=True,
            )
            return n_epochs, 0
        return epoch, batch

    def before_fit(self, learn: BaseLearner) -> None:
        restore(learn, self.ckpt, self.path)
        # Keep what the first training phase needs, not a second copy of the weights.
        self.ckpt = {k: self.ckpt[k] for k in ("rng", "epoch_rng")}
        if learn.start_iter:
            if self.ckpt["epoch_rng"] is None:
                raise ValueError(
                    f"{self.path} was written mid-epoch without the random states the epoch's "
                    "shuffle was drawn from, so the epoch cannot be resumed exactly. Write "
                    "mid-epoch checkpoints with CheckpointCB."
                )
            set_rng_state(learn.dls, self.ckpt["epoch_rng"])

    def before_train(self, learn: BaseLearner) -> None:
        if learn.start_iter:
            learn.dl = _SkipBatches(learn.dl, learn.start_iter, learn.dls, self.ckpt["rng"])


class _SkipBatches:
    """The first resumed training loader: it skips the `n` batches the saved run trained on
    (drawn, not run), then puts back the random states of the moment the checkpoint was
    written, and yields the rest of the epoch."""

    def __init__(self, dl: Any, n: int, dls: Any, rng: Mapping[str, Any]) -> None:
        self.dl, self.n, self.dls, self.rng = dl, n, dls, rng

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.dl)
        for i in range(self.n):
            if next(it, None) is None:
                raise ValueError(
                    f"Cannot resume at batch {self.n} of the epoch: the training loader "
                    f"yields only {i} batches now. Resume with the data of the saved run."
                )
        set_rng_state(self.dls, self.rng)
        yield from it
