"""Schedules, ParamSchedulerCB, one-cycle and LRSchedulerCB, against formulas and plain loops."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_dls, make_model
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau, StepLR

from learner import (
    Callback,
    CancelBatchException,
    CancelFitException,
    CheckpointCB,
    Learner,
    LRSchedulerCB,
    ParamSchedulerCB,
    combine_scheds,
    combined_cos,
    sched_cos,
    sched_exp,
    sched_lin,
    sched_no,
)

# -- schedule functions --------------------------------------------------------------------------


def test_schedule_functions() -> None:
    assert [sched_lin(1.0, 3.0)(p) for p in (0, 0.25, 1)] == [1.0, 1.5, 3.0]
    cos = sched_cos(1.0, 3.0)
    assert [cos(0), cos(1)] == [1.0, 3.0]
    assert cos(0.5) == pytest.approx(2.0) and cos(0.25) == pytest.approx(2 - math.sqrt(0.5))
    assert [sched_exp(1e-4, 1e-2)(p) for p in (0, 1)] == pytest.approx([1e-4, 1e-2], rel=1e-15)
    assert sched_exp(1e-4, 1e-2)(0.5) == pytest.approx(1e-3, rel=1e-12)
    assert sched_no(1.0, 3.0)(0.7) == 1.0
    with pytest.raises(ValueError, match="sched_exp needs"):
        sched_exp(0.0, 1.0)


def test_combine_scheds_phases() -> None:
    f = combine_scheds([0.25, 0.75], [sched_lin(0.0, 1.0), sched_lin(1.0, 0.0)])
    assert [f(p) for p in (0, 0.125, 0.25, 0.625, 1.0)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    # A phase of width 0 is skipped; the last phase takes pos 1.
    g = combine_scheds([0.0, 0.5, 0.5, 0.0], [sched_no(s, s) for s in (9, 1, 2, 8)])
    assert [g(0.0), g(0.49), g(0.5), g(1.0)] == [1, 1, 2, 2]
    assert combined_cos(0.5, 1.0, 2.0, 0.0)(0.5) == 2.0


@pytest.mark.parametrize(
    "pcts, n, match",
    [([0.5, 0.6], 2, "sum to 1"), ([1.5, -0.5], 2, ">= 0"), ([1.0], 2, "one fraction")],
)
def test_combine_scheds_bad_input(pcts: list[float], n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        combine_scheds(pcts, [sched_no(1, 1)] * n)


# -- one-cycle -----------------------------------------------------------------------------------


def one_cycle_lr(p: float, lr_max: float, div: float = 25, div_final: float = 1e5) -> float:
    """fastai's one-cycle lr at progress p: cosine up over the first 25%, then down."""

    def cos(a: float, b: float, t: float) -> float:
        return a + (b - a) * (1 - math.cos(math.pi * t)) / 2

    if p < 0.25:
        return cos(lr_max / div, lr_max, p / 0.25)
    return cos(lr_max, lr_max / div_final, (p - 0.25) / 0.75)


def one_cycle_mom(p: float) -> float:
    def cos(a: float, b: float, t: float) -> float:
        return a + (b - a) * (1 - math.cos(math.pi * t)) / 2

    return cos(0.95, 0.85, p / 0.25) if p < 0.25 else cos(0.85, 0.95, (p - 0.25) / 0.75)


class HypersCB(Callback):
    """Records lr and momentum of param group 0 at every optimizer step."""

    order = 100

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.moms: list[float] = []

    def after_step(self, learn: Learner) -> None:
        assert learn.opt is not None
        group = learn.opt.param_groups[0]
        self.lrs.append(group["lr"])
        self.moms.append(group["betas"][0] if "betas" in group else group["momentum"])


@pytest.mark.parametrize("opt_func", [torch.optim.SGD, torch.optim.AdamW])
def test_one_cycle_matches_the_formula(opt_func: Any) -> None:
    dls = make_dls(n_train=80, bs=8)  # 10 batches an epoch, 40 in all: the peak is batch 10
    model = make_model()
    probe = HypersCB()
    learn = Learner(model, dls, F.cross_entropy, lr=1e-3, opt_func=opt_func, cbs=[probe])
    learn.fit_one_cycle(4, lr_max=0.1)
    total = 40
    want_lrs = [one_cycle_lr(i / total, 0.1) for i in range(total)]
    assert probe.lrs == pytest.approx(want_lrs, rel=1e-12)
    assert probe.moms == pytest.approx([one_cycle_mom(i / total) for i in range(total)], rel=1e-12)
    assert probe.lrs[0] == pytest.approx(0.1 / 25) and probe.lrs[10] == pytest.approx(0.1)
    assert probe.moms[0] == 0.95 and probe.moms[10] == pytest.approx(0.85)
    # The recorder, and so plot_lr, show the lr each batch used.
    assert learn.recorder.lrs == probe.lrs
    line = learn.recorder.plot_lr().axes[0].get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx(want_lrs, rel=1e-12)
    assert learn.lr == 0.1  # lr_max is the run's lr, as fit(lr=...) makes it


