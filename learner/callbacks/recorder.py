"""Recording losses, learning rates and per-epoch results, and plotting them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from learner.callbacks.metrics import epoch_summary
from learner.callbacks.order import ORDERS
from learner.core import BaseLearner
from learner.events import Callback
from learner.plotting import new_figure
from learner.utils import get_lr

__all__ = ["RecorderCB", "find_recorder", "get_recorder", "smooth"]


def smooth(values: list[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (as in fastai's Recorder)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


class RecorderCB(Callback):
    """Records the loss and learning rate of every training batch and one row per epoch.

    - `losses`: training loss of every batch (Python floats; read from the device once per epoch).
    - `lrs`: learning rate of the first parameter group at every training batch.
    - `history`: one dict per epoch: `epoch`, `train_loss`, `valid_loss` and each metric (from
      `MetricsCB`; `None` for a phase that did not run), then the values logged with
      `learn.log` (`train_g_loss`, `valid_g_loss`). In a fit budgeted in steps, whose epochs
      end at each validation, a row per validation, with `step` (`learn.global_step`) after
      `epoch`.
    - `logged`: name -> the value of every training batch that logged it with
      `learn.log(name=value)` (Python floats, read once per epoch).

    Records accumulate across `fit` calls (a second fit continues the curves); `reset()` clears
    them; `state_dict()` / `load_state_dict()` hold them all, for checkpoints. Plots return a
    matplotlib Figure: save it in a script, or let a notebook show it.

    As the course's `RecorderCB(**d)`, it also records values of your own: each keyword is a
    function `f(recorder)`, called after every training batch, whose results go to
    `recs[name]`; `recorder.pg` is the optimizer's first param group, and `plot()` draws each
    record. Without keywords nothing more is done per batch.

    Events: `before_fit`, `after_batch`, `after_train`, `after_epoch`. Order: -5 (after
    MetricsCB, before callbacks that read the history).

    Args:
        **fns: name -> `f(recorder)`, a value to record after each training batch.

    Examples:
        >>> learn.fit(3)
        >>> learn.recorder.history[-1]["valid_loss"]
        >>> learn.recorder.plot_loss().savefig("loss.png")
        >>> def _lr(cb): return cb.pg["lr"]
        >>> def _beta1(cb): return cb.pg["betas"][0]
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=RecorderCB(lr=_lr, mom=_beta1))
        >>> learn.fit_one_cycle(3, lr_max=1e-2); learn.recorder.plot()
    """

    order = ORDERS["RecorderCB"]
    in_side_runs = False  # lr_find records its own curve; the run's records stay as they are

    def __init__(self, **fns: Callable[[RecorderCB], Any]) -> None:
        for name, fn in fns.items():
            if not callable(fn):
                raise TypeError(f"RecorderCB({name}=...) takes a function f(recorder), got {fn!r}.")
        self.fns = fns
        self.pg: dict[str, Any] | None = None  # the first param group, for the functions
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        self._losses: list[float] = []
        self._pending: list[torch.Tensor] = []
        self._logged: dict[str, list[float]] = {}
        self._pending_logged: dict[str, list[torch.Tensor]] = {}
        self.lrs: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.epoch_iters: list[int] = []  # number of training batches recorded at each epoch end
        self.recs: dict[str, list[Any]] = {name: [] for name in self.fns}

    @property
    def losses(self) -> list[float]:
        """Training loss of every batch recorded so far."""
        self._flush()
        return self._losses

    @property
    def logged(self) -> dict[str, list[float]]:
        """Name -> the value of every training batch that logged it (`learn.log`)."""
        self._flush()
        return self._logged

    def _flush(self) -> None:
        if self._pending:
            # One device-to-host read for the whole epoch instead of one per batch.
            self._losses.extend(torch.stack(self._pending).float().cpu().tolist())
            self._pending = []
        for name, values in self._pending_logged.items():
            if values:
                self._logged.setdefault(name, []).extend(torch.stack(values).float().cpu().tolist())
        self._pending_logged = {}

    def before_fit(self, learn: BaseLearner) -> None:
        groups = getattr(learn.opt, "param_groups", None)
        self.pg = groups[0] if groups else None

    def after_batch(self, learn: BaseLearner) -> None:
        if not learn.training:
            return
        if self.fns:
            for name, fn in self.fns.items():
                self.recs[name].append(fn(self))
        loss = learn.loss  # detached by the Learner once the step is done
        self._pending.append(loss.detach() if loss.requires_grad else loss)
        self.lrs.append(get_lr(learn.opt))
        for name, value in learn.logged.items():
            value = torch.as_tensor(value).detach().reshape(())
            self._pending_logged.setdefault(name, []).append(value)

    def after_train(self, learn: BaseLearner) -> None:
        self._flush()

    def after_epoch(self, learn: BaseLearner) -> None:
        self._flush()
        summary = epoch_summary(learn)
        row: dict[str, Any] = {"epoch": len(self.history)}
        if learn.n_steps is not None:
            row["step"] = learn.global_step
        self.history.append({**row, **summary})
        self.epoch_iters.append(len(self._losses))

    def state_dict(self) -> dict[str, Any]:
        """`losses`, `lrs`, `history` and `epoch_iters`, as plain lists."""
        return {
            "losses": list(self.losses),
            "lrs": list(self.lrs),
            "history": [dict(row) for row in self.history],
            "epoch_iters": list(self.epoch_iters),
            **({"logged": {k: list(v) for k, v in self.logged.items()}} if self.logged else {}),
            **({"recs": {k: list(v) for k, v in self.recs.items()}} if self.fns else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the records with those of `state_dict()`."""
        self.reset()
        self._losses = list(state["losses"])
        self.lrs = list(state["lrs"])
        self.history = [dict(row) for row in state["history"]]
        self.epoch_iters = list(state["epoch_iters"])
        self._logged = {k: list(v) for k, v in state.get("logged", {}).items()}
        for name, values in state.get("recs", {}).items():
            if name in self.recs:
                self.recs[name] = list(values)

    # -- plots ----------------------------------------------------------------------------------

    def plot_loss(self, skip_start: int = 5, with_valid: bool = True) -> Figure:
        """Smoothed training loss per batch, and validation loss at each epoch's end.

        Args:
            skip_start: batches to leave out at the start (the first losses dwarf the rest).
            with_valid: also plot the validation loss.
        """
        fig, (ax,) = new_figure()
        losses = smooth(self.losses)
        ax.plot(range(skip_start, len(losses)), losses[skip_start:], label="train")
        valid = [
            (i, h["valid_loss"])
            for i, h in zip(self.epoch_iters, self.history)
            if h.get("valid_loss") is not None
        ]
        if with_valid and valid:
            ax.plot(*zip(*valid), marker="o", label="valid")
        ax.set(xlabel="batch", ylabel="loss")
        ax.legend()
        return fig

    def plot_lr(self) -> Figure:
        """Learning rate at every training batch."""
        fig, (ax,) = new_figure()
        ax.plot(self.lrs)
        ax.set(xlabel="batch", ylabel="learning rate")
        return fig

    def plot(self) -> Figure:
        """Each value recorded by the functions given as `RecorderCB(name=f)`, per batch."""
        if not self.fns:
            raise ValueError(
                "RecorderCB.plot() draws the values of RecorderCB(name=f, ...), and this recorder "
                "has no functions: use plot_loss(), plot_lr() or plot_metrics()."
            )
        fig, axes = new_figure(len(self.recs), width=5.0)
        for ax, (name, values) in zip(axes, self.recs.items()):
            ax.plot([float(v) for v in values])
            ax.set(xlabel="batch", title=name)
        return fig

    def plot_metrics(self) -> Figure:
        """Every value of `history` per epoch (per validation step, for a fit in steps): the
        losses together, each metric on its own."""
        keys = [k for k in (self.history[0] if self.history else {}) if k not in ("epoch", "step")]
        metric_keys = [k for k in keys if k not in ("train_loss", "valid_loss")]
        fig, axes = new_figure(1 + len(metric_keys), width=5.0)
        # A fit budgeted in steps has a row per validation: drawn at its step.
        x = "step" if self.history and "step" in self.history[-1] else "epoch"
        epochs = [h.get(x, h["epoch"]) for h in self.history]
        for ax, names in zip(axes, [["train_loss", "valid_loss"], *[[k] for k in metric_keys]]):
            for name in names:
                ys = [_num(h.get(name)) for h in self.history]
                if not all(math.isnan(y) for y in ys):
                    ax.plot(epochs, ys, marker="o", label=name)
            ax.set(xlabel=x, title=names[0] if len(names) == 1 else "loss")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
        return fig


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def get_recorder(learn: BaseLearner) -> RecorderCB | None:
    """The learner's `RecorderCB` (of that class or a subclass, whatever its name), or None."""
    return next((c for c in learn.cbs if isinstance(c, RecorderCB)), None)


def find_recorder(learn: BaseLearner, user: str) -> RecorderCB:
    """The learner's `RecorderCB`, or a clear error naming `user`, which needs it."""
    recorder = get_recorder(learn)
    if recorder is None:
        raise ValueError(
            f"{user} reads learn.recorder: add a RecorderCB() to the learner's callbacks "
            "(the default callbacks include one)."
        )
    return recorder
