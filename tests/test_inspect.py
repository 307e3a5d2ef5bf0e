"""show_training_loop and summary: what runs where, and what the model does to one batch."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_dls
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learner import (
    EVENTS,
    ActivationStatsCB,
    Callback,
    CSVLoggerCB,
    DataLoaders,
    Learner,
    accuracy,
)
from learner.inspect import Report, show_training_loop


def _loop_table(text: str) -> list[tuple[int, str, list[str]]]:
    rows = []
    for line in text.splitlines():
        name, cbs = line.split(" : ")
        event = name.strip()
        indent = len(name) - len(name.lstrip())
        rows.append((indent, event, [] if cbs == "-" else cbs.split(", ")))
    return rows


class LateCB(Callback):
    order = 60

    def before_fit(self, learn: Learner) -> None:
        pass

    def after_loss(self, learn: Learner) -> None:
        pass


class EarlyCB(Callback):
    order = -5  # ties with RecorderCB, added after it

    def after_batch(self, learn: Learner) -> None:
        pass


def test_show_training_loop_lists_exactly_the_callbacks_of_each_event(
    tiny: dict[str, Any], tmp_path: Any, capsys: Any
) -> None:
    cbs = [LateCB(), EarlyCB(), ActivationStatsCB(), CSVLoggerCB(tmp_path / "h.csv")]
    learn = Learner(**tiny, metrics=accuracy, cbs=cbs)
    text = learn.show_training_loop()
    assert capsys.readouterr().out == text + "\n"
    rows = _loop_table(text)
    assert [event for _, event, _ in rows] == list(EVENTS)
    by_order = sorted(learn.cbs, key=lambda cb: cb.order)  # stable: ties keep insertion order
    for _, event, names in rows:
        want = [f"{type(cb).__name__}({cb.order})" for cb in by_order if hasattr(cb, event)]
        assert names == want, event
    after_batch = next(names for _, event, names in rows if event == "after_batch")
    assert after_batch[1:4] == ["RecorderCB(-5)", "EarlyCB(-5)", "ActivationStatsCB(0)"]


def test_show_training_loop_indents_by_level_and_follows_the_event_list(
    tiny: dict[str, Any],
) -> None:
    learn = Learner(**tiny)
    depth = {event: indent // 2 for indent, event, _ in _loop_table(show_training_loop(learn))}
    assert [depth[f"before_{lvl}"] for lvl in ("fit", "epoch", "train", "batch")] == [0, 1, 2, 3]
    for lvl in ("fit", "epoch", "train", "validate", "batch"):
        assert depth[f"before_{lvl}"] == depth[f"after_{lvl}"] == depth[f"cleanup_{lvl}"]
    assert depth["after_predict"] == depth["after_step"] == 4 and depth["before_validate"] == 2

    # Events added later (before_backward, before_step) show up where the list puts them; a
    # before_ without a cleanup_ is a point inside its level.
    handlers = {}
    for event, hs in learn.handlers.items():
        if event in ("after_backward", "after_step"):
            handlers[event.replace("after", "before")] = []
        handlers[event] = hs
    learn.handlers = handlers
    depth = {event: indent // 2 for indent, event, _ in _loop_table(show_training_loop(learn))}
    assert depth["before_backward"] == depth["before_step"] == 4 and depth["after_batch"] == 3
    assert depth["after_fit"] == 0


def test_report_is_not_echoed_again_by_ipython() -> None:
    formatters = pytest.importorskip(
        "IPython.core.formatters", reason="needs IPython, which shows a notebook cell's output"
    )
    DisplayFormatter = formatters.DisplayFormatter

    assert DisplayFormatter().format(Report("text")) == ({}, {})
    assert DisplayFormatter().format("text")[0] == {"text/plain": "'text'"}


# -- summary -----------------------------------------------------------------------------------


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 4*1*3*3 + 4 = 40
        nn.BatchNorm2d(4),  # 8 (+ running statistics, which are buffers)
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),  # 64*10 + 10 = 650
    )


def _image_dls(**kw: Any) -> DataLoaders:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g)
    return DataLoaders.from_tensors(x, y, x[:6], y[:6], bs=6, **kw)


def _table(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Layer"))
    rows = {}
    for line in lines[start + 1 :]:
        if not line:
            break
        name, *cells = re.split(r"\s{2,}", line)
        rows[name] = cells
    return rows


def test_summary_shapes_and_parameter_counts(capsys: Any) -> None:
    model = _cnn()
    model[1].requires_grad_(False)  # a frozen BatchNorm
    model[5].weight.requires_grad_(False)  # a half-frozen head
    learn = Learner(model, _image_dls(), F.cross_entropy)
    text = learn.summary()
    assert capsys.readouterr().out == text + "\n"
    assert text.splitlines()[0] == "Sequential, one batch of input (6, 1, 8, 8)"
    assert _table(text) == {
        "0": ["Conv2d", "(6, 4, 8, 8)", "40", "yes"],
        "1": ["BatchNorm2d", "(6, 4, 8, 8)", "8", "no"],
        "2": ["ReLU", "(6, 4, 8, 8)", "0", "-"],
        "3": ["MaxPool2d", "(6, 4, 4, 4)", "0", "-"],
        "4": ["Flatten", "(6, 64)", "0", "-"],
        "5": ["Linear", "(6, 10)", "650", "partly"],
    }
    assert text.splitlines()[-3:] == [
        "Total params: 698",
        "Trainable params: 50",  # the conv's 40 and the head's bias
        "Frozen params: 648",
    ]


def test_summary_changes_nothing(tiny: dict[str, Any]) -> None:
    model = _cnn()
    model.train()  # BatchNorm in training mode would update its statistics
    model[5].eval()  # a module pinned in eval stays as it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    learn = Learner(model, _image_dls(generator=g), F.cross_entropy)
    rng = torch.get_rng_state(), random.getstate(), g.get_state()
    learn.summary()
    assert [m.training for m in model.modules()] == [True] * 6 + [False]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BN's too
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert torch.equal(g.get_state(), rng[2])
    assert learn.opt is None and learn.batch is None and learn.preds is None
    assert learn.recorder.losses == [] and learn.recorder.history == []


def test_summary_leaves_a_seeded_run_unchanged() -> None:
    """Drawing a batch from a shuffled DataLoader uses the global RNG: it is put back."""

    def run(look: bool) -> list[float]:
        torch.manual_seed(0)
        x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
        dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        learn = Learner(model, SimpleNamespace(train=dl), F.cross_entropy)
        if look:
            learn.summary()
        learn.fit(1)
        return learn.recorder.losses

    assert run(look=True) == run(look=False)


def test_summary_of_a_model_without_children_and_of_layers_not_run() -> None:
    learn = Learner(nn.Linear(4, 3), make_dls(), F.cross_entropy)
    assert _table(learn.summary()) == {"<model>": ["Linear", "(8, 3)", "15", "yes"]}

    class Partly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    learn = Learner(Partly(), make_dls(), F.cross_entropy)
    assert _table(learn.summary())["spare"] == ["Linear", "(not run)", "15", "yes"]


def test_summary_needs_a_loader_it_can_draw_from() -> None:
    once = SimpleNamespace(train=iter(make_dls().train))
    learn = Learner(nn.Linear(4, 3), once, F.cross_entropy)
    with pytest.raises(ValueError, match="one-shot iterator"):
        learn.summary()
    assert len(list(once.train)) == 2  # no batch was used up
