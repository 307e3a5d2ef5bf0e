"""Budgets in optimizer steps: what `fit(steps=300, valid_every=100)` trains on.

A fit budgeted in steps trains for `steps` optimizer steps (with gradient accumulation, optimizer
steps, not batches), on a training loader with or without a length: a `DataLoader` over an
`IterableDataset`, any re-iterable object, or a one-shot iterator. Its epochs are the stretches
of training between two validations: epoch `e` trains from step `e * valid_every` up to
`min((e + 1) * valid_every, steps)` and then validates, so every callback that acts once per
epoch (the results row, `EarlyStoppingCB`, `SaveBestCB`, `CheckpointCB(every_n_epochs=1)`) acts
at every validation. Without `valid_every` the fit is one epoch, validated at its end.

The batches come from one iteration of the training loader that goes on across the epochs
(`TrainStream`): when a pass over the loader ends, the next one starts (a new shuffle, and
`sampler.set_epoch(pass)` where the sampler has one, as `DistributedSampler`), until the budget is
spent; a one-shot iterator that runs out ends the training early, with a warning.

The core loop (`learner.core`) uses this module; the state it keeps on the learner is
`global_step`, `n_steps`, `valid_every`, `fit_step` and `train_stream` (see `BaseLearner`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from learner.checks import check_int
from learner.rng import rng_state, set_rng_state

__all__ = ["TrainStream", "budget_epochs", "resumable", "segment"]

_END = object()


def budget_epochs(n_epochs: int | None, steps: int | None, valid_every: int | None) -> int:
    """The number of epochs of `fit(n_epochs, steps=, valid_every=)`, checked: `n_epochs`
    (default 1) for a budget in epochs; for one in steps, one epoch per validation,
    `ceil(steps / valid_every)` (1 without `valid_every`).

    Examples:
        >>> budget_epochs(None, 250, 100), budget_epochs(None, 250, None)
        (3, 1)
    """
    if steps is None:
        if valid_every is not None:
            raise ValueError(
                "valid_every= counts optimizer steps, for a fit budgeted in steps: pass "
                f"fit(steps=..., valid_every={valid_every!r}), or leave valid_every out (a fit in "
                "epochs validates after every epoch)."
            )
        n_epochs = 1 if n_epochs is None else n_epochs
        check_int("n_epochs", n_epochs, 0)
        return n_epochs
    if n_epochs is not None:
        raise ValueError(
            f"fit got both n_epochs={n_epochs!r} and steps={steps!r}: a fit is budgeted in one of "
            "them. Pass fit(steps=...) alone (valid_every= sets how often it validates)."
        )
    check_int("steps", steps, 1)
    check_int("valid_every", valid_every, 1, optional=True)
    return 1 if valid_every is None else math.ceil(steps / valid_every)


def segment(epoch: int, n_steps: int, valid_every: int | None) -> tuple[int, int]:
    """`(first, end)`: the steps of this fit that epoch `epoch` of a fit of `n_steps` steps,
    validated every `valid_every`, trains (from step `first` up to, not including, `end`).

    Examples:
        >>> segment(0, 250, 100), segment(2, 250, 100), segment(0, 250, None)
        ((0, 100), (200, 250), (0, 250))
    """
    if valid_every is None:
        return 0, n_steps
    return epoch * valid_every, min((epoch + 1) * valid_every, n_steps)


def resumable(loader: Any) -> str:
    """How a resumed fit finds its place in `loader` mid-pass: "state" for a loader that saves
    and loads its position (torchdata's `StatefulDataLoader`, anything with `state_dict()` and
    `load_state_dict()`), "replay" for a map-style one with a length (its batches are drawn again
    from the saved random states and skipped), "none" for a stream (an `IterableDataset`, an
    object without a length, a one-shot iterator), which cannot go back to where it was.
    """
    if isinstance(loader, Iterator):
        return "none"
    if callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    ):
        return "state"
    if isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
        return "none"
    try:
        len(loader)
    except TypeError:
        return "none"
    return "replay"


class TrainStream:
    """The training batches of a fit budgeted in steps: one iteration of `loader` that goes on
    across the fit's epochs, with a new pass over it whenever one ends.

    `until(done)` yields batches until `done()` is true (the loop asks once per batch, after the
    previous one was trained on) or a one-shot iterator runs out (`ended`, with a warning). A
    new pass calls `loader.sampler.set_epoch(pass)` where the sampler has one, after keeping
    the random states its shuffle draws from (`pass_rng`), which a checkpoint saves.

    `state_dict()` is the position: passes started, batches drawn in the current one, and the
    loader's own `state_dict()` where it has one; `resume(...)` makes the next pass start there
    (see `resumable`): exactly for a loader with a state or a length, from where the stream now
    is for a stream, with a warning.

    Args:
        loader: the training loader (`learn.dls.train` at the start of the fit).
        dls: the learner's loaders, whose generators the random states include.

    Examples:
        >>> stream = TrainStream([1, 2, 3], dls=None)
        >>> batches = stream.until(lambda: False)
        >>> [next(batches) for _ in range(5)], stream.passes
        ([1, 2, 3, 1, 2], 2)
    """

    def __init__(self, loader: Any, dls: Any) -> None:
        self.loader, self.dls = loader, dls
        self.one_shot = isinstance(loader, Iterator)
        self.it: Iterator[Any] | None = None
        self.passes = 0  # passes over the loader started
        self.pass_iter = 0  # batches drawn in the current pass
        self.pass_rng: dict[str, Any] | None = None  # the random states the pass started from
        self.ended = False  # a one-shot iterator ran out
        self._resume: tuple[Mapping[str, Any], Mapping[str, Any] | None, Mapping[str, Any]] | None
        self._resume = None

    def until(self, done: Callable[[], bool]) -> Iterator[Any]:
        """The batches until `done()` is true (or the stream ends)."""
        while not (self.ended or done()):
            if self.it is None:
                self._start_pass()
                assert self.it is not None
            batch = next(self.it, _END)
            if batch is _END:
                self.it = None
                if self.one_shot:
                    self.ended = True
                    warnings.warn(
                        f"dls.train ({type(self.loader).__name__}, a one-shot iterator) ran out "
                        "before the step budget was spent: training ends here, after "
                        f"{self.pass_iter} batches.",
                        stacklevel=2,
                    )
                elif self.pass_iter == 0:
                    raise ValueError(
                        f"dls.train yielded no batches in pass {self.passes} over it: check its "
                        "dataset size, batch size and drop_last."
                    )
                continue
            self.pass_iter += 1
            yield batch

    def _start_pass(self) -> None:
        if self._resume is not None:
            self._resume_pass(*self._resume)
            self._resume = None
            return
        if self.one_shot and self.passes:  # it was used up: nothing more to start
            self.it, self.ended = iter(()), True
            return
        self._set_epoch(self.passes)
        self.pass_rng = rng_state(self.dls)
        self.it, self.passes, self.pass_iter = iter(self.loader), self.passes + 1, 0

    def _set_epoch(self, n: int) -> None:
        set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(n)

    def state_dict(self) -> dict[str, Any]:
        """The position: `{"passes", "pass_iter", "loader"}` (the loader's own `state_dict()`
        where it has one and a pass is under way, else None)."""
        loader = None
        if self.it is not None and resumable(self.loader) == "state":
            loader = self.loader.state_dict()
        return {"passes": self.passes, "pass_iter": self.pass_iter, "loader": loader}

    def resume(
        self, state: Mapping[str, Any], pass_rng: Mapping[str, Any] | None, rng: Mapping[str, Any]
    ) -> None:
        """Start the next pass at the position `state` (`state_dict()` of the saved run),
        whose pass started from the random states `pass_rng`; `rng` are the states at the
        moment it was saved, put back once the position is reached."""
        self.passes, self.pass_iter = int(state["passes"]), int(state["pass_iter"])
        self.pass_rng = None if pass_rng is None else dict(pass_rng)
        if self.pass_iter:
            self._resume = (state, pass_rng, rng)

    def _resume_pass(
        self, state: Mapping[str, Any], pass_rng: Mapping[str, Any] | None, rng: Mapping[str, Any]
    ) -> None:
        how = resumable(self.loader)
        if how == "state" and state.get("loader") is not None:
            self._set_epoch(self.passes - 1)
            self.loader.load_state_dict(state["loader"])
            self.it = iter(self.loader)
        elif how == "replay" and pass_rng is not None:
            self._set_epoch(self.passes - 1)
            set_rng_state(self.dls, pass_rng)
            self.it = iter(self.loader)
            for i in range(self.pass_iter):
                if next(self.it, _END) is _END:
                    raise ValueError(
                        f"Cannot resume at batch {self.pass_iter} of pass {self.passes} over "
                        f"dls.train: it yields only {i} batches now. Resume with the data of the "
                        "saved run."
                    )
        else:
            warnings.warn(
                f"Resuming mid-stream: dls.train ({type(self.loader).__name__}) cannot go back "
                f"to batch {self.pass_iter} of pass {self.passes}, where the saved run was (it "
                "has neither a length nor a state_dict()), so the resumed run goes on with the "
                "batches the stream yields from now on, not those the saved run would have "
                "drawn next. For an exact resume use torchdata's StatefulDataLoader or a "
                "map-style dataset.",
                stacklevel=3,
            )
            self._set_epoch(self.passes)
            self.it, self.passes, self.pass_iter = iter(self.loader), self.passes + 1, 0
        set_rng_state(self.dls, rng)
