"""Watching the training: early stopping, keeping the best weights, stopping on a NaN loss."""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from learner.callbacks.metrics import epoch_summary
from learner.callbacks.order import ORDERS
from learner.callbacks.recorder import get_recorder
from learner.checks import check_int, check_number
from learner.core import BaseLearner, CancelFitException
from learner.distributed import broadcast_module, is_distributed, is_main_process, ranks_where
from learner.events import Callback
from learner.fsdp import full_model_state, is_sharded, load_model_state
from learner.io import atomic_save
from learner.utils import unwrap_model

__all__ = ["EarlyStoppingCB", "Monitor", "SaveBestCB", "TerminateOnNaNCB"]


class Monitor:
    """A key of `learn.recorder.history` to watch, and what counts as an improvement.

    Shared by the callbacks that act on a per-epoch value. `check` at `before_fit` turns an
    unknown key into a clear error listing the available ones; `value` reads the latest epoch's
    number (None when the phase that computes it did not run); `better` compares with `mode` and
    `min_delta`.

    Args:
        monitor: a history key: "train_loss", "valid_loss" or a metric's name.
        mode: "min" (lower is better) or "max".
        min_delta: how much better a value must be to count as an improvement (>= 0).

    Examples:
        >>> m = Monitor("accuracy", mode="max", min_delta=0.001)
        >>> m.better(0.95, best=0.9495), m.better(0.952, best=0.95)
        (False, True)
    """

    def __init__(self, monitor: str, mode: str = "min", min_delta: float = 0.0) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a history key (a str), got {monitor!r}.")
        if mode not in ("min", "max"):
            raise ValueError(
                f"mode must be 'min' (lower is better, e.g. a loss) or 'max' (e.g. accuracy), "
                f"got {mode!r}."
            )
        check_number("min_delta", min_delta, positive=False)
        self.name, self.mode, self.min_delta = monitor, mode, float(min_delta)

    @property
    def worst(self) -> float:
        """A starting `best` that any finite value improves on."""
        return math.inf if self.mode == "min" else -math.inf

    def better(self, value: float, best: float) -> bool:
        """Whether `value` improves on `best` by more than `min_delta` (NaN never does)."""
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def check(self, learn: BaseLearner, owner: str) -> None:
        """Raise a clear error if the value cannot be read during this fit."""
        recorder = get_recorder(learn)
        if recorder is None:
            raise ValueError(
                f"{owner} monitors {self.name!r} in learn.recorder.history, but the learner has "
                "no RecorderCB: add RecorderCB() (Learner(default_cbs=True) has one)."
            )
        # The keys the next row will have (MetricsCB has run before_fit), and any earlier ones.
        keys = [k for row in recorder.history for k in row] + ["epoch", *epoch_summary(learn)]
        keys = list(dict.fromkeys(keys))
        if self.name not in keys:
            raise ValueError(
                f"{owner}: monitor={self.name!r} is not a key of learn.recorder.history; "
                f"available keys: {', '.join(map(repr, keys))}."
            )
        if self.name == "valid_loss" and getattr(learn.dls, "valid", None) is None:
            raise ValueError(
                f"{owner} monitors 'valid_loss', but dls has no validation loader: monitor "
                "'train_loss', or give dls a .valid loader."
            )

    def value(self, learn: BaseLearner) -> float | None:
        """The latest epoch's value; None if it was not computed (e.g. validation did not run)."""
        recorder = get_recorder(learn)
        row = recorder.history[-1] if recorder is not None and recorder.history else {}
        value = row.get(self.name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"learn.recorder.history[-1][{self.name!r}] is {value!r}, not a number, so it "
                "cannot be monitored: monitor a metric that returns a single number."
            )
        return float(value)


