"""Forward hooks on chosen layers for the length of a fit, called only in the phases asked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from learner.callbacks.order import ORDERS
from learner.core import BaseLearner
from learner.events import Callback
from learner.hooks import Hook, HookFn, Hooks, ModuleSpec, find_modules

__all__ = ["HooksCB", "HooksCallback"]


class HooksCB(Callback):
    """Calls `hookfunc(hook, module, inputs, output)` after the forward pass of each chosen layer
    during the training (and, on request, validation) batches of a fit: the fastai course's
    `HooksCallback`.

    Hooks are registered at `before_fit` on `mods`, or else on the modules of `learn.model` that
    `mod_filter` selects, and removed at `cleanup_fit`, also when `fit` fails. `hookfunc` runs
    only within a batch of a phase asked for (from `before_batch` to `cleanup_batch`): forward
    passes outside the batches (a callback's between batches, `learn.infer` or `get_preds` at
    `after_epoch`, any after the fit) do not reach it. Each fit makes new hooks (so what
    `hookfunc` keeps on them starts over); after the fit the callback iterates over the last
    fit's hooks: `for h in cb`, and `len(cb)` counts them.

    Like any callback, one of its class added to a learner replaces the one there: a learner
    holds one `HooksCB` (an `ActivationStatsCB`, a subclass, replaces it too).

    Args:
        hookfunc: called as `hookfunc(hook, module, inputs, output)`; it keeps what it records
            on the hook (`hook.stored`, or an attribute of its own such as the course's
            `append_stats` sets, `hook.stats`).
        mod_filter: the layers to hook when `mods` is None: a predicate called on every module
            (`lambda m: isinstance(m, nn.Conv2d)`, the course's `fc.risinstance(nn.Conv2d)`), a
            module type, a name, or a list of these (see `learner.find_modules`). Default None:
            every module of the model, the model itself included, as the course's default
            `fc.noop` selects.
        on_train: call `hookfunc` in training batches.
        on_valid: call `hookfunc` in validation batches.
        mods: the layers to hook, given directly (modules of the model, or anything
            `find_modules` takes); wins over `mod_filter`.

    Events: `before_fit`, `before_batch`, `cleanup_batch`, `cleanup_fit`. Order: 0.

    Examples:
        >>> hc = HooksCB(append_stats, mod_filter=lambda m: isinstance(m, nn.Conv2d))
        >>> learn.fit(1, cbs=[hc])
        >>> for h in hc:
        ...     plt.plot(h.stats[0])  # the mean activation of each training batch
    """

    order = ORDERS["HooksCB"]
    unique = False  # several may watch different layers
    in_side_runs = False  # what it records is the run's

    def __init__(
        self,
        hookfunc: HookFn,
        mod_filter: ModuleSpec | None = None,
        on_train: bool = True,
        on_valid: bool = False,
        mods: ModuleSpec | None = None,
    ) -> None:
        if not callable(hookfunc):
            raise TypeError(
                "hookfunc must be a function hookfunc(hook, module, inputs, output), got "
                f"{type(hookfunc).__name__}."
            )
        if not (on_train or on_valid):
            raise ValueError(
                "on_train=False and on_valid=False: the hooks would never be called. Set "
                "on_train=True (training batches) or on_valid=True (validation batches)."
            )
        self.hookfunc, self.mod_filter, self.mods = hookfunc, mod_filter, mods
        self.on_train, self.on_valid = on_train, on_valid
        self.hooks: Hooks | None = None  # the last fit's hooks, removed once it ends
        self.recording = False  # whether the hooks call hookfunc now: within a batch asked for

    def choose_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules of `model` to hook: `mods`, else those `mod_filter` selects, else all."""
        if self.mods is not None:
            return find_modules(model, self.mods)
        if self.mod_filter is not None:
            return find_modules(model, self.mod_filter)
        return list(model.modules())

    def before_fit(self, learn: BaseLearner) -> None:
        if self.hooks is not None:
            self.hooks.remove()  # removed already, unless a fit ran without its cleanup
        self.hooks = Hooks(self.choose_modules(learn.model), self._call)

    def before_batch(self, learn: BaseLearner) -> None:
        self.recording = self.on_train if learn.training else self.on_valid

    def _call(self, hook: Hook, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self.recording:
            self.hookfunc(hook, module, inputs, output)

    def cleanup_batch(self, learn: BaseLearner) -> None:
        self.recording = False

    def cleanup_fit(self, learn: BaseLearner) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        self.recording = False

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks or ())

    def __len__(self) -> int:
        return len(self.hooks or ())


HooksCallback = HooksCB
"""The fastai course's name for `HooksCB`."""
