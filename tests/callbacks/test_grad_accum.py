"""GradAccumCB: n accumulated batches step like one batch of all their samples."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import StubScaler
from torch import nn

from learner import (
    Callback,
    CancelBatchException,
    CancelTrainException,
    GradAccumCB,
    Learner,
    MixedPrecisionCB,
)


def _regression_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.1


def _split(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(x[s : s + n], y[s : s + n]) for s, n in zip(starts, sizes)]


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 1, dtype=torch.float64)


class CountStepsCB(Callback):
    def __init__(self) -> None:
        self.n = 0

    def after_step(self, learn: Learner) -> None:
        self.n += 1


@pytest.mark.parametrize(
    ("batch_sizes", "n", "groups"),
    [
        ([2] * 8, 4, [8, 8]),  # the case: 4 batches of 2 step like one batch of 8
        ([2] * 5, 4, [8, 2]),  # a leftover batch, stepped at the end of the epoch
        ([2] * 5 + [1], 4, [8, 3]),  # a leftover group with a smaller last batch
        ([2] * 5, 3, [6, 4]),  # n that does not divide the number of batches
        ([3, 1, 2, 2, 5], 4, [8, 5]),  # batches of any size
        ([2] * 3, 1, [2, 2, 2]),  # n=1: no accumulation at all
    ],
)
def test_accumulated_steps_equal_big_batch_steps(
    batch_sizes: list[int], n: int, groups: list[int]
) -> None:
    x, y = _regression_data(sum(batch_sizes))
    ref = _linear()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    want_losses = []
    for _ in range(2):  # a second epoch: nothing carried over from the first
        sizes = list(batch_sizes)
        for xb, yb in _split(x, y, groups):
            # The group's batches, for the per-batch losses the Learner records: the losses at
            # the parameters of the group's start.
            in_group = []
            while sum(in_group) < len(xb):
                in_group.append(sizes.pop(0))
            with torch.no_grad():
                want_losses += [
                    F.mse_loss(ref(xs), ys).item() for xs, ys in _split(xb, yb, in_group)
                ]
            F.mse_loss(ref(xb), yb).backward()  # one big batch
            opt.step()
            opt.zero_grad()

    steps = CountStepsCB()
    dls = SimpleNamespace(train=_split(x, y, batch_sizes), valid=None)
    learn = Learner(
        _linear(), dls, F.mse_loss, lr=0.05, opt_func=lambda p, lr: torch.optim.SGD(p, lr, 0.9)
    )
    learn.fit(2, cbs=[GradAccumCB(n), steps])
    assert steps.n == 2 * len(groups)
    # The recorder keeps float32 losses; a loss divided by n would be off by far more.
    assert learn.recorder.losses == pytest.approx(want_losses, rel=1e-6, abs=0)
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_mixed_precision_unscales_once_per_group(tiny: dict[str, Any]) -> None:
    scaler = StubScaler()
    x = torch.cat([b[0] for b in tiny["dls"].train])
    y = torch.cat([b[1] for b in tiny["dls"].train])
    dls = SimpleNamespace(train=[(x[i : i + 2], y[i : i + 2]) for i in range(0, 16, 2)])
    learn = Learner(**{**tiny, "dls": dls}, cbs=[MixedPrecisionCB(scaler=scaler), GradAccumCB(4)])
    learn.fit(1)
    assert scaler.log == (["scale"] * 4 + ["unscale_", "step", "update"]) * 2


def test_a_train_phase_ended_mid_group_drops_its_gradients(tiny: dict[str, Any]) -> None:
    class StopAfterFirst(Callback):
        def after_batch(self, learn: Learner) -> None:
            if learn.training:
                raise CancelTrainException()

    learn = Learner(**tiny, cbs=[GradAccumCB(2)])
    before = [p.clone() for p in learn.model.parameters()]
    learn.fit(1, cbs=[StopAfterFirst()])
    assert all(p.grad is None for p in learn.model.parameters())  # not carried into the next fit
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), before))


def test_cancelled_last_batch_warns_and_drops_the_open_group(tiny: dict[str, Any]) -> None:
    class CancelLast(Callback):
        def after_loss(self, learn: Learner) -> None:
            if learn.training and learn.iter == len(learn.dl) - 1:
                raise CancelBatchException()

    learn = Learner(**tiny, cbs=[GradAccumCB(4), CancelLast()])
    with pytest.warns(UserWarning, match="1 batch"):
        learn.fit(1)
    assert all(p.grad is None for p in learn.model.parameters())


def test_a_loader_without_len_is_refused(tiny: dict[str, Any]) -> None:
    class NoLen:
        def __iter__(self) -> Any:
            return iter(tiny["dls"].train)

    learn = Learner(**{**tiny, "dls": SimpleNamespace(train=NoLen(), valid=None)})
    with pytest.raises(TypeError, match=r"len\(\) of the training loader"):
        learn.fit(1, cbs=[GradAccumCB(2)])
    assert all(p.grad is None for p in learn.model.parameters())
    learn.fit(1, train=False, cbs=[GradAccumCB(2)])  # validation alone needs no len


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_bad_n_batches(n: Any) -> None:
    with pytest.raises(ValueError, match="n_batches"):
        GradAccumCB(n)
