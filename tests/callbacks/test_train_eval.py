"""TrainEvalCB: train/eval switching that respects frozen submodules; after `fit` the model is in
the mode of its last phase."""

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


def test_frozen_batchnorm_stays_frozen_and_the_fit_ends_in_eval_mode() -> None:
    model = _bn_model()
    model[1].eval()
    stats = model[1].running_mean.clone()
    spy = FlagSpy()
    learn = Learner(model, _dls(), F.cross_entropy, cbs=[spy])
    learn.fit(1)
    assert spy.seen == [(True, True, False)] * 2 + [(False, False, False)]
    assert torch.equal(model[1].running_mean, stats)  # eval BN never updated its statistics
    assert not any(m.training for m in model.modules())  # the last phase was validation
    learn.fit(1)  # the next fit starts from the modes the last one left: the BN is still frozen
    assert spy.seen[3:] == [(True, True, False)] * 2 + [(False, False, False)]
    assert torch.equal(model[1].running_mean, stats)


def test_a_fit_without_validation_ends_in_training_mode_frozen_modules_frozen() -> None:
    model = _bn_model()
    model[1].eval()
    Learner(model, _dls(), F.cross_entropy).fit(1, valid=False)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]


def test_a_fit_that_runs_no_phase_leaves_the_flags_alone() -> None:
    model = _bn_model()
    model[1].eval()
    Learner(model, _dls(), F.cross_entropy).fit(0)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]


def test_modes_changed_after_a_fit_are_read_afresh() -> None:
    model = _bn_model()
    spy = FlagSpy()
    learn = Learner(model, _dls(), F.cross_entropy, cbs=[spy])
    learn.fit(1)
    model.train()
    model[1].eval()  # frozen now, after the first fit
    learn.fit(1)
    assert spy.seen[3:] == [(True, True, False)] * 2 + [(False, False, False)]


def test_model_in_eval_before_fit_trains_then_ends_in_eval() -> None:
    model = _bn_model().eval()
    spy = FlagSpy()
    Learner(model, _dls(), F.cross_entropy, cbs=[spy]).fit(1)
    assert spy.seen[0] == (True, True, True)
    assert not any(m.training for m in model.modules())


def test_side_runs_put_every_flag_back() -> None:
    model = _bn_model()
    learn = Learner(model, _dls(), F.cross_entropy)
    learn.fit(1)
    model.train()
    model[1].eval()
    flags = [m.training for m in model.modules()]
    with pytest.warns(UserWarning, match="no suggested learning rate"):
        learn.lr_find(num_it=3)
    learn.get_preds()
    learn.capture_preds()
    assert [m.training for m in model.modules()] == flags


def test_an_exception_leaves_the_mode_of_the_phase_it_stopped() -> None:
    model = _bn_model()
    model[1].eval()

    class Boom(Callback):
        def __init__(self, event: str) -> None:
            setattr(self, event, self.boom)

        def boom(self, learn: Learner) -> None:
            raise RuntimeError("boom")

    learn = Learner(model, _dls(), F.cross_entropy)
    with pytest.raises(RuntimeError):
        learn.fit(1, cbs=[Boom("after_train")])
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    with pytest.raises(RuntimeError):
        learn.fit(1, cbs=[Boom("after_validate")])
    assert not any(m.training for m in model.modules())
    spy = FlagSpy()
    learn.fit(1, cbs=[spy])  # nothing lost: the BN is still frozen in the next fit
    assert spy.seen == [(True, True, False)] * 2 + [(False, False, False)]
