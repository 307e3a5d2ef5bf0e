"""get_preds and predict(x): a hand-written inference loop as the oracle, and no trace left."""

from __future__ import annotations

import inspect
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_dls
from test_core import TraceCB
from torch import nn

from learner import DataLoaders, Learner


def _learner(tiny: dict[str, Any]) -> Learner:
    torch.manual_seed(0)
    tiny["model"] = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    learn = Learner(**tiny)
    learn.fit(1)
    return learn


def test_get_preds_equals_a_hand_written_loop_and_leaves_no_trace(tiny: dict[str, Any]) -> None:
    learn = _learner(tiny)
    model = learn.model
    model.train()
    model[2].eval()  # a user's flag, to be kept
    trace = TraceCB()
    learn.add_cb(trace)
    recorded = (list(learn.recorder.losses), list(learn.recorder.lrs), list(learn.recorder.history))
    batch, preds_before = learn.batch, learn.preds

    preds, targets, losses = learn.get_preds(with_loss=True)

    model.eval()
    with torch.no_grad():
        want = [(model(x), y) for x, y in learn.dls.valid]
    assert torch.equal(preds, torch.cat([p for p, _ in want]))
    assert torch.equal(targets, torch.cat([y for _, y in want]))
    want_losses = torch.cat([F.cross_entropy(p, y, reduction="none") for p, y in want])
    assert torch.equal(losses, want_losses)
    assert preds.device.type == "cpu" and not preds.requires_grad
    assert trace.trace == []  # no event fired
    assert (learn.recorder.losses, learn.recorder.lrs, learn.recorder.history) == recorded
    assert learn.batch is batch and learn.preds is preds_before


def test_get_preds_restores_every_training_flag(tiny: dict[str, Any]) -> None:
    learn = _learner(tiny)
    learn.model.train()
    learn.model[2].eval()
    flags = [m.training for m in learn.model.modules()]
    learn.get_preds()
    assert [m.training for m in learn.model.modules()] == flags


def test_get_preds_options(tiny: dict[str, Any]) -> None:
    learn = _learner(tiny)
    train = learn.dls.train
    preds = learn.get_preds(train, with_targets=False)
    assert isinstance(preds, torch.Tensor) and preds.shape == (16, 3)
    learn.loss_func = nn.CrossEntropyLoss()
    _, per_item = learn.get_preds(with_targets=False, with_loss=True)
    assert per_item.shape == (8,) and learn.loss_func.reduction == "mean"
    learn.loss_func = lambda p, t: F.cross_entropy(p, t)
    with pytest.raises(TypeError, match="reduction='none'"):
        learn.get_preds(with_loss=True)
    learn.dls = make_dls(valid=False)
    with pytest.raises(ValueError, match="no validation loader"):
        learn.get_preds()


def test_infer_one_item_or_one_batch(tiny: dict[str, Any]) -> None:
    learn = _learner(tiny)
    x = torch.randn(5, 4)
    learn.model.eval()
    with torch.no_grad():
        want, want_item = learn.model(x), learn.model(x[1:2])[0]
    learn.model.train()
    batch = learn.infer(x)
    item = learn.infer(x[1])
    assert torch.equal(batch, want)
    assert item.shape == (3,) and torch.equal(item, want_item)
    assert learn.model.training and learn.model[2].training
    with pytest.raises(ValueError, match=r"one item \(1 dims\) or a batch \(2 dims\)"):
        learn.infer(torch.randn(2, 2, 4))
    with pytest.raises(TypeError, match="takes a tensor"):
        learn.infer([1.0, 2.0])


def test_infer_before_training_peeks_a_batch_without_touching_random_states() -> None:
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    gen = torch.Generator().manual_seed(0)
    dls = DataLoaders.from_tensors(x, y, bs=4, generator=gen)
    learn = Learner(nn.Linear(4, 3), dls, F.cross_entropy)
    states = torch.get_rng_state(), gen.get_state(), random.getstate()
    assert learn.infer(x[0]).shape == (3,)
    assert torch.equal(torch.get_rng_state(), states[0]) and torch.equal(gen.get_state(), states[1])
    assert random.getstate() == states[2]
    assert learn.batch is None and learn.opt is None


def test_overriding_the_training_step_changes_inference_and_cannot_break_it(
    tiny: dict[str, Any],
) -> None:
    class DoubledLearner(Learner):
        """The course's idiom: a subclass overrides the training step `predict(self)`."""

        def predict(self) -> None:
            self.preds = 2 * self.model(self.batch[0])

    learn = DoubledLearner(**tiny)
    learn.fit(1)
    x = torch.randn(5, 4)
    learn.model.eval()
    with torch.no_grad():
        want = 2 * learn.model(x)
    assert torch.equal(learn.infer(x), want)
    assert torch.equal(learn.infer(x[0]), want[0])
    assert torch.equal(learn.get_preds(dl=[(x, torch.zeros(5, dtype=torch.long))])[0], want)
    # The training step takes no input: it is not also the inference entry point.
    assert list(inspect.signature(Learner.predict).parameters) == ["self"]
