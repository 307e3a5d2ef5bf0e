"""Looking at a Learner: which callbacks run at each event, and what the model does to a batch.

They are `Learner.show_training_loop()` and `Learner.summary()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from learner.core import BaseLearner
from learner.events import EVENTS, Callback
from learner.hooks import Hook, Hooks
from learner.snapshot import kept_state
from learner.utils import model_device, to_device

__all__ = ["show_training_loop", "summary"]


class Report(str):
    """Text that has been printed already: IPython and Jupyter do not echo it again as the cell's
    value (a plain `str` would be shown a second time, as an escaped one-liner)."""

    def _ipython_display_(self) -> None:
        pass


def show_training_loop(learn: BaseLearner) -> Report:
    """Print and return every event in the order it first fires, indented by loop level, with the
    callbacks that run at it, in the order they run: `before_fit: TrainEvalCB(-30), ...`."""
    return _report(_loop_table({event: learn.callbacks_at(event) for event in EVENTS}))


def _loop_table(handlers: dict[str, list[Callback]]) -> str:
    # `handlers`: EVENTS in order, each with the callbacks that run at it.
    rows: list[tuple[str, str]] = []
    open_levels: list[str] = []  # levels whose before_ is listed and whose cleanup_ is not yet
    for event, event_handlers in handlers.items():
        kind, _, level = event.partition("_")
        depth = len(open_levels)
        if level in open_levels and kind in ("after", "cleanup"):
            depth = open_levels.index(level)  # at its level's depth, not inside it
            if kind == "cleanup":
                del open_levels[depth:]
        cbs = ", ".join(f"{type(cb).__name__}({cb.order})" for cb in event_handlers)
        rows.append(("  " * depth + event, cbs or "-"))
        # A before_ without a cleanup_ (before_step) is a point inside its level, not a level.
        if kind == "before" and f"cleanup_{level}" in handlers:
            open_levels.append(level)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}} : {cbs}" for name, cbs in rows)


def summary(learn: BaseLearner) -> Report:
    """Print and return, per top-level layer of `learn.model`, its output shape for one batch of
    `learn.dls.train`, its number of parameters and whether they are trainable; then the totals.

    The batch runs through `learn.predict` in eval mode under `torch.no_grad`, on the model's
    device. Nothing else changes: not the modules' train/eval flags, nor BatchNorm statistics,
    nor the random number generators (torch, CUDA, Python, NumPy, the loader's own), nor the
    learner's batch, predictions, recorder or optimizer (none is created).
    """
    model = learn.model
    layers = list(model.named_children()) or [("<model>", model)]
    # Drawing a batch from a shuffled loader consumes random numbers: put them back after.
    with kept_state(learn, rng=True):
        batch = _one_batch(learn.dls.train)
        learn.batch = to_device(batch, model_device(model))
        learn.split_batch()
        model.eval()
        with torch.no_grad(), Hooks([m for _, m in layers], _keep_first_shape) as hooks:
            learn.predict()
        shapes = [h.stored[0] if h.stored else "(not run)" for h in hooks]

    table = [("Layer", "Type", "Output shape", "Params", "Trainable")]
    for (name, m), shape in zip(layers, shapes):
        params = list(m.parameters())
        table.append((name, type(m).__name__, shape, f"{_count(params):,}", _trainable(params)))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    inputs = learn.batch_format.split(batch)[0]
    shown = inputs[0] if isinstance(inputs, tuple) and len(inputs) == 1 else inputs
    lines = [f"{type(model).__name__}, one batch of input {_shape(shown)}", ""]
    for row in table:
        cells = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    params = list(model.parameters())
    n_trainable = _count([p for p in params if p.requires_grad])
    lines += [
        "",
        f"Total params: {_count(params):,}",
        f"Trainable params: {n_trainable:,}",
        f"Frozen params: {_count(params) - n_trainable:,}",
    ]
    return _report("\n".join(lines))


def _report(text: str) -> Report:
    print(text)
    return Report(text)


def _one_batch(dl: Any) -> Any:
    it = iter(dl)
    if it is dl:
        raise ValueError(
            "summary() needs a batch from dls.train, but it is a one-shot iterator: taking a "
            "batch would use it up. Use a loader that can be iterated again (a DataLoader, a "
            "list of batches)."
        )
    batch = next(it, None)
    if batch is None:
        raise ValueError("summary() needs a batch, but dls.train yielded none.")
    return batch


def _keep_first_shape(hook: Hook, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    if not hook.stored:  # a layer called again in the same forward pass keeps its first shape
        hook.stored.append(_shape(output))


def _shape(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return str(tuple(obj.shape))
    if isinstance(obj, (tuple, list)):
        return "[" + ", ".join(_shape(o) for o in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in obj.items()) + "}"
    return type(obj).__name__


def _count(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def _trainable(params: Sequence[torch.Tensor]) -> str:
    if not params:
        return "-"
    n = sum(p.requires_grad for p in params)
    return "yes" if n == len(params) else "no" if n == 0 else "partly"
