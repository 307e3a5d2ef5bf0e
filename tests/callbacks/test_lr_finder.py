"""lr_find: the schedule, the stop rules, the suggestions, and that it leaves no trace."""

from __future__ import annotations

import copy
import math
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_data, make_dls, make_model
from matplotlib.figure import Figure
from torch import nn

from learner import (
    Callback,
    CheckpointCB,
    CSVLoggerCB,
    DataLoaders,
    EarlyStoppingCB,
    Learner,
    LRFinderCB,
    LRFindResult,
    ParamSchedulerCB,
    SaveBestCB,
    accuracy,
    sched_no,
    steep,
    valley,
)
from learner.callbacks.recorder import smooth
from learner.data import mnist, mnist_available

LRS = [10 ** (i / 10 - 7) for i in range(81)]  # 1e-7 .. 10, ten points a decade

# -- suggestions on synthetic curves ---------------------------------------------------------------


def test_steep_finds_the_steepest_point() -> None:
    # -tanh of log10(lr) + 3 falls fastest at lr = 1e-3, which is LRS[40].
    losses = [-math.tanh(2 * (math.log10(lr) + 3)) for lr in LRS]
    assert steep(LRS, losses) == LRS[40]
    shifted = [-math.tanh(2 * (math.log10(lr) + 5)) for lr in LRS]
    assert steep(LRS, shifted) == LRS[20]


