"""AccelerateCB, and the course's AccelerateCB (miniai/accel.py, notebook 17) as written there.

Accelerate keeps one state per process, which the first `Accelerator` sets: every test starts and
ends without one (the `accelerate_state` fixture), and leaves the environment as it found it.
On a machine without a GPU Accelerate trains on the CPU; the CUDA check skips.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learner import (
    AccelerateCB,
    BatchFormat,
    Callback,
    CheckpointCB,
    DataLoaders,
    DeviceCB,
    DistributedCB,
    GradAccumCB,
    GradClipCB,
    Learner,
    MixedPrecisionCB,
    accuracy,
)

pytest.importorskip(
    "accelerate", reason='AccelerateCB needs accelerate: pip install "learner[accelerate]"'
)
from accelerate import Accelerator

pytestmark = pytest.mark.usefixtures("accelerate_state")
cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="Accelerate trains on the GPU here: a CPU-only check"
)

# -- the course's code, as written there (only the imports changed) -----------------------------


# fmt: off
# miniai/learner.py (notebook 09 onwards).
class TrainCB(Callback):
    def __init__(self, n_inp=1): self.n_inp = n_inp
    def predict(self, learn): learn.preds = learn.model(*learn.batch[:self.n_inp])
    def get_loss(self, learn): learn.loss = learn.loss_func(learn.preds, *learn.batch[self.n_inp:])
    def backward(self, learn): learn.loss.backward()
    def step(self, learn): learn.opt.step()
    def zero_grad(self, learn): learn.opt.zero_grad()


# miniai/accel.py (notebook 17).
class CourseAccelerateCB(TrainCB):
    order = DeviceCB.order+10
    def __init__(self, n_inp=1, mixed_precision="fp16"):
        super().__init__(n_inp=n_inp)
        self.acc = Accelerator(mixed_precision=mixed_precision)
    def before_fit(self, learn):
        learn.model,learn.opt,learn.dls.train,learn.dls.valid = self.acc.prepare(
            learn.model, learn.opt, learn.dls.train, learn.dls.valid)
    def backward(self, learn): self.acc.backward(learn.loss)


# miniai/learner.py: the training steps as Learner methods.
class TrainLearner(Learner):
    def predict(self): self.preds = self.model(self.batch[0])
    def get_loss(self): self.loss = self.loss_func(self.preds, self.batch[1])
    def backward(self): self.loss.backward()
    def step(self): self.opt.step()
    def zero_grad(self): self.opt.zero_grad()
# fmt: on


# -- a tiny run ---------------------------------------------------------------------------------


def make_dls(n_train: int = 32, n_valid: int = 12, bs: int = 8) -> DataLoaders:
    """Torch DataLoaders (which Accelerate prepares), the training one shuffled."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, 4, generator=g)
    y = torch.randint(0, 3, (n_train + n_valid,), generator=g)
    train = TensorDataset(x[:n_train], y[:n_train])
    valid = TensorDataset(x[n_train:], y[n_train:])
    return DataLoaders(DataLoader(train, bs, shuffle=True), DataLoader(valid, bs))


def make_learner(cbs: Any = (), cls: type[Learner] = Learner, **kwargs: Any) -> Learner:
    kwargs = {"lr": 0.1, "opt_func": torch.optim.SGD, "metrics": accuracy, **kwargs}
    return cls(make_model(), make_dls(), F.cross_entropy, cbs=list(cbs), **kwargs)


def fit(learn: Learner, n_epochs: int = 2, **kwargs: Any) -> Learner:
    torch.manual_seed(1)  # the shuffle
    learn.fit(n_epochs, **kwargs)
    return learn


def own_attrs(model: nn.Module) -> dict[str, Any]:
    """The model's instance attributes but its train/eval flag."""
    return {k: v for k, v in vars(model).items() if k != "training"}


