"""MixedPrecisionCB: autocast for the forward pass and loss, GradScaler steps and skips."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import StubScaler, batches, make_data, make_model
from torch import nn

from learner import Callback, Learner, MixedPrecisionCB


def _autocast_loop(
    model: nn.Module,
    dls: Any,
    n_epochs: int,
    dtype: torch.dtype = torch.bfloat16,
    scaler: Any = None,
    enabled: bool = True,
) -> tuple[list[float], list[float], int]:
    """The textbook mixed-precision loop: returns training losses, validation losses, steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_losses, valid_losses, steps = [], [], 0
    for _ in range(n_epochs):
        model.train()
        for xb, yb in dls.train:
            with torch.autocast("cpu", dtype=dtype, enabled=enabled):
                loss = F.cross_entropy(model(xb).float(), yb)
            train_losses.append(loss.item())
            if scaler is None:
                loss.backward()
                opt.step()
                steps += 1
            else:
                scaler.scale(loss).backward()
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                steps += scaler.get_scale() >= scale  # the scale drops exactly when it skipped
            opt.zero_grad()
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=enabled):
            for xb, yb in dls.valid:
                valid_losses.append(F.cross_entropy(model(xb).float(), yb).item())
    return train_losses, valid_losses, steps


class CountStepsCB(Callback):
    """Counts `after_step`, like a scheduler advancing once per optimizer step."""

    def __init__(self) -> None:
        self.n = 0

    def after_step(self, learn: Learner) -> None:
        self.n += 1


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_bf16_on_cpu_equals_an_autocast_loop(tiny: dict[str, Any]) -> None:
    ref = make_model()
    want_train, want_valid, _ = _autocast_loop(ref, tiny["dls"], n_epochs=2)
    fp32, _, _ = _autocast_loop(make_model(), tiny["dls"], n_epochs=2, enabled=False)
    assert want_train != fp32  # so bfloat16 really changes the numbers

    learn = Learner(**tiny, cbs=[MixedPrecisionCB()])
    learn.fit(2)
    assert learn.mixed_precision.dtype == torch.bfloat16 and learn.mixed_precision.scaler is None
    assert learn.recorder.losses == want_train
    assert [h["valid_loss"] for h in learn.recorder.history] == want_valid
    _assert_same_params(learn.model, ref)


def test_bf16_trains_with_float32_loss_and_preds() -> None:
    x, _ = make_data(96, seed=1)
    y = x[:, :3].argmax(dim=1)  # learnable
    dls = SimpleNamespace(train=batches(x[:64], y[:64], 8), valid=batches(x[64:], y[64:], 32))
    seen: list[tuple[torch.dtype, ...]] = []

    class Spy(Callback):
        order = 20  # after MixedPrecisionCB

        def after_loss(self, learn: Learner) -> None:
            seen.append((learn.preds.dtype, learn.loss.dtype))

    class SpyBeforeCast(Callback):
        order = 5

        def after_predict(self, learn: Learner) -> None:
            seen.append((learn.preds.dtype,))

    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD)
    learn.fit(5, cbs=[MixedPrecisionCB(), Spy(), SpyBeforeCast()])
    assert set(seen) == {(torch.bfloat16,), (torch.float32, torch.float32)}
    losses = [h["train_loss"] for h in learn.recorder.history]
    assert losses[-1] < 0.9 * losses[0]


def test_autocast_is_on_only_for_the_forward_pass_and_loss(tiny: dict[str, Any]) -> None:
    seen: dict[str, set[bool]] = {}

    class Spy(Callback):
        order = 20

    for event in ["before_batch", "after_predict", "after_loss", "before_backward"]:
        setattr(Spy, event, _recorder(seen, event))
    for event in ["after_backward", "before_step", "after_step", "after_batch", "after_epoch"]:
        setattr(Spy, event, _recorder(seen, event))
    Learner(**tiny, cbs=[MixedPrecisionCB(), Spy()]).fit(1)
    on = {"before_batch", "after_predict"}
    assert seen == {e: {e in on} for e in seen} and len(seen) == 9
    assert not torch.is_autocast_enabled("cpu")


def _recorder(seen: dict[str, set[bool]], event: str) -> Any:
    def method(self: Callback, learn: Learner) -> None:
        seen.setdefault(event, set()).add(torch.is_autocast_enabled("cpu"))

    return method


class Boom(Exception):
    pass


class FailingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert torch.is_autocast_enabled("cpu")
        raise Boom()


def test_autocast_is_left_after_an_error_or_a_cancel(tiny: dict[str, Any]) -> None:
    learn = Learner(**{**tiny, "model": FailingModel()}, cbs=[MixedPrecisionCB()])
    with pytest.raises(Boom):
        learn.fit(1)
    assert not torch.is_autocast_enabled("cpu")

    from learner import CancelBatchException

    class SkipAll(Callback):
        order = 20

        def after_predict(self, learn: Learner) -> None:
            raise CancelBatchException()

    seen: list[bool] = []

    class Spy(Callback):
        order = 20  # after MixedPrecisionCB

        def after_predict(self, learn: Learner) -> None:
            seen.append(torch.is_autocast_enabled("cpu"))

        def cleanup_batch(self, learn: Learner) -> None:
            seen.append(torch.is_autocast_enabled("cpu"))

    Learner(**tiny, cbs=[MixedPrecisionCB(), Spy(), SkipAll()]).fit(1)
    assert seen == [True, False] * 3  # on when the batch was cancelled, off after its cleanup
    assert not torch.is_autocast_enabled("cpu")


# -- with a GradScaler -------------------------------------------------------------------------


