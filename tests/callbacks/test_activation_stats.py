"""ActivationStatsCB: hand-computed statistics, hooks always removed, no host sync per batch."""

from __future__ import annotations

import functools
import math
import statistics
from types import SimpleNamespace
from typing import Any

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from conftest import GeneralRelu, batches, count_host_syncs, make_data, make_model
from matplotlib.figure import Figure
from torch import nn

from learner import ActivationStatsCB, Callback, CancelBatchException, Learner
from learner.callbacks.hooks_cb import HooksCB
from learner.hooks import get_hist, get_min

# A frozen first layer with known weights, so every activation can be worked out by hand.
W = [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]
B = [0.0, 0.0, -5.0]
X0 = [[1.0, 2.0], [12.0, -1.0]]  # layer 0 gives [1, 2, -6], [12, -1, 8]: 12 is beyond the range
X1 = [[0.0, 0.0], [3.0, 3.0]]  # [0, 0, -5], [3, 3, -5]
XV = [[2.0, 2.0]]  # [2, 2, -5]


def _linear(x: list[float]) -> list[float]:
    return [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(W, B)]


def _acts(xs: list[list[float]], relu: bool) -> list[float]:
    out = [a for x in xs for a in _linear(x)]
    return [max(a, 0.0) for a in out] if relu else out


def _hist(values: list[float], bins: int = 40, high: float = 10.0) -> list[float]:
    counts = [0.0] * bins
    for v in values:
        counts[min(int(min(abs(v), high) / (high / bins)), bins - 1)] += 1
    return counts


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W))
        model[0].bias.copy_(torch.tensor(B))
    model[0].requires_grad_(False)
    return model


def _learn(**kw: Any) -> Learner:
    t = torch.tensor
    dls = SimpleNamespace(train=[(t(X0), t([0, 1])), (t(X1), t([1, 0]))], valid=[(t(XV), t([1]))])
    return Learner(_model(), dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD, **kw)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def _check(stats: ActivationStatsCB, layer: int, xs: list[list[list[float]]]) -> None:
    """Layer `layer` (0: the Linear, 1: its ReLU) recorded exactly the batches `xs`."""
    acts = [_acts(x, relu=layer == 1) for x in xs]
    assert stats.means[layer].tolist() == pytest.approx([statistics.mean(a) for a in acts])
    assert stats.stds[layer].tolist() == pytest.approx([statistics.stdev(a) for a in acts])
    assert stats.hists[layer].tolist() == [_hist(a) for a in acts]


def test_statistics_equal_hand_computed_ones() -> None:
    stats = ActivationStatsCB(["0", "1"])
    learn = _learn(cbs=[stats])
    learn.fit(2)
    assert stats.names == ["0 (Linear)", "1 (ReLU)"]
    for layer in (0, 1):
        _check(stats, layer, [X0, X1, X0, X1])  # training batches only
    assert _no_hooks(learn.model)


def test_histogram_rows_count_every_activation() -> None:
    stats = ActivationStatsCB(nn.ReLU, bins=7, hist_range=(0.5, 2.0))  # most values out of range
    learn = Learner(make_model(), _dls(n_batches=3, bs=5), F.cross_entropy, cbs=[stats])
    learn.fit(1)
    assert stats.hists[0].shape == (3, 7)
    assert stats.hists[0].sum(1).tolist() == [5 * 8] * 3  # batch size x ReLU width


def test_validation_batches_on_request() -> None:
    stats = ActivationStatsCB(["0", "1"], with_valid=True)
    _learn(cbs=[stats]).fit(1)
    for layer in (0, 1):
        _check(stats, layer, [X0, X1, XV])


def test_every_counts_batches_across_epochs() -> None:
    stats = ActivationStatsCB("0", every=3)
    _learn(cbs=[stats]).fit(2)  # training batches 0, 1 | 2, 3: records 0 and 3
    _check(stats, 0, [X0, X1])


