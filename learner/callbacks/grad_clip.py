"""Clipping the gradient norm before each optimizer step."""

from __future__ import annotations

import torch
from torch import nn

from learner.callbacks.order import ORDERS
from learner.checks import check_number
from learner.core import BaseLearner
from learner.events import Callback

__all__ = ["GradClipCB"]


class GradClipCB(Callback):
    """Clips the gradients of the model's parameters to a total norm of at most `max_norm`.

    Runs `torch.nn.utils.clip_grad_norm_` at `before_step`, so it clips the gradient the optimizer
    is about to use: with `GradAccumCB` the accumulated one, once per step; with
    `MixedPrecisionCB` and a GradScaler the unscaled one (its order is above MixedPrecisionCB's,
    which unscales at `before_step`; clipping scaled gradients would clip to `max_norm * scale`).

    `total_norm` holds the total norm before clipping of the last step, as a tensor on the
    gradients' device (reading it with `.item()` waits for the device).

    Events: `before_step`. Order: 15 (after MixedPrecisionCB, 10).

    Args:
        max_norm: largest allowed total norm, > 0.
        norm_type: the p of the p-norm (`float("inf")` for the largest absolute value).

    Examples:
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=[GradClipCB(max_norm=1.0)])
        >>> learn.fit(1)
        >>> learn.grad_clip.total_norm
    """

    order = ORDERS["GradClipCB"]

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        check_number("GradClipCB max_norm", max_norm, finite=True)
        check_number("GradClipCB norm_type", norm_type)
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)
        self.total_norm: torch.Tensor | None = None

    def before_step(self, learn: BaseLearner) -> None:
        self.total_norm = nn.utils.clip_grad_norm_(
            learn.model.parameters(), self.max_norm, self.norm_type
        )
