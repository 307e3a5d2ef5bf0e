"""GradClipCB: clipping at before_step, after MixedPrecisionCB unscaled the gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import StubScaler, make_model
from torch import nn

from learner import Callback, GradClipCB, Learner, MixedPrecisionCB


def _clipped_loop(
    model: nn.Module, dls: Any, max_norm: float, norm_type: float, autocast: bool = False
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """One epoch by hand: returns the gradients each step used, and the norms before clipping."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, norms = [], []
    for xb, yb in dls.train:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(xb).float(), yb)
        loss.backward()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type))
        grads.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad()
    return grads, norms


class GradsAtStep(Callback):
    """Copies the gradients the optimizer is about to use (after every other before_step)."""

    order = 100

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.norms: list[torch.Tensor] = []

    def before_step(self, learn: Learner) -> None:
        self.grads.append([p.grad.clone() for p in learn.model.parameters()])  # type: ignore[union-attr]
        clip = next(cb for cb in learn.cbs if isinstance(cb, GradClipCB))
        assert clip.total_norm is not None
        self.norms.append(clip.total_norm)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clips_like_clip_grad_norm(tiny: dict[str, Any], norm_type: float) -> None:
    ref = make_model()
    want_grads, want_norms = _clipped_loop(ref, tiny["dls"], 0.05, norm_type)
    assert all(n > 0.05 for n in want_norms)  # so clipping really changed the gradients

    spy = GradsAtStep()
    learn = Learner(**tiny, cbs=[GradClipCB(0.05, norm_type), spy])
    learn.fit(1, valid=False)
    for gs, hs in zip(spy.grads, want_grads, strict=True):
        assert all(torch.equal(g, h) for g, h in zip(gs, hs))
    assert [n.item() for n in spy.norms] == [n.item() for n in want_norms]
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_clips_the_unscaled_gradients_once(tiny: dict[str, Any]) -> None:
    ref = make_model()
    want_grads, want_norms = _clipped_loop(ref, tiny["dls"], 0.05, 2.0, autocast=True)
    log: list[str] = []

    class LoggedClipCB(GradClipCB):
        def before_step(self, learn: Learner) -> None:
            log.append("clip")
            super().before_step(learn)

    spy = GradsAtStep()
    scaler = StubScaler(log=log)
    learn = Learner(**tiny, cbs=[LoggedClipCB(0.05), MixedPrecisionCB(scaler=scaler), spy])
    learn.fit(1, valid=False)
    assert log == ["scale", "unscale_", "step", "update", "clip"] * 2
    # Clipping 1024-times-too-large gradients would report a 1024-times-too-large norm.
    assert [n.item() for n in spy.norms] == [n.item() for n in want_norms]
    for gs, hs in zip(spy.grads, want_grads, strict=True):
        assert all(torch.equal(g, h) for g, h in zip(gs, hs))


def test_no_clipping_on_a_skipped_step(tiny: dict[str, Any]) -> None:
    spy = GradsAtStep()
    mp = MixedPrecisionCB(scaler=StubScaler(inf_at=(0,)))
    Learner(**tiny, cbs=[mp, GradClipCB(1.0), spy]).fit(1, valid=False)
    assert len(spy.grads) == 1  # the skipped step reached no later before_step


@pytest.mark.parametrize("max_norm", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_max_norm(max_norm: Any) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        GradClipCB(max_norm)


def test_bad_norm_type() -> None:
    with pytest.raises(ValueError, match="norm_type"):
        GradClipCB(1.0, norm_type=0)
