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
    BatchNorm, a frozen backbone) stay in eval mode during training, in this fit and the next.

    The rule at the end: **after `fit`, the model is in the mode of the last phase that ran**, so
    a fit that ends with validation leaves it in eval mode, ready to sample or predict (as in the
    course and fastai), and one without validation (`valid=False`) leaves it training, frozen
    submodules still frozen; a fit that ran no phase leaves every flag as it was. Side runs
    (`lr_find`, `get_preds`, `show_batch`, `tta`) put every flag back as it was before them.

    To freeze a submodule after a fit, put the model back in training mode first
    (`model.train(); model[1].eval()`): in eval mode, frozen and not frozen look alike.

    Events: `before_fit`, `before_train`, `before_validate`, `cleanup_fit`. Order: -30.

    Examples:
        >>> model[1].eval()  # a frozen BatchNorm stays frozen while the rest trains
        >>> Learner(model, dls, F.mse_loss).fit(1)
        >>> model.training  # False: the fit ended with validation
    """

    order = ORDERS["TrainEvalCB"]

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, bool]] = []
        self.pinned: list[nn.Module] = []
        self.phase: str | None = None  # "train" or "valid": the last phase this fit began
        # The flags the last fit left; a fit that starts from them keeps that fit's pinned list.
        self.left: list[tuple[nn.Module, bool]] = []

    def before_fit(self, learn: BaseLearner) -> None:
        self.saved, self.phase = training_flags(learn.model), None
        if self.saved != self.left:  # the first fit, or modes changed since the last one ended
            root_training = learn.model.training
            self.pinned = [m for m, t in self.saved if root_training and not t]

    def before_train(self, learn: BaseLearner) -> None:
        learn.model.train()
        # Set flags one module at a time: `.eval()` would recurse into children we did not pin.
        for m in self.pinned:
            m.training = False
        self.phase = "train"

    def before_validate(self, learn: BaseLearner) -> None:
        learn.model.eval()
        self.phase = "valid"

    def cleanup_fit(self, learn: BaseLearner) -> None:
        if self.phase is None:
            restore_training_flags(self.saved)
        # The modules of the model as `before_fit` saw it (a wrapper added since is not one).
        self.left = [(m, m.training) for m, _ in self.saved]
        self.saved = []
