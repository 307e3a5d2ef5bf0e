"""The Learner's methods built on callbacks, kept out of core.py so the loop reads in one sitting.

Each is a thin delegation to the module that implements it, imported when first called (those
modules import `learner.core`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from learner.callbacks.lr_finder import LRFindResult, Suggest
    from learner.core import Callback, Learner

__all__ = ["LearnerExtras"]


def _learner(obj: LearnerExtras) -> Learner:
    return cast("Learner", obj)  # only ever mixed into Learner


class LearnerExtras:
    """Mixed into `Learner`: `show_training_loop`, `summary`, `lr_find`, `fit_one_cycle`,
    `save`, `load`, `get_preds`."""

    # -- checkpoints: learner/checkpoint.py --

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint of everything the run needs to go on (weights, optimizer, callback
        and random states, position), atomically; see `learner.checkpoint`."""
        from learner.checkpoint import save

        return save(_learner(self), path)

    def load(self, path: str | os.PathLike[str], with_opt: bool = True) -> None:
        """Load a checkpoint's weights, and with `with_opt` its optimizer state; checked first, so
        a bad file changes nothing. To continue the run itself: `fit(n, resume_from=path)`."""
        from learner.checkpoint import load

        load(_learner(self), path, with_opt)

    # -- predictions: learner/inference.py --

    def get_preds(self, dl: Any = None, with_targets: bool = True, with_loss: bool = False) -> Any:
        """Predictions (and targets, per-item losses) over `dl` (default `dls.valid`), on the
        CPU, in eval and inference mode, with no events; see `learner.inference.get_preds`."""
        from learner.inference import get_preds

        return get_preds(_learner(self), dl, with_targets, with_loss)

    # -- looking inside: learner/inspect.py --

    def show_training_loop(self) -> str:
        """Print (and return) each event in order with the callbacks that run at it."""
        from learner.inspect import show_training_loop

        return show_training_loop(_learner(self))

    def summary(self) -> str:
        """Print (and return) each top-level layer's output shape for one batch, its parameter
        count and whether it trains; see `learner.inspect.summary`."""
        from learner.inspect import summary

        return summary(_learner(self))

    # -- training recipes: learner/callbacks/ --

    def lr_find(
        self,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_it: int = 100,
        stop_factor: float | None = 4.0,
        suggest: Suggest | None = None,
    ) -> LRFindResult:
        """Learning-rate finder that leaves no trace: `learner.callbacks.lr_finder.lr_find`."""
        from learner.callbacks.lr_finder import lr_find, valley

        return lr_find(_learner(self), start_lr, end_lr, num_it, stop_factor, suggest or valley)

    def fit_one_cycle(
        self,
        n_epochs: int,
        lr_max: float | None = None,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
        cbs: Iterable[Callback] | None = None,
    ) -> None:
        """One-cycle training, as fastai's: `learner.callbacks.schedule.fit_one_cycle`."""
        from learner.callbacks.schedule import fit_one_cycle

        fit_one_cycle(_learner(self), n_epochs, lr_max, div, div_final, pct_start, moms, cbs)
