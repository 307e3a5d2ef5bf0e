"""The one table of the standard callbacks' orders, and a test per constraint between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_dls, make_model

import learner
from learner import Callback, Learner
from learner.callbacks import order as order_module
from learner.callbacks.order import CONSTRAINTS, ORDERS, Constraint
from learner.callbacks.resume import ResumeCB

STANDARD = {  # by class name: an alias (the course's HooksCallback) is the same class
    obj.__name__: obj
    for obj in vars(learner).values()
    if isinstance(obj, type) and issubclass(obj, Callback) and obj is not Callback
}


def test_every_standard_callback_takes_its_order_from_the_table() -> None:
    assert set(STANDARD) == set(ORDERS), "a standard callback is missing from the table"
    for name, cls in STANDARD.items():
        assert cls.order == ORDERS[name], name
        assert f"Order: {ORDERS[name]}" in (cls.__doc__ or ""), f"{name}'s docstring"


def test_the_order_module_is_data() -> None:
    source = Path(order_module.__file__).read_text()
    assert "import learner" not in source and "from learner" not in source


def make(name: str, tmp_path: Path) -> Callback:
    """An instance of the standard callback `name`, with whatever its constructor needs."""
    cls: Any = STANDARD[name]
    args: dict[str, Any] = {
        "GradAccumCB": (2,),
        "BatchTransformCB": (lambda b: b,),
        "HooksCB": (lambda *args: None,),
        "GradClipCB": (1.0,),
        "ParamSchedulerCB": ({"lr": learner.sched_no(0.1, 0.1)},),
        "LRSchedulerCB": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1),),
        "CSVLoggerCB": (tmp_path / "log.csv",),
        "SaveBestCB": (tmp_path / "best.pt",),
        "CheckpointCB": (tmp_path / "ckpt.pt",),
        "MixedPrecisionCB": (torch.bfloat16,),
        "TensorBoardCB": (tmp_path / "tb",),
        "AccelerateCB": (1, "no"),
    }.get(name, ())
    if name == "TensorBoardCB":
        pytest.importorskip("tensorboard", reason="TensorBoardCB needs tensorboard")
    if name == "ResumeCB":
        source = Learner(make_model(), make_dls(), torch.nn.functional.cross_entropy)
        source.save(tmp_path / "resume.pt")
        return ResumeCB(source, tmp_path / "resume.pt")
    return cls(*args)


@pytest.mark.parametrize("c", CONSTRAINTS, ids=lambda c: f"{c.first}<{c.then}@{c.event}")
def test_constraint_holds_in_the_dispatch(
    c: Constraint, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if "AccelerateCB" in (c.first, c.then):
        request.getfixturevalue("accelerate_state")  # skips without accelerate
    # Both callbacks on one learner, added in the unfavourable order: the later one first.
    learn = Learner(make_model(), make_dls(), torch.nn.functional.cross_entropy, default_cbs=False)
    first, then = make(c.first, tmp_path), make(c.then, tmp_path)
    learn.add_cb(then)
    learn.add_cb(first)
    running = learn.callbacks_at(c.event)
    assert first in running and then in running, f"both implement {c.event}"
    assert running.index(first) < running.index(then), c.why


def test_resume_runs_last_at_before_fit_among_the_defaults(tmp_path: Path) -> None:
    learn = Learner(make_model(), make_dls(), torch.nn.functional.cross_entropy)
    learn.add_cb(make("ResumeCB", tmp_path))
    assert learn.callbacks_at("before_fit")[-1].name == "resume"
    assert all(o < ORDERS["ResumeCB"] for n, o in ORDERS.items() if n != "ResumeCB")
