"""The learning-rate finder: a short run with an exponentially growing learning rate that leaves
no trace on the Learner, and a suggested learning rate from its loss curve."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from matplotlib.figure import Figure

from learner.callbacks.order import ORDERS
from learner.callbacks.recorder import smooth
from learner.callbacks.schedule import sched_exp, set_hyper
from learner.checks import check_int, check_number, param_groups
from learner.core import BaseLearner, CancelFitException
from learner.distributed import all_reduce_sum, is_distributed, world_size
from learner.events import Callback
from learner.plotting import new_figure
from learner.snapshot import side_run
from learner.utils import get_lr

__all__ = [
    "MIN_POINTS",
    "LRFindResult",
    "LRFinderCB",
    "draws_on_pyplot",
    "lr_find",
    "steep",
    "valley",
]

MIN_POINTS = 10
"""Fewer finite points than this after trimming gives no suggestion (a warning instead)."""

Suggest = Callable[[Sequence[float], Sequence[float]], float | None]
"""A suggestion rule: `suggest(lrs, losses) -> lr`, or None when the curve has too few points."""


# -- suggestions --------------------------------------------------------------------------------


def _usable(lrs: Sequence[float], losses: Sequence[float]) -> tuple[list[float], list[float]]:
    """The points with a finite, positive lr and a finite loss; a warning if too few remain."""
    pts = [
        (float(lr), float(loss))
        for lr, loss in zip(lrs, losses)
        if math.isfinite(lr) and lr > 0 and math.isfinite(loss)
    ]
    if len(pts) < MIN_POINTS:
        warnings.warn(
            f"lr_find: {len(pts)} usable points (finite loss), fewer than {MIN_POINTS}: no "
            "suggested learning rate. The run stops when the loss diverges: start from a "
            "smaller start_lr, or raise num_it.",
            stacklevel=3,
        )
        return [], []
    return [p[0] for p in pts], [p[1] for p in pts]


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """fastai's "valley" suggestion: the middle of the longest descent of the loss curve.

    The longest descent is the longest strictly decreasing subsequence of `losses` (its points
    need not be adjacent, so a bump of noise does not cut a long descent in two). As in fastai,
    the valley is taken to end at its last point `end` and to span as many points as it has,
    `length`, and the suggestion is its middle, `lrs[end - length // 2]`: well inside the region
    where a higher learning rate still lowers the loss, away from both the flat start and the
    divergence. Points with a non-finite lr or loss are dropped first; with fewer than
    `MIN_POINTS` left, it warns and returns None.

    Examples:
        >>> lrs = [10 ** (i / 10 - 7) for i in range(80)]
        >>> losses = [2.0] * 20 + [2.0 - 0.03 * i for i in range(40)] + [1.0 + i for i in range(20)]
        >>> valley(lrs, losses) == lrs[39]
        True
    """
    lrs, losses = _usable(lrs, losses)
    if not losses:
        return None
    n = len(losses)
    length = [1] * n  # length[i]: the longest decreasing subsequence ending at point i
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]:
                length[i] = length[j] + 1
    end = max(range(n), key=length.__getitem__)
    return lrs[end - length[end] // 2]


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """The recorded lr where the loss falls fastest against log(lr) (central differences).

    The slope at point `i` is `(losses[i+1] - losses[i-1]) / (log lrs[i+1] - log lrs[i-1])`;
    the suggestion is the lr with the most negative slope. Points with a non-finite lr or loss
    are dropped first; with fewer than `MIN_POINTS` left, it warns and returns None.

    Examples:
        >>> lrs = [10 ** (i / 10 - 7) for i in range(60)]
        >>> losses = [-math.tanh(i - 30) for i in range(60)]  # steepest at i = 30
        >>> steep(lrs, losses) == lrs[30]
        True
    """
    lrs, losses = _usable(lrs, losses)
    if not losses:
        return None
    logs = [math.log(lr) for lr in lrs]

    def slope(i: int) -> float:
        run = logs[i + 1] - logs[i - 1]
        return (losses[i + 1] - losses[i - 1]) / run if run > 0 else math.inf

    return lrs[min(range(1, len(lrs) - 1), key=slope)]


# matplotlib's built-in backends that show nothing (its `BackendFilter.NON_INTERACTIVE`).
_NON_INTERACTIVE = frozenset({"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"})


def draws_on_pyplot() -> bool:
    """Whether matplotlib's backend shows figures (inline in a notebook, or in a window): then
    `lr_find` draws its plot onto pyplot's current figure, as the course's does."""
    import matplotlib

    return matplotlib.get_backend().lower() not in _NON_INTERACTIVE


class LRFindResult(NamedTuple):
    """What `lr_find` returns: `lrs, losses, suggestion = learn.lr_find()`.

    `losses` are the raw training losses (a non-finite last one, if the run blew up, included);
    `smoothed` is the curve the suggestion was read from; `plot()` draws it on a log-x axis.
    Where a backend shows figures (`draws_on_pyplot()`: a notebook's inline backend, a window),
    `lr_find` has drawn that plot onto pyplot's current figure already, so the result shows as
    one line of text; elsewhere (a notebook with a non-showing backend) it shows as its plot
    when `learn.lr_find()` is the last line of a cell.
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float | None

    @property
    def smoothed(self) -> list[float]:
        """The losses smoothed as the recorder smooths them (bias-corrected EMA, beta 0.98)."""
        return smooth(self.losses)

    def plot(self) -> Figure:
        """The smoothed loss against the learning rate (log scale), the suggestion marked; the
        y-axis spans the curve up to its minimum, so a steep divergence does not flatten it."""
        fig, (ax,) = new_figure()
        self.draw(ax)
        return fig

    def draw(self, ax: Any) -> None:
        """Draw `plot()`'s curve on the matplotlib axes `ax`."""
        pts = [(lr, s) for lr, s in zip(self.lrs, self.smoothed) if math.isfinite(s)]
        if pts:
            ax.plot(*zip(*pts), label="smoothed loss")
            ys = [y for _, y in pts]
            low = min(ys)
            high = max(ys[: ys.index(low) + 1])
            if high > low:  # the divergence leaves through the top rather than flatten the rest
                pad = 0.1 * (high - low)
                ax.set_ylim(low - pad, high + pad)
        lr = self.suggestion
        if lr is not None and pts:
            at = min(pts, key=lambda p: abs(math.log(p[0] / lr)))
            ax.plot(*at, "o", color="C3", label=f"suggestion {lr:.2e}")
        ax.set_xscale("log")
        ax.set(xlabel="learning rate", ylabel="loss")
        ax.legend()

    def __repr__(self) -> str:
        lr = "None" if self.suggestion is None else f"{self.suggestion:.2e}"
        return f"LRFindResult(suggestion={lr}, {len(self.lrs)} points)"

    def _repr_png_(self) -> bytes | None:
        # A notebook shows the plot when `learn.lr_find()` ends a cell, unless lr_find drew it.
        if draws_on_pyplot():
            return None
        buf = io.BytesIO()
        self.plot().savefig(buf, format="png")
        return buf.getvalue()


# -- the run ------------------------------------------------------------------------------------


class LRFinderCB(Callback):
    """Raises the learning rate exponentially from `start_lr` to `end_lr` over `num_it` batches;
    or, the course's way, by a factor `gamma` per batch.

    Batch `i` trains at `start_lr * (end_lr / start_lr) ** (i / (num_it - 1))` (`start_lr`
    None: 1e-7), set in every
    param group at `before_batch`. After each batch it records the lr and the loss in `lrs` and
    `losses`, and ends the fit with `CancelFitException` after `num_it` batches, at a non-finite
    loss, or when the smoothed loss exceeds `stop_factor` times its minimum. Use it through
    `lr_find`, which runs it in a fit budgeted in steps (`fit(steps=num_it, valid=False)`: a
    single training phase that passes over the loader as often as needed, no epoch ending) and
    undoes the run.

    With `gamma` (the course's `LRFinderCB(gamma=1.3, max_mult=3)`, notebook 09), batch `i`
    trains at `start_lr * gamma ** i` (`start_lr` None: the optimizer's rate when the fit
    starts), and the fit ends at a non-finite loss or when the loss exceeds `max_mult` times its
    minimum so far (raw losses, as the course's); there is no `num_it`: the fit's own length is
    the other limit. `end_lr`, `num_it` and `stop_factor` do not apply then.

    Events: `before_fit`, `before_batch`, `after_batch`. Order: 90 (its
    learning rate wins over
    any scheduler's; it stops the fit after every other callback has seen the batch).

    Examples:
        >>> finder = LRFinderCB(num_it=50)  # usually: learn.lr_find(num_it=50)
        >>> learn.fit(2, cbs=(lrf := LRFinderCB(gamma=1.3, max_mult=3)))  # the course's
        >>> plt.plot(lrf.lrs, lrf.losses); plt.xscale("log")
    """

    order = ORDERS["LRFinderCB"]
    beta = 0.98  # the smoothing of `learner.callbacks.recorder.smooth`

    def __init__(
        self,
        start_lr: float | None = None,
        end_lr: float = 10.0,
        num_it: int = 100,
        stop_factor: float | None = 4.0,
        *,
        gamma: float | None = None,
        max_mult: float | None = None,
    ) -> None:
        self.gamma, self.max_mult = gamma, max_mult
        if gamma is not None or max_mult is not None:  # the course's
            self.gamma = 1.3 if gamma is None else gamma
            self.max_mult = 3.0 if max_mult is None else max_mult
            check_number("gamma", self.gamma)
            check_number("max_mult", self.max_mult)
            if not self.gamma > 1:
                raise ValueError(f"gamma must be > 1 (the lr grows by it per batch), got {gamma}.")
            if start_lr is not None:
                check_number("start_lr", start_lr)
            self.sched = None
        else:
            start_lr = 1e-7 if start_lr is None else start_lr
            check_number("start_lr", start_lr)
            check_number("end_lr", end_lr)
            if not end_lr > start_lr:
                raise ValueError(f"end_lr ({end_lr}) must be larger than start_lr ({start_lr}).")
            check_int("num_it", num_it, 2)
            if stop_factor is not None and not stop_factor > 1:
                raise ValueError(f"stop_factor must be > 1 (or None), got {stop_factor!r}.")
            self.sched = sched_exp(start_lr, end_lr)
        self.start_lr, self.end_lr, self.num_it = start_lr, end_lr, num_it
        self.stop_factor = stop_factor
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.first_lr = self.lr = start_lr or 0.0
        self.avg, self.best = 0.0, math.inf

    def before_fit(self, learn: BaseLearner) -> None:
        if learn.run_train:
            param_groups(learn.opt, "lr_find")
        self.lrs, self.losses = [], []
        self.avg, self.best = 0.0, math.inf
        self.first_lr = self.start_lr if self.start_lr is not None else get_lr(learn.opt)
        self.lr = self.first_lr

    def before_batch(self, learn: BaseLearner) -> None:
        if not learn.training:
            return
        assert learn.opt is not None
        k = len(self.lrs)
        if self.sched is not None:
            self.lr = self.sched(k / (self.num_it - 1))
        else:
            assert self.gamma is not None
            self.lr = self.first_lr * self.gamma**k
        for group in learn.opt.param_groups:
            set_hyper(group, "lr", self.lr)

    def after_batch(self, learn: BaseLearner) -> None:
        if not learn.training:
            return
        loss = self._global_loss(learn)
        self.lrs.append(self.lr)
        self.losses.append(loss)
        if self.sched is None:  # the course's rule, on the raw losses
            assert self.max_mult is not None
            self.best = min(self.best, loss)
            if math.isnan(loss) or loss > self.best * self.max_mult:
                raise CancelFitException()
            return
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        smoothed = self.avg / (1 - self.beta ** len(self.losses))
        self.best = min(self.best, smoothed)
        stop = (
            len(self.losses) >= self.num_it
            or not math.isfinite(smoothed)
            or (self.stop_factor is not None and smoothed > self.stop_factor * self.best)
        )
        if stop:  # the same decision on every rank, from the same losses
            raise CancelFitException()

    @staticmethod
    def _global_loss(learn: BaseLearner) -> float:
        # Under DDP/FSDP each rank trains on its shard of the global batch, of equal size
        # (training shards are padded): the mean of the ranks' losses is the global batch's, the
        # same number on every rank, so all record the same curve and stop together.
        if not is_distributed():
            return learn.loss.item()
        return all_reduce_sum(learn.loss.detach().float().reshape(1)).item() / world_size()


def lr_find(
    learn: BaseLearner,
    start_lr: float | None = None,
    end_lr: float = 10.0,
    num_it: int = 100,
    stop_factor: float | None = 4.0,
    suggest: Suggest = valley,
    *,
    gamma: float | None = None,
    max_mult: float | None = None,
    max_epochs: int | None = None,
) -> LRFindResult:
    """Train `num_it` batches at exponentially growing learning rates, then undo everything.

    The sweep trains on `dls.train` only (passing over it again as often as needed), and stops
    early at a non-finite loss or when the smoothed loss exceeds `stop_factor` times its minimum
    (see `LRFinderCB`). The suggestion is `suggest(lrs, smoothed_losses)` with the first 10% of
    the points left out (the smoothing is still settling there); `valley` by default, or
    `steep`, or any such function.

    The course's arguments work too: `lr_find(gamma=1.3, max_mult=3, start_lr=1e-5,
    max_epochs=10)` (keywords) multiplies the rate by `gamma` each batch from `start_lr` and
    stops when the loss exceeds `max_mult` times its minimum, or after `max_epochs` passes over
    `dls.train`; `end_lr`, `num_it` and `stop_factor` are fastai's and do not mix with them.

    Where matplotlib shows figures (a notebook's inline backend, a window: `draws_on_pyplot`),
    the plot is drawn onto pyplot's current figure, as the course's is, so it shows even when
    the call is not a cell's last line; the result is returned either way.

    It leaves no trace, by design:

    - The sweep runs on copies of the learner's callbacks that take part in it (those with
      `in_side_runs`, True by default: device placement, train/eval modes, mixed precision,
      clipping, accumulation, your own training-step callbacks). The recorder, the metrics, the
      schedulers, the trackers, the loggers and `CheckpointCB` sit it out: no file is written,
      and the callbacks and metric objects you handed in are the same objects afterwards,
      unchanged.
    - The model's parameters, buffers and gradients, every submodule's train/eval flag, the
      optimizer's state (or its absence, so that the first `fit` still creates a fresh one),
      the loop's state, the Python, NumPy and torch random states and the loaders' generators
      are put back (`learner.snapshot.side_run`), also after an exception or Ctrl-C.

    So two calls give the same curve, and `lr_find(); fit(n)` trains exactly as `fit(n)` would.

    Args:
        learn: the Learner.
        start_lr: learning rate of the first batch. Default None: 1e-7 (1e-5 with `gamma`).
        end_lr: learning rate of batch `num_it` (if reached). Default 10.
        num_it: number of batches. Default 100.
        stop_factor: stop once the smoothed loss exceeds this multiple of its minimum; None
            runs all `num_it` batches unless the loss becomes non-finite. Default 4.
        suggest: `f(lrs, losses) -> lr or None`. Default `valley`.
        gamma: the course's: the factor of the rate from one batch to the next (1.3).
        max_mult: the course's: stop once the loss exceeds this multiple of its minimum (3).
        max_epochs: the course's: at most this many passes over `dls.train` (10).

    Examples:
        >>> lrs, losses, suggestion = learn.lr_find()
        >>> learn.lr_find().plot().savefig("lr_find.png")
        >>> learn.fit_one_cycle(3, lr_max=suggestion)
        >>> learn.lr_find(gamma=1.3, max_mult=3, start_lr=1e-5, max_epochs=10)  # the course's
    """
    course = gamma is not None or max_mult is not None or max_epochs is not None
    if course:
        fastai = {
            "end_lr": (end_lr, 10.0),
            "num_it": (num_it, 100),
            "stop_factor": (stop_factor, 4.0),
        }
        mixed = [k for k, (value, default) in fastai.items() if value != default]
        if mixed:
            raise ValueError(
                f"lr_find: {', '.join(mixed)} (fastai's sweep) and gamma/max_mult/max_epochs "
                "(the course's) are two ways to run it: pass one set."
            )
        check_int("max_epochs", 10 if max_epochs is None else max_epochs, 1)
        start = 1e-5 if start_lr is None else start_lr
        finder = LRFinderCB(start, gamma=gamma or 1.3, max_mult=max_mult or 3.0)
    else:
        start = 1e-7 if start_lr is None else start_lr
        finder = LRFinderCB(start, end_lr, num_it, stop_factor)
    if not callable(suggest):
        raise TypeError(f"suggest must be a function f(lrs, losses), got {suggest!r}.")
    if isinstance(learn.dls.train, Iterator):
        raise ValueError(
            f"lr_find would use up dls.train, a one-shot iterator ({type(learn.dls.train).__name__}"
            "), and leave no batches for fit: pass something iterable again (a DataLoader, an "
            "object whose __iter__ makes a new generator each time)."
        )
    if learn.opt is not None:
        param_groups(learn.opt, "lr_find")
    lr = start if learn.lr is None and learn.opt is None else None  # Learner(lr=None)
    if course:  # at most max_epochs passes, as one training phase (no table of empty epochs)
        epochs = 10 if max_epochs is None else max_epochs
        n_train = len(learn.dls.train) if hasattr(learn.dls.train, "__len__") else None
        budget: dict[str, Any] = {"steps": epochs * n_train} if n_train else {"n_epochs": epochs}
    else:
        budget = {"steps": num_it}
    with side_run(learn) as cbs:
        learn.fit(**budget, lr=lr, cbs=[*cbs, finder], valid=False)
    lrs, losses = finder.lrs, finder.losses
    skip = len(losses) // 10
    result = LRFindResult(lrs, losses, suggest(lrs[skip:], smooth(losses)[skip:]))
    if draws_on_pyplot():
        import matplotlib.pyplot as plt

        result.draw(plt.gca())
    return result
