"""Progress bars and a results table, in notebooks and terminals, quiet in log files."""

from __future__ import annotations

import sys
import time
from typing import Any

from fastprogress import fastprogress as fp
from fastprogress.core import format_time

from learner.callbacks.metrics import epoch_summary, phase_samples
from learner.callbacks.order import ORDERS
from learner.callbacks.recorder import get_recorder
from learner.core import BaseLearner
from learner.distributed import is_main_process
from learner.events import Callback
from learner.steps import segment

__all__ = ["ProgressCB"]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6f}" if isinstance(value, float) else str(value)


class ProgressCB(Callback):
    """fastprogress bars over epochs and batches, and a table row per epoch.

    The row shows the epoch's losses and metrics (`MetricsCB`), the training throughput
    (`samples/s`: the training samples of all ranks over the training phase's wall time) and
    the epoch's time. In a fit budgeted in steps (`fit(steps=..., valid_every=...)`) an epoch
    ends at each validation: its row also shows the learner's `global_step`, and the training
    bar counts optimizer steps up to the next validation, so its total, and the time left, are
    known even for a stream without a length.

    In a notebook: HTML bars, the table, and with `plot=True` a live graph of the training and
    validation loss. In a terminal: one updating line with the running loss. When output is not a
    terminal (a log file, CI): no bars and no carriage returns, just the table, one line per epoch.
    The bar redraws at most every `update_every` seconds, and only then is the running loss read
    from the device, so the bars do not slow training down. Under torch.distributed only rank 0
    shows anything (the table is the same on every rank: `MetricsCB` sums over ranks).

    Args:
        plot: in a notebook, draw the live loss graph.
        update_every: seconds between redraws of a bar.
        bars: draw bars: None (default) where output is a notebook or a terminal, True always,
            False never (the table only).

    Events: `before_fit`, `before_epoch`, `before_train`, `after_batch`, `after_train`,
    `before_validate`, `after_epoch`, `cleanup_fit`. Order: 50 (after the callbacks that compute
    what it shows).

    Examples:
        >>> learn.fit(3, cbs=[ProgressCB(plot=True)])
    """

    order = ORDERS["ProgressCB"]

    def __init__(
        self, plot: bool = False, update_every: float = 0.2, bars: bool | None = None
    ) -> None:
        self.plot, self.update_every, self.want_bars = plot, update_every, bars
        # cleanup_fit may run without before_fit (an earlier callback raised there).
        self.pbar: Any = None
        self.mbar: Any = None
        self.bars = self.in_notebook = False
        self.quiet = False
        self.first_step = 0  # a fit in steps: the step the training bar counts from
        self.train_start, self.train_time = 0.0, 0.0

    def before_fit(self, learn: BaseLearner) -> None:
        self.quiet = not is_main_process()
        self.in_notebook = bool(fp.IN_NOTEBOOK)
        wanted = self.want_bars
        if wanted is None:
            wanted = self.in_notebook or sys.stdout.isatty()
        self.bars = wanted and learn.n_epochs > 0 and not self.quiet
        self.header_written, self.pbar, self.mbar = False, None, None
        if self.bars:
            mbar_cls = fp.NBMasterBar if self.in_notebook else fp.ConsoleMasterBar
            self.mbar = mbar_cls(range(learn.n_epochs))
            self.mbar.main_bar.update_every = self.update_every
            self.mbar.update(0)
        self.graph_x: list[int] = []
        self.graph_valid: list[tuple[int, float]] = []

    def before_epoch(self, learn: BaseLearner) -> None:
        self.epoch_start = time.time()
        self.train_time = 0.0

    def _start_bar(self, learn: BaseLearner) -> None:
        if not self.bars:
            return
        total: int | str
        if learn.training and learn.n_steps is not None:  # counted in steps: known
            self.first_step, end = segment(learn.epoch, learn.n_steps, learn.valid_every)
            total = end - self.first_step
        else:
            total = len(learn.dl) if hasattr(learn.dl, "__len__") else "noinfer"
        pbar_cls = fp.NBProgressBar if self.in_notebook else fp.ConsoleProgressBar
        self.pbar = pbar_cls(range(0), total=total, parent=self.mbar)
        self.pbar.update_every = self.update_every
        self.pbar.update(0)

    def before_train(self, learn: BaseLearner) -> None:
        self._start_bar(learn)
        self.train_start = time.perf_counter()

    def after_train(self, learn: BaseLearner) -> None:
        self.train_time = time.perf_counter() - self.train_start

    def before_validate(self, learn: BaseLearner) -> None:
        self._start_bar(learn)

    def after_batch(self, learn: BaseLearner) -> None:
        pbar = self.pbar
        if pbar is None:
            return
        val = learn.iter + 1
        if learn.training and learn.n_steps is not None:
            val = learn.fit_step - self.first_step
        # fastprogress' own throttle: between redraws `update` does nothing, so it is not called,
        # and the loss is read from the device only for a redraw.
        if pbar.last_v is None or not (
            val <= pbar.first_its
            or val >= pbar.last_v + pbar.wait_for
            or (pbar.total and val >= pbar.total)
        ):
            return
        if learn.training:
            pbar.comment = f"loss {learn.loss.item():.4f}"
            if self.plot and self.in_notebook:
                self._update_graph(learn)
        pbar.update(val)

    def _update_graph(self, learn: BaseLearner) -> None:
        recorder = get_recorder(learn)
        if recorder is None:
            return
        losses = recorder.losses
        graphs: list[Any] = [[list(range(len(losses))), losses]]
        if self.graph_valid:
            graphs.append([list(v) for v in zip(*self.graph_valid)])
        self.mbar.update_graph(graphs)

    def after_epoch(self, learn: BaseLearner) -> None:
        summary = epoch_summary(learn)
        row: dict[str, Any] = {"epoch": learn.epoch}
        if learn.n_steps is not None:
            row["step"] = learn.global_step
        row.update(summary)
        samples = phase_samples(learn, "train")
        if learn.run_train:
            rate = samples / self.train_time if samples and self.train_time else None
            row["samples/s"] = None if rate is None else f"{rate:.0f}"
        row["time"] = format_time(time.time() - self.epoch_start)
        if not learn.run_train:
            row.pop("train_loss", None)
        if row.get("valid_loss") is None and "valid_loss" in row:
            row.pop("valid_loss")
        self._write(row)
        if self.mbar is not None:
            if self.plot and self.in_notebook:
                recorder = get_recorder(learn)
                if recorder is not None and summary.get("valid_loss") is not None:
                    self.graph_valid.append((len(recorder.losses), summary["valid_loss"]))
                self._update_graph(learn)
            self.mbar.update(learn.epoch + 1)
        self.pbar = None

    def _write(self, row: dict[str, Any]) -> None:
        if self.quiet:
            return
        if not self.header_written:
            self.names = list(row)
            self._line(self.names, header=True)
            self.header_written = True
        self._line([_fmt(row.get(n)) for n in self.names])

    def _line(self, cells: list[str], header: bool = False) -> None:
        if self.mbar is not None:
            self.mbar.write(cells, table=True)
        else:
            widths = [max(len(n), 10) for n in self.names]
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip(), flush=True)

    def cleanup_fit(self, learn: BaseLearner) -> None:
        # An interrupted console bar leaves the cursor mid-line; end it so later output is clean.
        if self.pbar is not None and not self.in_notebook and self.bars:
            print(flush=True)
        self.pbar = self.mbar = None
