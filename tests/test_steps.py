"""Training steps supplied by a callback, as the course's TrainCB does."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_dls, make_model

from learner import BatchFormat, Callback, DeviceCB, GradAccumCB, Learner


# The course's TrainCB (miniai, notebook 09), as a student writes it; it counts its calls.
class TrainCB(Callback):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def predict(self, learn: Any) -> None:
        self._count("predict")
        learn.preds = learn.model(learn.batch[0])

    def get_loss(self, learn: Any) -> None:
        self._count("get_loss")
        learn.loss = learn.loss_func(learn.preds, learn.batch[1])

    def backward(self, learn: Any) -> None:
        self._count("backward")
        learn.loss.backward()

    def step(self, learn: Any) -> None:
        self._count("step")
        learn.opt.step()

    def zero_grad(self, learn: Any) -> None:
        self._count("zero_grad")
        learn.opt.zero_grad()


class MomentumCB(Callback):
    """The course's MomentumLearner as a callback: zero_grad keeps a fraction of the gradient."""

    def __init__(self, mom: float = 0.85) -> None:
        self.mom = mom

    def zero_grad(self, learn: Any) -> None:
        with torch.no_grad():
            for p in learn.model.parameters():
                p.grad *= self.mom


def _learner(cbs: Any) -> Learner:
    return Learner(
        make_model(), make_dls(), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD, cbs=cbs
    )


def test_a_callback_supplies_every_step_and_trains_as_the_learner() -> None:
    train = TrainCB()
    ours, theirs = _learner(None), _learner(train)
    ours.fit(2)
    theirs.fit(2)
    # 2 epochs of 2 training batches and 1 validation batch.
    assert train.calls == {"predict": 6, "get_loss": 6, "backward": 4, "step": 4, "zero_grad": 4}
    assert ours.recorder.losses == theirs.recorder.losses
    for a, b in zip(ours.model.parameters(), theirs.model.parameters()):
        assert torch.equal(a, b)


def test_one_provided_step_and_the_others_from_the_learner() -> None:
    learn = _learner(MomentumCB(0.5))
    learn.fit(1)
    # The gradient of the last step, halved, not zeroed.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learn.model.parameters())
    plain = _learner(None)
    plain.fit(1)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in plain.model.parameters())


def test_every_caller_runs_the_provided_step() -> None:
    train = TrainCB()
    learn = _learner([train, GradAccumCB(2)])
    learn.fit(1)
    assert train.calls["step"] == 1 and train.calls["zero_grad"] == 1
    x = torch.randn(3, 4)
    learn.infer(x)  # inference runs the provided forward pass too
    learn.get_preds()
    assert train.calls["predict"] == 2 + 1 + 1 + 1
    learn.zero_grad()  # as a callback calls it: the provided step
    assert train.calls["zero_grad"] == 2


def test_the_learners_own_step_is_back_when_the_callback_goes() -> None:
    train = TrainCB()
    learn = _learner(None)
    learn.fit(1, cbs=train)  # only for this fit
    assert train.calls["predict"] == 3
    learn.fit(1)
    assert train.calls["predict"] == 3 and "predict" not in vars(learn)


def test_two_providers_of_one_step_are_an_error() -> None:
    class OtherTrainCB(TrainCB):
        pass

    learn = _learner(TrainCB())
    with pytest.raises(
        ValueError, match="TrainCB and MomentumCB both provide the training step 'zero_grad'"
    ):
        learn.add_cb(MomentumCB())
    assert [type(cb) for cb in learn.cbs].count(MomentumCB) == 0  # nothing changed
    with pytest.raises(ValueError, match="both provide"):
        learn.fit(1, cbs=MomentumCB())
    assert [type(cb).__name__ for cb in learn.cbs].count("MomentumCB") == 0
    learn.add_cb(OtherTrainCB())  # a subclass replaces its base class: one provider
    assert sum(isinstance(cb, TrainCB) for cb in learn.cbs) == 1


# The course's MixedPrecision(TrainCB) (miniai/accel.py), with the device made a parameter so it
# also runs on a CPU (bfloat16 autocast, a disabled GradScaler), and its calls counted.
class MixedPrecision(TrainCB):
    order = DeviceCB.order + 10

    def __init__(self, device: str = "cuda", dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.device, self.dtype = device, dtype

    def before_fit(self, learn: Any) -> None:
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.device == "cuda")

    def before_batch(self, learn: Any) -> None:
        self.autocast = torch.autocast(self.device, dtype=self.dtype)
        self.autocast.__enter__()

    def after_loss(self, learn: Any) -> None:
        self.autocast.__exit__(None, None, None)

    def backward(self, learn: Any) -> None:
        self._count("backward")
        self.scaler.scale(learn.loss).backward()

    def step(self, learn: Any) -> None:
        self._count("step")
        self.scaler.step(learn.opt)
        self.scaler.update()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_the_courses_mixed_precision_train_cb(device: str) -> None:
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    mp = MixedPrecision(device, dtype)
    model = make_model()
    dls = make_dls()
    learn = Learner(
        model, dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD, cbs=[DeviceCB(device), mp]
    )
    learn.fit(2)
    assert mp.calls == {"predict": 6, "get_loss": 6, "backward": 4, "step": 4, "zero_grad": 4}
    assert all(torch.isfinite(torch.tensor(learn.recorder.losses)))
    # Under autocast the forward pass ran in low precision: the recorded losses differ from a
    # float32 run's, but not by much.
    plain = _learner(None)
    plain.fit(2)
    assert learn.recorder.losses != plain.recorder.losses
    assert learn.recorder.losses == pytest.approx(plain.recorder.losses, rel=0.05)


# The course's TrainCB with its n_inp (miniai/learner.py, notebook 09 onwards), as written there.
class CourseTrainCB(Callback):
    def __init__(self, n_inp: int = 1) -> None:
        self.n_inp = n_inp

    def predict(self, learn: Any) -> None:
        learn.preds = learn.model(*learn.batch[: self.n_inp])

    def get_loss(self, learn: Any) -> None:
        learn.loss = learn.loss_func(learn.preds, *learn.batch[self.n_inp :])

    def backward(self, learn: Any) -> None:
        learn.loss.backward()

    def step(self, learn: Any) -> None:
        learn.opt.step()

    def zero_grad(self, learn: Any) -> None:
        learn.opt.zero_grad()


class Sum(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = make_model(), make_model(1)

    def forward(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x2)


def test_the_course_train_cb_with_n_inp_matches_the_batch_format() -> None:
    dls = make_dls()
    two = [(x, x.flip(0), y) for x, y in dls.train]
    dls.train, dls.valid = two, [(x, x.flip(0), y) for x, y in dls.valid]
    course = Learner(Sum(), dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD,
                     cbs=CourseTrainCB(n_inp=2), default_cbs=False)  # fmt: skip
    course.fit(2)
    ours = Learner(Sum(), dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD,
                   batch_format=BatchFormat(n_inp=2))  # fmt: skip
    ours.fit(2)
    for p, q in zip(course.model.parameters(), ours.model.parameters()):
        assert torch.equal(p, q)
