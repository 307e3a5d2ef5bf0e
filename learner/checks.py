"""Early, clear errors for bad input: the checks the Learner and the callbacks share, kept out of
core.py so the loop reads in one sitting. This module imports nothing of the package."""

from __future__ import annotations

import difflib
import math
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "add_note_once",
    "check_dls",
    "check_events",
    "check_int",
    "check_loaders",
    "check_lr",
    "check_not_empty",
    "check_number",
    "describe",
    "param_groups",
]

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
    if isinstance(obj, Mapping):
        items = ", ".join(f"{k}: {describe(v)}" for k, v in obj.items())
        return f"{type(obj).__name__}{{{items}}}"
    return type(obj).__name__


def add_note_once(e: BaseException, note: str) -> None:
    # An exception travels through nested event calls; name only the innermost callback.
    if not any(n.startswith("Raised in ") for n in getattr(e, "__notes__", ())):
        e.add_note(note)


def check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """A ValueError unless `value` is an int (not a bool) >= `minimum`, or None if `optional`.

    `name` is how the message names the value, e.g. "GradAccumCB n_batches"."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        alt = " or None" if optional else ""
        raise ValueError(f"{name} must be an int >= {minimum}{alt}, got {value!r}.")


def check_number(name: str, value: Any, positive: bool = True, finite: bool = False) -> None:
    """A ValueError unless `value` is an int or float (not a bool) that is > 0 (or >= 0 with
    `positive=False`) and, with `finite`, not infinite. NaN is never accepted."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = value > 0 if positive else value >= 0  # False for NaN
    if ok and finite:
        ok = math.isfinite(value)
    if not ok:
        what = ("a positive" if positive else "a non-negative") + (" finite" if finite else "")
        raise ValueError(f"{name} must be {what} number, got {value!r}.")


def check_lr(lr: Any, name: str = "lr") -> None:
    """A ValueError unless `lr` is a positive finite number."""
    check_number(name, lr, finite=True)


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
    try:
        n = len(dl)
    except TypeError:  # no length (a stream), or one that cannot tell (an IterableDataset's)
        return
    if n == 0:
        raise ValueError(
            f"{name} is empty (len 0): check its dataset size, batch size and drop_last."
        )


def param_groups(opt: Any, owner: str) -> list[dict[str, Any]]:
    """`opt.param_groups`, or a TypeError naming `owner`, which needs them: a hand-written
    optimizer (the course's `SGD` class) trains, but has no param groups to set values in."""
    groups = getattr(opt, "param_groups", None)
    if not isinstance(groups, list):
        raise TypeError(
            f"{owner} sets hyper-parameters in the optimizer's param_groups, but "
            f"{type(opt).__name__} has none (a hand-written optimizer?). Use a torch.optim "
            "optimizer, or give yours a param_groups list of dicts with 'params' and 'lr'."
        )
    return groups


def check_loaders(dls: Any, train: bool, valid: bool, one_shot_train: bool = False) -> None:
    """What `fit` checks of the loaders it will run, before anything runs: each is iterable
    again (not a one-shot iterator, which the first epoch, or `lr_find`, would use up; except
    the training loader with `one_shot_train`, a fit budgeted in steps) and not empty when it
    has a length."""
    for name, used in (("train", train), ("valid", valid)):
        dl = getattr(dls, name, None)
        if not used or dl is None:
            continue
        if isinstance(dl, Iterator) and not (name == "train" and one_shot_train):
            hint = ", or train on it for a budget of steps: fit(steps=...)" * (name == "train")
            raise ValueError(
                f"dls.{name} is a one-shot iterator ({type(dl).__name__}): the first pass would "
                "use it up, and the next epoch (or validation, lr_find, get_preds) would see no "
                "batch. Pass something iterable again: a DataLoader, a list of batches, or an "
                f"object whose __iter__ makes a new generator each time{hint}."
            )
        check_not_empty(dl, f"dls.{name}")