def test_valley_is_the_middle_of_the_longest_descent() -> None:
    # Flat at 3, a strict descent over points 20..59, then divergence. The longest decreasing
    # subsequence is one flat point and the 40 descending ones: 41 points ending at 59.
    losses = [3.0] * 20 + [2.9 - 0.05 * i for i in range(40)] + [1.0 + i for i in range(21)]
    assert valley(LRS, losses) == LRS[59 - 41 // 2]
    # A bump of noise inside the descent does not cut it in two: it only drops out of it.
    bumped = list(losses)
    bumped[40] = bumped[39] + 0.01
    assert valley(LRS, bumped) == LRS[59 - 40 // 2]


@pytest.mark.parametrize("suggest", [steep, valley])
def test_non_finite_points_are_dropped(suggest: Any) -> None:
    losses = [-math.tanh(2 * (math.log10(lr) + 3)) for lr in LRS]
    dirty = list(losses)
    dirty[5], dirty[70], dirty[80] = math.nan, -math.inf, -math.inf
    keep = [i for i in range(len(LRS)) if i not in (5, 70, 80)]
    want = suggest([LRS[i] for i in keep], [losses[i] for i in keep])
    assert suggest(LRS, dirty) == want


@pytest.mark.parametrize("suggest", [steep, valley])
def test_too_few_points_warn_and_suggest_nothing(suggest: Any) -> None:
    with pytest.warns(UserWarning, match="fewer than 10"):
        assert suggest(LRS[:12], [1.0] * 9 + [math.nan] * 3) is None
    with pytest.warns(UserWarning, match="0 usable points"):
        assert suggest([], []) is None


# -- the run ---------------------------------------------------------------------------------------


def test_lrs_grow_exponentially_over_repeated_passes(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    with pytest.warns(UserWarning, match="7 usable points"):
        res = learn.lr_find(start_lr=1e-4, end_lr=1e-1, num_it=7, stop_factor=None)
    assert res.lrs == pytest.approx([1e-4 * 1000 ** (i / 6) for i in range(7)], rel=1e-12)
    # Oracle: SGD at those lrs over the training batches, passing over them again as needed.
    model, batches = make_model(), tiny["dls"].train
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = []
    for i, lr in enumerate(res.lrs):
        xb, yb = batches[i % len(batches)]
        opt.param_groups[0]["lr"] = lr
        loss = F.cross_entropy(model(xb), yb)
        want.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert res.losses == want


class ScriptedLossCB(Callback):
    """Replaces the training loss by scripted values (the last one repeats), keeping the graph."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.i = values, 0

    def after_loss(self, learn: Learner) -> None:
        if learn.training:
            value = self.values[min(self.i, len(self.values) - 1)]
            learn.loss = learn.loss * 0 + value
            self.i += 1


def test_stops_when_the_smoothed_loss_diverges(tiny: dict[str, Any]) -> None:
    values = [1.0] * 12 + [2.0] * 10 + [50.0]
    learn = Learner(**tiny, cbs=[ScriptedLossCB(values)])
    res = learn.lr_find(num_it=40)
    sm = smooth(values)
    first = next(i for i, s in enumerate(sm) if s > 4 * min(sm[: i + 1]))
    assert first == 22 and len(res.losses) == 23 and res.losses == values
    assert len(learn.lr_find(num_it=40, stop_factor=None).losses) == 40


def test_stops_at_a_non_finite_loss_and_warns(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny, cbs=[ScriptedLossCB([1.0, 0.9, 0.8, math.nan, 0.5])])
    with pytest.warns(UserWarning, match="3 usable points"):
        res = learn.lr_find(num_it=50)
    assert res.losses[:3] == pytest.approx([1.0, 0.9, 0.8]) and math.isnan(res.losses[3])
    assert len(res.lrs) == 4 and res.suggestion is None
    assert isinstance(res.plot(), Figure)


def test_plot_is_on_a_log_x_axis(tiny: dict[str, Any]) -> None:
    res = Learner(**tiny).lr_find(num_it=30, end_lr=1.0)
    assert res.suggestion is not None
    fig = res.plot()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    curve, mark = ax.get_lines()
    assert list(curve.get_xdata()) == res.lrs and list(curve.get_ydata()) == res.smoothed
    assert list(mark.get_xdata()) == [res.suggestion]


def test_plot_keeps_a_divergence_from_flattening_the_curve() -> None:
    losses = [3.0 - 0.1 * i for i in range(20)] + [10.0, 100.0, 1000.0]
    res = LRFindResult(LRS[:23], losses, None)
    sm = res.smoothed
    bottom, top = res.plot().axes[0].get_ylim()
    span = sm[0] - min(sm)  # the curve from its start down to its minimum fills the axis
    assert (bottom, top) == pytest.approx((min(sm) - 0.1 * span, sm[0] + 0.1 * span))


def test_bad_arguments(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    for kwargs, match in [
        (dict(start_lr=0), "start_lr"),
        (dict(start_lr=1.0, end_lr=0.1), "larger than start_lr"),
        (dict(num_it=1), "num_it"),
        (dict(stop_factor=1.0), "stop_factor"),
        (dict(suggest="valley"), "suggest must be"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            learn.lr_find(**kwargs)
    assert learn.opt is None


def test_no_epoch_ends_during_lr_find(
    tiny: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 40 batches are 20 passes over the tiny training set, in one training phase: callbacks
    # acting at the end of an epoch (saving, stopping, the results table) never act.
    path = tmp_path / "best.pt"
    cbs = [SaveBestCB(path), EarlyStoppingCB("train_loss", patience=0)]
    learn = Learner(**tiny, cbs=cbs)
    assert len(learn.lr_find(num_it=40, stop_factor=None).losses) == 40
    assert not path.exists() and capsys.readouterr().out == ""


# -- leaving no trace ------------------------------------------------------------------------------


class Net(nn.Module):
    """BatchNorm buffers, dropout that consumes the global RNG, and a submodule pinned in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.frozen = nn.BatchNorm1d(16).eval()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(self.body(x)))


class NoiseCB(Callback):
    """Draws from Python's and NumPy's RNGs, and counts batches: state lr_find must put back."""

    def __init__(self) -> None:
        self.count, self.draws = 0, []

    def before_batch(self, learn: Learner) -> None:
        self.count += 1
        self.draws.append((random.random(), float(np.random.rand())))


class RaiseAtCB(Callback):
    """Raises `exc` at the `n`-th training batch it sees (never, if `exc` is None)."""

    def __init__(self, n: int, exc: BaseException | None) -> None:
        self.n, self.exc, self.seen = n, exc, 0

    def after_batch(self, learn: Learner) -> None:
        if learn.training:
            self.seen += 1
            if self.exc is not None and self.seen == self.n:
                raise self.exc


def make_learner(generator: bool = True, kind: str = "tensors", cbs: Any = ()) -> Learner:
    torch.manual_seed(0)
    model = Net()
    x, y = make_data(60)
    g = torch.Generator().manual_seed(1) if generator else None
    if kind == "tensors":
        dls = DataLoaders.from_tensors(x[:48], y[:48], x[48:], y[48:], bs=8, generator=g)
    else:
        from torch.utils.data import TensorDataset

        train, valid = TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])
        dls = DataLoaders.from_datasets(train, valid, bs=8, generator=g)
    return Learner(
        model,
        dls,
        F.cross_entropy,
        lr=0.05,
        opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
        metrics=accuracy,
        cbs=[NoiseCB(), *cbs],
    )


