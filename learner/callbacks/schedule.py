"""Hyper-parameter schedules: per-batch annealing, one-cycle, and torch lr schedulers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from learner.callbacks.order import ORDERS
from learner.callbacks.tracker import Monitor
from learner.checks import check_lr, param_groups
from learner.core import BaseLearner
from learner.events import Callback, as_cbs

__all__ = [
    "LRSchedulerCB",
    "ParamSchedulerCB",
    "Schedule",
    "combine_scheds",
    "combined_cos",
    "fit_one_cycle",
    "sched_cos",
    "sched_exp",
    "sched_lin",
    "sched_no",
    "set_hyper",
]

Schedule = Callable[[float], float]
"""A schedule maps training progress `pos` in [0, 1] to a hyper-parameter value."""


def sched_lin(start: float, end: float) -> Schedule:
    """Linear from `start` (pos 0) to `end` (pos 1).

    Examples:
        >>> sched_lin(1.0, 3.0)(0.5)
        2.0
    """
    return lambda pos: start + pos * (end - start)


def sched_cos(start: float, end: float) -> Schedule:
    """Cosine annealing from `start` to `end`: flat at both ends, steepest in the middle.

    Examples:
        >>> sched_cos(1.0, 3.0)(0.5)
        2.0
    """
    return lambda pos: start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def sched_exp(start: float, end: float) -> Schedule:
    """Exponential from `start` to `end` (linear on a log scale; both must be > 0).

    Examples:
        >>> sched_exp(1e-4, 1e-2)(0.5)
        0.001
    """
    if not (start > 0 and end > 0):
        raise ValueError(f"sched_exp needs start > 0 and end > 0, got {start} and {end}.")
    return lambda pos: start * (end / start) ** pos


def sched_no(start: float, end: float) -> Schedule:
    """Constant `start` (`end` is ignored): a flat phase in `combine_scheds`.

    Examples:
        >>> sched_no(1.0, 3.0)(0.9)
        1.0
    """
    return lambda pos: start


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Schedule]) -> Schedule:
    """Chain schedules: `scheds[i]` runs over the fraction `pcts[i]` of training.

    Each phase sees its own progress from 0 to 1. The fractions must be >= 0 and sum to 1; a
    phase of 0 is skipped.

    Examples:
        >>> warmup = combine_scheds([0.25, 0.75], [sched_lin(0.0, 1.0), sched_cos(1.0, 0.0)])
        >>> warmup(0.125), warmup(0.25)
        (0.5, 1.0)
    """
    pcts, scheds = list(pcts), list(scheds)
    if len(pcts) != len(scheds) or not pcts:
        raise ValueError(
            f"combine_scheds needs one fraction per schedule, got {len(pcts)} fractions and "
            f"{len(scheds)} schedules."
        )
    if any(p < 0 for p in pcts) or not math.isclose(sum(pcts), 1.0, abs_tol=1e-9):
        raise ValueError(f"combine_scheds fractions must be >= 0 and sum to 1, got {pcts}.")
    phases, start = [], 0.0
    for pct, sched in zip(pcts, scheds):
        if pct > 0:
            phases.append((start, pct, sched))
        start += pct

    def combined(pos: float) -> float:
        # The phase holding pos; the last one also takes pos == 1 (and beyond, clamped).
        lo, width, f = next((p for p in phases if pos < p[0] + p[1]), phases[-1])
        return f(min(max((pos - lo) / width, 0.0), 1.0))

    return combined


def combined_cos(pct: float, start: float, middle: float, end: float) -> Schedule:
    """Cosine from `start` to `middle` over the fraction `pct` of training, then to `end`.

    Examples:
        >>> combined_cos(0.25, 1.0, 2.0, 0.0)(0.25)
        2.0
    """
    return combine_scheds([pct, 1 - pct], [sched_cos(start, middle), sched_cos(middle, end)])


# -- setting hyper-parameters in param groups ----------------------------------------------------


def _key(group: Mapping[str, Any], name: str) -> str | None:
    """The param-group key that hyper-parameter `name` sets, or None if the group has none."""
    if name == "mom":
        # SGD and RMSprop call it momentum; the Adam family uses the first of `betas`.
        return next((k for k in ("momentum", "betas") if k in group), None)
    return name if name in group else None


def set_hyper(group: dict[str, Any], name: str, value: float | torch.Tensor) -> None:
    """Set hyper-parameter `name` ('lr', 'mom' or any param-group key) in one param group."""
    key = _key(group, name)
    if key is None:
        raise KeyError(name)
    old = group[key]
    if key == "betas":
        if isinstance(old[0], torch.Tensor):
            old[0].fill_(value)
        else:
            group[key] = (value, *old[1:])
    elif isinstance(old, torch.Tensor):
        old.fill_(value)  # fused/capturable optimizers keep hyper-parameters as tensors
    else:
        group[key] = value


def _check_hypers(opt: torch.optim.Optimizer, names: Iterable[str], owner: str) -> None:
    """A clear error, naming the key, when a param group lacks a hyper-parameter to set."""
    for name in names:
        for i, group in enumerate(param_groups(opt, owner)):
            if _key(group, name) is None:
                keys = ", ".join(k for k in group if k != "params")
                hint = (
                    " 'mom' sets 'momentum' (SGD, RMSprop) or betas[0] (Adam family); for this "
                    "optimizer leave it out (fit_one_cycle(..., moms=None))."
                    if name == "mom"
                    else ""
                )
                raise ValueError(
                    f"{owner} schedules {name!r}, but param_groups[{i}] of "
                    f"{type(opt).__name__} has no such key; it has: {keys}.{hint}"
                )


def _n_train_batches(learn: BaseLearner, owner: str) -> int:
    dl = learn.dls.train
    if not hasattr(dl, "__len__"):
        raise ValueError(
            f"{owner} needs len(dls.train) to know how long training runs, but "
            f"{type(dl).__name__} has no __len__. Give the loader a __len__, train for a budget "
            "of steps (fit(steps=...), fit_one_cycle(steps=...)), or use LRSchedulerCB with a "
            "torch scheduler that needs no length."
        )
    return len(dl)


# -- the callbacks ------------------------------------------------------------------------------


class ParamSchedulerCB(Callback):
    """Sets optimizer hyper-parameters before every training batch from schedules of progress.

    `scheds` maps a hyper-parameter name to a schedule `f(pos) -> value`, where `pos` in [0, 1)
    is the fraction of this fit's training batches done at the last optimizer step: the batch
    `i` of `n_epochs * len(dls.train)` gets `f(i / total)`, as in fastai. In a fit budgeted in
    steps (`fit(steps=n)`, no length needed) it is the fraction of the steps done,
    `learn.fit_step / n`. 'lr' sets the learning
    rate; 'mom' the momentum (SGD's `momentum`, or `betas[0]` in the Adam family); any other name
    sets that key of every param group (e.g. 'weight_decay'). The same value goes to every group.

    Progress advances at `after_step`, by the batches seen since the previous step, so a step
    that does not happen (gradient accumulation, a skipped mixed-precision step) does not move
    the schedule, and the schedule still ends where it should. `learn.lr` is left alone: it is
    the base learning rate a fit starts from; the recorder's `lrs` shows the schedule.

    `state_dict()` / `load_state_dict()` hold the position and length of the run, so a fit
    resumed from a checkpoint (`fit(resume_from=...)`) continues the saved schedule.

    Events: `before_fit`, `before_batch`, `after_step`. Order: 10 (before `lr_find`'s finder,
    which overrides the learning rate).

    Args:
        scheds: hyper-parameter name -> schedule, e.g. `{"lr": sched_cos(1e-2, 1e-5)}`.

    Examples:
        >>> warmup_cos = combine_scheds([0.1, 0.9], [sched_lin(1e-4, 1e-2), sched_cos(1e-2, 0)])
        >>> learn.fit(5, cbs=[ParamSchedulerCB({"lr": warmup_cos})])
        >>> learn.recorder.plot_lr()
    """

    order = ORDERS["ParamSchedulerCB"]
    in_side_runs = False  # the finder sets the learning rate

    def __init__(self, scheds: Mapping[str, Schedule]) -> None:
        if not isinstance(scheds, Mapping) or not scheds:
            raise TypeError(
                "scheds must be a non-empty dict of name -> schedule, e.g. "
                "{'lr': sched_cos(1e-2, 1e-5)}."
            )
        for name, sched in scheds.items():
            if not isinstance(name, str) or not callable(sched):
                raise TypeError(
                    f"scheds must map names to functions of progress, got {name!r}: {sched!r}."
                )
        self.scheds = dict(scheds)
        self.pos, self.total, self.since_step = 0, 0, 0
        self.per_step = False  # a fit budgeted in steps: pos counts steps, not batches

    def before_fit(self, learn: BaseLearner) -> None:
        if not learn.run_train:
            return
        assert learn.opt is not None  # fit creates the optimizer before a training run
        _check_hypers(learn.opt, self.scheds, type(self).__name__)
        if learn.n_steps is not None:
            total = learn.n_steps
        else:
            total = learn.n_epochs * _n_train_batches(learn, type(self).__name__)
        self.pos, self.total, self.since_step = 0, total, 0
        self.per_step = learn.n_steps is not None

    def before_batch(self, learn: BaseLearner) -> None:
        if not learn.training:
            return
        assert learn.opt is not None
        pos = min(self.pos / self.total, 1.0) if self.total else 0.0
        for name, sched in self.scheds.items():
            value = sched(pos)
            for group in learn.opt.param_groups:
                set_hyper(group, name, value)
        self.since_step += 1

    def after_step(self, learn: BaseLearner) -> None:
        self.pos += 1 if self.per_step else self.since_step
        self.since_step = 0

    def state_dict(self) -> dict[str, int]:
        """The schedule's position: `{"pos": batches done at the last step, "total": batches in
        the run, "since_step": batches since that step (accumulating gradients)}`."""
        return {"pos": self.pos, "total": self.total, "since_step": self.since_step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from `state` (from `state_dict()`)."""
        self.pos, self.total = int(state["pos"]), int(state["total"])
        self.since_step = int(state.get("since_step", 0))


class LRSchedulerCB(Callback):
    """Steps a `torch.optim.lr_scheduler` scheduler after every optimizer step, or every epoch.

    Pass a scheduler built on `learn.opt`, or, since the Learner creates its optimizer at the
    first `fit`, a factory `f(optimizer) -> scheduler`, called at the start of every fit.

    - `interval="batch"`: one `scheduler.step()` per optimizer step. The step is taken at the
      end of the batch (`cleanup_batch`), so the recorder still sees the learning rate the batch
      used, and a batch that did not step the optimizer does not step the scheduler.
    - `interval="epoch"`: one `scheduler.step()` after each epoch in which the optimizer stepped.
      `ReduceLROnPlateau` steps per epoch on `monitor`, a key of `learn.recorder.history`.

    `state_dict()` / `load_state_dict()` wrap the scheduler's own; a resumed fit loads it once
    `before_fit` has built the scheduler.

    Events: `before_fit`, `after_step`, `cleanup_batch`, `after_epoch`. Order: 10 (after the
    recorder, which `ReduceLROnPlateau`'s monitor reads at `after_epoch`).

    Args:
        scheduler: a scheduler on `learn.opt`, or a function `optimizer -> scheduler`.
        interval: "batch" or "epoch". Default "batch".
        monitor: history key for `ReduceLROnPlateau`. Default "valid_loss".

    Examples:
        >>> from torch.optim.lr_scheduler import OneCycleLR
        >>> sched = lambda opt: OneCycleLR(opt, max_lr=1e-2, total_steps=3 * len(dls.train))
        >>> learn.fit(3, cbs=[LRSchedulerCB(sched)])
    """

    order = ORDERS["LRSchedulerCB"]
    in_side_runs = False  # the finder sets the learning rate

    def __init__(
        self,
        scheduler: LRScheduler | Callable[[torch.optim.Optimizer], LRScheduler],
        interval: str = "batch",
        monitor: str = "valid_loss",
    ) -> None:
        if interval not in ("batch", "epoch"):
            raise ValueError(f"interval must be 'batch' or 'epoch', got {interval!r}.")
        if isinstance(scheduler, LRScheduler):
            self.scheduler: LRScheduler | None = scheduler
            self.factory: Callable[[torch.optim.Optimizer], LRScheduler] | None = None
        elif callable(scheduler):
            self.scheduler, self.factory = None, scheduler
        else:
            raise TypeError(
                "scheduler must be a torch.optim.lr_scheduler scheduler or a function "
                f"optimizer -> scheduler, got {type(scheduler).__name__}."
            )
        if isinstance(scheduler, ReduceLROnPlateau) and interval != "epoch":
            raise ValueError("ReduceLROnPlateau steps on an epoch's metric: pass interval='epoch'.")
        self.interval = interval
        self.monitor = Monitor(monitor, "min")  # ReduceLROnPlateau has its own mode
        self.pending, self.stepped = 0, False

    def before_fit(self, learn: BaseLearner) -> None:
        self.pending, self.stepped = 0, False
        if learn.opt is None:  # a fit without training, before any: nothing to schedule
            return
        if self.factory is not None:
            self.scheduler = self.factory(learn.opt)
            if not isinstance(self.scheduler, LRScheduler):
                raise TypeError(
                    "the factory passed to LRSchedulerCB must return a torch.optim.lr_scheduler "
                    f"scheduler, got {type(self.scheduler).__name__}."
                )
        assert self.scheduler is not None
        if self.scheduler.optimizer is not learn.opt:
            raise ValueError(
                "LRSchedulerCB's scheduler steps another optimizer than learn.opt. The Learner "
                "creates its optimizer at the first fit: pass a factory instead, e.g. "
                "LRSchedulerCB(lambda opt: StepLR(opt, step_size=1))."
            )
        if isinstance(self.scheduler, ReduceLROnPlateau):
            if self.interval != "epoch":
                raise ValueError(
                    "ReduceLROnPlateau steps on an epoch's metric: pass interval='epoch'."
                )
            self.monitor.check(learn, type(self).__name__)

    def after_step(self, learn: BaseLearner) -> None:
        self.pending += 1
        self.stepped = True

    def cleanup_batch(self, learn: BaseLearner) -> None:
        if self.interval == "batch" and self.scheduler is not None:
            for _ in range(self.pending):
                self.scheduler.step()
        self.pending = 0

    def after_epoch(self, learn: BaseLearner) -> None:
        if self.interval != "epoch" or not self.stepped or self.scheduler is None:
            return
        self.stepped = False
        if isinstance(self.scheduler, ReduceLROnPlateau):
            value = self.monitor.value(learn)
            if value is not None:
                self.scheduler.step(value)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's `state_dict()` ({} before a factory built it)."""
        return {} if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the scheduler (a resumed fit calls it once `before_fit` built it)."""
        if self.scheduler is None:
            raise ValueError(
                "LRSchedulerCB.load_state_dict: no scheduler yet (a factory builds it at "
                "before_fit); resume with fit(resume_from=...), which loads it after."
            )
        self.scheduler.load_state_dict(dict(state))
        # A scheduler sets the lr when it steps; one just built (by the factory) has set the lr of
        # step 0, so put back the lr of the step it resumes from.
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            set_hyper(group, "lr", lr)


def fit_one_cycle(
    learn: BaseLearner,
    n_epochs: int | None = None,
    lr_max: float | None = None,
    div: float = 25.0,
    div_final: float = 1e5,
    pct_start: float = 0.25,
    moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
    cbs: Callback | Iterable[Callback] | None = None,
    *,
    steps: int | None = None,
    valid_every: int | None = None,
) -> None:
    """Train with the one-cycle policy (Smith 2018), as fastai's `fit_one_cycle`, for `n_epochs`
    epochs or, with `steps`, for that many optimizer steps (`fit(steps=, valid_every=)`).

    The learning rate warms up from `lr_max / div` to `lr_max` over the first `pct_start` of
    the batches, then anneals to `lr_max / div_final`, both phases on cosines. The momentum (SGD
    `momentum` or Adam `betas[0]`) moves the other way: `moms[0]` down to `moms[1]` while the
    learning rate rises, back to `moms[2]` while it falls. `lr_max` becomes `learn.lr`, as
    `fit(lr=...)` does; afterwards the optimizer keeps the schedule's last values.

    Args:
        learn: the Learner.
        n_epochs: number of epochs. Default 1, or none with `steps`.
        lr_max: peak learning rate. Default None: `learn.lr`.
        div: `lr_max / div` is the starting learning rate. Default 25.
        div_final: `lr_max / div_final` is the final learning rate. Default 1e5.
        pct_start: fraction of the batches spent warming up. Default 0.25.
        moms: momentum at the start, at the peak lr, and at the end; None leaves it alone (for
            optimizers with no momentum). Default (0.95, 0.85, 0.95).
        cbs: more callbacks for this fit.
        steps: a budget in optimizer steps instead of epochs, the cycle spread over them.
        valid_every: with `steps`, validate after every `valid_every` steps (and at the end).

    Examples:
        >>> learn.fit_one_cycle(3, lr_max=1e-2)
        >>> learn.fit_one_cycle(steps=300, valid_every=100, lr_max=1e-2)
        >>> learn.recorder.plot_lr()
    """
    lr_max = learn.lr if lr_max is None else lr_max
    if lr_max is None:
        raise ValueError("fit_one_cycle needs lr_max= (the Learner was made with lr=None).")
    check_lr(lr_max, "lr_max")
    if not 0 <= pct_start <= 1:
        raise ValueError(f"pct_start must be between 0 and 1, got {pct_start!r}.")
    if not (div > 0 and div_final > 0):
        raise ValueError(f"div and div_final must be > 0, got {div!r} and {div_final!r}.")
    scheds = {"lr": combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final)}
    if moms is not None:
        if len(moms) != 3:
            raise ValueError(f"moms must be (start, middle, end), got {moms!r}.")
        scheds["mom"] = combined_cos(pct_start, *moms)
    learn.fit(
        n_epochs,
        lr=lr_max,
        cbs=[ParamSchedulerCB(scheds), *as_cbs(cbs)],
        steps=steps,
        valid_every=valid_every,
    )
