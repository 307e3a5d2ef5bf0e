"""Forward hooks that are always removed: `Hook`, `Hooks`, and `find_modules` to choose layers;
and the fastai course's hook function `append_stats` with its readers `get_hist`, `get_min`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, overload

import torch
from torch import nn

__all__ = [
    "Hook",
    "HookFn",
    "Hooks",
    "ModuleSpec",
    "append_stats",
    "find_modules",
    "get_hist",
    "get_min",
]

# `fn(hook, module, inputs, output)`: the hook comes first so `fn` can keep what it sees on it.
HookFn = Callable[["Hook", nn.Module, tuple[Any, ...], Any], None]

# What `find_modules` accepts: a module type (or tuple of types), a submodule name, a module, a
# predicate `module -> bool`, or a list mixing them.
ModuleSpec = (
    type[nn.Module]
    | tuple[type[nn.Module], ...]
    | str
    | nn.Module
    | Callable[[nn.Module], Any]
    | Iterable[Any]
)


class Hook:
    """A forward hook on `module` that calls `fn(hook, module, inputs, output)` after each forward.

    `hook.stored` is an empty list for `fn` to keep what it records; `fn` may also set attributes
    of its own on the hook (the course's `append_stats` sets `hook.stats`). Remove the hook with
    `remove()`, or use it as a context manager, which removes it however the block ends.

    Examples:
        >>> with Hook(model[0], lambda h, m, i, o: h.stored.append(o.shape)) as hook:
        ...     model(xb)
        >>> hook.stored
        [torch.Size([8, 50])]
    """

    stats: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]
    """(means, stds, hists), one entry per forward pass: set by `append_stats` and by
    `ActivationStatsCB`; absent until then."""

    def __init__(self, module: nn.Module, fn: HookFn) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"Hook needs an nn.Module, got {type(module).__name__}.")
        self.module = module
        self.stored: list[Any] = []
        self._handle = module.register_forward_hook(functools.partial(fn, self))

    def remove(self) -> None:
        """Unregister the hook (calling it again does nothing)."""
        self._handle.remove()

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Hook({type(self.module).__name__})"


class Hooks:
    """One `Hook` per module, all calling `fn`; a sequence of hooks (`len`, iteration, `hooks[i]`,
    `hooks[:-1]`, `del hooks[i]`), and a context manager that removes every hook however the block
    ends.

    `modules` is an iterable of modules, or a module, whose children are hooked (as iterating an
    `nn.Sequential` gives them: `Hooks(model, fn)` hooks each layer of a Sequential). `del
    hooks[i]` removes that hook from its module and from the list. A `Hooks` is not a list: a
    slice is a plain list of its hooks.

    Examples:
        >>> def keep_mean(hook, module, inputs, output):
        ...     hook.stored.append(output.mean())
        >>> with Hooks(find_modules(model, nn.ReLU), keep_mean) as hooks:
        ...     model(xb)
        >>> [h.stored for h in hooks]
        >>> with Hooks(model, append_stats) as hooks:  # the course's: each layer of a Sequential
        ...     model(xb)
        >>> [get_hist(h).shape for h in hooks[:-1]]
    """

    def __init__(self, modules: nn.Module | Iterable[nn.Module], fn: HookFn) -> None:
        if isinstance(modules, nn.Module):
            children = list(modules.children())
            if not children:
                raise ValueError(
                    f"Hooks(module, fn) hooks the module's children, and this "
                    f"{type(modules).__name__} has none: to hook the module itself, pass "
                    "[module] or use Hook(module, fn)."
                )
            modules = children
        self.hooks: list[Hook] = []
        try:
            for m in modules:
                self.hooks.append(Hook(m, fn))
        except BaseException:
            self.remove()  # no hook left behind when a later module is bad
            raise

    def remove(self) -> None:
        """Unregister every hook."""
        for hook in self.hooks:
            hook.remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    @overload
    def __getitem__(self, i: int) -> Hook: ...

    @overload
    def __getitem__(self, i: slice) -> list[Hook]: ...

    def __getitem__(self, i: int | slice) -> Hook | list[Hook]:
        return self.hooks[i]

    def __delitem__(self, i: int | slice) -> None:
        """Remove the hook(s) at `i` from their modules and from this sequence."""
        for hook in self.hooks[i] if isinstance(i, slice) else [self.hooks[i]]:
            hook.remove()
        del self.hooks[i]

    def __repr__(self) -> str:
        return f"Hooks({', '.join(type(h.module).__name__ for h in self.hooks)})"


def find_modules(model: nn.Module, spec: ModuleSpec) -> list[nn.Module]:
    """The modules of `model` that `spec` names, in order, each once.

    Args:
        model: the model to search.
        spec: a module type or tuple of types (every submodule of that type, `model` included),
            a name as in `model.named_modules()` (`"encoder.0"`), a module of `model`, a
            predicate called on every module, `model` included, that returns whether to take it
            (`lambda m: isinstance(m, GeneralRelu)`, the course's `fc.risinstance(nn.ReLU)`), or
            a list mixing these.

    Examples:
        >>> find_modules(model, nn.ReLU)
        >>> find_modules(model, ["0", "2"])
        >>> find_modules(model, lambda m: isinstance(m, nn.Conv2d) and m.stride == (2, 2))
    """
    found: dict[int, nn.Module] = {}
    for m in _resolve(model, spec):
        found.setdefault(id(m), m)
    if not found:
        raise ValueError(
            f"{_describe(spec)} matched no module of the model. Its modules are: {_listing(model)}."
        )
    return list(found.values())


def _resolve(model: nn.Module, spec: Any) -> list[nn.Module]:
    if isinstance(spec, type) or (
        isinstance(spec, tuple) and spec and all(isinstance(s, type) for s in spec)
    ):
        types = spec if isinstance(spec, tuple) else (spec,)
        if not all(issubclass(t, nn.Module) for t in types):
            raise TypeError(f"module types must be nn.Module subclasses, got {spec!r}.")
        return [m for m in model.modules() if isinstance(m, types)]
    if isinstance(spec, str):
        try:
            return [model.get_submodule(spec)]
        except AttributeError:
            raise ValueError(
                f"the model has no submodule named {spec!r}. Its modules are: {_listing(model)}."
            ) from None
    if isinstance(spec, nn.Module):
        if not any(m is spec for m in model.modules()):
            raise ValueError(
                f"{type(spec).__name__} is not a module of the model, so a hook on it would "
                "never run. Pass a module of learn.model, its name, or its type."
            )
        return [spec]
    if callable(spec):  # a predicate: not a type nor a module, which are callable too
        return [m for m in model.modules() if spec(m)]
    if isinstance(spec, Iterable):
        return [m for s in spec for m in _resolve(model, s)]
    raise TypeError(
        "modules must be a module type, a submodule name, a module, a predicate module -> bool, "
        f"or a list of these; got {type(spec).__name__}."
    )


def _describe(spec: Any) -> str:
    if callable(spec) and not isinstance(spec, (type, nn.Module)):
        name = getattr(spec, "__qualname__", None) or type(spec).__qualname__
        return f"The predicate {name}"
    return repr(spec)


def _listing(model: nn.Module, limit: int = 20) -> str:
    names = [f"{n or '<model>'} ({type(m).__name__})" for n, m in model.named_modules()]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# -- the fastai course's activation statistics (miniai/activations.py) --------------------------


def append_stats(hook: Hook, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    """The course's hook function: appends to `hook.stats` = (means, stds, hists) the mean, the
    standard deviation and a 40-bin histogram over 0..10 of |activation| of `output`, on the CPU.

    As in the course, the output is copied to the host at every call (a device sync per forward
    pass on a GPU), float16 (and bfloat16, which the course leaves as it is) as float32, and
    `histc` leaves out values beyond 10. `ActivationStatsCB` records the same statistics on the
    device, reading them once per epoch, and counts values beyond the range in the last bin.

    Examples:
        >>> with Hooks(model, append_stats) as hooks:
        ...     model(xb)
        >>> hooks[0].stats[0]  # the mean of each forward pass of the first layer
    """
    if not hasattr(hook, "stats"):
        hook.stats = ([], [], [])
    acts = output.detach().cpu()
    if acts.dtype in (torch.float16, torch.bfloat16):  # the course's to_cpu: float16 only
        acts = acts.float()  # bfloat16 counts would not be exact beyond 256
    means, stds, hists = hook.stats
    means.append(acts.mean())
    stds.append(acts.std())
    hists.append(acts.abs().histc(40, 0, 10))


def get_hist(hook: Hook) -> torch.Tensor:
    """The course's "colorful dimension" image of a hook's `stats`: log(1 + count) per bin
    (rows, low |activation| first) and forward pass (columns), shape (bins, passes)."""
    return torch.stack(hook.stats[2]).t().float().log1p()


def get_min(hook: Hook) -> torch.Tensor:
    """The fraction of each forward pass's activations in the lowest histogram bin of a hook's
    `stats`: near 1, the layer is mostly dead (a ReLU outputting zeros)."""
    h1 = torch.stack(hook.stats[2]).t().float()
    return h1[0] / h1.sum(0)