class EarlyStoppingCB(Callback):
    """Stops training when a monitored value has not improved for `patience` epochs.

    After each epoch it reads `monitor` from `learn.recorder.history`. A value better than the
    best so far by more than `min_delta` resets the count; otherwise the count goes up, and when
    it reaches `patience` the fit ends with `CancelFitException` (the epoch's row is complete
    and shown, and every `cleanup_*` runs). The reason is printed and kept in `reason`, the
    epoch in `stopped_epoch` (None if training ran to the end). The best value so far is `best`,
    from epoch `best_epoch`. Each `fit` starts afresh; a fit resumed from a checkpoint
    (`fit(resume_from=...)`) goes on counting from the saved state.

    Events: `before_fit`, `after_epoch`. Order: 60 (after the recorder and the progress table
    have the epoch, and after `SaveBestCB` has saved it).

    Args:
        monitor: key of `learn.recorder.history`. Default "valid_loss".
        mode: "min" or "max". Default "min".
        patience: epochs without improvement before stopping (0 stops at the first). Default 3.
        min_delta: smallest change that counts as an improvement. Default 0.

    Examples:
        >>> learn.fit(50, cbs=[EarlyStoppingCB("accuracy", mode="max", patience=2)])
        >>> learn.early_stopping.reason  # while the callback is in learn.cbs
    """

    order = ORDERS["EarlyStoppingCB"]
    in_side_runs = False

    def __init__(
        self,
        monitor: str = "valid_loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        check_int("patience", patience, 0)
        self.monitor = Monitor(monitor, mode, min_delta)
        self.patience = patience
        self.best, self.best_epoch, self.wait = self.monitor.worst, -1, 0
        self.stopped_epoch: int | None = None
        self.reason: str | None = None

    def before_fit(self, learn: BaseLearner) -> None:
        self.monitor.check(learn, type(self).__name__)
        self.best, self.best_epoch, self.wait = self.monitor.worst, -1, 0
        self.stopped_epoch, self.reason = None, None

    def state_dict(self) -> dict[str, Any]:
        """`best`, `best_epoch` and `wait` (epochs without improvement)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from `state` (from `state_dict()`): a resumed fit goes on counting."""
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.wait = int(state["wait"])

    def after_epoch(self, learn: BaseLearner) -> None:
        value = self.monitor.value(learn)
        if value is None:
            return
        if self.monitor.better(value, self.best):
            self.best, self.best_epoch, self.wait = value, learn.epoch, 0
            return
        self.wait += 1
        if self.wait < self.patience:
            return
        m = self.monitor
        if self.best_epoch < 0:  # every value so far was NaN
            what = f"has had no usable value for {self.wait} epoch(s)"
        else:
            delta = f" by more than {m.min_delta:g}" if m.min_delta else ""
            what = (
                f"has not improved{delta} for {self.wait} epoch(s) on its best, "
                f"{self.best:.6g} at epoch {self.best_epoch}"
            )
        self.stopped_epoch = learn.epoch
        at = f" (step {learn.global_step})" if learn.n_steps is not None else ""
        self.reason = f"EarlyStoppingCB: stopped after epoch {learn.epoch}{at}: {m.name} {what}."
        if is_main_process():
            print(self.reason, flush=True)
        raise CancelFitException(self.reason)


class SaveBestCB(Callback):
    """Saves the model's weights whenever a monitored value improves, and can load the best back.

    After each epoch that improves `monitor` (a key of `learn.recorder.history`) by more than
    `min_delta`, `model.state_dict()` is written to `path` with `atomic_save`, so a crash mid-write
    leaves the previous best intact. With `load_best=True`, the best weights are loaded into the
    model when the fit ends: normally, stopped early (`EarlyStoppingCB`, `TerminateOnNaNCB`), or
    interrupted; not when no epoch was saved in this fit. `best` and `best_epoch` say what was
    kept. Each `fit` starts afresh, overwriting `path`; a fit resumed from a checkpoint
    (`fit(resume_from=...)`) goes on from the saved best.

    At `before_fit`, before anything trains, it creates the file's folder and checks that it can
    write there (a temporary file is created and removed): a read-only folder, or a parent that
    cannot be created, is an error then, not after the first epoch.

    The file holds only tensors: load it elsewhere with
    `model.load_state_dict(torch.load(path, weights_only=True))`.

    Under torch.distributed (`DistributedCB`) rank 0 alone checks the folder, writes the file and
    reads it back; with `load_best` it hands the weights to the other ranks. A sharded model's
    (FSDP) weights are gathered whole, so the file loads into a plain model.

    Events: `before_fit`, `after_epoch`, `cleanup_fit`. Order: 55 (after the recorder, before
    `EarlyStoppingCB` ends the fit).

    Args:
        path: file to write. Default "best.pt".
        monitor: key of `learn.recorder.history`. Default "valid_loss".
        mode: "min" or "max". Default "min".
        min_delta: smallest change that counts as an improvement. Default 0.
        load_best: load the best weights at the end of fit. Default False.

    Examples:
        >>> cbs = [SaveBestCB("models/best.pt", "accuracy", mode="max", load_best=True),
        ...        EarlyStoppingCB("accuracy", mode="max", patience=3)]
        >>> learn.fit(50, cbs=cbs)
    """

    order = ORDERS["SaveBestCB"]
    in_side_runs = False

    def __init__(
        self,
        path: str | os.PathLike[str] = "best.pt",
        monitor: str = "valid_loss",
        mode: str = "min",
        min_delta: float = 0.0,
        load_best: bool = False,
    ) -> None:
        self.path = Path(path)
        self.monitor = Monitor(monitor, mode, min_delta)
        self.load_best = load_best
        self.best, self.best_epoch = self.monitor.worst, -1

    def before_fit(self, learn: BaseLearner) -> None:
        self.monitor.check(learn, type(self).__name__)
        error = self._check_writable() if is_main_process() else None
        # Rank 0 writes (and with load_best reads) the file: if it cannot, all ranks stop.
        if ranks_where(error is not None):
            raise error or OSError(
                f"SaveBestCB cannot write {str(self.path)!r} on rank 0: see the error there."
            )
        self.best, self.best_epoch = self.monitor.worst, -1

    def _check_writable(self) -> Exception | None:
        """The error that writing `path` would end in, found now by writing a temporary file."""
        if self.path.is_dir():
            return ValueError(f"SaveBestCB path {str(self.path)!r} is a folder: name a file in it.")
        folder = self.path.parent
        probe = folder / f".{self.path.name}.{uuid.uuid4().hex}.probe"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "xb"):
                pass
        except OSError as e:
            return OSError(
                e.errno,
                f"SaveBestCB cannot write {str(self.path)!r} ({e.strerror or e}): pass a path "
                "in a folder you can write to",
            )
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return None

    def state_dict(self) -> dict[str, Any]:
        """`best` and `best_epoch`."""
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from `state` (from `state_dict()`): a resumed fit keeps the saved best."""
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])

    def after_epoch(self, learn: BaseLearner) -> None:
        value = self.monitor.value(learn)  # the same on every rank (MetricsCB sums over them)
        if value is not None and self.monitor.better(value, self.best):
            model = unwrap_model(learn.model)
            state = full_model_state(model) if is_sharded(model) else model.state_dict()
            if is_main_process():
                atomic_save(state, self.path)
            self.best, self.best_epoch = value, learn.epoch

    def cleanup_fit(self, learn: BaseLearner) -> None:
        if not (self.load_best and self.best_epoch >= 0):
            return
        # Rank 0 reads the file it wrote, and hands the weights to the others.
        main, model = is_main_process(), unwrap_model(learn.model)
        state = torch.load(self.path, map_location="cpu", weights_only=True) if main else {}
        if is_sharded(model):
            load_model_state(model, state, from_rank0=True)
        else:
            if main:
                model.load_state_dict(state)
            broadcast_module(model)
        if main:
            print(
                f"SaveBestCB: loaded the weights of epoch {self.best_epoch} "
                f"({self.monitor.name} {self.best:.6g}) from {self.path}.",
                flush=True,
            )


class TerminateOnNaNCB(Callback):
    """Stops training as soon as a training loss is NaN or infinite, before the weights change.

    At `after_loss` of a training batch, a non-finite loss ends the fit with `CancelFitException`,
    before `backward` and the optimizer step: the weights are those after the last batch with a
    finite loss, and nothing is recorded for the bad batch. The message, naming the epoch and the
    batch, is printed and kept in `reason`; `stopped_epoch` and `stopped_batch` hold the indices.
    It reads the loss on the host every training batch (on a GPU, one synchronisation per batch).
    Under torch.distributed a non-finite loss on any rank stops every rank at that batch (one
    collective per training batch); the message names the ranks.

    Events: `before_fit`, `after_loss`. Order: 60 (after callbacks that change the loss).

    Examples:
        >>> learn.fit(10, cbs=[TerminateOnNaNCB()])
    """

    order = ORDERS["TerminateOnNaNCB"]
    in_side_runs = False  # the finder stops at a non-finite loss itself

    def __init__(self) -> None:
        self.reason: str | None = None
        self.stopped_epoch: int | None = None
        self.stopped_batch: int | None = None

    @property
    def name(self) -> str:
        """`learn.terminate_on_nan`."""
        return "terminate_on_nan"

    def before_fit(self, learn: BaseLearner) -> None:
        self.reason, self.stopped_epoch, self.stopped_batch = None, None, None

    def after_loss(self, learn: BaseLearner) -> None:
        if not learn.training:
            return
        finite = bool(torch.isfinite(learn.loss).all())
        # Under DDP one rank's NaN must stop every rank at the same batch: a rank going on alone
        # would wait forever in the next gradient all-reduce. One collective per batch.
        bad_ranks = ranks_where(not finite) if is_distributed() else []
        if finite and not bad_ranks:
            return
        loss: Any = learn.loss.detach()
        loss = loss.item() if loss.numel() == 1 else loss.tolist()
        ranks = ", ".join(map(str, bad_ranks))
        what = f"is not finite on rank {ranks}" if bad_ranks else f"is {loss}"
        self.stopped_epoch, self.stopped_batch = learn.epoch, learn.iter
        self.reason = (
            f"TerminateOnNaNCB: the training loss {what} at epoch {learn.epoch}, batch "
            f"{learn.iter}; stopped before the optimizer step, so the weights are those after "
            "the previous batch."
        )
        if is_main_process():
            print(self.reason, flush=True)
        raise CancelFitException(self.reason)
