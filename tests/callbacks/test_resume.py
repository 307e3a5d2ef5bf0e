"""The resume protocol: Learner state for where a fit starts, and callback states loaded after
every callback's before_fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from learner import Callback, CancelFitException, CheckpointCB, Learner


class SeenCB(Callback):
    """Records `(event, resuming, start_epoch, start_iter, epoch, iter)` where it matters."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def _see(self, event: str, learn: Learner) -> None:
        self.seen.append((event, learn.resuming, learn.start_epoch, learn.start_iter))

    def before_fit(self, learn: Learner) -> None:
        self._see("before_fit", learn)

    def before_train(self, learn: Learner) -> None:
        self._see(f"before_train {learn.epoch}", learn)

    def before_validate(self, learn: Learner) -> None:
        self._see(f"before_validate {learn.epoch}", learn)


class CounterCB(Callback):
    """State a resumed run needs; its before_fit starts afresh, as a callback's should."""

    order = 50

    def __init__(self) -> None:
        self.batches, self.at_before_fit = 0, -1

    def before_fit(self, learn: Learner) -> None:
        self.batches = 0
        self.at_before_fit = self.batches

    def after_batch(self, learn: Learner) -> None:
        self.batches += learn.training

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]


def test_where_a_fit_starts_is_learner_state(tiny: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    fresh = SeenCB()
    learn = Learner(**tiny)
    # Stopped after batch 1 of 2 of epoch 0, with a checkpoint of that point.
    learn.fit(1, cbs=[fresh, StopAfterBatchCB(), CheckpointCB(path, every_n_batches=1)])
    assert fresh.seen == [("before_fit", False, 0, 0), ("before_train 0", False, 0, 0)]
    seen = SeenCB()
    other = Learner(**tiny)
    other.fit(2, cbs=[seen], resume_from=path)
    assert seen.seen == [
        ("before_fit", True, 0, 1),
        ("before_train 0", True, 0, 1),  # the first training phase starts at batch 1
        ("before_validate 0", True, 0, 0),
        ("before_train 1", True, 0, 0),
        ("before_validate 1", True, 0, 0),
    ]
    assert (other.resuming, other.start_epoch, other.start_iter) == (False, 0, 0)


class StopAfterBatchCB(Callback):
    """Ends the fit after the first training batch (its checkpoint is written at cleanup_batch)."""

    order = 70  # after CheckpointCB

    def cleanup_batch(self, learn: Learner) -> None:
        if learn.training:
            raise CancelFitException()


def test_states_are_loaded_after_every_before_fit(tiny: dict[str, Any], tmp_path: Path) -> None:
    learn = Learner(**tiny, cbs=[CounterCB()])
    learn.fit(2)
    assert learn.counter.batches == 4
    learn.save(tmp_path / "ckpt.pt")

    other = Learner(**tiny, cbs=[CounterCB()])
    other.fit(3, resume_from=tmp_path / "ckpt.pt")
    # before_fit reset it as in a fresh fit; the saved state came after; epoch 2 added 2.
    assert other.counter.at_before_fit == 0 and other.counter.batches == 4 + 2
    # A fit that does not resume starts afresh.
    other.fit(1)
    assert other.counter.batches == 2


def test_a_plain_callback_has_an_empty_state_and_checkpoints_hold_only_real_ones(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    cb = Callback()
    assert cb.state_dict() == {}
    cb.load_state_dict({"anything": 1})  # a no-op
    learn = Learner(**tiny, cbs=[SeenCB(), CounterCB()])
    learn.fit(1)
    learn.save(tmp_path / "ckpt.pt")
    states = torch.load(tmp_path / "ckpt.pt", weights_only=True)["callbacks"]
    assert "seen" not in states and "progress" not in states and "train_eval" not in states
    assert states["counter"] == {"batches": 2} and "recorder" in states and "metrics" in states


def test_a_failed_resume_leaves_no_resuming_state(tiny: dict[str, Any], tmp_path: Path) -> None:
    learn = Learner(**tiny)
    learn.fit(1)
    learn.save(tmp_path / "ckpt.pt")

    class BoomCB(Callback):
        def before_epoch(self, learn: Learner) -> None:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        learn.fit(3, cbs=[BoomCB()], resume_from=tmp_path / "ckpt.pt")
    assert (learn.resuming, learn.start_epoch, learn.start_iter) == (False, 0, 0)
    with pytest.raises(ValueError, match="leave out lr"):
        learn.fit(3, lr=0.1, resume_from=tmp_path / "ckpt.pt")
    assert (learn.resuming, learn.start_epoch, learn.start_iter) == (False, 0, 0)


class PickyCB(Callback):
    """Saves a state, and refuses one without `x` (a callback whose format changed)."""

    order = 50  # after the recorder, so the recorder's state is loaded before this one fails

    def state_dict(self) -> dict[str, Any]:
        return {"y": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x = state["x"]


def test_a_callback_refusing_its_state_leaves_the_run_as_it_was(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    Learner(**tiny, cbs=[PickyCB()]).fit(2, cbs=[CheckpointCB(tmp_path / "ckpt.pt")])
    learn = Learner(**{**tiny, "model": make_model(seed=1)}, cbs=[PickyCB()])
    learn.fit(1)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    assert learn.opt is not None
    opt, losses = learn.opt.state_dict(), list(learn.recorder.losses)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"callback 'picky'.*KeyError: 'x'"):
        learn.fit(3, resume_from=tmp_path / "ckpt.pt")
    assert all(torch.equal(learn.model.state_dict()[k], v) for k, v in weights.items())
    assert learn.opt.state_dict() == opt
    assert learn.recorder.losses == losses  # loaded before the refusal, then put back
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_learner_without_a_rate_resumes(tmp_path: Path) -> None:
    from conftest import make_dls, make_model

    def make() -> Learner:
        return Learner(make_model(), make_dls(), F.cross_entropy, lr=None)

    learn = make()
    learn.fit_one_cycle(2, lr_max=0.01, cbs=CheckpointCB(tmp_path / "ckpt.pt"))
    other = make()  # no rate, no optimizer: the saved optimizer's rate and state are used
    other.fit(3, resume_from=tmp_path / "ckpt.pt")
    assert other.lr is None and other.opt is not None
    assert len(other.recorder.history) == 3
    assert other.opt.param_groups[0]["lr"] == learn.opt.param_groups[0]["lr"]