def assert_trains_alike(learn: Learner, plain: Learner, **tol: float) -> None:
    """The same per-batch losses, history and weights: to the last bit unless `tol` says."""
    tol = tol or {"rtol": 0.0, "atol": 0.0}
    torch.testing.assert_close(learn.recorder.losses, plain.recorder.losses, **tol)  # type: ignore[arg-type]
    for ours, theirs in zip(learn.recorder.history, plain.recorder.history):
        torch.testing.assert_close(ours, theirs, **tol)  # type: ignore[arg-type]
    for p, q in zip(learn.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, **tol)


# -- the course's recipe, and ours --------------------------------------------------------------


@cpu_only
def test_the_courses_accelerate_cb_trains_as_the_plain_learner() -> None:
    # fp16, the course's default, on a CPU: Accelerate trains in float32, silently.
    course = fit(make_learner([CourseAccelerateCB(n_inp=1)]))
    assert_trains_alike(course, fit(make_learner()))
    assert len(course.recorder.losses) == 2 * 4


@cpu_only
def test_ours_trains_as_the_plain_learner_and_warns_that_fp16_is_float32_on_a_cpu() -> None:
    with pytest.warns(UserWarning, match=r'mixed_precision="fp16" needs a device with float16 '
                      r'autocast; on cpu Accelerate trains in float32'):  # fmt: skip
        cb = AccelerateCB(n_inp=1)
    assert cb.mixed_precision == "no" and cb.acc.scaler is None
    learn = fit(make_learner([cb]))
    assert_trains_alike(learn, fit(make_learner()))
    assert not learn.model.training  # TrainEvalCB: eval after the validation, as without it


def test_as_float32_it_trains_as_the_plain_learner_with_the_courses_train_learner() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb = AccelerateCB(mixed_precision="no")
    learn = fit(make_learner([cb], cls=TrainLearner))
    # Its backward and step replace TrainLearner's; predict and get_loss are TrainLearner's.
    assert learn.backward.func == cb.backward and "predict" not in vars(learn)  # type: ignore[attr-defined]
    assert_trains_alike(learn, fit(make_learner(cls=TrainLearner)))


@cpu_only
def test_fp16_and_no_share_a_process_on_a_cpu_and_another_precision_says_why_not() -> None:
    # Accelerate holds every Accelerator of a process to the first one's mixed_precision; on a
    # CPU "fp16" and "no" both mean float32, so AccelerateCB takes either for the other.
    with pytest.warns(UserWarning, match="fp16"):
        AccelerateCB()
    CourseAccelerateCB()  # Accelerator(mixed_precision="fp16"), as the first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AccelerateCB(mixed_precision="no").mixed_precision == "no"
    with pytest.raises(ValueError, match=r"one state per process.*restart the kernel"):
        AccelerateCB(mixed_precision="bf16")


# -- putting everything back --------------------------------------------------------------------


def test_after_fit_the_learner_holds_your_objects_and_a_second_fit_goes_on() -> None:
    cb = AccelerateCB(mixed_precision="no")
    learn = make_learner([cb])
    model, dls, train, valid = learn.model, learn.dls, learn.dls.train, learn.dls.valid
    attrs = own_attrs(model)
    seen: list[Any] = []

    class PeekCB(Callback):
        def before_train(self, learn: Any) -> None:
            seen.append((learn.opt, learn.dls.train, learn.dls is dls))

    fit(learn, 1, cbs=[PeekCB()])
    opt = learn.opt
    assert type(seen[0][0]).__name__ == "AcceleratedOptimizer" and seen[0][0].optimizer is opt
    assert type(seen[0][1]).__name__ == "DataLoaderShard" and seen[0][2] is False
    assert learn.model is model and type(opt) is torch.optim.SGD
    assert learn.dls is dls and (dls.train, dls.valid) == (train, valid)
    assert own_attrs(model) == attrs  # nothing of Accelerate's left on the model
    assert "step" not in vars(opt) and "_is_accelerate_prepared" not in vars(opt)
    fit(learn, 1)
    plain = make_learner()
    fit(plain, 1)
    fit(plain, 1)
    assert_trains_alike(learn, plain)