def snapshot(learn: Learner) -> dict[str, Any]:
    """Everything lr_find must leave as it was, as plain data (tensors cloned)."""
    model = learn.model
    gen = learn.dls.train.generator
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "flags": [m.training for m in model.modules()],
        "opt": None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
        "opt_obj": learn.opt,
        "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state()),
        "gen": None if gen is None else gen.get_state(),
        "cbs": [(cb, type(cb).__name__) for cb in learn.cbs],
        "recorder": (
            list(learn.recorder.losses),
            list(learn.recorder.lrs),
            [dict(h) for h in learn.recorder.history],
            list(learn.recorder.epoch_iters),
        ),
        "metrics": repr(learn.metrics.values),
        "noise": (learn.noise.count, list(learn.noise.draws)),
        "learner": {
            k: getattr(learn, k)
            for k in ("lr", "epoch", "n_epochs", "iter", "training", "run_train", "run_valid")
        },
        "dls": (learn.dls, learn.dls.train),
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    elif isinstance(a, (int, float, str, bool, type(None))):
        assert a == b, where
    else:
        assert a is b, where  # objects: the very same one


@pytest.mark.parametrize("exc", [None, ValueError("boom"), KeyboardInterrupt()])
def test_lr_find_leaves_no_trace(exc: BaseException | None) -> None:
    # fit(1) sees 6 batches; the callback raises at lr_find's 5th.
    learn = make_learner(cbs=[RaiseAtCB(6 + 5, exc)])
    learn.fit(1)  # optimizer state (momentum), recorder contents, metric values
    learn.model.body[0].weight.grad = torch.ones(16, 4)  # even a stray gradient
    recorder = learn.recorder
    before = snapshot(learn)
    if exc is None:
        assert len(learn.lr_find(num_it=20).lrs) == 20
    else:
        with pytest.raises(type(exc)):
            learn.lr_find(num_it=20)
    assert learn.raise_at.seen == 6
    assert_same(before, snapshot(learn))
    assert learn.recorder is recorder


def test_lr_find_on_a_fresh_learner_leaves_no_optimizer(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny, cbs=[RaiseAtCB(5, ValueError("boom"))])
    weights = [p.clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match="boom"):
        learn.lr_find(num_it=20)
    assert learn.opt is None
    assert all(torch.equal(a, b) for a, b in zip(weights, learn.model.parameters()))


def test_two_calls_give_the_same_curve() -> None:
    learn = make_learner()
    learn.fit(1)
    a, b = learn.lr_find(num_it=30), learn.lr_find(num_it=30)
    assert a.lrs == b.lrs and a.losses == b.losses and a.suggestion == b.suggestion


@pytest.mark.parametrize(
    "generator, kind",
    [(True, "tensors"), (False, "tensors"), (True, "datasets")],
    ids=["tensors-generator", "tensors-global-rng", "dataloader-generator"],
)
def test_lr_find_then_fit_trains_like_fit(generator: bool, kind: str) -> None:
    results = []
    for find_first in (True, False):
        learn = make_learner(generator, kind)
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)
        if find_first:
            learn.lr_find(num_it=20)
            assert learn.opt is None  # the first fit creates a fresh optimizer
        learn.fit(2)
        results.append((learn.model.state_dict(), learn.recorder.losses, learn.opt))
    (a, losses_a, opt_a), (b, losses_b, opt_b) = results
    assert losses_a == losses_b
    assert_same(a, b)
    assert opt_a is not None and opt_b is not None
    assert_same(opt_a.state_dict(), opt_b.state_dict())


def test_finder_cb_alone(tiny: dict[str, Any]) -> None:
    finder = LRFinderCB(start_lr=1e-3, end_lr=1e-1, num_it=3, stop_factor=None)
    learn = Learner(**tiny)
    learn.fit(5, cbs=[finder])
    assert finder.lrs == pytest.approx([1e-3, 1e-2, 1e-1], rel=1e-12)
    assert learn.recorder.lrs == finder.lrs and len(learn.recorder.history) == 1


def test_restores_a_model_moved_during_the_run() -> None:
    class DoubleCB(Callback):
        """Casts the model to float64 at before_fit, as DeviceCB may move it to a GPU: new
        tensor objects for the buffers, new data for the parameters."""

        def before_fit(self, learn: Learner) -> None:
            learn.model.double()

        def before_batch(self, learn: Learner) -> None:
            learn.batch = (learn.batch[0].double(), learn.batch[1])

    learn = make_learner(cbs=[DoubleCB()])
    model = learn.model
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    before = {k: v.clone() for k, v in tensors.items()}
    learn.lr_find(num_it=12)
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert all(after[k] is tensors[k] for k in tensors)
    assert_same(before, {k: v.clone() for k, v in after.items()})


