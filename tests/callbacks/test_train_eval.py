"""TrainEvalCB: train/eval switching that respects frozen submodules and restores flags."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, make_data
from torch import nn

from learner import Callback, Learner


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _dls() -> SimpleNamespace:
    x, y = make_data(24)
    return SimpleNamespace(train=batches(x[:16], y[:16], 8), valid=batches(x[16:], y[16:], 8))


class FlagSpy(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool, bool]] = []

    def after_predict(self, learn: Learner) -> None:
        m = learn.model
        self.seen.append((learn.training, m[0].training, m[1].training))


def test_frozen_batchnorm_stays_frozen_and_flags_come_back() -> None:
    model = _bn_model()
    model[1].eval()
    stats = model[1].running_mean.clone()
    spy = FlagSpy()
    Learner(model, _dls(), F.cross_entropy, cbs=[spy]).fit(1)
    assert spy.seen == [(True, True, False)] * 2 + [(False, False, False)]
    assert torch.equal(model[1].running_mean, stats)  # eval BN never updated its statistics
    assert model.training and model[0].training and not model[1].training


def test_model_in_eval_before_fit_trains_then_goes_back_to_eval() -> None:
    model = _bn_model().eval()
    spy = FlagSpy()
    Learner(model, _dls(), F.cross_entropy, cbs=[spy]).fit(1)
    assert spy.seen[0] == (True, True, True)
    assert not any(m.training for m in model.modules())


def test_flags_restored_after_an_exception() -> None:
    model = _bn_model()
    model[1].eval()

    class Boom(Callback):
        def before_validate(self, learn: Learner) -> None:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Learner(model, _dls(), F.cross_entropy, cbs=[Boom()]).fit(1)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
