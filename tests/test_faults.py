"""Bad input and faults in the loop: the original error propagates, bad batches and loaders are
refused before training, callbacks are checked and added in one change."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, make_data, make_model

from learner import Callback, DeviceCB, Learner, RecorderCB
from learner.core import BaseLearner


class Raising(Callback):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class AfterLoss(Raising):
    def after_loss(self, learn: Any) -> None:
        raise self.exc


class CleanupBatch(Raising):
    def cleanup_batch(self, learn: Any) -> None:
        raise self.exc


class CleanupFit(Raising):
    def cleanup_fit(self, learn: Any) -> None:
        raise self.exc


class OtherCleanupFit(Raising):
    def cleanup_fit(self, learn: Any) -> None:
        raise self.exc


# -- 1. a failing cleanup does not replace the error in flight -----------------------------------


@pytest.mark.parametrize("original", [ValueError("the original"), KeyboardInterrupt()])
def test_the_original_error_propagates_past_a_failing_cleanup(
    tiny: dict[str, Any], original: BaseException
) -> None:
    cbs = [
        AfterLoss(original),
        CleanupBatch(RuntimeError("cleanup broke")),
        CleanupFit(OSError("x")),
    ]
    learn = Learner(**tiny, cbs=cbs)
    with pytest.raises(type(original)) as info:
        learn.fit(1)
    assert info.value is original  # Ctrl-C stays Ctrl-C
    notes = "\n".join(getattr(info.value, "__notes__", ()))
    assert "cleanup_batch failed too: RuntimeError: cleanup broke" in notes
    assert "cleanup_fit failed too: OSError: x" in notes


def test_without_an_error_in_flight_the_first_failing_cleanup_carries_the_others(
    tiny: dict[str, Any],
) -> None:
    cbs = [CleanupFit(ValueError("first")), OtherCleanupFit(OSError("second"))]
    learn = Learner(**tiny, cbs=cbs)
    with pytest.raises(ValueError, match="first") as info:
        learn.fit(1)
    assert any("Another cleanup_fit failed too: OSError: second" in n for n in info.value.__notes__)


# -- 8. batches the default steps cannot take -----------------------------------------------------


def test_batches_the_format_cannot_serve_fail_with_the_fix_and_change_no_weight() -> None:
    x, y = make_data(16)
    model = make_model()
    before = [p.clone() for p in model.parameters()]
    # A bare tensor is the inputs alone: a loss that needs targets says there are none.
    bare = SimpleNamespace(train=[x[:8], x[8:]], valid=None)
    with pytest.raises(TypeError) as info:
        Learner(model, bare, F.cross_entropy, lr=0.1).fit(1)
    assert "targets none (the batch holds the inputs only)" in str(info.value.__notes__)
    # A dict with other keys than the model takes: the note names the keys and the fix.
    dicts = SimpleNamespace(train=[{"image": x[:8], "label": y[:8]}], valid=None)
    with pytest.raises(TypeError) as info:
        Learner(model, dicts, F.cross_entropy, lr=0.1).fit(1)
    note = " ".join(info.value.__notes__)
    assert "['image', 'label']" in note and "BatchFormat(inputs=" in note, note
    # What is no batch at all is refused before the model sees it, naming the loader.
    for bad in ("a string", 3, None, ()):
        loaders = SimpleNamespace(train=[bad], valid=None)
        with pytest.raises(ValueError, match=r"dls\.train yielded a batch that is .*BatchFormat"):
            Learner(model, loaders, F.cross_entropy, lr=0.1).fit(1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    valid = SimpleNamespace(train=batches(x, y, 8), valid=["no batch"])
    with pytest.raises(ValueError, match=r"dls\.valid yielded a batch"):
        Learner(model, valid, F.cross_entropy, lr=0.1).fit(1)


def test_other_batches_train_with_steps_that_take_them() -> None:
    x, y = make_data(16)
    dicts = SimpleNamespace(train=[{"image": x[i : i + 8], "label": y[i : i + 8]} for i in (0, 8)])
    dicts.valid = None

    class DictLearner(Learner):
        def predict(self) -> None:
            self.preds = self.model(self.batch["image"])

        def get_loss(self) -> None:
            self.loss = self.loss_func(self.preds, self.batch["label"])

    learn = DictLearner(make_model(), dicts, F.cross_entropy, lr=0.1, default_cbs=False)
    learn.fit(2)

    # An autoencoder-like loss needs only x: a one-item batch (x,) is fine for predict.
    class XOnly(Learner):
        def get_loss(self) -> None:
            self.loss = self.preds.pow(2).mean()

    xonly = SimpleNamespace(train=[(x[:8],), (x[8:],)], valid=None)
    XOnly(make_model(), xonly, F.cross_entropy, lr=0.1, default_cbs=False).fit(1)


# -- 9. loaders that cannot serve a fit ----------------------------------------------------------


def test_an_empty_valid_loader_and_one_shot_iterators_are_refused_at_the_start() -> None:
    x, y = make_data(16)
    model = make_model()
    before = [p.clone() for p in model.parameters()]
    empty_valid = SimpleNamespace(train=batches(x, y, 8), valid=[])
    with pytest.raises(ValueError, match=r"dls\.valid is empty"):
        Learner(model, empty_valid, F.cross_entropy).fit(1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing ran
    Learner(model, empty_valid, F.cross_entropy).fit(1, valid=False)  # not used: fine
    for name in ("train", "valid"):
        loaders = {"train": batches(x, y, 8), "valid": batches(x, y, 8)}
        loaders[name] = (b for b in loaders[name])  # a generator: one pass only
        with pytest.raises(ValueError, match=rf"dls\.{name} is a one-shot iterator \(generator\)"):
            Learner(make_model(), SimpleNamespace(**loaders), F.cross_entropy).fit(2)


# -- 13. two callbacks of one kind in one list ----------------------------------------------------


def test_two_callbacks_of_one_kind_in_one_list_are_an_error(tiny: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="two of one kind, RecorderCB and RecorderCB"):
        Learner(**tiny, cbs=[RecorderCB(), RecorderCB()])
    learn = Learner(**tiny)
    with pytest.raises(ValueError, match="two of one kind, DeviceCB and DeviceCB"):
        learn.fit(1, cbs=[DeviceCB("cpu"), DeviceCB("cpu")])
    assert learn.opt is None and sum(isinstance(c, DeviceCB) for c in learn.cbs) == 1
    mine = RecorderCB()
    learn = Learner(**tiny, cbs=mine)  # replacing a default callback stays as it was
    assert learn.recorder is mine and sum(isinstance(c, RecorderCB) for c in learn.cbs) == 1


# -- 14. one build of the dispatch table per change set -------------------------------------------


class EveryEventCB(Callback):
    def before_batch(self, learn: Any) -> None: ...
    def after_batch(self, learn: Any) -> None: ...
    def after_epoch(self, learn: Any) -> None: ...


def test_the_dispatch_table_is_built_once_per_change_set(
    tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []
    real = BaseLearner.build_handlers

    def counting(self: BaseLearner) -> Any:
        builds.append(len(self.cbs))
        return real(self)

    monkeypatch.setattr(BaseLearner, "build_handlers", counting)
    cbs = [type(f"CB{i}", (EveryEventCB,), {})() for i in range(300)]
    learn = Learner(**tiny, cbs=cbs)
    for i in range(300):
        learn.add_cb(type(f"More{i}", (EveryEventCB,), {})())
    assert builds == []  # 600 callbacks added, nothing built yet
    learn.fit(1)
    assert builds == [5 + 600]  # built once, at the first event
    builds.clear()
    learn.fit(1, cbs=[type(f"Fit{i}", (EveryEventCB,), {})() for i in range(100)])
    assert builds == [5 + 700]  # once for the fit's callbacks
    assert len(learn.callbacks_at("after_batch")) == 3 + 600  # metrics, recorder, progress, ours
