"""A tiny synthetic learner for mechanics tests, and matplotlib on Agg."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

matplotlib.use("Agg")


def make_data(
    n: int = 23, n_in: int = 4, n_out: int = 3, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    y = torch.randint(0, n_out, (n,), generator=g)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, bs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def make_dls(n_train: int = 16, n_valid: int = 8, bs: int = 8, valid: bool = True) -> Any:
    x, y = make_data(n_train + n_valid)
    train = batches(x[:n_train], y[:n_train], bs)
    return SimpleNamespace(
        train=train, valid=batches(x[n_train:], y[n_train:], bs) if valid else None
    )


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def tiny() -> dict[str, Any]:
    """Keyword arguments for a tiny Learner: 2 training batches, 1 validation batch."""
    return dict(
        model=make_model(),
        dls=make_dls(),
        loss_func=F.cross_entropy,
        lr=0.1,
        opt_func=torch.optim.SGD,
    )


class StubScaler:
    """A fake `torch.amp.GradScaler` that records its calls in `log`.

    It scales by a power of two, so scaling and unscaling are exact, and reports inf/nan gradients
    at the unscales numbered in `inf_at` (0-based): its `step` then does not call `opt.step()`.
    """

    def __init__(
        self, factor: float = 1024.0, inf_at: tuple[int, ...] = (), log: list[str] | None = None
    ) -> None:
        self.factor, self.inf_at = factor, set(inf_at)
        self.log = [] if log is None else log
        self.n_unscales, self.found_inf = 0, False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        self.log.append("scale")
        return loss * self.factor

    def unscale_(self, opt: Any) -> None:
        self.log.append("unscale_")
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad /= self.factor
        self.found_inf = self.n_unscales in self.inf_at
        self.n_unscales += 1

    def step(self, opt: Any) -> None:
        self.log.append("step")
        if not self.found_inf:
            opt.step()

    def update(self) -> None:
        self.log.append("update")

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor = state["factor"]


@pytest.fixture
def accelerate_state() -> Iterator[None]:
    """A process with no Accelerate state before the test and none after it (Accelerate keeps one
    per process, which the first `Accelerator` sets), and the environment as it was."""
    state = pytest.importorskip("accelerate.state", reason="needs accelerate")
    env = dict(os.environ)

    def reset() -> None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()

    reset()
    yield
    reset()
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)


def same(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are equal to the last bit, through dicts, lists and tuples of tensors
    and plain values (sequences of the same type)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def count_host_syncs(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> int:
    """How many times `run()` reads a tensor's value on the host (each one a device sync on a GPU).
    Use SGD: torch's single-tensor Adam itself calls .item() every step."""
    count = [0]
    with monkeypatch.context() as m:
        for name in HOST_SYNCS:
            original = getattr(torch.Tensor, name)

            def counting(self: torch.Tensor, *args: Any, _o: Any = original, **kw: Any) -> Any:
                count[0] += 1
                return _o(self, *args, **kw)

            m.setattr(torch.Tensor, name, counting)
        run()
    return count[0]


class GeneralRelu(nn.Module):
    """The course's activation (miniai/init.py), as written: a leaky ReLU, shifted and capped."""

    def __init__(self, leak=None, sub=None, maxv=None):  # type: ignore[no-untyped-def]
        super().__init__()
        self.leak, self.sub, self.maxv = leak, sub, maxv

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = F.leaky_relu(x, self.leak) if self.leak is not None else F.relu(x)
        if self.sub is not None:
            x -= self.sub
        if self.maxv is not None:
            x.clamp_max_(self.maxv)
        return x
