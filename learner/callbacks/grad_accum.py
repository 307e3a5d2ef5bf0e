"""Accumulating gradients over several batches before each optimizer step."""

from __future__ import annotations

import warnings

import torch

from learner.batches import batch_size
from learner.callbacks.order import ORDERS
from learner.checks import check_int
from learner.core import BaseLearner, CancelStepException
from learner.events import Callback

__all__ = ["GradAccumCB"]


class GradAccumCB(Callback):
    """Steps the optimizer once every `n_batches` training batches, on their summed gradients.

    Each step uses the gradient of the mean loss over exactly the samples of its group of
    batches, as if they had been one batch: 4 accumulated batches of 16 give the gradient of one
    batch of 64. To get there, each batch's `learn.loss_grad` is weighted by its share of a full
    group, `batch_size / (n_batches * first_batch_size)` (that is `1 / n_batches` for equal
    batches). When a group ends up holding a different number of samples (the leftover batches at
    the end of an epoch, a smaller last batch), its summed gradients are rescaled once, at its
    step, to its real sample count. This relies on `loss_func` returning the batch mean, the
    Learner's convention.

    The last training batch of each epoch closes its group, so leftover batches are stepped: never
    dropped, never carried into the next epoch. That needs `len()` of the training loader, except
    in a fit budgeted in steps (`fit(steps=...)`), whose epochs end on a step: there every group
    has `n_batches` batches, across the passes over the loader, and no length is needed. A
    training phase that ends with a group still open (cancelled or failed mid-group, its last batch
    cancelled, or a loader yielding fewer batches than its `len()`) drops that group's gradients,
    with a warning when the phase itself completed.

    `learn.loss`, and so the recorded loss, stays each batch's own loss. `after_step` (where a
    scheduler advances) fires once per group.

    Under `DistributedCB` with DDP only the last batch of each group synchronises its gradients
    across processes: it clears `learn.grad_sync` at `before_batch` for the others (DDP's
    `no_sync`), so a group of `n_batches` costs one all-reduce instead of `n_batches`. (FSDP
    reduce-scatters every batch, to keep the gradients sharded.)

    `state_dict()` holds the open group; a fit resumed mid-epoch (`learn.start_iter > 0`) goes on
    with it in its first training phase (a checkpoint written mid-group also holds the
    accumulated gradients).

    Events: `before_fit`, `before_train`, `before_batch`, `before_backward`, `before_step`,
    `after_train`, `cleanup_train`. Order: 5 (before MixedPrecisionCB, 10, so that batches that do
    not step are not unscaled, and before GradClipCB, 15, so that only the summed gradients are
    clipped).

    Args:
        n_batches: batches per optimizer step, >= 1.

    Examples:
        >>> # batches of 16, stepped as batches of 64
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=[GradAccumCB(4)])
        >>> learn.fit(1)
    """

    order = ORDERS["GradAccumCB"]

    def __init__(self, n_batches: int) -> None:
        check_int("GradAccumCB n_batches", n_batches, 1)
        self.n_batches = n_batches
        self._reset()

    def _reset(self) -> None:
        self.count = 0  # batches accumulated in the open group
        self.samples = 0  # samples accumulated in the open group
        self.full = 0  # samples in a full group: what each batch's weight assumed

    def before_fit(self, learn: BaseLearner) -> None:
        if not learn.run_train or learn.n_steps is not None:
            return
        try:
            len(learn.dls.train)
        except TypeError:
            raise TypeError(
                f"GradAccumCB needs len() of the training loader to step the leftover batches "
                f"at the end of each epoch, and {type(learn.dls.train).__name__} has none. Give it "
                "a __len__ (a DataLoader over a map-style dataset has one), or train for a "
                "budget of steps: fit(steps=...)."
            ) from None

    def before_train(self, learn: BaseLearner) -> None:
        if not learn.start_iter:  # resuming mid-epoch: the loaded group goes on
            self._reset()

    def before_batch(self, learn: BaseLearner) -> None:
        if learn.training:  # under DDP/FSDP, only the batch that steps all-reduces its gradients
            learn.grad_sync = self._steps(learn, self.count + 1)

    def _steps(self, learn: BaseLearner, count: int) -> bool:
        # len() of the loader now: a callback may have replaced it at before_train (lr_find).
        return count >= self.n_batches or (
            learn.n_steps is None and learn.iter >= len(learn.dl) - 1
        )

    def before_backward(self, learn: BaseLearner) -> None:
        bs = batch_size(learn.xb, learn.yb)
        if self.count == 0:
            self.full = self.n_batches * bs
        self.count += 1
        self.samples += bs
        learn.loss_grad = learn.loss_grad * (bs / self.full)

    def before_step(self, learn: BaseLearner) -> None:
        if not self._steps(learn, self.count):
            raise CancelStepException()  # keep accumulating
        if self.samples != self.full:
            # Weights summed to samples / full, not 1: rescale to the group's own mean loss.
            with torch.no_grad():
                for p in learn.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.full / self.samples)
        self._reset()

    def after_train(self, learn: BaseLearner) -> None:
        if self.count:
            warnings.warn(
                f"GradAccumCB: the training phase ended with {self.count} batch(es) accumulated "
                "but not stepped (its last batch was cancelled, or the loader yielded another "
                "number of batches than its len()); their gradients are dropped.",
                stacklevel=2,
            )
            self._drop(learn)

    def cleanup_train(self, learn: BaseLearner) -> None:
        learn.grad_sync = True
        # Cancelled or failed mid-group: never carry its gradients into the next phase.
        if self.count:
            self._drop(learn)

    def _drop(self, learn: BaseLearner) -> None:
        learn.zero_grad()
        self._reset()

    def state_dict(self) -> dict[str, int]:
        """The open group: `count` batches and `samples` samples of a `full` group."""
        return {"count": self.count, "samples": self.samples, "full": self.full}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Take back the open group of `state_dict()`."""
        self.count, self.samples, self.full = (int(state[k]) for k in ("count", "samples", "full"))
