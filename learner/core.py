"""The training loop that fires events to callbacks: the bottom floor of the package.

Read top to bottom: the cancel exceptions, then `BaseLearner` (`fit` -> epoch -> train/validate
-> batch). The event list and `Callback` are `learner.events`'s, which also keeps a learner's
list of callbacks; how a batch becomes the model's inputs and the loss's targets is
`learner.batches`'s. Everything else is built on this module, which imports only leaf helpers:
`learner.Learner` (learner/learner.py) adds the default callbacks, `metrics=`, resuming, saving,
predictions and the training recipes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from learner.batches import BatchFormat, Inputs
from learner.checks import add_note_once, check_dls, check_loaders, check_lr, describe
from learner.events import EVENTS, Callback, CallbackList, as_cbs
from learner.optimizers import as_optimizer
from learner.steps import TrainStream, budget_epochs, segment
from learner.utils import set_lr

__all__ = [
    "BaseLearner",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "CancelStepException",
    "CancelTrainException",
    "CancelValidateException",
]


class CancelFitException(Exception):
    """Raise from a callback to end `fit` quietly (`after_fit` is skipped, `cleanup_fit` runs)."""


class CancelEpochException(Exception):
    """Raise from a callback to end the current epoch quietly and go on with the next."""


class CancelTrainException(Exception):
    """Raise from a callback to end the current training phase quietly (validation still runs)."""


class CancelValidateException(Exception):
    """Raise from a callback to end the current validation phase quietly."""


class CancelBatchException(Exception):
    """Raise from a callback to skip the rest of the current batch (nothing is recorded for it)."""


class CancelStepException(Exception):
    """Raise at `after_backward` or `before_step` to skip this batch's optimizer step.

    `step`, `after_step` and `zero_grad` do not run, so the gradients are kept (to accumulate over
    batches); the batch is otherwise complete: `after_batch` runs and the batch is recorded. To
    skip the step and drop the gradients too, call `learn.zero_grad()` before raising.
    """


_CANCELS = (CancelFitException, CancelEpochException, CancelTrainException,
            CancelValidateException, CancelBatchException, CancelStepException)  # fmt: skip

# The three events of each level, named once rather than formatted on every batch.
_LEVELS = {
    level: (f"before_{level}", f"after_{level}", f"cleanup_{level}")
    for level in ("fit", "epoch", "train", "validate", "batch")
}
_CLEANUPS = frozenset(e for e in EVENTS if e.startswith("cleanup_"))


def _one_line(e: BaseException) -> str:
    notes = "; ".join(getattr(e, "__notes__", ()))
    return f"{type(e).__name__}: {e}" + (f" ({notes})" if notes else "")


class BaseLearner(CallbackList):
    """The training loop: a model, data loaders, a loss function and an optimizer, trained by
    `fit`, which fires `EVENTS` to callbacks. `learner.Learner` builds on it (default callbacks,
    `metrics=`, resuming, saving, predictions): use that one.

    The loop's state, which callbacks read and may change:

    - `model`, `dls`, `loss_func`, `opt` (created by the first training `fit`), `lr`, `cbs`,
      `batch_format`.
    - `epoch`, `n_epochs`, `iter` (batch index in the phase), `training`, `dl` (the loader of the
      running phase: a callback may replace it at `before_train`/`before_validate`).
    - `batch` (as the loader yielded it, then as `before_batch` callbacks left it), `xb` and `yb`
      (its inputs and targets, split by `batch_format` after `before_batch`), `output` (what
      the model returned), `preds` (its predictions: `output`, or its `.logits`), `loss` (the
      true loss), `loss_grad` (what `backward` differentiates).
    - `logged`: the values the running batch's steps logged with `log(name=value)`.
    - `run_train`, `run_valid`: whether this fit runs the phases.
    - `grad_sync`: whether the backward of this training batch synchronises the gradients
      across processes (True); a callback that steps only every few batches (`GradAccumCB`)
      clears it at `before_batch` for the others, and `DistributedCB` (DDP) skips their
      all-reduce.
    - `start_epoch`, `start_iter`, `start_step`: where this fit starts; 0, 0 and 0 except on a
      resumed fit, which starts mid-run (`start_iter` is the first training batch of the first
      epoch, and is 0 again once that training phase is over; `start_step` the steps done).
      `resuming`: whether this fit continues a saved run.
    - `global_step`: optimizer steps taken by this learner in all its fits (counted right after
      each `step`, before `after_step`; checkpoints keep it). `fit_step`: those of this fit (on
      a resumed fit, of the run it continues).
    - `n_steps`, `valid_every`: the budget of a fit in steps (`fit(steps=, valid_every=)`), None
      for one in epochs. Its epochs are the stretches between validations, and `train_stream`
      (a `learner.steps.TrainStream`, None otherwise) the training batches they draw from.

    Args:
        model: the `nn.Module` to train.
        dls: an object with `.train` (and optionally `.valid`) iterables of batches: `(x, y)`
            tuples, dicts, or any structure `batch_format` splits (`learner.batches`).
        loss_func: `loss_func(preds, *targets)` returning the mean loss of a batch; None to
            train on the model's own loss (the `.loss` of its output, as Hugging Face models
            return it).
        lr: learning rate for the optimizer created on the first `fit`; None if it comes later
            (`fit(lr=...)`, `lr_find()`, `fit_one_cycle(lr_max=...)`).
        cbs: callbacks to add (one, or an iterable); one of a class already added replaces it.
        opt_func: optimizer factory, called as `opt_func(model.parameters(), lr=lr)`: a
            torch optimizer, any object with `step()` and `zero_grad()`, or a dict of named
            optimizers (`learner.optimizers.Optimizers`).
        batch_format: how a batch becomes the model's inputs and the loss's targets, and the
            model's output its predictions. Default None: `BatchFormat()`.
    """

    def __init__(
        self,
        model: nn.Module,
        dls: Any,
        loss_func: Callable[..., torch.Tensor] | None,
        lr: float | None = 1e-3,
        cbs: Callback | Iterable[Callback] | None = None,
        opt_func: Callable[..., Any] = torch.optim.AdamW,
        batch_format: BatchFormat | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        check_dls(dls)
        if lr is not None:
            check_lr(lr)
        if loss_func is not None and not callable(loss_func):
            raise TypeError(f"loss_func must be callable or None, got {type(loss_func).__name__}.")
        if batch_format is not None and not isinstance(batch_format, BatchFormat):
            raise TypeError(
                f"batch_format must be a BatchFormat, got {type(batch_format).__name__}: for a "
                "function splitting the batch, pass BatchFormat(split=f)."
            )
        self.model, self.dls, self.loss_func, self.opt_func = model, dls, loss_func, opt_func
        self.lr = lr
        self.batch_format = batch_format or BatchFormat()
        # A torch optimizer, or any object with step() and zero_grad() (the course's SGD class).
        self.opt: Any = None
        self.epoch, self.n_epochs, self.iter, self.training = 0, 0, 0, False
        self.start_epoch, self.start_iter, self.start_step, self.resuming = 0, 0, 0, False
        self.global_step, self.fit_step = 0, 0
        self.n_steps: int | None = None
        self.valid_every: int | None = None
        self.train_stream: TrainStream | None = None
        self.dl: Any = None
        self.batch: Any = None
        self.xb: Inputs = ()
        self.yb: tuple[Any, ...] = ()
        self.output: Any = None
        self.preds: Any = None
        # Typed as a tensor so callbacks can call `learn.loss.item()`; set by get_loss.
        self.loss: torch.Tensor = torch.full((), torch.nan)
        # `loss` unless a callback replaces it at before_backward (scaled for fp16, divided for
        # accumulation) while `loss` stays the true loss.
        self.loss_grad: torch.Tensor = self.loss
        self.logged: dict[str, Any] = {}
        self.run_train, self.run_valid = True, True
        self.grad_sync = True
        self.init_cbs(cbs)

    def callback(self, event: str) -> None:
        """Run every callback implementing `event`, in order."""
        handlers = self.handlers[event]
        if not handlers:  # most events of a batch have none: return before any other work
            return
        errors: list[BaseException] = []
        for cb, method in handlers:
            try:
                method(self)
            except BaseException as e:
                if not isinstance(e, _CANCELS):
                    add_note_once(e, f"Raised in {type(cb).__name__}.{event}.")
                # Every cleanup must run (they restore state), so a failing one is raised after.
                if event not in _CLEANUPS:
                    raise
                errors.append(e)
        if errors:
            for other in errors[1:]:  # every cleanup ran; the first error carries the others
                errors[0].add_note(f"Another {event} failed too: {_one_line(other)}")
            raise errors[0]

    # -- the loop -------------------------------------------------------------------------------

    def fit(
        self,
        n_epochs: int | None = None,
        lr: float | None = None,
        cbs: Callback | Iterable[Callback] | None = None,
        train: bool = True,
        valid: bool = True,
        *,
        steps: int | None = None,
        valid_every: int | None = None,
    ) -> None:
        """Train for `n_epochs` epochs, each a training then a validation phase; or, with
        `steps`, for that many optimizer steps, validating every `valid_every` of them and at
        the end (see `learner.steps`).

        Args:
            n_epochs: number of epochs (0 runs before_fit/after_fit only). Default 1, or none
                with `steps`.
            lr: if given, sets the learning rate of the optimizer (kept across fits).
            cbs: callbacks for this call only (one, or an iterable); removed afterwards,
                whatever happens.
            train: run the training phases.
            valid: run the validation phases (skipped anyway when `dls.valid` is absent).
            steps: a budget in optimizer steps instead of epochs; the training loader then
                needs no length, and may be a one-shot iterator.
            valid_every: with `steps`, validate after every `valid_every` steps (and at the
                end); None: at the end only.
        """
        n_epochs = budget_epochs(n_epochs, steps, valid_every)
        if steps is not None and not train:
            raise ValueError("steps= is a training budget: fit(train=False) takes none.")
        if lr is not None:
            check_lr(lr)
        check_dls(self.dls)
        check_loaders(self.dls, train, valid, one_shot_train=steps is not None)
        cbs = as_cbs(cbs)
        if train and self.opt is None and not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "The model has no trainable parameters, so there is nothing for the "
                "optimizer to train. Unfreeze some, or call fit(train=False)."
            )
        if train and self.opt is None and lr is None and self.lr is None:
            raise ValueError(
                "No learning rate: the Learner was made with lr=None and fit got none. Pass "
                "fit(n, lr=...), or run lr_find() or fit_one_cycle(n, lr_max=...)."
            )

        saved = list(self.cbs)
        try:
            self.add_cbs(cbs)
            if train and self.opt is None:
                self.opt = as_optimizer(self.opt_func(self.model.parameters(), lr=lr or self.lr))
            if lr is not None:
                self.lr = lr
                if self.opt is not None:
                    set_lr(self.opt, lr)
            self.n_epochs, self.run_train, self.run_valid = n_epochs, train, valid
            self.n_steps, self.valid_every, self.fit_step = steps, valid_every, self.start_step
            self._with("fit", self._do_epochs, CancelFitException)
        finally:
            self.set_cbs(saved)
            self.train_stream = None

    def _with(self, level: str, body: Callable[[], None], cancel: type[Exception]) -> None:
        # The one place that defines event semantics: before_, body, after_; a cancel of this
        # level skips after_ quietly; cleanup_ always runs, exactly once per before_.
        # An exception in flight wins over one a cleanup raises: the cleanup's becomes a note on
        # it, so the original error (or Ctrl-C) is what propagates.
        before, after, cleanup = _LEVELS[level]
        try:
            self.callback(before)
            body()
            self.callback(after)
        except cancel:
            pass
        except BaseException as e:
            try:
                self.callback(cleanup)
            except BaseException as failed:
                e.add_note(f"While it propagated, {cleanup} failed too: {_one_line(failed)}")
            raise
        self.callback(cleanup)

    def _do_epochs(self) -> None:
        for epoch in range(self.start_epoch, self.n_epochs):
            self.epoch = epoch
            self._with("epoch", self._do_epoch, CancelEpochException)
            if self.train_stream is not None and self.train_stream.ended:
                break  # a one-shot iterator ran out (it warned): its last epoch validated

    def _do_epoch(self) -> None:
        if self.run_train:
            try:
                dl = self.dls.train if self.n_steps is None else self._steps_of_epoch()
                self._phase(True, dl, "train", CancelTrainException)
            finally:
                self.start_iter = 0  # only the first training phase of a resumed fit starts late
        valid_dl = getattr(self.dls, "valid", None)
        if self.run_valid and valid_dl is not None:
            self._phase(False, valid_dl, "validate", CancelValidateException)

    def _steps_of_epoch(self) -> Iterable[Any]:
        assert self.n_steps is not None
        if self.train_stream is None:  # made here, once before_fit has set the loaders up
            self.train_stream = TrainStream(self.dls.train, self.dls)
        end = segment(self.epoch, self.n_steps, self.valid_every)[1]
        return self.train_stream.until(lambda: self.fit_step >= end)

    def _phase(
        self, training: bool, dl: Iterable[Any], level: str, cancel: type[Exception]
    ) -> None:
        self.training, self.dl = training, dl
        with torch.set_grad_enabled(training):
            self._with(level, self._do_batches, cancel)

    def _do_batches(self) -> None:
        # A resumed fit's first training phase starts at batch `start_iter`: the callback that
        # resumes hands the loop a loader that yields the rest of the epoch (see ResumeCB).
        start = self.start_iter if self.training else 0
        self.iter = start - 1
        unchecked = True  # the first batch of a phase is checked: a clear error for a bad one
        for i, batch in enumerate(self.dl, start):
            if unchecked:
                self.batch_format.check(batch, "dls.train" if self.training else "dls.valid")
                unchecked = False
            self.iter, self.batch = i, batch
            self._with("batch", self._do_batch, CancelBatchException)
        if self.training and self.iter < 0:
            raise ValueError(
                "dls.train yielded no batches: check its dataset size, batch size and drop_last."
            )

    def _do_batch(self) -> None:
        if self.logged:  # what the previous batch logged
            self.logged = {}
        self.split_batch()
        try:
            self.predict()
        except Exception as e:
            inputs = self.batch_format.describe_inputs(self.batch, self.xb)
            if self.loss_func is None:
                inputs += (
                    " (loss_func=None: the model computes its own loss, so it gets the whole "
                    "batch, targets included; a model that does not: pass a loss_func)"
                )
            e.add_note(f"The model failed on inputs {inputs}.")
            raise
        self.callback("after_predict")
        try:
            self.get_loss()
        except Exception as e:
            if self.loss_func is not None:
                targets = self.batch_format.describe_targets(self.batch, self.yb)
                e.add_note(
                    f"loss_func failed on preds {describe(self.preds)} and targets {targets}."
                )
            raise
        self.loss_grad = self.loss
        self.callback("after_loss")
        if not self.training:
            return
        self.callback("before_backward")
        self.backward()
        # A cancelled step skips step, after_step and zero_grad, keeping the gradients (to
        # accumulate them), so after_step fires only when the optimizer stepped. There is no
        # cleanup_step: a cancelled step leaves nothing to restore. A batch cancelled after its
        # backward pass drops its gradients, so a skipped batch never reaches the weights.
        try:
            self.callback("after_backward")
            self.callback("before_step")
            self.step()
            self.global_step += 1
            self.fit_step += 1
            self.callback("after_step")
            self.zero_grad()
        except CancelStepException:
            pass
        except CancelBatchException:
            self.zero_grad()
            raise
        # Backward has run, so the graph is spent: from here on the loss is a plain value, which
        # callbacks may keep (metrics, recorder) without holding the graph alive.
        self.loss = self.loss.detach()

    def split_batch(self) -> None:
        """`self.xb, self.yb`: the inputs and targets of `self.batch`, by `self.batch_format`.

        The loop calls it after `before_batch`; code that runs `predict` outside the loop
        (`get_preds`, `infer`) calls it after setting `batch`. The model computing its own loss
        (`loss_func=None`) gets the targets in `xb` too.
        """
        self.xb, self.yb = self.batch_format.split(self.batch, self.loss_func is None)

    def log(self, **values: torch.Tensor | float) -> None:
        """Record values of this batch besides its loss, one number each (a GAN's `g_loss` and
        `d_loss`): `MetricsCB` averages each over the phase, weighted by batch size, into the
        results table (`train_g_loss`, `valid_g_loss`); `RecorderCB` keeps each training
        batch's. They are in `logged` until the next batch starts.

        Examples:
            >>> learn.log(g_loss=g_loss, d_loss=d_loss)  # in a training step
        """
        self.logged.update(values)

    # -- training steps: override in a subclass to change how a batch is processed --------------

    def predict(self) -> None:
        """Forward pass: `self.output = self.model(*self.xb)` (`**self.xb` for keyword inputs),
        and `self.preds = self.batch_format.preds(self.output)` (the output, or its `.logits`).

        Only the training step: inference is `learn.infer(x)`, which runs this step in eval and
        inference mode, so overriding it changes inference too and cannot break it.
        """
        xb = self.xb
        self.output = self.model(*xb) if isinstance(xb, tuple) else self.model(**xb)
        self.preds = self.batch_format.preds(self.output)

    def get_loss(self) -> None:
        """`self.loss = self.loss_func(self.preds, *self.yb)`; with `loss_func=None`, the model's
        own: `self.batch_format.loss(self.output)` (its `.loss`)."""
        if self.loss_func is None:
            self.loss = self.batch_format.loss(self.output)
        else:
            self.loss = self.loss_func(self.preds, *self.yb)

    def backward(self) -> None:
        """`self.loss_grad.backward()` (`loss_grad` is `loss` unless a callback replaced it)."""
        self.loss_grad.backward()

    def step(self) -> None:
        """`self.opt.step()` (every optimizer's, for several: `learner.optimizers`)."""
        assert self.opt is not None
        self.opt.step()

    def zero_grad(self) -> None:
        """`self.opt.zero_grad()`."""
        assert self.opt is not None
        self.opt.zero_grad()
