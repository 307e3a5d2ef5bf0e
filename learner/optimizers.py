"""Several optimizers as one: a GAN's generator and discriminator, an encoder and a head.

An `opt_func` that returns a dict of named optimizers makes `learn.opt` an `Optimizers`: the
training step steps each by name (`learn.opt["d"].step()`), and everything that treats
`learn.opt` as one optimizer works on all of them: the default `step` and `zero_grad`, the
learning-rate finder and schedules (`param_groups` is every optimizer's groups), `save`,
`load` and resuming (`state_dict` holds each optimizer's by name). This module imports nothing
of the package.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["Optimizers", "as_optimizer", "unwrap_optimizer"]


class Optimizers(Mapping[str, Any]):
    """Named optimizers that act as one: `step()`, `zero_grad()`, `param_groups`,
    `state_dict()` and `load_state_dict()` go to each, in the order given.

    Args:
        opts: name -> optimizer (a torch optimizer, or any object with `step()` and
            `zero_grad()`).

    Examples:
        >>> def opt_func(params, lr):  # the parameters of each come from the model itself
        ...     return {"g": torch.optim.Adam(gan.g.parameters(), lr=lr),
        ...             "d": torch.optim.Adam(gan.d.parameters(), lr=lr)}
        >>> learn = Learner(gan, dls, None, opt_func=opt_func, cbs=GANStepCB())
        >>> learn.fit(1)
        >>> learn.opt["d"].param_groups[0]["lr"]
    """

    def __init__(self, opts: Mapping[str, Any]) -> None:
        if not opts:
            raise ValueError("Optimizers needs at least one optimizer; opt_func returned none.")
        for name, opt in opts.items():
            if not isinstance(name, str):
                raise TypeError(f"Optimizers are named by strings, got the key {name!r}.")
            if not (
                callable(getattr(opt, "step", None)) and callable(getattr(opt, "zero_grad", None))
            ):
                raise TypeError(
                    f"optimizer {name!r} is a {type(opt).__name__}, with no step() and "
                    "zero_grad(): opt_func's dict must hold optimizers."
                )
        self.opts = dict(opts)

    def __getitem__(self, name: str) -> Any:
        try:
            return self.opts[name]
        except KeyError:
            raise KeyError(
                f"no optimizer named {name!r}; learn.opt holds {list(self.opts)}."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.opts)

    def __len__(self) -> int:
        return len(self.opts)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={type(v).__name__}" for k, v in self.opts.items())
        return f"Optimizers({inner})"

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every optimizer's param groups, in order: the very dicts, so a value set in one
        (a learning rate) is set in that optimizer."""
        return [g for opt in self.opts.values() for g in getattr(opt, "param_groups", [])]

    def step(self) -> None:
        """Step every optimizer."""
        for opt in self.opts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of every optimizer's parameters."""
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """`{"optimizers": {name: its state_dict()}, "classes": {name: its class name}}`."""
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self.opts.items()},
            "classes": {name: type(opt).__name__ for name, opt in self.opts.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load each optimizer's state from `state_dict()`'s, by name (the same names)."""
        saved = state["optimizers"]
        if set(saved) != set(self.opts):
            raise ValueError(
                f"the optimizer states are for {sorted(saved)}, and learn.opt holds "
                f"{sorted(self.opts)}."
            )
        for name, opt in self.opts.items():
            opt.load_state_dict(saved[name])


def as_optimizer(opt: Any) -> Any:
    """What `opt_func` returned, as `learn.opt`: a dict of optimizers as `Optimizers`, anything
    else as it is."""
    if isinstance(opt, Mapping) and not isinstance(opt, Optimizers):
        return Optimizers(opt)
    return opt


def unwrap_optimizer(opt: Any) -> Any:
    """The optimizer inside wrappers that hold it as `.optimizer` (Accelerate's
    `AcceleratedOptimizer`, `learn.opt` during a fit with `AccelerateCB`); `opt` itself if it
    is not wrapped. A checkpoint names its class, which resuming compares with the learner's."""
    while hasattr(getattr(opt, "optimizer", None), "param_groups"):
        opt = opt.optimizer
    return opt
