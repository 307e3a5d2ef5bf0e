"""Transforming each batch on the device: normalisation and augmentation, as in the course."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from learner.callbacks.order import ORDERS
from learner.core import BaseLearner
from learner.events import Callback

__all__ = ["BatchTransformCB", "tfm_batch"]


class BatchTransformCB(Callback):
    """Replaces each batch by `tfm(batch)` at `before_batch`, on the device the batch was moved to.

    For normalisation and augmentation on the GPU, a whole batch at a time (the course's
    notebooks 11 and 14). `tfm` takes the batch as the loader yields it, an `(x, y)` tuple, and
    returns the new one: `tfm_batch(b, tfm_x=...)` applies a function to `x` alone. Several may
    be added to one learner (they do not replace each other); they run in the order added.
    `show_batch` and `capture_preds` apply them too, so augmentations can be looked at and used
    for test-time augmentation.

    Events: `before_batch`. Order: -18 (after `DeviceCB` moved the batch, before
    `MixedPrecisionCB` enters autocast, so the transform runs in full precision).

    Args:
        tfm: `tfm(batch) -> batch`.
        on_train: transform the training batches.
        on_val: transform the validation batches.

    Examples:
        >>> xmean, xstd = 0.28, 0.35
        >>> def _norm(b): return (b[0] - xmean) / xstd, b[1]
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=BatchTransformCB(_norm))
        >>> flip = BatchTransformCB(partial(tfm_batch, tfm_x=torch.fliplr), on_val=False)
    """

    order = ORDERS["BatchTransformCB"]
    unique = False

    def __init__(
        self, tfm: Callable[[Any], Any], on_train: bool = True, on_val: bool = True
    ) -> None:
        if not callable(tfm):
            raise TypeError(f"BatchTransformCB takes a function tfm(batch), got {tfm!r}.")
        self.tfm, self.on_train, self.on_val = tfm, on_train, on_val

    def before_batch(self, learn: BaseLearner) -> None:
        if self.on_train if learn.training else self.on_val:
            learn.batch = self.tfm(learn.batch)

    def __repr__(self) -> str:
        return f"BatchTransformCB({getattr(self.tfm, '__name__', self.tfm)!s}, order={self.order})"


def tfm_batch(
    b: tuple[Any, ...],
    tfm_x: Callable[[Any], Any] | None = None,
    tfm_y: Callable[[Any], Any] | None = None,
) -> tuple[Any, ...]:
    """`(tfm_x(x), tfm_y(y), *rest)` of a batch `(x, y, *rest)`; a missing function leaves its
    part alone (the course's `tfm_batch`).

    Examples:
        >>> tfm_batch((torch.ones(2), torch.zeros(2)), tfm_x=lambda x: 2 * x)
        (tensor([2., 2.]), tensor([0., 0.]))
    """
    x, y, *rest = b
    return (tfm_x(x) if tfm_x else x, tfm_y(y) if tfm_y else y, *rest)