def test_a_cancelled_batch_records_nothing() -> None:
    class SkipFirst(Callback):
        def after_loss(self, learn: Learner) -> None:
            if learn.training and learn.epoch == 0 and learn.iter == 0:
                raise CancelBatchException()

    stats = ActivationStatsCB("0")
    _learn(cbs=[stats, SkipFirst()]).fit(2)
    _check(stats, 0, [X1, X0, X1])


def test_forward_passes_between_batches_are_not_recorded() -> None:
    class LooksAtTheModel(Callback):
        def after_train(self, learn: Learner) -> None:
            learn.model(torch.tensor(XV))

    stats = ActivationStatsCB("0")
    _learn(cbs=[stats, LooksAtTheModel()]).fit(2, valid=False)
    _check(stats, 0, [X0, X1, X0, X1])


def test_records_leave_the_device_at_each_epoch_end() -> None:
    class Spy(Callback):
        order = 10

        def __init__(self) -> None:
            self.on_device: list[int] = []

        def before_epoch(self, learn: Learner) -> None:
            self.on_device.append(sum(len(rows) for rows in stats._device))

    stats, spy = ActivationStatsCB("0"), Spy()
    _learn(cbs=[stats, spy]).fit(3)  # so device memory does not grow over a long run
    assert spy.on_device == [0, 0, 0]


def test_default_layers_are_the_leaves_with_parameters() -> None:
    stats = ActivationStatsCB()
    _learn(cbs=[stats]).fit(1)
    assert stats.names == ["0 (Linear)", "2 (Linear)"]
    _check(stats, 0, [X0, X1])


def test_records_accumulate_across_fits_and_start_over_for_other_layers() -> None:
    stats = ActivationStatsCB("0")
    learn = _learn(cbs=[stats])
    learn.fit(1)
    learn.fit(1)
    _check(stats, 0, [X0, X1, X0, X1])
    learn.model = _model()  # other modules: a new story
    learn.fit(1)
    _check(stats, 0, [X0, X1])
    stats.reset()
    with pytest.raises(RuntimeError, match="recorded nothing yet"):
        stats.means  # noqa: B018