def test_everything_is_put_back_after_an_error() -> None:
    cb = AccelerateCB(mixed_precision="no")
    learn = make_learner([cb])
    model, dls, attrs = learn.model, learn.dls, own_attrs(learn.model)

    class FailCB(Callback):
        def after_batch(self, learn: Any) -> None:
            if learn.iter == 1:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(learn, 1, cbs=[FailCB()])
    assert learn.model is model and learn.dls is dls and type(learn.opt) is torch.optim.SGD
    assert own_attrs(model) == attrs
    fit(learn, 1)
    assert len(learn.recorder.losses) == 2 + 4  # the failed fit's two batches, then a whole one


def test_a_checkpoint_written_mid_epoch_resumes_as_the_uninterrupted_run(tmp_path: Any) -> None:
    class CrashCB(Callback):
        def after_batch(self, learn: Any) -> None:
            if learn.training and learn.epoch == 1 and learn.iter == 2:
                raise RuntimeError("crash")

    path = tmp_path / "ckpt.pt"
    ckpt = CheckpointCB(path, every_n_epochs=None, every_n_batches=2)
    crashed = make_learner([AccelerateCB(mixed_precision="no"), ckpt, CrashCB()])
    with pytest.raises(RuntimeError, match="crash"):
        fit(crashed, 3)
    resumed = make_learner([AccelerateCB(mixed_precision="no")])
    torch.manual_seed(123)  # the checkpoint's random states win
    resumed.fit(3, resume_from=path)  # names the optimizer SGD, not Accelerate's wrapper
    plain = fit(make_learner(), 3)
    assert resumed.recorder.history == plain.recorder.history
    assert resumed.recorder.losses[-6:] == plain.recorder.losses[-6:]
    for p, q in zip(resumed.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)


# -- mixed precision ----------------------------------------------------------------------------


