"""`Learner`: the training loop of `learner.core` with the standard callbacks and everything
built on the loop (resuming, saving, predictions, the learning-rate finder, one-cycle training).

Each method that is not the loop's own is a function of the module that implements it, taken
into the class as it is: one signature and one docstring, in one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from learner.batches import BatchFormat
from learner.callbacks import default_callbacks
from learner.callbacks.accelerate import AccelerateCB
from learner.callbacks.lr_finder import lr_find
from learner.callbacks.resume import ResumeCB
from learner.callbacks.schedule import fit_one_cycle
from learner.core import BaseLearner
from learner.events import Callback, as_cbs
from learner.inference import capture_preds, get_preds, infer
from learner.inspect import show_training_loop, summary
from learner.interpret import interpret
from learner.results import show_results, tta
from learner.saving import load, save
from learner.steps import budget_epochs
from learner.vision import show_batch, show_image_batch

__all__ = ["Learner"]


class Learner(BaseLearner):
    """Bundles a model, data loaders, a loss function and an optimizer, and trains with `fit`.

    The loop and its state are `learner.core.BaseLearner`'s; a subclass may override the training
    steps `predict`, `get_loss`, `backward`, `step` and `zero_grad`.

    Args:
        model: the `nn.Module` to train.
        dls: an object with `.train` (and optionally `.valid`) iterables of batches, such as
            `learner.DataLoaders`: `(x, y)` tuples, dicts (a Hugging Face collator's), or any
            structure `batch_format` splits (see `learner.batches`).
        loss_func: `loss_func(preds, *targets)` returning the mean loss of a batch; None to
            train on the model's own loss (the `.loss` of its output: a Hugging Face model
            given `labels`).
        lr: learning rate for the optimizer created on the first `fit`; None if it comes later
            (`fit(lr=...)`, `lr_find()`, `fit_one_cycle(lr_max=...)`).
        cbs: callbacks to add, one or an iterable (one of a default callback's class replaces it).
        opt_func: optimizer factory, called as `opt_func(model.parameters(), lr=lr)`: a
            torch optimizer, any object with `step()` and `zero_grad()` (the course's `SGD`),
            or a dict of named optimizers (`learner.optimizers.Optimizers`).
        metrics: handed to the default `MetricsCB`: one metric, a list, or a dict name -> metric.
        default_cbs: add `TrainEvalCB, DeviceCB, MetricsCB, RecorderCB, ProgressCB` (and
            `DistributedCB` under torchrun, unless `cbs` hold an `AccelerateCB`).
        batch_format: how a batch becomes the model's inputs and the loss's targets, and the
            model's output its predictions: a `learner.batches.BatchFormat`. Default None: `(x,
            y, ...)` tuples with one input, dicts with the targets under `"labels"`.

    Examples:
        >>> learn = Learner(model, dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD,
        ...                 metrics=accuracy)
        >>> learn.fit(5)
        >>> learn.recorder.history[-1]["accuracy"]
    """

    def __init__(
        self,
        model: nn.Module,
        dls: Any,
        loss_func: Callable[..., torch.Tensor] | None,
        lr: float | None = 1e-3,
        cbs: Callback | Iterable[Callback] | None = None,
        opt_func: Callable[..., Any] = torch.optim.AdamW,
        metrics: Any = None,
        default_cbs: bool = True,
        batch_format: BatchFormat | None = None,
    ) -> None:
        if not default_cbs and metrics is not None:
            raise ValueError(
                "metrics= needs the default MetricsCB: pass default_cbs=True, or add "
                "MetricsCB(...) to cbs yourself."
            )
        cbs = as_cbs(cbs)
        # Under a launcher, Accelerate distributes by itself: no DistributedCB beside it.
        accelerated = any(isinstance(cb, AccelerateCB) for cb in cbs)
        defaults = default_callbacks(metrics, distributed=not accelerated) if default_cbs else []
        super().__init__(model, dls, loss_func, lr, defaults, opt_func, batch_format)
        self.add_cbs(cbs)  # yours replace the defaults of their class

    def fit(
        self,
        n_epochs: int | None = None,
        lr: float | None = None,
        cbs: Callback | Iterable[Callback] | None = None,
        train: bool = True,
        valid: bool = True,
        resume_from: str | os.PathLike[str] | None = None,
        *,
        steps: int | None = None,
        valid_every: int | None = None,
    ) -> None:
        """Train for `n_epochs` epochs, each a training then a validation phase; or, with
        `steps`, for that many optimizer steps, validating every `valid_every` of them and at
        the end (see `learner.steps`).

        Args:
            n_epochs: number of epochs (0 runs before_fit/after_fit only); when resuming, the
                total of the run, as in the fit that wrote the checkpoint. Default 1, or none
                with `steps`.
            lr: if given, sets the learning rate of the optimizer (kept across fits).
            cbs: callbacks for this call only (one, or an iterable); removed afterwards,
                whatever happens.
            train: run the training phases.
            valid: run the validation phases (skipped anyway when `dls.valid` is absent).
            resume_from: a checkpoint (`learn.save`, `CheckpointCB`) whose run this fit
                continues exactly where it stopped: see `learner.callbacks.resume.ResumeCB`.
            steps: a budget in optimizer steps instead of epochs (when resuming, the run's
                total); the training loader then needs no length, and may be a one-shot
                iterator.
            valid_every: with `steps`, validate after every `valid_every` steps (and at the
                end); None: at the end only.

        Examples:
            >>> learn.fit(3)
            >>> learn.fit(steps=300, valid_every=100)  # on a stream too
            >>> learn.global_step, [row["step"] for row in learn.recorder.history]
        """
        budget = {"steps": steps, "valid_every": valid_every}
        if resume_from is None:
            super().fit(n_epochs, lr, cbs, train, valid, **budget)
            return
        if lr is not None:
            raise ValueError(
                "fit(resume_from=...) continues the saved run, learning rates included: "
                "leave out lr=."
            )
        n = budget_epochs(n_epochs, steps, valid_every)
        cbs = as_cbs(cbs)
        resume = ResumeCB(self, resume_from)  # reads and checks the file now
        if train and self.opt is None and self.lr is None:
            # Learner(lr=None): the optimizer the check made, at the saved rate, gets its state.
            self.opt = resume.opt
        try:
            self.start_epoch, self.start_iter, self.start_step = resume.start(n, steps, valid_every)
            self.resuming = True
            super().fit(n_epochs, None, [*cbs, resume], train, valid, **budget)
        finally:
            self.start_epoch, self.start_iter, self.start_step, self.resuming = 0, 0, 0, False

    save = save
    load = load
    get_preds = get_preds
    capture_preds = capture_preds
    tta = tta
    show_batch = show_batch
    show_image_batch = show_image_batch
    show_results = show_results
    interpret = interpret
    infer = infer
    summary = summary
    show_training_loop = show_training_loop
    lr_find = lr_find
    fit_one_cycle = fit_one_cycle