def test_a_layer_returning_a_tuple_is_recorded_by_its_first_output() -> None:
    class WithState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
            return self.lin(x), "state"

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = WithState(), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x)[0])

    model = Model()
    model.body.lin.load_state_dict(_model()[0].state_dict())
    model.body.lin.requires_grad_(False)
    stats = ActivationStatsCB(WithState)
    learn = _learn(cbs=[stats])
    learn.model = model
    learn.fit(1)
    _check(stats, 0, [X0, X1])

    class Named(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": x}

    learn.model = nn.Sequential(Named(), nn.Linear(2, 2))  # the hook fails before the Linear
    stats = ActivationStatsCB(Named)
    with pytest.raises(TypeError, match="can only watch layers that output a tensor"):
        learn.fit(1, cbs=[stats])


class RaiseAt(Callback):
    def __init__(self, event: str, when: Any = lambda learn: True) -> None:
        self.event, self.when = event, when
        setattr(self, event, self._raise)

    def _raise(self, learn: Learner) -> None:
        if self.when(learn):
            raise ValueError("boom")


def test_hooks_are_removed_after_an_exception_mid_epoch() -> None:
    stats = ActivationStatsCB(["0", "1", "2"])
    learn = _learn(cbs=[stats])
    with pytest.raises(ValueError, match="boom"):
        learn.fit(2, cbs=[RaiseAt("before_batch", lambda learn: learn.iter == 1)])
    assert _no_hooks(learn.model)
    _check(stats, 0, [X0])  # what was recorded before the error is kept
    learn.model(torch.tensor(X1))
    _check(stats, 0, [X0])  # and nothing is recorded outside fit


def test_cleanup_without_before_fit() -> None:
    early = RaiseAt("before_fit")
    early.order = -100
    learn = _learn(cbs=[ActivationStatsCB()])
    with pytest.raises(ValueError, match="boom"):  # not an error from ActivationStatsCB
        learn.fit(1, cbs=[early])


def _dls(n_batches: int, bs: int = 4) -> Any:
    x, y = make_data(n_batches * bs, seed=7)
    return SimpleNamespace(train=batches(x, y, bs), valid=batches(x, y, bs))


def test_no_host_sync_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def syncs(n_batches: int) -> int:
        stats = ActivationStatsCB(nn.ReLU, with_valid=True)
        learn = Learner(make_model(), _dls(n_batches), F.cross_entropy, opt_func=torch.optim.SGD)
        return count_host_syncs(monkeypatch, lambda: learn.fit(2, cbs=[stats]))

    assert syncs(3) == syncs(30)


def test_plots_return_figures_of_the_records(tmp_path: Any) -> None:
    stats = ActivationStatsCB(["0", "1"])
    _learn(cbs=[stats]).fit(3)
    fig = stats.plot_stats()
    assert isinstance(fig, Figure) and [ax.get_title() for ax in fig.axes] == [
        "means",
        "standard deviations",
    ]
    for ax, values in zip(fig.axes, (stats.means, stats.stds)):
        assert [line.get_label() for line in ax.get_lines()] == stats.names
        assert [list(line.get_ydata()) for line in ax.get_lines()] == [v.tolist() for v in values]

    fig = stats.color_dim()
    assert isinstance(fig, Figure) and [ax.get_title() for ax in fig.axes] == stats.names
    for ax, hist in zip(fig.axes, stats.hists):
        image = torch.as_tensor(ax.images[0].get_array())
        assert image.shape == (40, 6) and torch.allclose(image, hist.t().log1p())

    fig = stats.dead_chart()
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    for ax, hist in zip(fig.axes, stats.hists):
        dead = [h[0] / sum(h) for h in hist.tolist()]
        assert list(ax.get_lines()[0].get_ydata()) == pytest.approx(dead)
    # The ReLU zeroes two of the six activations of X0 and four of X1.
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == pytest.approx([2 / 6, 4 / 6] * 3)
    fig.savefig(tmp_path / "dead.png")
    assert (tmp_path / "dead.png").stat().st_size > 1000


def test_many_layers_plot_in_a_grid() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)], nn.Linear(4, 3))
    stats = ActivationStatsCB(nn.Linear)
    Learner(model, _dls(2), F.cross_entropy, cbs=[stats]).fit(1)
    for fig in (stats.color_dim(ncols=2), stats.dead_chart(ncols=2)):
        assert len(fig.axes) == 5
        assert [ax.get_subplotspec().rowspan.start for ax in fig.axes] == [0, 0, 1, 1, 2]


def test_bad_arguments() -> None:
    for kw in [{"every": 0}, {"every": 1.5}, {"bins": True}, {"bins": 0}]:
        with pytest.raises(ValueError, match="must be an int >= 1"):
            ActivationStatsCB(**kw)
    for hist_range in [(1.0, 1.0), (2.0, 1.0), (0.0, math.inf)]:
        with pytest.raises(ValueError, match="hist_range"):
            ActivationStatsCB(hist_range=hist_range)
    with pytest.raises(ValueError, match="no submodule named 'body'"):
        _learn(cbs=[ActivationStatsCB("body")]).fit(1)

    class Bare(nn.Module):  # its only parameter sits on a module that has children
        def __init__(self) -> None:
            super().__init__()
            self.w, self.act = nn.Parameter(torch.ones(2, 2)), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x @ self.w)

    learn = _learn(cbs=[ActivationStatsCB()])
    learn.model = Bare()
    with pytest.raises(ValueError, match=r"pass modules=, e\.g\. ActivationStatsCB\(nn\.ReLU\)"):
        learn.fit(1)
    assert _no_hooks(learn.model)


