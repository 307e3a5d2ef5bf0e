"""Moving the model and each batch to a device."""

from __future__ import annotations

import os
from typing import Any

import torch

from learner.callbacks.order import ORDERS
from learner.core import BaseLearner
from learner.data import TensorLoader
from learner.events import Callback
from learner.utils import move

__all__ = ["DeviceCB", "default_device"]


def default_device() -> torch.device:
    """The best device available: cuda, then mps, then cpu. Under torchrun (`$LOCAL_RANK` set),
    each process on a machine gets its own GPU: `cuda:LOCAL_RANK`."""
    if torch.cuda.is_available():
        if os.environ.get("LOCAL_RANK", "").strip():
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _resolve(device: torch.device) -> torch.device:
    # Tensors report "cuda:0", never "cuda": with the index filled in, a batch already there
    # compares equal and is not moved again.
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class DeviceCB(Callback):
    """Moves the model to `device` at `before_fit` and each batch at `before_batch`.

    A `TensorLoader` whose tensors are already on `device` (`from_tensors(device=...)`) yields
    batches that need no move, so its phases skip the per-batch work altogether.

    Events: `before_fit`, `before_train`, `before_validate`, `before_batch`. Order: -20 (before
    callbacks that read the batch).

    Args:
        device: where to train; `None` picks cuda, then mps, then cpu.

    Examples:
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=[DeviceCB("cpu")])
    """

    order = ORDERS["DeviceCB"]

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self._target, self._move = self.device, True

    def before_fit(self, learn: BaseLearner) -> None:
        learn.model.to(self.device)
        self._target = _resolve(self.device)

    def before_train(self, learn: BaseLearner) -> None:
        self._move = not _yields_on(learn.dl, self._target)

    def before_validate(self, learn: BaseLearner) -> None:
        self._move = not _yields_on(learn.dl, self._target)

    def before_batch(self, learn: BaseLearner) -> None:
        if self._move:
            learn.batch = move(learn.batch, self._target)


def _yields_on(dl: Any, device: torch.device) -> bool:
    # A TensorLoader's batches are slices of the tensors it holds, all on its `device`.
    return isinstance(dl, TensorLoader) and dl.device == device
