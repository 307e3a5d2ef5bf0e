"""The fastai course's student code (2022 part 2, notebooks 09-14) runs as written: each test
copies the course's own classes and recipe, with only the imports changed."""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_dls, make_model
from matplotlib.figure import Figure
from torch import nn

from learner import (
    BatchTransformCB,
    Callback,
    DataLoaders,
    Learner,
    MetricsCB,
    ParamSchedulerCB,
    RecorderCB,
    accuracy,
    sched_lin,
    set_seed,
    tfm_batch,
    to_cpu,
)


@pytest.fixture(autouse=True)
def _random_states() -> Iterator[None]:
    """These tests seed the global generators: put them back for the tests that follow."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    torch.use_deterministic_algorithms(deterministic)


def _data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A learnable 3-class problem: the class is the argmax of the first three features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) * 3 + 5  # far from normalised, on purpose
    return x, (x[:, :3] - 5).argmax(1)


# -- notebook 12: hand-written optimizers -------------------------------------------------------


class SGD:
    def __init__(self, params, lr, wd=0.0):  # type: ignore[no-untyped-def]
        params = list(params)
        self.params, self.lr, self.wd = params, lr, wd
        self.i = 0

    def step(self):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            for p in self.params:
                self.reg_step(p)
                self.opt_step(p)
        self.i += 1

    def opt_step(self, p):  # type: ignore[no-untyped-def]
        p -= p.grad * self.lr

    def reg_step(self, p):  # type: ignore[no-untyped-def]
        if self.wd != 0:
            p *= 1 - self.lr * self.wd

    def zero_grad(self):  # type: ignore[no-untyped-def]
        for p in self.params:
            p.grad.data.zero_()


class Momentum(SGD):
    def __init__(self, params, lr, wd=0.0, mom=0.9):  # type: ignore[no-untyped-def]
        super().__init__(params, lr=lr, wd=wd)
        self.mom = mom

    def opt_step(self, p):  # type: ignore[no-untyped-def]
        if not hasattr(p, "grad_avg"):
            p.grad_avg = torch.zeros_like(p.grad)
        p.grad_avg = p.grad_avg * self.mom + p.grad * (1 - self.mom)
        p -= self.lr * p.grad_avg


@pytest.mark.parametrize("opt_cls", [SGD, Momentum])
def test_hand_written_optimizers_train_with_the_default_callbacks(opt_cls: Any) -> None:
    dls = make_dls()
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1, opt_func=opt_cls, metrics=accuracy)
    learn.fit(2)
    # The oracle: the course's loop with the same optimizer over the same batches.
    model = make_model()
    opt = opt_cls(model.parameters(), lr=0.1)
    losses = []
    for _ in range(2):
        for xb, yb in dls.train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert learn.recorder.losses == losses
    assert learn.recorder.lrs == [0.1] * 4 and learn.opt.i == 4
    for a, b in zip(learn.model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    learn.fit(1, lr=0.05)  # fit(lr=...) sets the hand-written optimizer's lr
    assert learn.opt.lr == 0.05 and learn.recorder.lrs[-1] == 0.05


def test_what_needs_param_groups_says_so(tmp_path: Path) -> None:
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, opt_func=SGD)
    with pytest.raises(TypeError, match=r"lr_find.*param_groups.*SGD has none"):
        learn.lr_find(num_it=10)
    assert learn.opt is None  # the sweep's optimizer is gone with it
    learn.fit(1)
    with pytest.raises(TypeError, match=r"ParamSchedulerCB.*param_groups.*SGD has none"):
        learn.fit_one_cycle(1, lr_max=0.1)
    with pytest.raises(TypeError, match=r"lr_find.*param_groups"):
        learn.lr_find(num_it=10)
    with pytest.raises(TypeError, match=r"state_dict.*SGD has none"):
        learn.save(tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


# -- Learner(lr=None) ----------------------------------------------------------------------------


def test_the_learning_rate_may_come_later() -> None:
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=None, opt_func=torch.optim.SGD)
    with pytest.raises(ValueError, match=r"No learning rate.*fit\(n, lr=...\)"):
        learn.fit(1)
    assert learn.opt is None
    result = learn.lr_find(num_it=12, stop_factor=None)
    assert len(result.lrs) == 12 and learn.lr is None and learn.opt is None
    with pytest.raises(ValueError, match="fit_one_cycle needs lr_max"):
        learn.fit_one_cycle(1)
    learn.fit_one_cycle(1, lr_max=0.1)
    assert learn.lr == 0.1 and max(learn.recorder.lrs) <= 0.1
    learn.fit(1, train=False)  # no training, no rate needed


# -- notebook 10: set_seed, to_cpu ---------------------------------------------------------------


def test_set_seed_seeds_python_numpy_and_torch() -> None:
    set_seed(42)
    a = random.random(), np.random.rand(), torch.rand(3)
    set_seed(42)
    b = random.random(), np.random.rand(), torch.rand(3)
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    set_seed(1, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    set_seed(1)
    assert not torch.are_deterministic_algorithms_enabled()


def test_to_cpu_detaches_and_casts_half_through_containers() -> None:
    x = torch.ones(2, dtype=torch.float16, requires_grad=True) * 2
    out = to_cpu({"a": [x, (torch.arange(3), "name")], "b": torch.ones(1, dtype=torch.bfloat16)})
    a = out["a"][0]
    assert (
        a.dtype == torch.float32 and not a.requires_grad and torch.equal(a, torch.full((2,), 2.0))
    )
    assert out["a"][1][1] == "name" and out["a"][1][0].dtype == torch.int64
    assert out["b"].dtype == torch.float32


# -- notebook 09: lr_find shows itself in a notebook ---------------------------------------------


def test_lr_find_result_displays_its_plot_in_a_notebook() -> None:
    formatters = pytest.importorskip("IPython.core.formatters", reason="needs IPython")
    DisplayFormatter = formatters.DisplayFormatter

    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD)
    result = learn.lr_find(num_it=20, stop_factor=None)
    data, _ = DisplayFormatter().format(result)
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"  # the plot, as the cell's output
    assert isinstance(result.plot(), Figure)


# -- notebook 12: RecorderCB(**d) ----------------------------------------------------------------


def _lr(cb):  # type: ignore[no-untyped-def]
    return cb.pg["lr"]


def _beta1(cb):  # type: ignore[no-untyped-def]
    return cb.pg["betas"][0]


def test_recorder_records_the_courses_functions() -> None:
    rec = RecorderCB(lr=_lr, mom=_beta1)
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[rec])
    assert learn.recorder is rec  # it replaced the default recorder, and does its job too
    learn.fit_one_cycle(3, lr_max=0.01)
    assert rec.recs["lr"] == rec.lrs and len(rec.lrs) == 6
    moms = [learn.opt.param_groups[0]["betas"][0]]
    assert rec.recs["mom"][-1] == moms[-1] and rec.recs["mom"][0] == pytest.approx(0.95)
    assert len(rec.history) == 3 and len(rec.losses) == 6
    assert len(rec.plot().axes) == 2
    with pytest.raises(ValueError, match="has no functions"):
        RecorderCB().plot()


# -- notebooks 11 and 14: batch transforms on the device -----------------------------------------


class SeenCB(Callback):
    """Keeps the inputs the model saw."""

    order = 100

    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []

    def after_predict(self, learn: Learner) -> None:
        (self.train if learn.training else self.valid).append(learn.batch[0])


def test_batch_transforms_normalise_and_augment_as_the_course() -> None:
    x, y = _data()
    xmean, xstd = x.mean(), x.std()

    def _norm(b):  # type: ignore[no-untyped-def]
        return (b[0] - xmean) / xstd, b[1]

    dls = DataLoaders.from_tensors(x[:64], y[:64], x[64:], y[64:], bs=16)
    seen = SeenCB()
    flip = BatchTransformCB(partial(tfm_batch, tfm_x=lambda t: -t), on_val=False)
    learn = Learner(
        nn.Linear(4, 3), dls, F.cross_entropy, lr=0.1, cbs=[BatchTransformCB(_norm), flip, seen]
    )
    assert sum(isinstance(cb, BatchTransformCB) for cb in learn.cbs) == 2  # they stack
    learn.fit(1)
    # Training batches normalised, then negated; validation batches only normalised.
    assert torch.allclose(torch.cat(seen.valid), (x[64:] - xmean) / xstd)
    assert torch.cat(seen.train).mean().item() == pytest.approx(
        -((x[:64] - xmean) / xstd).mean().item(), abs=1e-5
    )
    # The oracle: the same training on data normalised beforehand.
    pre = DataLoaders.from_tensors(
        (x[:64] - xmean) / xstd, y[:64], (x[64:] - xmean) / xstd, y[64:], bs=16
    )
    torch.manual_seed(0)
    a = Learner(nn.Linear(4, 3), dls, F.cross_entropy, lr=0.1, cbs=BatchTransformCB(_norm))
    a.fit(2)
    torch.manual_seed(0)
    b = Learner(nn.Linear(4, 3), pre, F.cross_entropy, lr=0.1)
    b.fit(2)
    assert a.recorder.losses == pytest.approx(b.recorder.losses, rel=1e-5)
    assert a.recorder.history[-1]["valid_loss"] == pytest.approx(
        b.recorder.history[-1]["valid_loss"], rel=1e-5
    )


# -- notebook 14: capture_preds and test-time augmentation ---------------------------------------


def test_capture_preds_runs_callbacks_and_records_nothing() -> None:
    x, y = _data()
    dls = DataLoaders.from_tensors(x[:64], y[:64], x[64:], y[64:], bs=16)

    class CountingMetric:
        def __init__(self) -> None:
            self.updates = 0

        def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
            self.updates += 1

        def compute(self) -> int:
            return self.updates

        def reset(self) -> None:
            pass

    metric = CountingMetric()
    learn = Learner(nn.Linear(4, 3), dls, F.cross_entropy, lr=0.1, cbs=MetricsCB(n=metric))
    learn.fit(2)
    history, updates = [dict(h) for h in learn.recorder.history], metric.updates
    preds, targs = learn.capture_preds()
    want, want_targs = learn.get_preds()
    assert torch.equal(preds, want) and torch.equal(targs, want_targs)
    # Test-time augmentation by a callback, as the course does it.
    ttacb = BatchTransformCB(partial(tfm_batch, tfm_x=lambda t: -t), on_train=False)
    flipped, _ = learn.capture_preds(cbs=[ttacb])
    assert torch.equal(flipped, learn.get_preds(dl=[(-x[64:], y[64:])])[0])
    assert learn.recorder.history == history and metric.updates == updates
    assert ttacb not in learn.cbs


def test_a_parameter_schedule_of_the_course_runs() -> None:
    # notebook 12: a schedule over the batches of a fit, read back from the optimizer.
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD)
    learn.fit(2, cbs=ParamSchedulerCB({"lr": sched_lin(0.1, 0.01)}))
    assert learn.recorder.lrs == pytest.approx([sched_lin(0.1, 0.01)(i / 4) for i in range(4)])


# -- notebook 12: the course's scheduler callbacks -----------------------------------------------


class BaseSchedCB(Callback):
    def __init__(self, sched):  # type: ignore[no-untyped-def]
        self.sched = sched

    def before_fit(self, learn):  # type: ignore[no-untyped-def]
        self.schedo = self.sched(learn.opt)

    def _step(self, learn):  # type: ignore[no-untyped-def]
        if learn.training:
            self.schedo.step()


class BatchSchedCB(BaseSchedCB):
    def after_batch(self, learn):  # type: ignore[no-untyped-def]
        self._step(learn)


def test_the_courses_batch_scheduler_runs() -> None:
    from torch.optim import lr_scheduler

    sched = partial(lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=6)
    rec = RecorderCB(lr=_lr)
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD)
    learn.fit(3, cbs=[BatchSchedCB(sched), rec])
    # The oracle: the same scheduler stepped by hand.
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    ref = lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6)
    want = []
    for _ in range(6):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert rec.recs["lr"] == want


def test_predictions_see_the_validation_transforms() -> None:
    # A normalisation done by a BatchTransformCB applies to get_preds and infer too: they give
    # what a validation pass through the events gives (capture_preds), exactly.
    x, y = _data()
    xmean, xstd = x.mean(), x.std()

    def _norm(b):  # type: ignore[no-untyped-def]
        return (b[0] - xmean) / xstd, b[1]

    train_only = BatchTransformCB(partial(tfm_batch, tfm_x=lambda t: -t), on_val=False)
    dls = DataLoaders.from_tensors(x[:64], y[:64], x[64:], y[64:], bs=16)
    learn = Learner(
        nn.Linear(4, 3), dls, F.cross_entropy, lr=0.1, cbs=[BatchTransformCB(_norm), train_only]
    )
    learn.fit(2)
    preds, targs = learn.get_preds()
    captured, captured_targs = learn.capture_preds()
    assert torch.equal(preds, captured) and torch.equal(targs, captured_targs)
    learn.model.eval()
    with torch.no_grad():
        want = learn.model((x[64:] - xmean) / xstd)
    assert torch.allclose(learn.infer(x[64:]), want) and torch.allclose(learn.infer(x[64]), want[0])
