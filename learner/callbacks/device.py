"""Moving the model and each batch to a device."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from learner.core import Callback, Learner
from learner.data import TensorLoader

__all__ = ["DeviceCB", "default_device", "to_device"]


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


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in `obj` to `device`, through tuples, lists, dicts, namedtuples and
    dataclasses; other leaves are returned as they are.

    Example:
        >>> to_device({"x": torch.ones(2), "n": 3}, "cpu")
        {'x': tensor([1., 1.]), 'n': 3}
    """
    return _move(obj, torch.device(device))


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device == device:  # the common case on one device: no dispatcher call at all
            return obj
        # Host-to-device copies may overlap with compute; device-to-host ones must not (the host
        # would read memory before the copy lands).
        return obj.to(device, non_blocking=device.type == "cuda" and obj.device.type == "cpu")
    if type(obj) is tuple:  # the usual (x, y) batch, before the slower general checks
        return tuple([_move(o, device) for o in obj])
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_move(o, device) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)([_move(o, device) for o in obj])
    if isinstance(obj, dict):
        return type(obj)((k, _move(v, device)) for k, v in obj.items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {
            f.name: _move(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init
        }
        return dataclasses.replace(obj, **fields)
    return obj


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

    Example:
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=[DeviceCB("cpu")])
    """

    order = -20

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self._target, self._move = self.device, True

    def before_fit(self, learn: Learner) -> None:
        learn.model.to(self.device)
        self._target = _resolve(self.device)

    def before_train(self, learn: Learner) -> None:
        self._move = not _yields_on(learn.dl, self._target)

    def before_validate(self, learn: Learner) -> None:
        self._move = not _yields_on(learn.dl, self._target)

    def before_batch(self, learn: Learner) -> None:
        if self._move:
            learn.batch = _move(learn.batch, self._target)


def _yields_on(dl: Any, device: torch.device) -> bool:
    # A TensorLoader's batches are slices of the tensors it holds, all on its `device`.
    return isinstance(dl, TensorLoader) and dl.device == device
