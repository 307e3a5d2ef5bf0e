"""The README's code runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from learner.data import mnist_available

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not mnist_available():
        pytest.skip("MNIST not found: set LEARNER_DATA to a folder holding MNIST/raw/")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(BLOCKS[0], scope)
    assert scope["learn"].recorder.history[-1]["accuracy"] > 0.95
    assert (tmp_path / "loss.png").exists()


def test_callback_example_runs(tiny: dict[str, Any]) -> None:
    from learner import Learner

    learn = Learner(**tiny)
    scope: dict[str, Any] = {"learn": learn}
    exec(BLOCKS[1], scope)
    assert len(learn.recorder.losses) == 6  # 3 epochs of 2 batches: 100 is never reached
    learn.fit(3, cbs=[scope["StopAfterCB"](3)])
    assert len(learn.recorder.losses) == 6 + 3


def test_mixed_precision_example_runs(tiny: dict[str, Any]) -> None:
    import torch
    import torch.nn.functional as F

    block = next(b for b in BLOCKS if "GradAccumCB(4)" in b)
    scope: dict[str, Any] = {"model": tiny["model"], "dls": tiny["dls"], "F": F, "torch": torch}
    exec(block, scope)
    learn = scope["learn"]
    assert learn.mixed_precision.dtype == torch.bfloat16
    assert len(learn.recorder.losses) == 2 and learn.grad_clip.total_norm is not None


def test_seeing_inside_training_runs(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from learner import Learner

    monkeypatch.chdir(tmp_path)
    block = next(b for b in BLOCKS if "ActivationStatsCB" in b)
    scope: dict[str, Any] = {"learn": Learner(**tiny)}
    exec(block, scope)
    assert "before_fit" in capsys.readouterr().out
    assert len(scope["stats"].means[0]) == 2  # the ReLU, at each of the 2 training batches
    for name in ("history.csv", "stats.png", "color_dim.png", "dead.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_feature_examples_run(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from learner import Learner, accuracy

    monkeypatch.chdir(tmp_path)
    learn = Learner(**tiny, metrics=accuracy)
    scope: dict[str, Any] = {"learn": learn, "dls": tiny["dls"]}
    first = next(i for i, b in enumerate(BLOCKS) if "learn.lr_find()" in b)
    for block in BLOCKS[first : first + 4]:  # lr_find, schedules, torch schedulers, trackers
        exec(block, scope)
    assert (tmp_path / "lr_find.png").exists() and (tmp_path / "lr.png").exists()
    assert scope["result"].suggestion is not None
    assert (tmp_path / "models" / "best.pt").exists()
    # 3 one-cycle + 3 scheduled + 3 + 3 torch-scheduled epochs, then at least 3 more
    assert len(learn.recorder.history) >= 12 + 3


def test_checkpoint_and_predictions_examples_run(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from learner import Learner

    monkeypatch.chdir(tmp_path)
    learn = Learner(**tiny)
    exec(next(b for b in BLOCKS if "resume_from=" in b), {"learn": learn})
    assert len(learn.recorder.losses) == 6  # 3 epochs of 2 batches, resumed: none added
    assert (tmp_path / "models" / "ckpt.pt").exists() and (
        tmp_path / "models" / "ckpt.1.pt"
    ).exists()
    x_valid = torch.cat([x for x, _ in tiny["dls"].valid])
    scope: dict[str, Any] = {"learn": learn, "x_valid": x_valid}
    exec(next(b for b in BLOCKS if "get_preds" in b), scope)
    assert scope["losses"].shape == (8,)