def test_stub_scaler_scales_backward_only_and_unscales_once(tiny: dict[str, Any]) -> None:
    ref = make_model()
    want_train, _, _ = _autocast_loop(ref, tiny["dls"], n_epochs=1)
    scaler = StubScaler()
    learn = Learner(**tiny, cbs=[MixedPrecisionCB(torch.bfloat16, scaler=scaler)])
    learn.fit(1)
    assert scaler.log == ["scale", "unscale_", "step", "update"] * 2
    assert learn.recorder.losses == want_train  # the true loss, not 1024 times it
    _assert_same_params(learn.model, ref)  # a power-of-two scale is exact


def test_skipped_step_steps_nothing_zeroes_grads_and_fires_no_after_step(
    tiny: dict[str, Any],
) -> None:
    ref = make_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    want = []
    for i, (xb, yb) in enumerate(tiny["dls"].train):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(ref(xb).float(), yb)
        want.append(loss.item())
        loss.backward()
        if i != 0:  # the first step is skipped, and its gradients dropped
            opt.step()
        opt.zero_grad()

    grads: list[list[Any]] = []

    class GradSpy(Callback):
        def after_batch(self, learn: Learner) -> None:
            grads.append([p.grad for p in learn.model.parameters()])

    steps = CountStepsCB()
    mp = MixedPrecisionCB(torch.bfloat16, scaler=StubScaler(inf_at=(0,)))
    learn = Learner(**tiny, cbs=[mp, steps, GradSpy()])
    learn.fit(1, valid=False)
    assert steps.n == 1 and mp.n_skipped == 1
    assert grads[0] == [None] * 4  # zeroed by the skip (set to None)
    assert learn.recorder.losses == want  # the skipped batch is recorded all the same
    _assert_same_params(learn.model, ref)


def _cpu_grad_scaler_works() -> bool:
    try:
        p = nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.1)
        scaler = torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (p * 2).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return scaler.is_enabled()
    except (RuntimeError, AssertionError):
        return False


needs_cpu_scaler = pytest.mark.skipif(
    not _cpu_grad_scaler_works(), reason="torch.amp.GradScaler('cpu') is not supported here"
)


@needs_cpu_scaler
def test_real_grad_scaler_float16_on_cpu_equals_the_textbook_loop() -> None:
    x, y = make_data(72, seed=2)
    dls = SimpleNamespace(train=batches(x[:64], y[:64], 4), valid=batches(x[64:], y[64:], 8))
    # A huge initial scale overflows float16 at first: the scaler skips steps until it backs off.
    ref = make_model()
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    want_train, want_valid, want_steps = _autocast_loop(
        ref, dls, n_epochs=2, dtype=torch.float16, scaler=ref_scaler
    )
    assert 0 < want_steps < 32

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    steps = CountStepsCB()
    mp = MixedPrecisionCB(torch.float16, scaler=scaler)
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD)
    learn.fit(2, cbs=[mp, steps])
    assert steps.n == want_steps and mp.n_skipped == 32 - want_steps
    assert scaler.get_scale() == ref_scaler.get_scale()
    assert learn.recorder.losses == want_train
    assert [h["valid_loss"] for h in learn.recorder.history] == want_valid
    _assert_same_params(learn.model, ref)


@needs_cpu_scaler
def test_scaler_true_makes_one_and_its_state_round_trips(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = Learner(**tiny, cbs=[MixedPrecisionCB(torch.float16, scaler=True)])
    learn.fit(1)
    mp = learn.mixed_precision
    assert isinstance(mp.scaler, torch.amp.GradScaler)
    mp.scaler.update(new_scale=512.0)
    state = mp.state_dict()
    learn.save(tmp_path / "ckpt.pt")

    # A resumed fit loads the state once before_fit has made the scaler.
    fresh = MixedPrecisionCB(torch.float16, scaler=True)
    other = Learner(**{**tiny, "model": make_model()}, cbs=[fresh])
    other.fit(1, resume_from=tmp_path / "ckpt.pt")  # at the end of epoch 0: nothing to train
    assert fresh.scaler is not None and fresh.scaler.get_scale() == 512.0
    assert fresh.state_dict() == state

    stub = StubScaler(factor=8.0)
    MixedPrecisionCB(scaler=stub).load_state_dict({"scaler": {"factor": 2.0}, "n_skipped": 3})
    assert stub.factor == 2.0


def test_default_on_cpu_has_no_scaler(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny, cbs=[MixedPrecisionCB(torch.float16)])
    learn.fit(1)
    assert learn.mixed_precision.scaler is None  # float16 on cpu: a scaler only when asked
    assert learn.mixed_precision.state_dict() == {"scaler": {}, "n_skipped": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_defaults_to_float16_with_a_grad_scaler(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny, cbs=[MixedPrecisionCB()])
    learn.fit(2)
    mp = learn.mixed_precision
    assert mp.device_type == "cuda" and mp.dtype == torch.float16
    assert isinstance(mp.scaler, torch.amp.GradScaler)
    assert all(torch.isfinite(torch.tensor(learn.recorder.losses)))

    ref, dev = make_model().cuda(), torch.device("cuda")
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(2):
        for xb, yb in tiny["dls"].train:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(ref(xb.to(dev)).float(), yb.to(dev))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


# -- bad input ---------------------------------------------------------------------------------


def test_bad_arguments(tiny: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"float16 or torch\.bfloat16"):
        MixedPrecisionCB(torch.float32)
    with pytest.raises(TypeError, match="no scale, unscale_, step, update"):
        MixedPrecisionCB(scaler=object())  # type: ignore[arg-type]
    model = nn.Linear(4, 3, device="meta")
    learn = Learner(**{**tiny, "model": model}, cbs=[MixedPrecisionCB()], default_cbs=False)
    with pytest.raises(ValueError, match="'meta'"):
        learn.fit(1)
