"""Resuming a saved run exactly where it stopped: what `fit(n, resume_from=path)` adds."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from learner.callbacks.order import ORDERS
from learner.core import BaseLearner
from learner.events import Callback
from learner.rng import set_rng_state
from learner.saving import (
    check_fits,
    check_position,
    check_world_size,
    for_this_rank,
    read_checkpoint,
    restore,
)
from learner.steps import TrainStream

__all__ = ["ResumeCB"]


class ResumeCB(Callback):
    """Continues the run saved in a checkpoint (`learn.save`, `CheckpointCB`).

    `fit(n_epochs, resume_from=path)` adds it for that fit, and the fit starts where the run
    stopped (`learn.start_epoch`, `learn.start_iter`, with `learn.resuming` True). When the fit
    is called, before anything runs or changes, the file is read and checked whole
    (`read_checkpoint`: its checksum and layout) and against the learner (`check_fits`: the
    model, the gradients, the optimizer's class and keys), and a resume mid-epoch against the
    training loader (`check_position`: its batch size, samples and batches). The protocol:

    1. Every callback's `before_fit` runs as in a fresh fit: callbacks set themselves up (build
       their scheduler or GradScaler, reset their counters).
    2. Then, last at `before_fit`, this callback puts the run back (`restore`): every callback's
       `load_state_dict` (first: a callback that refuses its state leaves the rest untouched),
       the weights, the gradients held between steps, the optimizer state, and the random
       states (mid-epoch: those the epoch's shuffle was drawn from).
    3. Mid-epoch, at the first `before_train`, it hands the loop a loader that skips the
       batches the saved run trained on (without running them), then puts back the random
       states of the moment the checkpoint was written. A fit budgeted in steps goes on in the
       training loader where the saved one was instead (`learner.steps.TrainStream.resume`):
       exactly for a map-style loader or one with a `state_dict()` (torchdata's
       `StatefulDataLoader`); a stream goes on with the batches it yields now, with a warning.
       Callbacks that accumulate over a training phase keep their loaded accumulators when
       `learn.start_iter > 0`.

    So a callback reads its own restored state from `before_epoch` on (and other callbacks'
    too), never at `before_fit`.

    Events: `before_fit`, `before_train`. Order: 1000 (after every other callback's
    `before_fit`).

    Args:
        learn: the learner that resumes, checked against the checkpoint now.
        path: the checkpoint (`learn.save`, `CheckpointCB`).

    Examples:
        >>> learn.fit(10, cbs=[CheckpointCB("run/ckpt.pt")], resume_from="run/ckpt.pt")
    """

    order = ORDERS["ResumeCB"]

    def __init__(self, learn: BaseLearner, path: str | os.PathLike[str]) -> None:
        self.path, self.dls = path, learn.dls
        self.ckpt = for_this_rank(read_checkpoint(path))  # under DDP/FSDP: this rank's states
        # Before anything runs; the optimizer too, on one made for the check if the learner has
        # none yet: `opt`, which a learner made with lr=None takes (its lr is the saved one).
        self.opt = check_fits(learn, self.ckpt, path)

    def start(
        self, n_epochs: int, steps: int | None = None, valid_every: int | None = None
    ) -> tuple[int, int, int]:
        """`(epoch, batch, step)` where a fit of `n_epochs` epochs (for a budget in steps: of
        `steps` steps, validated every `valid_every`) resumes the saved run.

        Mid-epoch, checks first that as many processes run as wrote it (`check_world_size`) and
        that the training loader is the saved run's (`check_position`).
        """
        progress = self.ckpt["progress"]
        epoch, batch, step = progress["epoch"], progress["iter"], progress.get("step", 0)
        saved_steps = progress.get("n_steps")
        if (steps is None) != (saved_steps is None):
            saved = "epochs" if saved_steps is None else f"steps (steps={saved_steps})"
            raise ValueError(
                f"{self.path} was written by a fit budgeted in {saved}: resume it the same way, "
                "fit(n_epochs, resume_from=...) or fit(steps=..., valid_every=..., "
                "resume_from=...), as the fit that wrote it."
            )
        if steps is not None and progress.get("valid_every") != valid_every:
            raise ValueError(
                f"{self.path} was written by a fit validated every "
                f"{progress.get('valid_every')} steps, and this one has valid_every="
                f"{valid_every}: resume with the saved run's valid_every."
            )
        if epoch >= n_epochs or (steps is not None and step >= steps):
            where = f"the end of epoch {epoch - 1}" if steps is None else f"step {step}"
            budget = f"{n_epochs} epochs" if steps is None else f"{steps} steps"
            print(
                f"resume_from={str(self.path)!r}: the checkpoint is at {where}, and this fit "
                f"has {budget}: nothing to train.",
                flush=True,
            )
            return n_epochs, 0, step
        check_world_size(self.ckpt, self.path)
        check_position(self.dls, progress, self.path)
        return epoch, batch, step

    def before_fit(self, learn: BaseLearner) -> None:
        restore(learn, self.ckpt, self.path)
        stream = self.ckpt["progress"].get("stream")
        # Keep what the first training phase needs, not a second copy of the weights.
        self.ckpt = {k: self.ckpt[k] for k in ("rng", "epoch_rng")}
        if learn.n_steps is not None:
            if stream is not None and learn.run_train:  # the stream goes on from its position
                learn.train_stream = TrainStream(learn.dls.train, learn.dls)
                learn.train_stream.resume(stream, self.ckpt["epoch_rng"], self.ckpt["rng"])
            return
        if learn.start_iter:
            if self.ckpt["epoch_rng"] is None:
                raise ValueError(
                    f"{self.path} was written mid-epoch without the random states the epoch's "
                    "shuffle was drawn from, so the epoch cannot be resumed exactly. Write "
                    "mid-epoch checkpoints with CheckpointCB."
                )
            set_rng_state(learn.dls, self.ckpt["epoch_rng"])

    def before_train(self, learn: BaseLearner) -> None:
        if learn.start_iter and learn.n_steps is None:
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
