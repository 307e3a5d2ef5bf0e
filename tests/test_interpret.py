"""`interpret` and `Interpretation`: the confusion matrix counted by hand from `get_preds`, and
`most_confused`, `top_losses` and the pictures checked against it."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from test_vision import CLASSES, as_shown, make_learner, shown, stretched, titles

from learner import Learner
from learner.inference import get_preds
from learner.interpret import Interpretation, interpret


@pytest.fixture(scope="module")
def learn() -> Learner:
    """A learner a little trained on 3 classes: 12 validation items, some mistaken."""
    learn = make_learner(3)
    learn.fit(1)
    return learn


def by_hand(learn: Learner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions, targets, per-item losses and the confusion matrix, counted in a loop."""
    preds, targets = get_preds(learn)
    cm = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(targets.tolist(), preds.argmax(1).tolist()):
        cm[t, p] += 1
    return preds, targets, F.cross_entropy(preds, targets, reduction="none"), cm


def test_interpret_holds_get_preds_and_leaves_no_trace(learn: Learner) -> None:
    preds, targets, losses, _ = by_hand(learn)
    learn.model.train()
    state, py_state = torch.get_rng_state(), random.getstate()
    recorded, batch = list(learn.recorder.losses), learn.batch
    interp = interpret(learn)
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state
    assert learn.model.training and learn.recorder.losses == recorded and learn.batch is batch
    assert torch.equal(interp.preds, preds) and torch.equal(interp.targets, targets)
    assert torch.allclose(interp.losses, losses)
    assert torch.equal(interp.decoded, preds.argmax(1))
    assert interp.classes == CLASSES and interp.dl is learn.dls.valid and interp.n_classes == 3


def test_confusion_matrix_is_counted_by_hand(learn: Learner) -> None:
    _, targets, _, cm = by_hand(learn)
    got = interpret(learn).confusion_matrix()
    assert got.dtype == torch.int64 and torch.equal(got, cm)
    assert int(got.sum()) == len(targets) == 12
    assert 0 < int(cm.diag().sum()) < 12  # some right, some wrong: the test sees both


def test_most_confused_lists_the_off_diagonal_cells_largest_first(learn: Learner) -> None:
    _, _, _, cm = by_hand(learn)
    off = {(a, p): int(cm[a, p]) for a in range(3) for p in range(3) if a != p and cm[a, p] > 0}
    interp = interpret(learn)
    got = interp.most_confused()
    assert {(CLASSES.index(a), CLASSES.index(p)): n for a, p, n in got} == off
    assert [n for _, _, n in got] == sorted(off.values(), reverse=True)
    assert all(n >= 2 for _, _, n in interp.most_confused(min_val=2))
    assert len(interp.most_confused(min_val=2)) == sum(n >= 2 for n in off.values())
    numbers = Interpretation(interp.preds, interp.targets, interp.losses)  # no names
    assert {(a, p): n for a, p, n in numbers.most_confused()} == off


def test_top_losses_are_the_largest_per_item_losses(learn: Learner) -> None:
    _, _, losses, _ = by_hand(learn)
    interp = interpret(learn)
    top, idx = interp.top_losses(5)
    assert torch.allclose(top, losses.sort(descending=True).values[:5])
    assert torch.equal(interp.losses[idx], top) and len(set(idx.tolist())) == 5
    all_losses, _ = interp.top_losses(None)
    assert len(all_losses) == 12 and bool((all_losses[:-1] >= all_losses[1:]).all())


def test_plot_confusion_matrix_writes_the_counts_or_row_fractions(learn: Learner) -> None:
    _, _, _, cm = by_hand(learn)
    interp = interpret(learn)
    fig = interp.plot_confusion_matrix()
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == [str(n) for n in cm.flatten().tolist()]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted", "Actual")
    (ax,) = interp.plot_confusion_matrix(normalize=True).axes
    rows = (cm / cm.sum(1, keepdim=True).clamp_min(1)).flatten().tolist()
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in rows]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("normalised", [False, True])
def test_plot_top_losses_titles_and_images(channels: int, normalised: bool) -> None:
    learn = make_learner(channels, normalised)
    interp = interpret(learn)
    x_valid = torch.cat([x for x, _ in learn.dls.valid])
    probs = interp.preds.softmax(1)
    losses, idx = interp.top_losses(4)
    state = torch.get_rng_state()
    fig = interp.plot_top_losses(4)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(fig.axes) == 4
    want = [
        f"{CLASSES[interp.targets[i]]} / {CLASSES[interp.decoded[i]]} / {float(loss):.2f} / "
        f"{float(probs[i].max()):.2f}"
        for loss, i in zip(losses, idx)
    ]
    assert titles(fig) == want
    images = x_valid[idx]
    expected = as_shown(stretched(images) if normalised else images)
    assert all(np.allclose(g, w, atol=1e-6) for g, w in zip(shown(fig), expected))


def test_class_names_from_the_argument(learn: Learner) -> None:
    names = ["x", "y", "z"]
    interp = interpret(learn, classes=names)
    assert interp.classes == ("x", "y", "z")
    assert all(a in names and p in names for a, p, _ in interp.most_confused())
    assert [t.get_text() for t in interp.plot_confusion_matrix().axes[0].get_yticklabels()] == names
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        interpret(learn, classes=["x", "y"])


def test_plot_top_losses_needs_the_items_in_the_same_order(learn: Learner) -> None:
    interp = interpret(learn, dl=learn.dls.train)  # shuffled
    torch.rand(1)  # the random state moves on: read again, the loader gives another order
    with pytest.raises(ValueError, match="unshuffled loader"):
        interp.plot_top_losses(28)
    with pytest.raises(ValueError, match="at least 1"):
        interp.plot_top_losses(0)
    alone = Interpretation(interp.preds, interp.targets, interp.losses)
    with pytest.raises(ValueError, match="no dl to read the items from"):
        alone.plot_top_losses()
    assert isinstance(alone.plot_confusion_matrix(), Figure)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.zeros(4)), r"\(N, n_classes\)"),
        ((torch.zeros(4, 3), torch.zeros(4), torch.zeros(4)), "integer labels"),
        ((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(3)), r"losses are"),
        ((torch.zeros(2, 3), torch.tensor([0, 3]), torch.zeros(2)), "run from 0 to 3"),
    ],
)
def test_interpretation_rejects_what_is_not_a_classifiers(args: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Interpretation(*args)


def test_the_learner_takes_interpret_and_the_package_exports_interpretation() -> None:
    import learner

    assert Learner.interpret is interpret
    assert learner.Interpretation is Interpretation
