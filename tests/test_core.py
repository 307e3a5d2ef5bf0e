"""The loop's mechanics: event sequence, cancelling, errors, order, names, bad input, oracle."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, make_data, make_dls, make_model
from torch import nn

from learner import (
    EVENTS,
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidateException,
    DeviceCB,
    Learner,
    MetricsCB,
    ProgressCB,
    RecorderCB,
)

CANCELS = {
    "fit": CancelFitException,
    "epoch": CancelEpochException,
    "train": CancelTrainException,
    "validate": CancelValidateException,
    "batch": CancelBatchException,
    "step": CancelStepException,
}
LEVELS_WITH_CLEANUP = ["fit", "epoch", "train", "validate", "batch"]


class TraceCB(Callback):
    """Appends every event it sees to `trace`."""

    def __init__(self, trace: list[str] | None = None, tag: str = "", order: int = 0) -> None:
        self.trace = [] if trace is None else trace
        self.tag, self.order = tag, order


def _tracer(event: str) -> Any:
    def method(self: TraceCB, learn: Learner) -> None:
        self.trace.append(f"{self.tag}{event}")

    return method


for _e in EVENTS:
    setattr(TraceCB, _e, _tracer(_e))


def tracer(trace: list[str], tag: str, order: int = 0) -> TraceCB:
    """A TraceCB of a class of its own: callbacks of one class replace each other."""
    return type(f"Trace{tag.strip(':').replace('-', 'm')}CB", (TraceCB,), {})(trace, tag, order)


class RaiseCB(Callback):
    """Raises `exc` the first time `event` fires."""

    def __init__(self, event: str, exc: BaseException) -> None:
        self.event, self.exc, self.fired = event, exc, False
        setattr(self, event, self._raise)  # instance attribute: only this event is handled

    def _raise(self, learn: Learner) -> None:
        if not self.fired:
            self.fired = True
            raise self.exc


def expected_trace(
    raise_at: str | None = None,
    cancel_level: str | None = None,
    n_epochs: int = 2,
    n_train: int = 2,
    n_valid: int = 1,
) -> list[str]:
    """The documented semantics, written independently of the Learner: returns the event trace
    when `CANCELS[cancel_level]` is raised the first time `raise_at` fires."""
    trace: list[str] = []
    fired = [False]

    class Cancel(Exception):
        pass

    def ev(name: str) -> None:
        trace.append(name)
        if name == raise_at and not fired[0]:
            fired[0] = True
            raise Cancel(cancel_level)

    def level(name: str, body: Any) -> None:
        try:
            ev(f"before_{name}")
            body()
            ev(f"after_{name}")
        except Cancel as c:
            if c.args[0] != name:
                raise
        finally:
            ev(f"cleanup_{name}")

    def batch(training: bool) -> None:
        ev("after_predict")
        ev("after_loss")
        if not training:
            return
        ev("before_backward")
        try:  # the step level: it has no before_/cleanup_ of its own
            ev("after_backward")
            ev("before_step")
            ev("after_step")
        except Cancel as c:
            if c.args[0] != "step":
                raise

    def phase(training: bool, n: int) -> None:
        for _ in range(n):
            level("batch", lambda: batch(training))

    def epoch() -> None:
        level("train", lambda: phase(True, n_train))
        level("validate", lambda: phase(False, n_valid))

    def fit() -> None:
        for _ in range(n_epochs):
            level("epoch", epoch)

    try:
        level("fit", fit)
    except Cancel:
        trace.append("<escaped>")
    return trace


# -- the event sequence ------------------------------------------------------------------------


def test_event_sequence_is_exactly_the_documented_one(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    trace = TraceCB()
    learn.fit(2, cbs=[trace])
    batch = ["before_batch", "after_predict", "after_loss"]
    train_batch = [
        *batch,
        "before_backward",
        "after_backward",
        "before_step",
        "after_step",
        "after_batch",
        "cleanup_batch",
    ]
    valid_batch = [*batch, "after_batch", "cleanup_batch"]
    epoch = [
        "before_epoch",
        "before_train",
        *train_batch * 2,
        "after_train",
        "cleanup_train",
        "before_validate",
        *valid_batch,
        "after_validate",
        "cleanup_validate",
        "after_epoch",
        "cleanup_epoch",
    ]
    assert trace.trace == ["before_fit", *epoch * 2, "after_fit", "cleanup_fit"]
    assert trace.trace == expected_trace()


def test_no_valid_loader_skips_validation(tiny: dict[str, Any]) -> None:
    tiny["dls"] = SimpleNamespace(train=tiny["dls"].train)  # no .valid at all
    trace = TraceCB()
    Learner(**tiny).fit(1, cbs=[trace])
    assert not any("validate" in e for e in trace.trace)
    assert trace.trace.count("after_step") == 2


def test_train_false_and_valid_false(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    trace = TraceCB()
    learn.fit(1, train=False, cbs=[trace])
    assert "before_train" not in trace.trace and "before_validate" in trace.trace
    assert learn.opt is None  # nothing to optimise, so no optimizer yet
    trace.trace.clear()
    learn.fit(1, valid=False, cbs=[trace])
    assert "before_validate" not in trace.trace and "before_train" in trace.trace


def _event_level_pairs() -> list[tuple[str, str]]:
    return [(e, lvl) for e in EVENTS for lvl in CANCELS]


@pytest.mark.parametrize(("event", "level"), _event_level_pairs())
def test_cancel_at_every_event(tiny: dict[str, Any], event: str, level: str) -> None:
    learn = Learner(**tiny)
    trace = TraceCB()
    cbs = [trace, RaiseCB(event, CANCELS[level]())]
    want = expected_trace(event, level)
    if want[-1] == "<escaped>":
        # Raised where its level is not running (CancelBatchException in before_epoch): it is not
        # swallowed, it propagates like any error, after every cleanup.
        with pytest.raises(CANCELS[level]):
            learn.fit(2, cbs=cbs)
        want = want[:-1]
    else:
        learn.fit(2, cbs=cbs)
    assert trace.trace == want
    _check_cleanups_balanced(trace.trace)
    assert learn.cbs == _defaults(learn)  # fit(cbs=) callbacks are gone
    learn.fit(1)  # and the learner still works


def test_cancel_semantics_by_hand(tiny: dict[str, Any]) -> None:
    """A few cases of the table above spelled out, so the oracle itself is checked."""
    learn = Learner(**tiny)
    trace = TraceCB()
    learn.fit(1, cbs=[trace, RaiseCB("after_loss", CancelBatchException())])
    first = trace.trace[: trace.trace.index("cleanup_batch") + 1]
    assert first[-3:] == ["after_predict", "after_loss", "cleanup_batch"]  # no backward, no after_
    assert trace.trace.count("after_step") == 1  # the second batch trains
    assert learn.recorder.losses.__len__() == 1  # the skipped batch recorded nothing

    trace = TraceCB()
    learn.fit(1, cbs=[trace, RaiseCB("before_batch", CancelTrainException())])
    assert "after_train" not in trace.trace and "cleanup_train" in trace.trace
    assert "after_validate" in trace.trace  # validation still runs

    trace = TraceCB()
    learn.fit(3, cbs=[trace, RaiseCB("before_epoch", CancelFitException())])
    assert trace.trace == ["before_fit", "before_epoch", "cleanup_epoch", "cleanup_fit"]


@pytest.mark.parametrize("event", ["after_backward", "before_step"])
def test_cancel_step_keeps_grads_and_records_the_batch(tiny: dict[str, Any], event: str) -> None:
    """Cancelling the first batch's step: no step, no after_step, no zero_grad, so the second
    batch steps on the sum of both gradients; both batches are recorded."""
    ref = make_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_losses = []
    for xb, yb in tiny["dls"].train:
        loss = F.cross_entropy(ref(xb), yb)
        loss.backward()
        ref_losses.append(loss.item())
    opt.step()

    learn = Learner(**tiny)
    trace = TraceCB()
    learn.fit(1, valid=False, cbs=[trace, RaiseCB(event, CancelStepException())])
    first = trace.trace[: trace.trace.index("cleanup_batch") + 1]
    assert first[-3:] == [event, "after_batch", "cleanup_batch"]
    assert trace.trace.count("after_step") == 1 and trace.trace.count("after_batch") == 2
    assert learn.recorder.losses == ref_losses
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_loss_grad_is_what_backward_differentiates(tiny: dict[str, Any]) -> None:
    """A callback replacing `loss_grad` changes the gradients; `loss` (recorded) stays true."""

    class DoubleCB(Callback):
        def before_backward(self, learn: Learner) -> None:
            assert learn.loss_grad is learn.loss
            learn.loss_grad = learn.loss_grad * 2

    ref = make_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_losses = []
    for xb, yb in tiny["dls"].train:
        loss = F.cross_entropy(ref(xb), yb)
        (loss * 2).backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    learn = Learner(**tiny, cbs=[DoubleCB()])
    learn.fit(1, valid=False)
    assert learn.recorder.losses == ref_losses
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("exc_type", [ValueError, KeyboardInterrupt])
def test_error_at_every_event(tiny: dict[str, Any], event: str, exc_type: type) -> None:
    learn = Learner(**tiny)
    trace = TraceCB()
    with pytest.raises(exc_type) as info:
        learn.fit(2, cbs=[trace, RaiseCB(event, exc_type("boom"))])
    assert type(info.value) is exc_type and info.value.args == ("boom",)
    assert f"Raised in RaiseCB.{event}." in getattr(info.value, "__notes__", [])
    _check_cleanups_balanced(trace.trace)
    assert trace.trace[-1] == "cleanup_fit"
    assert learn.cbs == _defaults(learn)
    learn.fit(1)


def test_every_cleanup_runs_even_if_one_fails(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    trace = TraceCB(order=10)  # runs after the failing callback
    with pytest.raises(RuntimeError):
        learn.fit(1, cbs=[RaiseCB("cleanup_batch", RuntimeError("x")), trace])
    assert trace.trace.count("cleanup_batch") == trace.trace.count("before_batch")
    _check_cleanups_balanced(trace.trace)


def _check_cleanups_balanced(trace: list[str]) -> None:
    for lvl in LEVELS_WITH_CLEANUP:
        assert trace.count(f"before_{lvl}") == trace.count(f"cleanup_{lvl}"), lvl


def _defaults(learn: Learner) -> list[Callback]:
    return [cb for cb in learn.cbs if not isinstance(cb, (TraceCB, RaiseCB))]


# -- order, names, typos, defaults -------------------------------------------------------------


def test_callback_order_is_invariant_to_list_order(tiny: dict[str, Any]) -> None:
    def run(order: list[int]) -> list[str]:
        trace: list[str] = []
        cbs = [tracer(trace, f"{o}:", o) for o in order]
        Learner(**{**tiny, "model": make_model()}, cbs=cbs, default_cbs=False).fit(1)
        return trace

    base = run([-5, 0, 3, 7])
    for seed in range(3):
        order = [-5, 0, 3, 7]
        random.Random(seed).shuffle(order)
        assert run(order) == base
    assert base[:4] == ["-5:before_fit", "0:before_fit", "3:before_fit", "7:before_fit"]


def test_ties_keep_insertion_order(tiny: dict[str, Any]) -> None:
    trace: list[str] = []
    cbs = [tracer(trace, "b:"), tracer(trace, "a:", -1), tracer(trace, "c:")]
    Learner(**tiny, cbs=cbs, default_cbs=False).fit(0)
    assert trace[:3] == ["a:before_fit", "b:before_fit", "c:before_fit"]


def test_access_by_name(tiny: dict[str, Any]) -> None:
    class GradNormLoggerCB(Callback):
        pass

    cb = GradNormLoggerCB()
    learn = Learner(**tiny, cbs=[cb])
    assert learn.grad_norm_logger is cb
    assert isinstance(learn.recorder, RecorderCB) and isinstance(learn.metrics, MetricsCB)
    assert isinstance(learn.progress, ProgressCB)
    learn.remove_cb(cb)
    with pytest.raises(AttributeError, match="grad_norm_logger"):
        learn.grad_norm_logger  # noqa: B018


@pytest.mark.parametrize("typo", ["before_batc", "befor_batch", "after_epochs", "before_stpe"])
def test_typoed_event_names_are_rejected(tiny: dict[str, Any], typo: str) -> None:
    cls = type("TypoCB", (Callback,), {typo: lambda self, learn: None})
    with pytest.raises(ValueError, match=typo):
        Learner(**tiny, cbs=[cls()])
    learn = Learner(**tiny)
    with pytest.raises(ValueError, match=typo):
        learn.fit(1, cbs=[cls()])
    assert learn.opt is None  # rejected before anything happened


def test_callback_classes_are_checked_once(
    tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import learner.checks as checks

    checked: list[type] = []
    real = checks._check_names

    def counting(cls: type, events: tuple[str, ...]) -> None:
        checked.append(cls)
        real(cls, events)

    monkeypatch.setattr(checks, "_check_names", counting)

    class GoodCB(Callback):
        def after_batch(self, learn: Learner) -> None:
            pass

    class TypoCB(Callback):
        def after_bacth(self, learn: Learner) -> None:
            pass

    for _ in range(3):
        Learner(**tiny, cbs=[GoodCB()]).fit(1, cbs=[GoodCB()])
        with pytest.raises(ValueError, match="after_bacth"):  # a failure is not remembered
            Learner(**tiny, cbs=[TypoCB()])
    assert checked.count(GoodCB) == 1 and checked.count(TypoCB) == 3


def test_loss_is_detached_once_the_step_is_done(tiny: dict[str, Any]) -> None:
    seen: list[tuple[str, bool, bool]] = []

    class ProbeCB(Callback):
        def after_loss(self, learn: Learner) -> None:
            seen.append(("after_loss", learn.training, learn.loss.requires_grad))

        def after_batch(self, learn: Learner) -> None:
            seen.append(("after_batch", learn.training, learn.loss.grad_fn is not None))

    learn = Learner(**tiny, cbs=[ProbeCB()])
    learn.fit(1)
    # Training losses carry the graph until backward, and none from after_batch on, so the
    # losses callbacks keep (MetricsCB, RecorderCB) hold no graph alive.
    assert seen == [
        ("after_loss", True, True), ("after_batch", True, False),
        ("after_loss", True, True), ("after_batch", True, False),
        ("after_loss", False, False), ("after_batch", False, False),
    ]  # fmt: skip
    kept = learn.metrics.batch_values["loss"] + learn.recorder._pending
    assert all(t.grad_fn is None and not t.requires_grad for t in kept)


def test_default_callbacks_are_replaceable(tiny: dict[str, Any]) -> None:
    mine = ProgressCB(plot=True)
    learn = Learner(**tiny, cbs=[mine])
    assert [type(cb).__name__ for cb in learn.cbs] == [
        "TrainEvalCB",
        "DeviceCB",
        "MetricsCB",
        "RecorderCB",
        "ProgressCB",
    ]
    assert learn.progress is mine
    default_recorder = learn.recorder
    for_one_fit = RecorderCB()
    learn.fit(1, cbs=[for_one_fit])
    assert len(for_one_fit.history) == 1 and not default_recorder.history
    assert learn.recorder is default_recorder  # put back after the fit
    assert Learner(**tiny, default_cbs=False).cbs == []


def test_metrics_shortcut(tiny: dict[str, Any]) -> None:
    from learner import accuracy

    for metrics, names in [
        (accuracy, ["accuracy"]),
        ([accuracy], ["accuracy"]),
        ({"acc": accuracy}, ["acc"]),
    ]:
        learn = Learner(**{**tiny, "model": make_model()}, metrics=metrics)
        learn.fit(1)
        assert list(learn.recorder.history[0]) == ["epoch", "train_loss", "valid_loss", *names]


# -- the loop trains exactly like a hand-written one --------------------------------------------


def _hand_written(model: nn.Module, dls: Any, lr: float, n_epochs: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(n_epochs):
        model.train()
        for xb, yb in dls.train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            for xb, yb in dls.valid:
                F.cross_entropy(model(xb), yb)


def test_fit_equals_hand_written_loop() -> None:
    x, y = make_data(200, seed=1)
    dls = SimpleNamespace(train=batches(x[:150], y[:150], 16), valid=batches(x[150:], y[150:], 32))
    ref = make_model(seed=3)
    _hand_written(ref, dls, lr=0.1, n_epochs=2)
    model = make_model(seed=3)
    Learner(model, dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD).fit(2)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_second_fit_continues_and_lr_changes_the_optimizer(tiny: dict[str, Any]) -> None:
    ref = make_model()
    _hand_written(ref, tiny["dls"], lr=0.1, n_epochs=2)
    learn = Learner(**tiny)
    learn.fit(1)
    opt = learn.opt
    learn.fit(1)
    assert learn.opt is opt
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    learn.fit(1, lr=0.01)
    assert learn.lr == 0.01 and all(g["lr"] == 0.01 for g in opt.param_groups)  # type: ignore[union-attr]


@pytest.mark.parametrize("event", ["after_backward", "before_step"])
def test_batch_cancelled_after_backward_never_reaches_the_weights(
    tiny: dict[str, Any], event: str
) -> None:
    ref = make_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    xb, yb = tiny["dls"].train[1]  # only the second batch trains
    F.cross_entropy(ref(xb), yb).backward()
    opt.step()
    learn = Learner(**tiny, cbs=[RaiseCB(event, CancelBatchException())])
    learn.fit(1, valid=False)
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_training_steps_are_overridable(tiny: dict[str, Any]) -> None:
    """A momentum learner from the course: zero_grad keeps a fraction of the gradient."""

    class MomentumLearner(Learner):
        def zero_grad(self) -> None:
            with torch.no_grad():
                for p in self.model.parameters():
                    assert p.grad is not None
                    p.grad *= 0.85

    ref = make_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for xb, yb in tiny["dls"].train:
        F.cross_entropy(ref(xb), yb).backward()
        opt.step()
        with torch.no_grad():
            for p in ref.parameters():
                p.grad *= 0.85  # type: ignore[operator]
    learn = MomentumLearner(**tiny)
    learn.fit(1)
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_validation_has_no_gradients_and_no_steps(tiny: dict[str, Any]) -> None:
    seen: list[tuple[bool, bool, bool]] = []

    class Spy(Callback):
        def after_loss(self, learn: Learner) -> None:
            assert learn.loss is not None
            seen.append((learn.training, torch.is_grad_enabled(), learn.loss.requires_grad))

    class CountingLearner(Learner):
        steps = 0

        def step(self) -> None:
            CountingLearner.steps += 1
            super().step()

    CountingLearner(**tiny, cbs=[Spy()]).fit(1)
    assert seen == [(True, True, True)] * 2 + [(False, False, False)]
    assert CountingLearner.steps == 2


def test_state_visible_to_callbacks(tiny: dict[str, Any]) -> None:
    seen: list[tuple[Any, ...]] = []

    class Spy(Callback):
        def after_batch(self, learn: Learner) -> None:
            seen.append(
                (
                    learn.epoch,
                    learn.n_epochs,
                    learn.iter,
                    learn.training,
                    learn.dl is (learn.dls.train if learn.training else learn.dls.valid),
                    learn.preds.shape[0] == learn.batch[0].shape[0],
                    learn.lr,
                )
            )

    Learner(**tiny, cbs=[Spy()]).fit(2)
    assert seen == [
        (e, 2, i, t, True, True, 0.1)
        for e in range(2)
        for i, t in [(0, True), (1, True), (0, False)]
    ]


# -- bad input ---------------------------------------------------------------------------------


def test_bad_dls(tiny: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=r"\.train"):
        Learner(**{**tiny, "dls": [1, 2, 3]})
    with pytest.raises(TypeError, match="iterable"):
        Learner(**{**tiny, "dls": SimpleNamespace(train=5, valid=None)})


def test_bad_numbers(tiny: dict[str, Any]) -> None:
    for lr in (0, -1.0, float("nan"), float("inf"), -float("inf"), "0.1"):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            Learner(**{**tiny, "lr": lr})
    learn = Learner(**tiny)
    for lr in (0, float("inf")):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            learn.fit(1, lr=lr)
    with pytest.raises(ValueError, match="lr_max must be a positive finite number"):
        learn.fit_one_cycle(1, lr_max=float("inf"))
    for n in (-1, 1.5, True):
        with pytest.raises(ValueError, match="n_epochs"):
            learn.fit(n)  # type: ignore[arg-type]
    assert learn.opt is None


def test_model_without_parameters(tiny: dict[str, Any]) -> None:
    learn = Learner(**{**tiny, "model": nn.Identity()})
    with pytest.raises(ValueError, match="no trainable parameters"):
        learn.fit(1)


def test_empty_training_loader_is_named(tiny: dict[str, Any]) -> None:
    learn = Learner(**{**tiny, "dls": SimpleNamespace(train=[], valid=None)})
    with pytest.raises(ValueError, match=r"dls\.train is empty"):
        learn.fit(1)

    class Empty:  # no len(): found while training
        def __iter__(self) -> Any:
            return iter(())

    with pytest.raises(ValueError, match=r"dls\.train yielded no batches"):
        Learner(**{**tiny, "dls": SimpleNamespace(train=Empty(), valid=None)}).fit(1)


def test_failing_loss_names_shapes_and_leaves_no_trace(tiny: dict[str, Any]) -> None:
    learn = Learner(**{**tiny, "loss_func": F.mse_loss})  # (8, 3) floats vs (8,) ints
    before = [p.clone() for p in learn.model.parameters()]
    with pytest.raises(RuntimeError) as info:
        learn.fit(1)
    note = "\n".join(info.value.__notes__)
    assert "shape=(8, 3), dtype=torch.float32" in note and "shape=(8,), dtype=torch.int64" in note
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), before))
    learn.loss_func = F.cross_entropy
    learn.fit(1)  # usable afterwards


def test_failed_fit_does_not_touch_the_model(tiny: dict[str, Any]) -> None:
    model = tiny["model"]
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        Learner(**tiny).fit(-1)
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bare_learner_without_callbacks(tiny: dict[str, Any]) -> None:
    ref = make_model()
    _hand_written(ref, tiny["dls"], lr=0.1, n_epochs=1)
    learn = Learner(**tiny, default_cbs=False)
    learn.fit(1)
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_dls_of_plain_iterables() -> None:
    """Any object with .train/.valid iterables of (x, y) works, e.g. generators made per epoch."""
    x, y = make_data(32)

    class Loader:
        def __iter__(self) -> Any:
            return iter(batches(x, y, 8))

    learn = Learner(make_model(), SimpleNamespace(train=Loader(), valid=Loader()), F.cross_entropy)
    learn.fit(2)
    assert len(learn.recorder.losses) == 8
    assert make_dls().valid is not None


def test_removed_cbs_puts_the_same_list_back(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny)
    before = list(learn.cbs)
    with learn.removed_cbs([learn.progress, learn.metrics]):
        assert learn.cbs == [cb for cb in before if cb.name not in ("progress", "metrics")]
        assert learn.callbacks_at("after_batch") == [learn.recorder]
    assert learn.cbs == before
    with pytest.raises(ValueError, match="boom"), learn.removed_cbs(learn.recorder):
        raise ValueError("boom")
    assert learn.cbs == before and learn.recorder in learn.callbacks_at("after_batch")


def test_one_callback_without_a_list(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny, cbs=DeviceCB("cpu"), default_cbs=False)
    assert [type(cb) for cb in learn.cbs] == [DeviceCB]
    seen: list[int] = []

    class EpochCB(Callback):
        def after_epoch(self, learn: Learner) -> None:
            seen.append(learn.epoch)

    learn.fit(2, cbs=EpochCB())
    assert seen == [0, 1] and len(learn.cbs) == 1
    with pytest.raises(TypeError, match="Callback instances"):
        learn.fit(1, cbs="not a callback")  # type: ignore[arg-type]
