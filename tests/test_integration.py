"""Callbacks that meet at the optimizer step: schedules advance only on real steps."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import StubScaler, batches, make_data, make_model

from learner import GradAccumCB, Learner, MixedPrecisionCB, ParamSchedulerCB, sched_lin


def _dls(n_batches: int) -> Any:
    x, y = make_data(8 * n_batches, seed=3)
    return SimpleNamespace(train=batches(x, y, 8), valid=None)


def test_skipped_mixed_precision_step_does_not_advance_the_schedule() -> None:
    # 4 batches, lr from 0.4 down in steps of 0.1 per batch; the first step has inf gradients.
    mp = MixedPrecisionCB(torch.bfloat16, scaler=StubScaler(inf_at=(0,)))
    sched = ParamSchedulerCB({"lr": sched_lin(0.4, 0.0)})
    learn = Learner(
        make_model(), _dls(4), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD, cbs=[mp, sched]
    )
    learn.fit(1)
    assert mp.n_skipped == 1
    # Batch 1 repeats batch 0's lr; batch 2 then sets the lr for progress 2/4 (the skipped
    # batch is counted when the next step is taken).
    assert learn.recorder.lrs == pytest.approx([0.4, 0.4, 0.2, 0.1])


def test_accumulation_holds_the_schedule_between_steps() -> None:
    sched = ParamSchedulerCB({"lr": sched_lin(0.6, 0.0)})
    learn = Learner(
        make_model(),
        _dls(6),
        F.cross_entropy,
        lr=0.1,
        opt_func=torch.optim.SGD,
        cbs=[GradAccumCB(2), sched],
    )
    learn.fit(1)
    # Steps after batches 1, 3, 5: the lr moves in pairs, by two batches' worth of progress.
    assert learn.recorder.lrs == pytest.approx([0.6, 0.6, 0.4, 0.4, 0.2, 0.2])
