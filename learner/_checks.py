"""Early, clear errors for bad input to the Learner: kept out of core.py so the loop reads
in one sitting."""

from __future__ import annotations

import difflib
import re
import weakref
from collections.abc import Iterable
from typing import Any

import torch

_EVENT_LIKE = re.compile(r"^(before|after|cleanup)_")


# Callback classes whose method names passed `check_events`: a class is checked once, not on
# every Learner it joins (the fuzzy match is slow enough to show in a short fit).
_CHECKED: weakref.WeakSet[type] = weakref.WeakSet()


def check_events(cb: Any, events: tuple[str, ...]) -> None:
    cls = type(cb)
    if cls in _CHECKED:
        return
    _check_names(cls, events)
    _CHECKED.add(cls)


def _check_names(cls: type, events: tuple[str, ...]) -> None:
    for attr in dir(cls):
        if attr.startswith("_") or attr in events:
            continue
        close = difflib.get_close_matches(attr, events, n=1, cutoff=0.85)
        if _EVENT_LIKE.match(attr) or close:
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{cls.__name__}.{attr} looks like an event but is not one.{hint} "
                f"Events are: {', '.join(events)}."
            )


def describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor(shape={tuple(obj.shape)}, dtype={obj.dtype}, device={obj.device})"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__}[{', '.join(describe(o) for o in obj)}]"
    return type(obj).__name__


def add_note_once(e: BaseException, note: str) -> None:
    # An exception travels through nested event calls; name only the innermost callback.
    if not any(n.startswith("Raised in ") for n in getattr(e, "__notes__", ())):
        e.add_note(note)


def check_lr(lr: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}.")


def check_dls(dls: Any) -> None:
    train = getattr(dls, "train", None)
    if train is None:
        raise TypeError(
            f"dls must have a .train loader (and optionally .valid), got {type(dls).__name__}. "
            "Wrap your loaders: DataLoaders(train_dl, valid_dl)."
        )
    for name in ("train", "valid"):
        dl = getattr(dls, name, None)
        if dl is not None and not isinstance(dl, Iterable):
            raise TypeError(f"dls.{name} must be an iterable of batches, got {type(dl).__name__}.")


def check_not_empty(dl: Any, name: str) -> None:
    if hasattr(dl, "__len__") and len(dl) == 0:
        raise ValueError(
            f"{name} is empty (len 0): check its dataset size, batch size and drop_last."
        )
