"""RecorderCB: per-batch losses and lrs, per-epoch history, plots."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from matplotlib.figure import Figure

from learner import Learner, accuracy
from learner.callbacks.recorder import smooth


def test_records_every_training_batch(tiny: dict[str, Any]) -> None:
    model = tiny["model"]
    ref = make_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    want = []
    for xb, yb in tiny["dls"].train:
        loss = F.cross_entropy(ref(xb), yb)
        want.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    learn = Learner(**tiny, metrics=accuracy)
    learn.fit(1)
    assert learn.model is model
    assert learn.recorder.losses == pytest.approx(want, abs=0)
    assert learn.recorder.lrs == [0.1, 0.1]
    assert learn.recorder.history[0]["train_loss"] == pytest.approx(sum(want) / 2, abs=1e-6)


def test_history_accumulates_across_fits_and_resets(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny, metrics=accuracy)
    learn.fit(2)
    learn.fit(1, lr=0.05)
    rec = learn.recorder
    assert [h["epoch"] for h in rec.history] == [0, 1, 2]
    assert set(rec.history[0]) == {"epoch", "train_loss", "valid_loss", "accuracy"}
    assert len(rec.losses) == 6 and rec.lrs == [0.1] * 4 + [0.05] * 2
    assert rec.epoch_iters == [2, 4, 6]
    rec.reset()
    assert rec.losses == [] and rec.history == [] and rec.lrs == []


def test_smoothing_is_bias_corrected() -> None:
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)
    assert smooth([1.0, 3.0], beta=0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])


def test_plots_return_figures(tiny: dict[str, Any], tmp_path: Any) -> None:
    learn = Learner(**tiny, metrics=accuracy)
    learn.fit(3)
    rec = learn.recorder
    fig = rec.plot_loss(skip_start=0)
    assert isinstance(fig, Figure)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train", "valid"]
    assert len(fig.axes[0].get_lines()[1].get_xdata()) == 3  # one validation point per epoch
    assert len(rec.plot_loss(with_valid=False).axes[0].get_lines()) == 1
    assert list(rec.plot_lr().axes[0].get_lines()[0].get_ydata()) == [0.1] * 6
    metrics_fig = rec.plot_metrics()
    assert [ax.get_title() for ax in metrics_fig.axes] == ["loss", "accuracy"]
    for name, f in [("loss", fig), ("metrics", metrics_fig)]:
        f.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
