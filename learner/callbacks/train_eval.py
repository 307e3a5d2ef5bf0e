"""Switching the model between training and evaluation mode."""

from __future__ import annotations

from torch import nn

from learner.callbacks.order import ORDERS
from learner.core import BaseLearner
from learner.events import Callback
from learner.utils import restore_training_flags, training_flags

__all__ = ["TrainEvalCB"]


class TrainEvalCB(Callback):
    """`model.train()` before each training phase, `model.eval()` before each validation phase.

    Submodules the user put in eval mode while the model was in training mode (a frozen
    BatchNorm, a frozen backbone) stay in eval mode during training. At the end of `fit`, also
    after an exception, every submodule gets back the `.training` flag it had before.

    Events: `before_fit`, `before_train`, `before_validate`, `cleanup_fit`. Order: -30.

    Examples:
        >>> model[1].eval()  # a frozen BatchNorm stays frozen while the rest trains
        >>> Learner(model, dls, F.mse_loss).fit(1)
    """

    order = ORDERS["TrainEvalCB"]

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, bool]] = []
        self.pinned: list[nn.Module] = []

    def before_fit(self, learn: BaseLearner) -> None:
        self.saved = training_flags(learn.model)
        root_training = learn.model.training
        self.pinned = [m for m, t in self.saved if root_training and not t]

    def before_train(self, learn: BaseLearner) -> None:
        learn.model.train()
        # Set flags one module at a time: `.eval()` would recurse into children we did not pin.
        for m in self.pinned:
            m.training = False

    def before_validate(self, learn: BaseLearner) -> None:
        learn.model.eval()

    def cleanup_fit(self, learn: BaseLearner) -> None:
        restore_training_flags(self.saved)
        self.saved, self.pinned = [], []
