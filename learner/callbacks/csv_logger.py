"""Writing the per-epoch history to a CSV file, one row per epoch, safe against crashes."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from learner.callbacks.metrics import epoch_summary
from learner.callbacks.order import ORDERS
from learner.callbacks.recorder import RecorderCB, find_recorder
from learner.core import BaseLearner
from learner.distributed import is_main_process, ranks_where
from learner.events import Callback

__all__ = ["CSVLoggerCB"]


class CSVLoggerCB(Callback):
    """Appends each epoch's row of `learn.recorder.history` to a CSV file as the epoch ends.

    The columns are the history's keys (`epoch`, `train_loss`, `valid_loss`, each metric), the
    header is written once, and values are written in full precision (`None` as an empty cell).
    Each row is flushed and synced to disk when its epoch ends, so a run that crashes or is killed
    keeps every completed epoch. Rows are written at `cleanup_epoch`, which runs whatever happened,
    so a callback cancelling at `after_epoch` cannot make a recorded epoch go missing. Under
    torch.distributed only rank 0 writes (every rank has the same history).

    With `append=False` the file is started afresh at the first fit; later fits of the same
    callback keep adding to it, like the recorder's history. A fit resumed from a checkpoint
    (`fit(resume_from=...)`) goes on with the file by itself: when its first epoch starts (the
    saved history loaded), the file is rewritten to hold exactly the saved run's rows, so rows
    written after the checkpoint, which the resumed fit trains again, are not kept twice. With
    `append=True` rows are added to an existing file whose header must match the history's keys.
    That is checked at `before_fit` (also on a resumed fit), against the columns this fit will
    write (`epoch` and the keys of `epoch_summary`), so a mismatch is a `ValueError` before
    anything trains, and the file is left as it was.

    Args:
        path: the CSV file; missing parent folders are created.
        append: add to an existing file instead of overwriting it.

    Rows already in the recorder's history when the fit's first epoch starts (earlier fits, or
    the saved run of a resumed fit) are not written again.

    Events: `before_fit`, `before_epoch`, `cleanup_epoch`. Order: -4 (just after RecorderCB,
    which makes the row).

    Examples:
        >>> learn.fit(3, cbs=[CSVLoggerCB("runs/history.csv")])
        >>> # later, resuming:
        >>> learn.fit(2, cbs=[CSVLoggerCB("runs/history.csv", append=True)])
    """

    order = ORDERS["CSVLoggerCB"]
    in_side_runs = False

    def __init__(self, path: str | os.PathLike[str], append: bool = False) -> None:
        self.path, self.append = Path(path), append
        if self.path.is_dir():
            raise ValueError(f"CSVLoggerCB path {str(self.path)!r} is a folder: name a file in it.")
        self.started = False  # the file has been claimed by this callback (truncated or checked)
        self.header: list[str] | None = None
        self.recorder: RecorderCB | None = None
        self.n_written: int | None = None  # rows of the recorder's history already handled
        self.resumed = False  # this fit continues a saved run (learn.resuming at before_fit)

    def before_fit(self, learn: BaseLearner) -> None:
        self.recorder = find_recorder(learn, "CSVLoggerCB")
        error = self._start(learn) if is_main_process() else None
        # Rank 0 alone reads the file: the other ranks stop with it, rather than wait for it.
        if ranks_where(error is not None):
            raise error or ValueError(
                f"CSVLoggerCB: rank 0 cannot log to {str(self.path)!r}: see the error there."
            )
        if not is_main_process():  # every rank has the same history: rank 0 writes it
            self.recorder = None
        self.n_written = None  # counted at the first epoch: a resumed fit loads the recorder later

    def _start(self, learn: BaseLearner) -> ValueError | None:
        """Claim the file at the first fit; the error if its columns are not this fit's."""
        # The row's keys as RecorderCB makes them; not the recorder's history, which a resumed fit
        # loads only after every before_fit.
        columns = ["epoch", *epoch_summary(learn)]
        self.resumed = learn.resuming
        if not self.started:
            existing = self.path.exists() and self.path.stat().st_size > 0
            if (self.append or learn.resuming) and existing:
                with self.path.open(newline="") as f:
                    header = next(csv.reader(f), None)
                if header != columns:
                    return self._mismatch(header, columns)
                self.header = header
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text("")  # a fresh file: an old run's rows must not pass for ours
                self.header = None
            self.started = True
        elif self.header is not None and self.header != columns:  # a later fit, other metrics
            return self._mismatch(self.header, columns)
        return None

    def _mismatch(self, header: list[str] | None, columns: list[str]) -> ValueError:
        return ValueError(
            f"{str(self.path)!r} has columns {header} but this run's history has {columns}: "
            "log to another file, or pass append=False to overwrite it."
        )

    def before_epoch(self, learn: BaseLearner) -> None:
        if self.recorder is None or self.n_written is not None:
            return
        if self.resumed:
            # The recorder holds the saved run's rows now: the file becomes exactly them, so rows
            # written after the checkpoint (which this fit trains again) are not kept twice.
            self._rewrite(self.recorder.history)
        self.n_written = len(self.recorder.history)  # only epochs from now on

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        keys = self.header or (list(rows[0]) if rows else None)
        tmp = self.path.with_name(f".{self.path.name}.resume.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            if keys is not None:
                writer.writerow(keys)
                writer.writerows([_cell(row.get(k)) for k in keys] for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.header = keys

    def cleanup_epoch(self, learn: BaseLearner) -> None:
        if self.recorder is None or self.n_written is None:
            return
        rows = self.recorder.history[self.n_written :]
        if not rows:
            return
        keys = self.header or list(rows[0])
        for row in rows:
            if list(row) != keys:
                raise ValueError(
                    f"{str(self.path)!r} has columns {keys} but this run's history has "
                    f"{list(row)}: log to another file, or pass append=False to overwrite it."
                )
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if self.header is None:
                writer.writerow(keys)
                self.header = keys
            writer.writerows([_cell(row.get(k)) for k in keys] for row in rows)
            f.flush()
            os.fsync(f.fileno())  # the epoch survives a crash or a power cut, not only an error
        self.n_written += len(rows)


def _cell(value: Any) -> Any:
    return "" if value is None else value
