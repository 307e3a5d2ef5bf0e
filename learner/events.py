"""The event list, `Callback`, and a learner's list of callbacks: below the loop (`learner.core`).

`EVENTS` names every event a callback may implement; `STEPS` the training steps a callback may
provide. `CallbackList` is the part of a learner that keeps its callbacks: adding, replacing and
removing them, the steps they provide, and the table of who runs at each event that the loop
reads on every batch. This module imports only leaf helpers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from learner.checks import check_events
from learner.utils import snake

__all__ = ["EVENTS", "STEPS", "Callback", "CallbackList", "as_cbs"]

# Every event a callback may implement, in the order they first fire. A callback method that looks
# like an event but is not in this tuple is a typo, and rejected when the callback is added.
EVENTS = (
    "before_fit", "before_epoch", "before_train", "before_batch", "after_predict", "after_loss",
    "before_backward", "after_backward", "before_step", "after_step", "after_batch",
    "cleanup_batch", "after_train", "cleanup_train", "before_validate", "after_validate",
    "cleanup_validate", "after_epoch", "cleanup_epoch", "after_fit", "cleanup_fit",
)  # fmt: skip

# The training steps of a batch: methods of the Learner that a subclass may override, or that a
# callback may provide (`def predict(self, learn): ...`, the course's TrainCB).
STEPS = ("predict", "get_loss", "backward", "step", "zero_grad")

Handlers = dict[str, list[tuple["Callback", Callable[[Any], None]]]]


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


def _same_kind(old: Callback, new: Callback) -> bool:
    """Whether adding `new` replaces `old`: both unique, `new` of `old`'s class or a subclass."""
    return new.unique and old.unique and isinstance(new, type(old))


class _StaleHandlers(dict[str, list[tuple[Callback, Callable[[Any], None]]]]):
    """The dispatch table after a change of callbacks: its first lookup builds the real one (a
    plain dict), so the hot path (`learn.handlers[event]`) never checks whether it is stale."""

    def __init__(self, owner: CallbackList) -> None:
        super().__init__()
        self.owner = owner

    def __missing__(self, event: str) -> list[tuple[Callback, Callable[[Any], None]]]:
        return self.owner.build_handlers()[event]


class CallbackList:
    """A learner's callbacks: `cbs`, in the order added, and `handlers`, the callbacks that run
    at each event with their bound methods, sorted by `order` (rebuilt at its first use after a
    change). A callback's provided training steps (`STEPS`) shadow the learner's methods on the
    instance while it is added. `BaseLearner` inherits it; it holds no loop state.

    Examples:
        >>> learn.add_cb(PrintLossCB())
        >>> learn.callbacks_at("after_batch")
        [MetricsCB(order=-10), RecorderCB(order=-5), PrintLossCB(order=10), ProgressCB(order=50)]
    """

    cbs: list[Callback]
    handlers: Handlers
    providers: dict[str, Callback]

    def init_cbs(self, cbs: Callback | Iterable[Callback] | None) -> None:
        """Start with no callbacks, then add `cbs` (for `__init__`)."""
        self.cbs = []
        self.providers = {}
        self.set_cbs([])
        self.add_cbs(cbs or [])

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
        self.set_cbs(current, added=new_cbs if appended else None)
        return replaced

    def remove_cb(self, cb: Callback) -> None:
        """Remove `cb` (an instance in `learn.cbs`)."""
        if cb not in self.cbs:
            raise ValueError(f"remove_cb: {cb!r} is not in learn.cbs.")
        self.set_cbs([c for c in self.cbs if c is not cb])

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
        self.set_cbs([cb for cb in saved if cb not in removed])
        try:
            yield
        finally:
            self.set_cbs(saved)

    def set_cbs(self, cbs: list[Callback], added: list[Callback] | None = None) -> None:
        """Make `cbs` the callbacks (`added`: those appended to the current ones, if that is all
        that changed). Checked before anything is assigned."""
        # The step providers are resolved now (from the added callbacks alone when they were only
        # appended); the dispatch table when it is first used, so a change of any size costs one
        # build.
        providers: dict[str, Callback] = {} if added is None else dict(self.providers)
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
        self.providers = providers
        self.handlers = _StaleHandlers(self)
        # A provided step shadows the learner's method on the instance, so that every caller
        # (the loop, infer, a callback calling learn.zero_grad()) runs the provided one.
        for step in STEPS:
            if step in providers:
                setattr(self, step, functools.partial(getattr(providers[step], step), self))
            else:
                vars(self).pop(step, None)

    def build_handlers(self) -> Handlers:
        """Sort the callbacks by `order` and make `handlers` from them (returned)."""
        ordered = sorted(self.cbs, key=lambda c: c.order)  # stable: ties keep insertion order
        self.handlers = {
            e: [(c, getattr(c, e)) for c in ordered if callable(getattr(c, e, None))]
            for e in EVENTS
        }
        return self.handlers

    def callbacks_at(self, event: str) -> list[Callback]:
        """The callbacks that run at `event`, in the order they run."""
        return [cb for cb, _ in self.handlers[event]]

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: find a callback by name (`learn.recorder`).
        if not name.startswith("_"):
            for cb in self.__dict__.get("cbs", ()):
                if cb.name == name:
                    return cb
        raise AttributeError(f"{type(self).__name__!r} has no attribute or callback {name!r}")