def test_dls_without_valid(tiny: dict[str, Any]) -> None:
    tiny["dls"] = make_dls(valid=False)
    learn = Learner(**tiny)
    assert len(learn.lr_find(num_it=12, stop_factor=None).lrs) == 12
    assert learn.dls is tiny["dls"]


def test_flags_restored_without_train_eval_cb(tiny: dict[str, Any]) -> None:
    class TrainModeCB(Callback):
        def before_fit(self, learn: Learner) -> None:
            learn.model.train()

    model = tiny["model"].eval()
    Learner(**tiny, default_cbs=False, cbs=[TrainModeCB()]).lr_find(num_it=12)
    assert not any(m.training for m in model.modules())


def test_the_finder_overrides_a_scheduler_in_the_learner(tiny: dict[str, Any]) -> None:
    used: list[float] = []  # outside the callback: lr_find puts the callback's attributes back

    class UsedLrCB(Callback):
        order = 100

        def after_step(self, learn: Learner) -> None:
            assert learn.opt is not None
            used.append(learn.opt.param_groups[0]["lr"])

    cbs = [ParamSchedulerCB({"lr": sched_no(0.5, 0.5)}), UsedLrCB()]
    res = Learner(**tiny, cbs=cbs).lr_find(num_it=12, stop_factor=None)
    assert used == res.lrs and res.lrs[0] == 1e-7


class CountingMetric:
    """A stateful metric of the user's (update/compute/reset): lr_find must leave it alone."""

    def __init__(self) -> None:
        self.n, self.updates = 0, 0

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.n += len(targets)
        self.updates += 1

    def compute(self) -> int:
        return self.n

    def reset(self) -> None:
        self.n = 0


@pytest.mark.parametrize("exc", [None, KeyboardInterrupt()])
def test_lr_find_touches_no_user_object_and_writes_no_file(
    tiny: dict[str, Any], tmp_path: Path, exc: BaseException | None
) -> None:
    metric = CountingMetric()
    ckpt, log = tmp_path / "ckpt.pt", tmp_path / "log.csv"
    # fit(1) sees 2 training batches; the sweep, if `exc`, is interrupted at its 5th.
    cbs = [CheckpointCB(ckpt, every_n_batches=1), CSVLoggerCB(log), RaiseAtCB(2 + 5, exc)]
    learn = Learner(**tiny, metrics={"n": metric}, cbs=cbs)
    learn.fit(1)
    files = {p: p.read_bytes() for p in (ckpt, log)}
    objects = [(cb, dict(vars(cb))) for cb in learn.cbs]
    handler = signal.getsignal(signal.SIGINT)
    if exc is None:
        learn.lr_find(num_it=12)
    else:
        with pytest.raises(KeyboardInterrupt):
            learn.lr_find(num_it=12)
    assert learn.metrics.metrics["n"] is metric and (metric.n, metric.updates) == (8, 1)
    assert [cb for cb, _ in objects] == learn.cbs  # the same objects, in the same order
    for cb, attrs in objects:
        assert vars(cb).keys() == attrs.keys() and all(vars(cb)[k] is v for k, v in attrs.items())
    assert learn.raise_at.seen == 2  # the sweep ran on a copy of it
    assert {p: p.read_bytes() for p in (ckpt, log)} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "log.csv"]
    assert signal.getsignal(signal.SIGINT) is handler


def test_callbacks_can_sit_the_sweep_out(tiny: dict[str, Any]) -> None:
    class WatchCB(Callback):
        in_side_runs = False

        def __init__(self) -> None:
            self.batches = 0

        def after_batch(self, learn: Learner) -> None:
            self.batches += 1

    learn = Learner(**tiny, cbs=[WatchCB(), NoiseCB()])
    learn.lr_find(num_it=12, stop_factor=None)
    assert learn.watch.batches == 0 and learn.noise.count == 0


# -- MNIST: the point is the accuracy the suggested lr reaches -----------------------------------


def test_mnist_lr_find_then_one_cycle() -> None:
    if not mnist_available():
        pytest.skip("MNIST not found: set LEARNER_DATA to a folder holding MNIST/raw/")
    torch.manual_seed(42)
    g = torch.Generator().manual_seed(42)
    dls = DataLoaders.from_tensors(*mnist(flatten=True), bs=64, generator=g)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    learn = Learner(model, dls, F.cross_entropy, metrics=accuracy)
    suggestion = learn.lr_find().suggestion
    assert suggestion is not None and 1e-4 < suggestion < 1e-1
    learn.fit_one_cycle(1, lr_max=suggestion)
    assert learn.recorder.history[-1]["accuracy"] > 0.95
