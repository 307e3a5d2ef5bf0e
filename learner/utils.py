"""Small helpers the rest of the package builds on; this module imports nothing of the package.

One home for each: moving nested batches between devices, the device a model lives on, the
model inside `torch.compile` / DDP wrappers, modules' train/eval flags.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "get_lr",
    "map_tensors",
    "model_device",
    "move",
    "restore_training_flags",
    "set_lr",
    "snake",
    "to_cpu",
    "to_device",
    "training_flags",
    "unwrap_model",
]


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in `obj` to `device`, through tuples, lists, dicts, namedtuples and
    dataclasses; other leaves are returned as they are.

    Examples:
        >>> to_device({"x": torch.ones(2), "n": 3}, "cpu")
        {'x': tensor([1., 1.]), 'n': 3}
    """
    return move(obj, torch.device(device))


def move(obj: Any, device: torch.device) -> Any:
    """`to_device` for a `torch.device` already resolved (the per-batch path of `DeviceCB`)."""
    # Host-to-device copies may overlap with compute; device-to-host ones must not (the host
    # would read memory before the copy lands).
    non_blocking = device.type == "cuda"

    def to(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:  # the common case on one device: no dispatcher call at all
            return t
        return t.to(device, non_blocking=non_blocking and t.device.type == "cpu")

    return map_tensors(obj, to)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`fn` applied to every tensor in `obj`, through tuples, lists, dicts, namedtuples and
    dataclasses, each rebuilt as its own type; other leaves are returned as they are.

    Examples:
        >>> map_tensors({"x": torch.ones(2), "n": 3}, lambda t: 2 * t)
        {'x': tensor([2., 2.]), 'n': 3}
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if type(obj) is tuple:  # the usual (x, y) batch, before the slower general checks
        return tuple([map_tensors(o, fn) for o in obj])
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)([map_tensors(o, fn) for o in obj])
    # Before mappings: a Hugging Face ModelOutput is a dict and a dataclass, built by field.
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {
            f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init
        }
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, Mapping):  # a UserDict, such as Hugging Face's BatchEncoding
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(items)  # type: ignore[call-arg]
        except TypeError:  # a mapping type that cannot be built from a dict: a plain one
            return items
    return obj


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside `DistributedDataParallel`, `DataParallel` and `torch.compile`
    wrappers; `model` itself if it is not wrapped. Its `state_dict()` keys carry no `module.` or
    `_orig_mod.` prefix, so they load into the plain model, with any number of processes."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def snake(name: str) -> str:
    """`RecorderCB` -> `recorder_cb`: CamelCase to snake_case.

    Examples:
        >>> snake("MulticlassAccuracy")
        'multiclass_accuracy'
    """
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule of `model` with its `.training` flag, for `restore_training_flags`."""
    return [(m, m.training) for m in model.modules()]


def restore_training_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    """Put back the flags `training_flags` returned, one module at a time (`.train()` and
    `.eval()` recurse into children, which may have had other flags)."""
    for m, training in flags:
        m.training = training


def get_lr(opt: Any) -> float:
    """The learning rate of the first param group, or `opt.lr` for a hand-written optimizer
    without param groups (the course's `SGD`), or NaN if it has neither."""
    groups = getattr(opt, "param_groups", None)
    if groups:
        return float(groups[0]["lr"])
    lr = getattr(opt, "lr", None)
    return float(lr) if isinstance(lr, (int, float, torch.Tensor)) else float("nan")


def set_lr(opt: Any, lr: float) -> None:
    """Set the learning rate of every param group, or `opt.lr` of a hand-written optimizer."""
    groups = getattr(opt, "param_groups", None)
    if groups is not None:
        for group in groups:
            group["lr"] = lr
    elif hasattr(opt, "lr"):
        opt.lr = lr
    else:
        raise TypeError(
            f"Cannot set the learning rate of {type(opt).__name__}: it has neither param_groups "
            "nor an lr attribute."
        )


def to_cpu(obj: Any) -> Any:
    """Every tensor in `obj` detached and on the CPU, float16 and bfloat16 as float32, through
    dicts, lists, tuples, namedtuples and dataclasses (as `to_device`); other leaves unchanged.

    Examples:
        >>> to_cpu({"preds": torch.ones(2, dtype=torch.float16, requires_grad=True)})
        {'preds': tensor([1., 1.])}
    """
    return map_tensors(obj, _cpu_float)


def _cpu_float(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