class DtypeCB(Callback):
    """Records the dtype of the first layer's output in each training batch."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def before_fit(self, learn: Any) -> None:
        self.hook = learn.model[0].register_forward_hook(
            lambda m, i, o: self.dtypes.append(o.dtype) if learn.training else None
        )

    def cleanup_fit(self, learn: Any) -> None:
        self.hook.remove()


@cpu_only
def test_bf16_autocasts_on_a_cpu_and_lr_find_leaves_no_trace() -> None:
    cb = AccelerateCB(mixed_precision="bf16")
    assert cb.mixed_precision == "bf16"
    learn = make_learner([cb], lr=None)
    model, attrs = learn.model, own_attrs(learn.model)
    # The sweep runs on a copy of the callback (sharing the accelerator): the model's forward it
    # wrapped in autocast, and the mark that it was prepared, are gone after it.
    _, losses, suggestion = learn.lr_find(num_it=12, stop_factor=None)
    assert len(losses) == 12 and suggestion is not None
    assert own_attrs(model) == attrs and learn.opt is None and learn.lr is None
    dtypes = DtypeCB()
    learn = fit(learn, lr=0.1, cbs=[dtypes])  # prepared afresh: autocast again
    assert dtypes.dtypes == [torch.bfloat16] * 8
    assert own_attrs(model) == attrs and model(torch.randn(2, 4)).dtype == torch.float32
    plain = fit(make_learner(lr=None), lr=0.1)
    assert all(torch.isfinite(torch.tensor(learn.recorder.losses)))
    # bfloat16 forward passes: not float32's losses, but close to them.
    assert learn.recorder.losses != plain.recorder.losses
    assert learn.recorder.losses == pytest.approx(plain.recorder.losses, rel=0.05)


def _fp16_with_a_scaler(cb: AccelerateCB) -> None:
    # What Accelerator(mixed_precision="fp16") sets up on a GPU, here on the CPU: float16
    # autocast around the model's forward (native_amp) and a GradScaler, which torch has for
    # the CPU too, at MixedPrecisionCB's initial scale.
    cb.acc.native_amp = True
    cb.acc.scaler = torch.amp.GradScaler("cpu")


class InfOnceCB(Callback):
    """Makes the gradients of the first training batch infinite."""

    def before_backward(self, learn: Any) -> None:
        if learn.epoch == 0 and learn.iter == 0:
            learn.loss_grad = learn.loss_grad * float("inf")


@cpu_only
def test_fp16_with_a_grad_scaler_steps_as_mixed_precision_cb() -> None:
    # The oracle: our MixedPrecisionCB with float16 autocast and a GradScaler, with gradient
    # accumulation, clipping, and a step skipped for inf gradients. Accelerate's GradScaler must
    # unscale once per step, before the clipping, and the skipped step must not count.
    with pytest.warns(UserWarning, match="fp16"):
        cb = AccelerateCB()
    _fp16_with_a_scaler(cb)
    others = lambda: [GradAccumCB(2), GradClipCB(max_norm=0.5), InfOnceCB()]
    learn = fit(make_learner([cb, *others()]), 3)
    mp = MixedPrecisionCB(torch.float16, scaler=True)
    plain = fit(make_learner([mp, *others()]), 3)
    assert cb.n_skipped == mp.n_skipped == 1
    assert learn.global_step == plain.global_step == 3 * 2 - 1
    assert_trains_alike(learn, plain, rtol=1e-4, atol=1e-5)
    assert learn.grad_clip.total_norm == pytest.approx(plain.grad_clip.total_norm.item(), rel=1e-4)
    assert cb.state_dict() == {"scaler": mp.scaler.state_dict(), "n_skipped": 1}  # type: ignore[union-attr]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_a_gpu_autocasts_with_a_grad_scaler() -> None:
    cb = AccelerateCB()
    assert cb.mixed_precision == "fp16" and cb.acc.scaler is not None
    dtypes = DtypeCB()
    learn = fit(make_learner([cb, dtypes]))
    assert dtypes.dtypes == [torch.float16] * 8
    assert all(torch.isfinite(torch.tensor(learn.recorder.losses)))
    assert learn.model.training is False and next(learn.model.parameters()).is_cuda


# -- what it refuses, and what it needs ---------------------------------------------------------


def test_without_accelerate_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match=r'pip install "learner\[accelerate\]"'):
        AccelerateCB()


def test_n_inp_is_the_batch_formats() -> None:
    cb = AccelerateCB(n_inp=2, mixed_precision="no")
    learn = make_learner([cb])
    with pytest.raises(ValueError, match=r"batch_format=BatchFormat\(n_inp=2\)"):
        learn.fit(1)
    assert type(learn.opt) is torch.optim.SGD

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def forward(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
            return self.net(x + x2)

    dls = make_dls()
    dls.train = [(x, x.flip(0), y) for x, y in dls.train]
    dls.valid = [(x, x.flip(0), y) for x, y in dls.valid]
    two = Learner(Two(), dls, F.cross_entropy, cbs=[cb], batch_format=BatchFormat(n_inp=2))
    two.fit(1)  # lists, not DataLoaders: passed through as they are, one process
    assert len(two.recorder.losses) == 4


def test_under_a_launcher_the_learner_adds_no_distributed_cb(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cb = AccelerateCB(mixed_precision="no")  # one process: made before the variables
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert any(isinstance(c, DistributedCB) for c in make_learner().cbs)
    learn = make_learner([cb])
    assert not any(isinstance(c, DistributedCB) for c in learn.cbs)
    model = learn.model
    learn.add_cb(DistributedCB())  # refused before either sets anything up
    with pytest.raises(ValueError, match="AccelerateCB and DistributedCB both distribute"):
        learn.fit(1)
    assert learn.model is model


def test_mixed_precision_cb_beside_accelerates_own_is_refused() -> None:
    cb = AccelerateCB(mixed_precision="bf16")
    learn = make_learner([cb, MixedPrecisionCB()])
    with pytest.raises(ValueError, match="autocasts already: remove MixedPrecisionCB"):
        learn.fit(1)


def test_accelerates_gradient_accumulation_is_refused() -> None:
    with pytest.raises(ValueError, match=r"GradAccumCB\(n\), not Accelerator"):
        AccelerateCB(mixed_precision="no", gradient_accumulation_steps=2)
