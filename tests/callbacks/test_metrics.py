"""MetricsCB: batch-size-weighted values equal full-dataset values; no host sync per batch."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, count_host_syncs, make_data, make_model

from learner import Callback, CancelBatchException, Learner, MetricsCB, accuracy


def _full(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        preds = model.eval()(x)
    return F.cross_entropy(preds, y).item(), accuracy(preds, y).item()


@pytest.mark.parametrize("bs", [1, 3, 7])
def test_valid_values_equal_full_dataset(bs: int) -> None:
    x, y = make_data(23 + 40, seed=2)
    dls = SimpleNamespace(train=batches(x[23:], y[23:], 8), valid=batches(x[:23], y[:23], bs))
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1, metrics=accuracy)
    learn.fit(2)
    loss, acc = _full(learn.model, x[:23], y[:23])
    h = learn.recorder.history[-1]
    assert h["valid_loss"] == pytest.approx(loss, abs=1e-6)
    assert h["accuracy"] == pytest.approx(acc, abs=1e-6)


@pytest.mark.parametrize("bs", [1, 3, 7])
def test_train_values_equal_full_dataset_without_validation(bs: int) -> None:
    # lr so small the weights do not move: every training batch sees the same model, so the
    # epoch's weighted train loss must equal the full-dataset loss.
    x, y = make_data(23, seed=4)
    dls = SimpleNamespace(train=batches(x, y, bs), valid=None)
    learn = Learner(
        make_model(), dls, F.cross_entropy, lr=1e-30, opt_func=torch.optim.SGD, metrics=accuracy
    )
    learn.fit(1)
    loss, acc = _full(learn.model, x, y)
    assert learn.recorder.history[0] == {
        "epoch": 0,
        "train_loss": pytest.approx(loss, abs=1e-6),
        "valid_loss": None,
        "accuracy": pytest.approx(acc, abs=1e-6),
    }


def test_stateful_metric_objects_give_their_full_dataset_answers() -> None:
    from torcheval.metrics import MulticlassAccuracy
    from torchmetrics.classification import MulticlassF1Score

    x, y = make_data(23 + 40, seed=5)
    dls = SimpleNamespace(train=batches(x[23:], y[23:], 8), valid=batches(x[:23], y[:23], 7))
    cbs = [
        MetricsCB(acc=MulticlassAccuracy(), f1=MulticlassF1Score(num_classes=3, average="macro"))
    ]
    learn = Learner(make_model(), dls, F.cross_entropy, cbs=cbs)
    learn.fit(1)
    with torch.no_grad():
        preds = learn.model(x[:23])
    want_acc = MulticlassAccuracy()
    want_acc.update(preds, y[:23])
    want_f1 = MulticlassF1Score(num_classes=3, average="macro")(preds, y[:23])
    h = learn.recorder.history[0]
    assert h["acc"] == pytest.approx(want_acc.compute().item(), abs=1e-6)
    assert h["f1"] == pytest.approx(want_f1.item(), abs=1e-6)


def test_skipped_batches_are_not_counted() -> None:
    x, y = make_data(30, seed=6)
    dls = SimpleNamespace(train=batches(x[:16], y[:16], 8), valid=batches(x[16:], y[16:], 5))

    class SkipFirstValidBatch(Callback):
        def after_loss(self, learn: Learner) -> None:
            if not learn.training and learn.iter == 0:
                raise CancelBatchException()

    learn = Learner(
        make_model(), dls, F.cross_entropy, metrics=accuracy, cbs=[SkipFirstValidBatch()]
    )
    learn.fit(1)
    loss, acc = _full(learn.model, x[21:], y[21:])  # the first validation batch (5 items) skipped
    assert learn.recorder.history[0]["valid_loss"] == pytest.approx(loss, abs=1e-6)
    assert learn.recorder.history[0]["accuracy"] == pytest.approx(acc, abs=1e-6)


def test_metric_names_and_bad_metrics() -> None:
    def top1(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return accuracy(preds, targets)

    assert list(MetricsCB(accuracy, functools.partial(top1), mine=top1).metrics) == [
        "accuracy",
        "top1",
        "mine",
    ]
    with pytest.raises(TypeError, match="update/compute/reset"):
        MetricsCB(bad=3)
    with pytest.raises(ValueError, match="'loss' is taken"):
        MetricsCB(loss=accuracy)
    with pytest.raises(ValueError, match="'accuracy' is taken"):
        MetricsCB(accuracy, accuracy)


def _count_syncs(monkeypatch: pytest.MonkeyPatch, n_batches: int) -> int:
    """Host reads of tensor values during one fit with `n_batches` per phase."""
    x, y = make_data(n_batches * 4, seed=7)
    dls = SimpleNamespace(train=batches(x, y, 4), valid=batches(x, y, 4))
    learn = Learner(make_model(), dls, F.cross_entropy, metrics=accuracy, opt_func=torch.optim.SGD)
    return count_host_syncs(monkeypatch, lambda: learn.fit(2))


def test_no_host_sync_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    few, many = _count_syncs(monkeypatch, 3), _count_syncs(monkeypatch, 30)
    assert few == many
