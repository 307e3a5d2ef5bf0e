"""Forward hooks that are always removed: `Hook`, `Hooks`, and `find_modules` to choose layers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

__all__ = ["Hook", "HookFn", "Hooks", "ModuleSpec", "find_modules"]

# `fn(hook, module, inputs, output)`: the hook comes first so `fn` can keep what it sees on it.
HookFn = Callable[["Hook", nn.Module, tuple[Any, ...], Any], None]

# What `find_modules` accepts: a module type (or tuple of types), a submodule name, a module, or a
# list mixing them.
ModuleSpec = type[nn.Module] | tuple[type[nn.Module], ...] | str | nn.Module | Iterable[Any]


class Hook:
    """A forward hook on `module` that calls `fn(hook, module, inputs, output)` after each forward.

    `hook.stored` is an empty list for `fn` to keep what it records. Remove the hook with
    `remove()`, or use it as a context manager, which removes it however the block ends.

    Examples:
        >>> with Hook(model[0], lambda h, m, i, o: h.stored.append(o.shape)) as hook:
        ...     model(xb)
        >>> hook.stored
        [torch.Size([8, 50])]
    """

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
    """One `Hook` per module, all calling `fn`; iterable, indexable, and a context manager that
    removes every hook however the block ends.

    Examples:
        >>> def keep_mean(hook, module, inputs, output):
        ...     hook.stored.append(output.mean())
        >>> with Hooks(find_modules(model, nn.ReLU), keep_mean) as hooks:
        ...     model(xb)
        >>> [h.stored for h in hooks]
    """

    def __init__(self, modules: Iterable[nn.Module], fn: HookFn) -> None:
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

    def __getitem__(self, i: int) -> Hook:
        return self.hooks[i]


def find_modules(model: nn.Module, spec: ModuleSpec) -> list[nn.Module]:
    """The modules of `model` that `spec` names, in order, each once.

    Args:
        model: the model to search.
        spec: a module type or tuple of types (every submodule of that type, `model` included),
            a name as in `model.named_modules()` (`"encoder.0"`), a module of `model`, or a list
            mixing these.

    Examples:
        >>> find_modules(model, nn.ReLU)
        >>> find_modules(model, ["0", "2"])
    """
    found: dict[int, nn.Module] = {}
    for m in _resolve(model, spec):
        found.setdefault(id(m), m)
    if not found:
        raise ValueError(
            f"{spec!r} matched no module of the model. Its modules are: {_listing(model)}."
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
    if isinstance(spec, Iterable):
        return [m for s in spec for m in _resolve(model, s)]
    raise TypeError(
        "modules must be a module type, a submodule name, a module, or a list of these; "
        f"got {type(spec).__name__}."
    )


def _listing(model: nn.Module, limit: int = 20) -> str:
    names = [f"{n or '<model>'} ({type(m).__name__})" for n, m in model.named_modules()]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
