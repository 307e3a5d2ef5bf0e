"""Doing something with a Learner that leaves no trace: one home for putting its state back.

`get_preds`, `infer`, `summary`, `lr_find` and `capture_preds` run the model outside a training
run; each does it inside `kept_state(learn)`, which restores the loop's state, every submodule's
train/eval flag and, on request, the random states and the model's tensors and optimizer. Those
that fire events (`lr_find`, `capture_preds`) do it in a `side_run`, on copies of the callbacks
that take part (`Callback.in_side_runs`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from learner.core import BaseLearner
from learner.events import Callback
from learner.fsdp import is_sharded, load_grads, load_model_state
from learner.rng import rng_state, set_rng_state
from learner.utils import restore_training_flags, training_flags

__all__ = ["LOOP_STATE", "kept_state", "side_run"]

LOOP_STATE = (
    "lr", "epoch", "n_epochs", "iter", "training", "dl", "batch", "xb", "yb", "output", "preds",
    "loss", "loss_grad", "logged", "run_train", "run_valid", "start_epoch", "start_iter",
    "start_step", "resuming", "grad_sync", "global_step", "fit_step", "n_steps", "valid_every",
    "train_stream",
)  # fmt: skip
"""The documented loop state of `BaseLearner` that a fit changes (see its docstring)."""


@contextmanager
def kept_state(
    learn: BaseLearner, rng: bool = False, weights: bool = False, opt: bool = False
) -> Iterator[None]:
    """Within the block do anything; afterwards the learner's `LOOP_STATE`, `learn.model`,
    `learn.opt` (the object, or its absence), every submodule's train/eval flag are as before,
    also after an exception or Ctrl-C. With `rng`: also the Python, NumPy, torch (and CUDA, MPS)
    random states and the loaders' generators. With `weights`: also the model's parameters,
    buffers and gradients, even if the block moved or cast them (the very same tensor objects are
    put back). With `opt`: also the optimizer's state.

    Examples:
        >>> with kept_state(learn, rng=True):
        ...     batch = next(iter(learn.dls.train))  # the shuffle's random numbers come back
    """
    model, optimizer = learn.model, learn.opt
    loop = {name: getattr(learn, name) for name in LOOP_STATE}
    flags = training_flags(model)
    rngs = rng_state(learn.dls) if rng else None
    # Per module and name: moving a model (`.to(device)`) puts new tensor objects in for buffers.
    tensors = [
        (m, name, t, t.detach().clone())
        for m in model.modules()
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
    ] if weights else []  # fmt: skip
    grads = [
        (p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()
    ] if weights else []  # fmt: skip
    opt_state = copy.deepcopy(optimizer.state_dict()) if opt and optimizer is not None else None
    sharded = weights and is_sharded(model)
    try:
        yield
    finally:
        learn.model, learn.opt = model, optimizer
        if weights and not sharded and is_sharded(model):
            _reload_sharded(model, tensors, grads)
        else:
            with torch.no_grad():
                for m, name, t, saved in tensors:
                    if t.device == saved.device and t.dtype == saved.dtype:
                        t.copy_(saved)
                    else:  # moved or cast in the block (DeviceCB moves the model): move it back
                        t.data = saved
                    if getattr(m, name) is not t:
                        setattr(m, name, t)
            for p, grad in grads:
                p.grad = grad
        restore_training_flags(flags)
        if optimizer is not None and opt_state is not None:
            optimizer.load_state_dict(opt_state)  # after the weights: it casts to their device
        for name, value in loop.items():
            setattr(learn, name, value)
        if rngs is not None:
            set_rng_state(learn.dls, rngs)


def _reload_sharded(model: nn.Module, tensors: list[Any], grads: list[Any]) -> None:
    # Sharded in the block (DistributedCB(strategy="fsdp") at a side run's first fit): a model
    # cannot be un-sharded, so the values go back into the shards instead of the tensors.
    # fully_shard keeps the parameters' names and order.
    prefix = {id(m): name for name, m in model.named_modules()}
    keys = set(model.state_dict())
    full = {f"{prefix[id(m)]}.{n}".lstrip("."): saved for m, n, _, saved in tensors}
    load_model_state(model, {k: v for k, v in full.items() if k in keys})
    names = [n for n, _ in model.named_parameters()]
    load_grads(model, {n: g for n, (_, g) in zip(names, grads) if g is not None})


@contextmanager
def side_run(learn: BaseLearner, weights: bool = True) -> Iterator[list[Callback]]:
    """A run that is not part of training: within the block the learner has no callbacks, and the
    block gets copies of those that take part in side runs (`Callback.in_side_runs`) to pass to
    `fit(cbs=...)`. Afterwards everything is as `kept_state(learn, rng=True, weights=weights,
    opt=weights)` puts it back (a side run that trains, `weights=True`, also changes the
    optimizer's state; one that does not leaves it alone, and it is not copied), and `learn.cbs`
    is the same list: the callbacks (and the metric objects) handed in were never touched, and
    those that sit side runs out saw nothing.

    Examples:
        >>> with side_run(learn) as cbs:
        ...     learn.fit(steps=100, cbs=[*cbs, LRFinderCB()], valid=False)
    """
    # Objects the callbacks share with the learner are kept, not copied, in the copies.
    model = learn.model
    shared: list[Any] = [learn, learn.dls, learn.opt, *model.modules()]
    memo = {id(o): o for o in [*shared, *model.parameters(), *model.buffers()]}
    copies = [_copy(cb, memo) for cb in learn.cbs if cb.in_side_runs]
    with kept_state(learn, rng=True, weights=weights, opt=weights), learn.removed_cbs(learn.cbs):
        yield copies


def _copy(cb: Callback, memo: dict[int, Any]) -> Callback:
    """A copy of `cb`: its attributes deep-copied (those that cannot be, such as an open file,
    shared), so that whatever a side run does to the copy, `cb` itself is untouched."""
    new, memo = copy.copy(cb), dict(memo)
    for name, value in vars(cb).items():
        with contextlib.suppress(Exception):  # not copyable (an open file, a lock): shared
            setattr(new, name, copy.deepcopy(value, memo))
    return new