# -- the course's way: a predicate, and hooks with `stats` for get_hist / get_min ----------------


def test_the_course_way_with_a_predicate() -> None:
    stats = ActivationStatsCB(lambda m: isinstance(m, nn.ReLU))
    assert isinstance(stats, HooksCB) and len(stats) == 0 and list(stats) == []
    learn = _learn(cbs=[stats])
    learn.fit(2)
    assert stats.names == ["1 (ReLU)"] and len(stats) == 1
    (h,) = stats
    assert h.module is learn.model[1]
    acts = [_acts(x, relu=True) for x in (X0, X1, X0, X1)]
    # h.stats in the course's layout: lists with an entry per recorded batch.
    means, stds, hists = h.stats
    assert [m.shape for m in means] == [()] * 4 and [t.shape for t in hists] == [(40,)] * 4
    assert [m.item() for m in means] == pytest.approx([statistics.mean(a) for a in acts])
    assert [s.item() for s in stds] == pytest.approx([statistics.stdev(a) for a in acts])
    # get_hist: (bins, batches) of log(1 + count); get_min: the fraction in the lowest bin.
    hand = torch.tensor([_hist(a) for a in acts])
    assert get_hist(h).shape == (40, 4) and torch.allclose(get_hist(h), hand.t().log1p())
    # ReLU zeros: the lowest bin. X0's 12 counts in the last bin (the course's histc drops it).
    dead = [sum(v == 0.0 for v in a) / len(a) for a in acts]
    assert get_min(h).tolist() == pytest.approx(dead) == [2 / 6, 4 / 6] * 2
    # The course's plot_stats, by hand.
    fig, axs = plt.subplots(1, 2)
    for h in stats:
        for i in 0, 1:
            axs[i].plot(h.stats[i])
    assert list(axs[0].get_lines()[0].get_ydata()) == pytest.approx(stats.means[0].tolist())
    plt.close(fig)
    assert _no_hooks(learn.model)


def test_course_hooks_follow_the_records() -> None:
    stats = ActivationStatsCB("0")
    learn = _learn(cbs=[stats])
    learn.fit(1)
    learn.fit(1)  # records accumulate over fits on the same layers, and so do the hooks' stats
    assert [len(s) for s in next(iter(stats)).stats] == [4, 4, 4]
    stats.reset()
    assert len(stats) == 0 and list(stats) == []


def test_general_relus_chosen_by_a_predicate() -> None:
    torch.manual_seed(0)
    act = functools.partial(GeneralRelu, leak=0.1, sub=0.4)
    model = nn.Sequential(nn.Linear(4, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3))
    stats = ActivationStatsCB(lambda m: isinstance(m, GeneralRelu), with_valid=True)
    Learner(model, _dls(n_batches=3), F.cross_entropy, cbs=[stats]).fit(1)
    assert stats.names == ["1 (GeneralRelu)", "3 (GeneralRelu)"]
    assert [h.module for h in stats] == [model[1], model[3]]
    for h in stats:
        assert get_hist(h).shape == (40, 6) and get_min(h).shape == (6,)  # 3 train + 3 valid
        assert min(m.item() for m in h.stats[0]) > -0.44  # leaky_relu(x, 0.1) - 0.4 > -0.44
    for fig in (stats.color_dim(), stats.dead_chart(), stats.plot_stats()):
        assert isinstance(fig, Figure)


def test_no_host_sync_per_batch_with_a_predicate(monkeypatch: pytest.MonkeyPatch) -> None:
    def syncs(n_batches: int) -> int:
        stats = ActivationStatsCB(lambda m: isinstance(m, nn.ReLU), with_valid=True)
        learn = Learner(make_model(), _dls(n_batches), F.cross_entropy, opt_func=torch.optim.SGD)
        return count_host_syncs(monkeypatch, lambda: learn.fit(2, cbs=[stats]))

    assert syncs(3) == syncs(30)