def test_one_cycle_trains_like_a_plain_loop_with_those_hypers() -> None:
    dls = make_dls(n_train=48, bs=8)
    probe = HypersCB()
    learn = Learner(make_model(), dls, F.cross_entropy, opt_func=torch.optim.SGD, cbs=[probe])
    learn.fit_one_cycle(2, lr_max=0.5, pct_start=0.3)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = [b for _ in range(2) for b in dls.train]
    for (xb, yb), lr, mom in zip(batches, probe.lrs, probe.moms, strict=True):
        opt.param_groups[0].update(lr=lr, momentum=mom)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(learn.model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_one_cycle_without_momentum_needs_moms_none(tiny: dict[str, Any]) -> None:
    tiny["opt_func"] = torch.optim.Adagrad
    learn = Learner(**tiny)
    with pytest.raises(ValueError, match=r"schedules 'mom'.*moms=None"):
        learn.fit_one_cycle(1)
    learn.fit_one_cycle(1, moms=None)
    assert learn.recorder.lrs == pytest.approx([0.1 / 25, one_cycle_lr(0.5, 0.1)])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(lr_max=0), "lr_max"), (dict(pct_start=1.5), "pct_start"), (dict(div=0), "div")],
)
def test_one_cycle_bad_input(tiny: dict[str, Any], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Learner(**tiny).fit_one_cycle(1, **kwargs)


# -- ParamSchedulerCB ----------------------------------------------------------------------------


def test_any_param_group_key(tiny: dict[str, Any]) -> None:
    tiny["opt_func"] = torch.optim.AdamW
    probe = HypersCB()
    learn = Learner(**tiny, cbs=[probe])
    wds: list[float] = []

    class WdCB(Callback):
        def after_step(self, learn: Learner) -> None:
            assert learn.opt is not None
            wds.append(learn.opt.param_groups[0]["weight_decay"])

    learn.fit(2, cbs=[ParamSchedulerCB({"weight_decay": sched_lin(0.0, 0.4)}), WdCB()])
    assert wds == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_unknown_key_is_an_error_at_before_fit(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    with pytest.raises(ValueError, match=r"'foo', but param_groups\[0\] of SGD has no such key"):
        learn.fit(1, cbs=[ParamSchedulerCB({"foo": sched_no(1, 1)})])
    assert learn.recorder.losses == []


def test_loader_without_len_is_an_error(tiny: dict[str, Any]) -> None:
    class NoLen:
        def __init__(self, batches: list[Any]) -> None:
            self.batches = batches

        def __iter__(self) -> Any:
            return iter(self.batches)

    tiny["dls"].train = NoLen(tiny["dls"].train)
    with pytest.raises(ValueError, match="needs len"):
        Learner(**tiny).fit(1, cbs=[ParamSchedulerCB({"lr": sched_no(1, 1)})])


def test_bad_scheds_are_rejected() -> None:
    with pytest.raises(TypeError, match="non-empty dict"):
        ParamSchedulerCB({})
    with pytest.raises(TypeError, match="functions of progress"):
        ParamSchedulerCB({"lr": 0.1})  # type: ignore[dict-item]


class AccumulateCB(Callback):
    """Gradient accumulation over 2 batches: the first of each pair skips the optimizer step."""

    def after_backward(self, learn: Learner) -> None:
        if learn.iter % 2 == 0:
            raise CancelBatchException()


def test_progress_advances_only_when_the_optimizer_steps() -> None:
    dls = make_dls(n_train=48, bs=8)  # 6 batches: steps at batches 1, 3, 5
    probe = HypersCB()
    learn = Learner(make_model(), dls, F.cross_entropy, opt_func=torch.optim.SGD)
    learn.fit(1, cbs=[ParamSchedulerCB({"lr": sched_lin(0.1, 0.7)}), AccumulateCB(), probe])
    # Each step uses the lr of the position reached by the previous step: 0, 2/6, 4/6.
    assert probe.lrs == pytest.approx([0.1, 0.3, 0.5])


class StopAfterEpochCB(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_epoch(self, learn: Learner) -> None:
        if learn.epoch == self.epoch:
            raise CancelFitException()


def test_state_dict_resumes_the_schedule(tmp_path: Path) -> None:
    scheds = {"lr": sched_cos(0.1, 0.001), "mom": sched_lin(0.9, 0.5)}
    whole = Learner(make_model(), make_dls(), F.cross_entropy, opt_func=torch.optim.SGD)
    whole.fit(4, cbs=[ParamSchedulerCB(scheds)])

    learn = Learner(make_model(), make_dls(), F.cross_entropy, opt_func=torch.optim.SGD)
    first, path = ParamSchedulerCB(scheds), tmp_path / "ckpt.pt"
    # Interrupted after 2 of 4 epochs; the last checkpoint is at the end of epoch 0.
    learn.fit(4, cbs=[first, StopAfterEpochCB(1), CheckpointCB(path)])
    assert first.state_dict() == {"pos": 4, "total": 8, "since_step": 0}
    second = ParamSchedulerCB(scheds)
    learn.fit(4, cbs=[second], resume_from=path)
    assert learn.recorder.lrs == whole.recorder.lrs
    for a, b in zip(learn.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)
    # The loaded state belongs to the resumed fit: the next fit starts its own schedule.
    learn.fit(1, cbs=[second])
    assert learn.recorder.lrs[-2:] == [0.1, sched_cos(0.1, 0.001)(0.5)]


# -- LRSchedulerCB -------------------------------------------------------------------------------


def plain_loop_lrs(sched_factory: Any, n_batches: int) -> tuple[list[float], torch.nn.Module]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = sched_factory(opt)
    lrs, batches = [], make_dls().train
    for i in range(n_batches):
        xb, yb = batches[i % len(batches)]
        lrs.append(opt.param_groups[0]["lr"])
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return lrs, model


def test_torch_scheduler_per_batch(tiny: dict[str, Any]) -> None:
    factory = lambda opt: OneCycleLR(opt, max_lr=0.5, total_steps=8)
    want, model = plain_loop_lrs(factory, 8)
    learn = Learner(**tiny)
    learn.fit(4, cbs=[LRSchedulerCB(factory)])
    assert learn.recorder.lrs == want
    for a, b in zip(learn.model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_torch_scheduler_per_epoch(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    learn.fit(3, cbs=[LRSchedulerCB(lambda opt: StepLR(opt, 1, gamma=0.5), interval="epoch")])
    assert learn.recorder.lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


def test_scheduler_state_resumes(tiny: dict[str, Any], tmp_path: Path) -> None:
    factory = lambda opt: OneCycleLR(opt, max_lr=0.5, total_steps=8)
    want, _ = plain_loop_lrs(factory, 8)
    learn, path = Learner(**tiny), tmp_path / "ckpt.pt"
    learn.fit(4, cbs=[LRSchedulerCB(factory), StopAfterEpochCB(1), CheckpointCB(path)])
    # A resumed fit builds the scheduler at before_fit, then loads its state.
    learn.fit(4, cbs=[LRSchedulerCB(factory)], resume_from=path)
    assert learn.recorder.lrs == want
    with pytest.raises(ValueError, match="no scheduler yet"):
        LRSchedulerCB(factory).load_state_dict({})


def test_reduce_on_plateau_reads_the_monitor(tiny: dict[str, Any]) -> None:
    values = iter([1.0, 0.5, 0.75, 0.25])
    learn = Learner(**tiny, metrics={"score": lambda p, t: next(values)})
    factory = lambda opt: ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=0)
    learn.fit(4, cbs=[LRSchedulerCB(factory, interval="epoch", monitor="score")])
    assert learn.recorder.lrs == [0.1] * 6 + [0.05] * 2  # reduced after epoch 2's 0.75


def test_reduce_on_plateau_unknown_monitor(tiny: dict[str, Any]) -> None:
    factory = lambda opt: ReduceLROnPlateau(opt)
    with pytest.raises(ValueError, match="available keys"):
        Learner(**tiny).fit(1, cbs=[LRSchedulerCB(factory, interval="epoch", monitor="acc")])


def test_scheduler_on_another_optimizer_is_an_error(tiny: dict[str, Any]) -> None:
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pass a factory"):
        Learner(**tiny).fit(1, cbs=[LRSchedulerCB(StepLR(other, 1))])
    with pytest.raises(ValueError, match="interval='epoch'"):
        LRSchedulerCB(ReduceLROnPlateau(other))
    with pytest.raises(ValueError, match="interval must be"):
        LRSchedulerCB(StepLR(other, 1), interval="step")
    with pytest.raises(TypeError, match="scheduler must be"):
        LRSchedulerCB(0.1)  # type: ignore[arg-type]


def test_scheduler_instance_on_learn_opt(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    learn.fit(1)
    assert learn.opt is not None
    learn.fit(2, cbs=[LRSchedulerCB(StepLR(learn.opt, 1, gamma=0.5), interval="epoch")])
    assert learn.recorder.lrs == [0.1, 0.1, 0.1, 0.1, 0.05, 0.05]
