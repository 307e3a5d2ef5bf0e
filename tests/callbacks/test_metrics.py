"""MetricsCB: batch-size-weighted values equal full-dataset values; no host sync per batch."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

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
    reason = 'needs torcheval and torchmetrics: pip install "learner[test]"'
    MulticlassAccuracy = pytest.importorskip("torcheval.metrics", reason=reason).MulticlassAccuracy
    classification = pytest.importorskip("torchmetrics.classification", reason=reason)
    MulticlassF1Score = classification.MulticlassF1Score

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


# -- metrics that return more than one number --------------------------------------------------


def per_class_accuracy(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy of each of the 3 classes: shape (3,), not a batch mean."""
    hits = preds.argmax(dim=-1) == targets
    return torch.stack([hits[targets == c].float().mean() for c in range(3)])


@pytest.mark.parametrize("valid", [True, False])
@pytest.mark.parametrize(
    "returns, what",
    [
        (per_class_accuracy, r"returned a value of shape \(3,\)"),
        (lambda p, t: [0.5, 0.25], r"returned a value of shape \(2,\)"),
        (lambda p, t: accuracy(p, t).reshape(1), r"returned a value of shape \(1,\)"),
        (lambda p, t: "0.5", "returned str, not a number"),
    ],
    ids=["per-class", "list", "shape-1", "str"],
)
def test_a_function_metric_returning_more_than_a_number_fails_at_the_first_batch(
    valid: bool, returns: Any, what: str
) -> None:
    calls = []

    def per_class(preds: torch.Tensor, targets: torch.Tensor) -> Any:
        calls.append(1)
        return returns(preds, targets)

    x, y = make_data(24, seed=8)
    dls = SimpleNamespace(  # 3 batches in each phase: it fails at the first, not at the end
        train=batches(x[:12], y[:12], 4), valid=batches(x[12:], y[12:], 4) if valid else None
    )
    learn = Learner(make_model(), dls, F.cross_entropy, metrics={"per_class": per_class})
    phase = "validation" if valid else "training"
    with pytest.raises(ValueError, match=f"metric 'per_class' {what}") as info:
        learn.fit(2)
    message = str(info.value)
    assert f"(at {phase} batch 0)" in message
    assert "batch mean" in message and "update/compute/reset" in message  # how to fix it
    assert len(calls) == 1 and learn.epoch == 0


def test_a_function_metric_changing_shape_after_the_first_batch_is_named() -> None:
    # Only the first batch of a phase is checked (a per-batch check costs every batch); a later
    # batch of another shape is named when the phase's values are summed.
    def sometimes(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = accuracy(preds, targets)
        return value if len(targets) == 4 else value.repeat(2)

    x, y = make_data(22, seed=8)
    dls = SimpleNamespace(train=batches(x[:12], y[:12], 4), valid=batches(x[12:], y[12:], 4))
    learn = Learner(make_model(), dls, F.cross_entropy, metrics={"sometimes": sometimes})
    with pytest.raises(ValueError, match=r"'sometimes' .* shape \(2,\) .*\(at batch 2\)"):
        learn.fit(1)


class PerClassHits:
    """A stateful metric whose compute() is a tensor of shape (3,): hits of each class."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.hits = torch.zeros(3)

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        hits = preds.argmax(dim=-1) == targets
        self.hits += torch.stack([hits[targets == c].float().sum() for c in range(3)])

    def compute(self) -> torch.Tensor:
        return self.hits.clone()


def test_stateful_metrics_may_compute_more_than_a_number() -> None:
    x, y = make_data(23 + 16, seed=9)
    dls = SimpleNamespace(train=batches(x[23:], y[23:], 8), valid=batches(x[:23], y[:23], 7))
    learn = Learner(make_model(), dls, F.cross_entropy, cbs=[MetricsCB(hits=PerClassHits())])
    learn.fit(2)
    with torch.no_grad():
        hits = learn.model.eval()(x[:23]).argmax(dim=-1) == y[:23]
    want = [hits[y[:23] == c].float().sum().item() for c in range(3)]
    assert learn.recorder.history[-1]["hits"] == want  # a list, over the whole phase


def test_torcheval_per_class_accuracy_is_a_list() -> None:
    metrics = pytest.importorskip(
        "torcheval.metrics", reason='needs torcheval: pip install "learner[test]"'
    )
    x, y = make_data(23 + 16, seed=9)
    dls = SimpleNamespace(train=batches(x[23:], y[23:], 8), valid=batches(x[:23], y[:23], 7))
    acc = metrics.MulticlassAccuracy(average=None, num_classes=3)
    learn = Learner(make_model(), dls, F.cross_entropy, cbs=[MetricsCB(per_class=acc)])
    learn.fit(1)
    with torch.no_grad():
        preds = learn.model.eval()(x[:23])
    want = [per_class_accuracy(preds, y[:23])[c].item() for c in range(3)]
    assert learn.recorder.history[0]["per_class"] == pytest.approx(want, abs=1e-6)


def test_torchmetrics_state_survives_a_mid_epoch_checkpoint(tmp_path: Any) -> None:
    # torchmetrics keeps its accumulated states out of state_dict(): a checkpoint written
    # mid-epoch must still hold them, so that the resumed epoch's value is the uninterrupted one.
    classification = pytest.importorskip("torchmetrics.classification", reason="needs torchmetrics")
    from conftest import make_dls

    from learner import CancelFitException, CheckpointCB

    def learner() -> Learner:
        acc = classification.MulticlassAccuracy(num_classes=3, average="micro")
        return Learner(make_model(), make_dls(n_train=24), F.cross_entropy, lr=0.1,
                       metrics={"acc": acc, "mean_acc": accuracy})  # fmt: skip

    class StopAfterOneBatchCB(Callback):
        order = 70  # after CheckpointCB wrote the batch

        def cleanup_batch(self, learn: Learner) -> None:
            if learn.training and learn.iter == 1:
                raise CancelFitException()

    whole = learner()
    whole.fit(1, valid=False)  # the metrics are computed on the training phase
    path = tmp_path / "ckpt.pt"
    first = learner()
    first.fit(1, valid=False, cbs=[CheckpointCB(path, every_n_batches=1), StopAfterOneBatchCB()])
    resumed = learner()
    resumed.fit(1, valid=False, resume_from=path)
    want, got = whole.recorder.history[-1], resumed.recorder.history[-1]
    assert got["acc"] == pytest.approx(want["acc"], abs=1e-7)
    assert got["acc"] == pytest.approx(got["mean_acc"], abs=1e-6)  # the same accuracy, two ways
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-7)
