"""The training loop that fires events to callbacks: the bottom floor of the package.

Read top to bottom: the cancel exceptions, the event list, `Callback`, then `BaseLearner`
(`fit` -> epoch -> train/validate -> batch). Everything else is built on this module, which
imports only leaf helpers: `learner.Learner` (learner/learner.py) adds the default callbacks,
`metrics=`, resuming, saving, predictions and the training recipes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from learner.checks import (
    add_note_once,
    check_batch,
    check_dls,
    check_events,
    check_int,
    check_loaders,
    check_lr,
    describe,
)
from learner.utils import set_lr, snake

__all__ = [
    "EVENTS",
    "STEPS",
    "BaseLearner",
    "Callback",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "CancelStepException",
    "CancelTrainException",
    "CancelValidateException",
    "as_cbs",
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

# Every event a callback may implement, in the order they first fire. A callback method that looks
# like an event but is not in this tuple is a typo, and rejected when the callback is added.
EVENTS = (
    "before_fit", "before_epoch", "before_train", "before_batch", "after_predict", "after_loss",
    "before_backward", "after_backward", "before_step", "after_step", "after_batch",
    "cleanup_batch", "after_train", "cleanup_train", "before_validate", "after_validate",
    "cleanup_validate", "after_epoch", "cleanup_epoch", "after_fit", "cleanup_fit",
)  # fmt: skip


# The three events of each level, named once rather than formatted on every batch.
_LEVELS = {
    level: (f"before_{level}", f"after_{level}", f"cleanup_{level}")
    for level in ("fit", "epoch", "train", "validate", "batch")
}
_CLEANUPS = frozenset(e for e in EVENTS if e.startswith("cleanup_"))

# The training steps of a batch: methods of the Learner that a subclass may override, or that a
# callback may provide (`def predict(self, learn): ...`, the course's TrainCB).
STEPS = ("predict", "get_loss", "backward", "step", "zero_grad")


class Callback:
    """Base class for callbacks: implement any of `EVENTS` as `def event(self, learn): ...`.

    Callbacks run sorted by `order` (lower first; ties keep insertion order; the standard
    callbacks' orders and the constraints between them are in `learner.callbacks.order`). A
    callback is reachable as `learn.<name>`, its class name in snake case without the `CB` suffix.

    A callback may also provide a training step (`STEPS`): `def predict(self, learn): ...` runs
    instead of the learner's own `predict` while the callback is added (as the course's
    `TrainCB`). Two callbacks providing the same step are an error.

    A callback with state that a resumed run needs (counters, accumulators, positions) returns it
    from `state_dict()` as plain values and tensors, and takes it back in `load_state_dict()`; a
    checkpoint holds every non-empty one, by `name`. On `fit(resume_from=...)` each callback's
    `before_fit` runs as in a fresh fit, then the states are loaded (`learner.callbacks.resume`).

    Examples:
        >>> class PrintLossCB(Callback):
        ...     order = 10
        ...     def after_batch(self, learn):
        ...         if learn.iter % 100 == 0:
        ...             print(learn.loss.item())
    """

    order: int = 0
    unique: ClassVar[bool] = True
    """Whether adding a callback of this class replaces one already added (so a `DeviceCB` of
    yours replaces the default one). False for callbacks that stack, such as `BatchTransformCB`."""
    in_side_runs: ClassVar[bool] = True
    """Whether runs that are not part of training (`lr_find`'s sweep, `capture_preds`) use a copy
    of this callback. False for callbacks that record, log, write files, schedule or watch
    validation results: a side run leaves them, and what they hold, alone."""

    @property
    def name(self) -> str:
        """Attribute name on the Learner: `RecorderCB` -> `recorder`."""
        cls = type(self).__name__
        return snake(cls[:-2] if cls.endswith("CB") and len(cls) > 2 else cls)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback: plain values and tensors. None by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict()` returned (called by a resumed fit after `before_fit`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order})"


def as_cbs(cbs: Callback | Iterable[Callback] | None) -> list[Callback]:
    """`cbs=` as a list: None, one callback, or an iterable of them, each checked."""
    if cbs is None:
        return []
    cbs = [cbs] if isinstance(cbs, Callback) else list(cbs)
    for cb in cbs:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be Callback instances, got {type(cb).__name__}.")
        check_events(cb, EVENTS)
    return cbs


def _one_line(e: BaseException) -> str:
    notes = "; ".join(getattr(e, "__notes__", ()))
    return f"{type(e).__name__}: {e}" + (f" ({notes})" if notes else "")


def _same_kind(old: Callback, new: Callback) -> bool:
    """Whether adding `new` replaces `old`: both unique, `new` of `old`'s class or a subclass."""
    return new.unique and old.unique and isinstance(new, type(old))


class _StaleHandlers(dict[str, list[tuple[Callback, Callable[[Any], None]]]]):
    """The dispatch table after a change of callbacks: its first lookup builds the real one (a
    plain dict), so the hot path (`learn._handlers[event]`) never checks whether it is stale."""

    def __init__(self, learn: BaseLearner) -> None:
        super().__init__()
        self.learn = learn

    def __missing__(self, event: str) -> list[tuple[Callback, Callable[[Any], None]]]:
        return self.learn._build_handlers()[event]


class BaseLearner:
    """The training loop: a model, data loaders, a loss function and an optimizer, trained by
    `fit`, which fires `EVENTS` to callbacks. `learner.Learner` builds on it (default callbacks,
    `metrics=`, resuming, saving, predictions): use that one.

    The loop's state, which callbacks read and may change:

    - `model`, `dls`, `loss_func`, `opt` (created by the first training `fit`), `lr`, `cbs`.
    - `epoch`, `n_epochs`, `iter` (batch index in the phase), `training`, `dl` (the loader of the
      running phase: a callback may replace it at `before_train`/`before_validate`).
    - `batch`, `preds`, `loss` (the true loss), `loss_grad` (what `backward` differentiates).
    - `run_train`, `run_valid`: whether this fit runs the phases.
    - `grad_sync`: whether the backward of this training batch synchronises the gradients
      across processes (True); a callback that steps only every few batches (`GradAccumCB`)
      clears it at `before_batch` for the others, and `DistributedCB` (DDP) skips their
      all-reduce.
    - `start_epoch`, `start_iter`: where this fit starts; 0 and 0 except on a resumed fit, which
      starts mid-run (`start_iter` is the first training batch of the first epoch, and is 0 again
      once that training phase is over). `resuming`: whether this fit continues a saved run.

    Args:
        model: the `nn.Module` to train.
        dls: an object with `.train` (and optionally `.valid`) iterables of `(x, y)` batches.
        loss_func: `loss_func(preds, targets)` returning the mean loss of a batch.
        lr: learning rate for the optimizer created on the first `fit`; None if it comes later
            (`fit(lr=...)`, `lr_find()`, `fit_one_cycle(lr_max=...)`).
        cbs: callbacks to add (one, or an iterable); one of a class already added replaces it.
        opt_func: optimizer factory, called as `opt_func(model.parameters(), lr=lr)`: a
            torch optimizer, or any object with `step()` and `zero_grad()`.
    """

    def __init__(
        self,
        model: nn.Module,
        dls: Any,
        loss_func: Callable[..., torch.Tensor],
        lr: float | None = 1e-3,
        cbs: Callback | Iterable[Callback] | None = None,
        opt_func: Callable[..., Any] = torch.optim.AdamW,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        check_dls(dls)
        if lr is not None:
            check_lr(lr)
        if not callable(loss_func):
            raise TypeError(f"loss_func must be callable, got {type(loss_func).__name__}.")
        self.model, self.dls, self.loss_func, self.opt_func = model, dls, loss_func, opt_func
        self.lr = lr
        # A torch optimizer, or any object with step() and zero_grad() (the course's SGD class).
        self.opt: Any = None
        self.cbs: list[Callback] = []
        self._handlers: dict[str, list[tuple[Callback, Callable[[BaseLearner], None]]]]
        self.epoch, self.n_epochs, self.iter, self.training = 0, 0, 0, False
        self.start_epoch, self.start_iter, self.resuming = 0, 0, False
        self.dl: Any = None
        self.batch: Any = None
        self.preds: Any = None
        # Typed as a tensor so callbacks can call `learn.loss.item()`; set by get_loss.
        self.loss: torch.Tensor = torch.full((), torch.nan)
        # `loss` unless a callback replaces it at before_backward (scaled for fp16, divided for
        # accumulation) while `loss` stays the true loss.
        self.loss_grad: torch.Tensor = self.loss
        self.run_train, self.run_valid = True, True
        self.grad_sync = True
        self._providers: dict[str, Callback] = {}
        self._set_cbs([])
        self.add_cbs(cbs or [])

    # -- callbacks -------------------------------------------------------------------------------

    def add_cb(self, cb: Callback) -> Callback | None:
        """Add `cb`; it replaces a callback of its own class (unless `cb.unique` is False). Returns
        the callback it replaced."""
        return self.add_cbs([cb])[0]

    def add_cbs(self, cbs: Callback | Iterable[Callback]) -> list[Callback | None]:
        """Add several callbacks at once (one change, however many): each replaces a callback of
        its own class, as `add_cb` does. Returns the callbacks replaced, None where none was."""
        new_cbs = as_cbs(cbs)
        for i, cb in enumerate(new_cbs):
            twin = next((c for c in new_cbs[:i] if _same_kind(c, cb)), None)
            if twin is not None:
                raise ValueError(
                    f"The callbacks given hold two of one kind, {type(twin).__name__} and "
                    f"{type(cb).__name__}: the second would replace the first. Pass one (a "
                    "callback class that may be added several times sets unique = False)."
                )
        current, replaced = list(self.cbs), []
        for cb in new_cbs:
            same = [c for c in current if _same_kind(c, cb)]
            old = same[0] if same else None
            current = [*current, cb] if old is None else [cb if c is old else c for c in current]
            replaced.append(old)
        appended = all(old is None for old in replaced)
        self._set_cbs(current, added=new_cbs if appended else None)
        return replaced

    def remove_cb(self, cb: Callback) -> None:
        """Remove `cb` (an instance in `learn.cbs`)."""
        if cb not in self.cbs:
            raise ValueError(f"remove_cb: {cb!r} is not in learn.cbs.")
        self._set_cbs([c for c in self.cbs if c is not cb])

    @contextmanager
    def removed_cbs(self, cbs: Callback | Iterable[Callback]) -> Iterator[None]:
        """Within the `with` block, the learner runs without `cbs`; afterwards `learn.cbs` is the
        same list as before, in the same order.

        Examples:
            >>> with learn.removed_cbs(learn.progress):
            ...     learn.fit(1)  # no progress bars
        """
        saved, removed = list(self.cbs), as_cbs(cbs)
        missing = [cb for cb in removed if cb not in saved]
        if missing:
            raise ValueError(f"removed_cbs: {missing} not in learn.cbs.")
        self._set_cbs([cb for cb in saved if cb not in removed])
        try:
            yield
        finally:
            self._set_cbs(saved)

    def _set_cbs(self, cbs: list[Callback], added: list[Callback] | None = None) -> None:
        # Checked before anything is assigned. The step providers are resolved now (from the
        # added callbacks alone when they were only appended); the dispatch table when it is
        # first used, so a change set of any size costs one build.
        providers = {} if added is None else dict(self._providers)
        for cb in cbs if added is None else added:
            for step in STEPS:
                if callable(getattr(cb, step, None)):
                    if step in providers:
                        names = f"{type(providers[step]).__name__} and {type(cb).__name__}"
                        raise ValueError(
                            f"{names} both provide the training step {step!r}; only one "
                            "callback may. Remove one, or combine them into one callback."
                        )
                    providers[step] = cb
        self.cbs[:] = cbs
        self._providers = providers
        self._handlers = _StaleHandlers(self)
        # A provided step shadows the learner's method on the instance, so that every caller
        # (the loop, infer, a callback calling learn.zero_grad()) runs the provided one.
        for step in STEPS:
            if step in providers:
                setattr(self, step, functools.partial(getattr(providers[step], step), self))
            else:
                vars(self).pop(step, None)

    def _build_handlers(self) -> dict[str, list[tuple[Callback, Callable[[BaseLearner], None]]]]:
        ordered = sorted(self.cbs, key=lambda c: c.order)  # stable: ties keep insertion order
        self._handlers = {
            e: [(c, getattr(c, e)) for c in ordered if callable(getattr(c, e, None))]
            for e in EVENTS
        }
        return self._handlers

    def callbacks_at(self, event: str) -> list[Callback]:
        """The callbacks that run at `event`, in the order they run."""
        return [cb for cb, _ in self._handlers[event]]

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: find a callback by name (`learn.recorder`).
        if not name.startswith("_"):
            for cb in self.__dict__.get("cbs", ()):
                if cb.name == name:
                    return cb
        raise AttributeError(f"{type(self).__name__!r} has no attribute or callback {name!r}")

    def callback(self, event: str) -> None:
        """Run every callback implementing `event`, in order."""
        handlers = self._handlers[event]
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
        n_epochs: int = 1,
        lr: float | None = None,
        cbs: Callback | Iterable[Callback] | None = None,
        train: bool = True,
        valid: bool = True,
    ) -> None:
        """Train for `n_epochs` epochs, each a training then a validation phase.

        Args:
            n_epochs: number of epochs (0 runs before_fit/after_fit only).
            lr: if given, sets the learning rate of the optimizer (kept across fits).
            cbs: callbacks for this call only (one, or an iterable); removed afterwards,
                whatever happens.
            train: run the training phases.
            valid: run the validation phases (skipped anyway when `dls.valid` is absent).
        """
        check_int("n_epochs", n_epochs, 0)
        if lr is not None:
            check_lr(lr)
        check_dls(self.dls)
        check_loaders(self.dls, train, valid)
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
                self.opt = self.opt_func(self.model.parameters(), lr=lr or self.lr)
            if lr is not None:
                self.lr = lr
                if self.opt is not None:
                    set_lr(self.opt, lr)
            self.n_epochs, self.run_train, self.run_valid = n_epochs, train, valid
            self._with("fit", self._do_epochs, CancelFitException)
        finally:
            self._set_cbs(saved)

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

    def _do_epoch(self) -> None:
        if self.run_train:
            try:
                self._phase(True, self.dls.train, "train", CancelTrainException)
            finally:
                self.start_iter = 0  # only the first training phase of a resumed fit starts late
        valid_dl = getattr(self.dls, "valid", None)
        if self.run_valid and valid_dl is not None:
            self._phase(False, valid_dl, "validate", CancelValidateException)

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
        # The first batch of a phase is checked when the default steps will index it.
        n = 2 if self._default_step("get_loss") else 1
        unchecked = self._default_step("predict")
        for i, batch in enumerate(self.dl, start):
            if unchecked:
                check_batch(batch, "dls.train" if self.training else "dls.valid", n)
                unchecked = False
            self.iter, self.batch = i, batch
            self._with("batch", self._do_batch, CancelBatchException)
        if self.training and self.iter < 0:
            raise ValueError(
                "dls.train yielded no batches: check its dataset size, batch size and drop_last."
            )

    def _default_step(self, step: str) -> bool:
        # Neither a subclass's method nor a callback's (which shadows it on the instance).
        return getattr(type(self), step) is getattr(BaseLearner, step) and step not in vars(self)

    def _do_batch(self) -> None:
        try:
            self.predict()
        except Exception as e:
            e.add_note(f"The model failed on input {describe(self.batch[0])}.")
            raise
        self.callback("after_predict")
        try:
            self.get_loss()
        except Exception as e:
            e.add_note(
                f"loss_func failed on preds {describe(self.preds)} and targets "
                f"{describe(self.batch[1:])}."
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

    # -- training steps: override in a subclass to change how a batch is processed --------------

    def predict(self) -> None:
        """Forward pass: `self.preds = self.model(self.batch[0])`.

        Only the training step: inference is `learn.infer(x)`, which runs this step in eval and
        inference mode, so overriding it changes inference too and cannot break it.
        """
        self.preds = self.model(self.batch[0])

    def get_loss(self) -> None:
        """`self.loss = self.loss_func(self.preds, self.batch[1])`."""
        self.loss = self.loss_func(self.preds, self.batch[1])

    def backward(self) -> None:
        """`self.loss_grad.backward()` (`loss_grad` is `loss` unless a callback replaced it)."""
        self.loss_grad.backward()

    def step(self) -> None:
        """`self.opt.step()`."""
        assert self.opt is not None
        self.opt.step()

    def zero_grad(self) -> None:
        """`self.opt.zero_grad()`."""
        assert self.opt is not None
        self.opt.zero_grad()
