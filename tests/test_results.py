"""`show_results` for each kind of results, `tta` and `Interpretation` on batches of any
structure: a lookup model returns predictions known exactly, so every title, colour, image and
scatter point is checked against values written down by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from test_vision import CLASSES, as_shown, shown, titles
from torch import nn

from learner import BatchFormat, DataLoaders, Learner
from learner.inference import get_preds
from learner.interpret import interpret
from learner.results import show_results, tta
from learner.vision import image_input, label_text, show_batch


class Lookup(nn.Module):
    """Returns `outputs[i]` for the input equal to `inputs[i]`: predictions known exactly,
    whatever the batches."""

    def __init__(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inputs", inputs.flatten(1))
        self.register_buffer("outputs", outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same = (x.flatten(1)[:, None] == self.inputs[None]).all(-1)
        assert bool(same.any(1).all()), "an input the lookup does not know"
        return self.outputs[same.float().argmax(1)]


class ByKeyword(nn.Module):
    """`model` taking its image as the keyword argument `image` (and an `id` it ignores)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, id: Any = None) -> torch.Tensor:
        return self.model(image)


class WithAux(nn.Module):
    """A model with several outputs: the lookup's and their sums."""

    def __init__(self, lookup: Lookup, as_dict: bool = False) -> None:
        super().__init__()
        self.lookup, self.as_dict = lookup, as_dict

    def forward(self, x: torch.Tensor) -> Any:
        out = self.lookup(x)
        return {"logits": out, "aux": out.sum(1)} if self.as_dict else (out, out.sum(1))


def images(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """`n` distinct random images (N, C, 4, 4) in [0, 1]."""
    return torch.rand(n, channels, 4, 4, generator=torch.Generator().manual_seed(seed))


def lookup_learner(
    x: torch.Tensor,
    y: Any,
    out: torch.Tensor,
    bs: int = 4,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> Learner:
    """A learner whose model returns `out[i]` for `x[i]`; validation batches `(x, y)` of `bs`."""
    valid = [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]
    dls = DataLoaders(valid, valid, classes=kwargs.pop("classes", None))
    return Learner(model or Lookup(x, out), dls, F.mse_loss, **kwargs)


def colours(fig: Figure) -> list[str]:
    return [ax.title.get_color() for ax in fig.axes]


BLACK = "black"  # the default title colour (matplotlib's rcParams["axes.titlecolor"] "auto")


# --- single-label classification --------------------------------------------------------------


def test_classification_titles_target_and_prediction_mistakes_in_red() -> None:
    x, y = images(5), torch.tensor([0, 1, 2, 1, 0])
    logits = torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 3, 0], [3, 0, 0], [0, 0, 3]])
    fig = show_results(lookup_learner(x, y, logits, classes=CLASSES))
    assert titles(fig) == ["ant / ant", "bee / bee", "cat / bee", "bee / ant", "ant / cat"]
    assert colours(fig) == [BLACK, BLACK, "red", "red", "red"]
    assert all(np.array_equal(g, w) for g, w in zip(shown(fig), as_shown(x)))
    assert fig.get_suptitle() == "target / prediction"


def test_classification_of_dict_batches_reads_the_image_key() -> None:
    x, y = images(6, channels=3), torch.tensor([2, 2, 1, 0, 1, 0])
    logits = F.one_hot(torch.tensor([2, 0, 1, 0, 1, 1]), 3).float()
    valid = [{"image": x[i : i + 4], "label": y[i : i + 4]} for i in (0, 4)]
    fmt = BatchFormat(inputs="image", targets="label")
    learn = Learner(Lookup(x, logits), DataLoaders(valid, valid), F.cross_entropy, batch_format=fmt)
    fig = show_results(learn, max_n=5)  # both batches: the first holds 4 items
    assert titles(fig) == ["2 / 2", "2 / 0", "1 / 1", "0 / 0", "1 / 1"]
    assert colours(fig) == [BLACK, "red", BLACK, BLACK, BLACK]
    assert all(np.array_equal(g, w) for g, w in zip(shown(fig), as_shown(x[:5])))


def test_first_items_reads_only_the_batches_max_n_needs() -> None:
    x, y = images(12), torch.zeros(12, dtype=torch.long)
    drawn = []

    class Counting:
        def __iter__(self) -> Any:
            for i in range(0, 12, 4):
                drawn.append(i)
                yield {"image": x[i : i + 4], "label": y[i : i + 4]}

    fmt = BatchFormat(inputs="image", targets="label")
    learn = Learner(Lookup(x, torch.zeros(12, 3)), DataLoaders([], Counting()), F.cross_entropy,
                    batch_format=fmt)  # fmt: skip
    assert len(show_results(learn, max_n=5).axes) == 5
    assert drawn == [0, 4]  # 2 dict batches of 4 items (each has 2 keys)


# --- multi-label ------------------------------------------------------------------------------


def test_multi_label_titles_name_the_labels_present_red_where_the_sets_differ() -> None:
    x = images(4)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    logits = torch.tensor([[2.0, -2, 1], [1, 1, -1], [-1, -3, -2], [0.5, 1.5, 3]])
    learn = lookup_learner(x, y, logits, classes=CLASSES)
    fig = show_results(learn)
    assert titles(fig) == [
        "ant;cat\nant;cat",
        "bee\nant;bee",
        "(none)\n(none)",
        "ant;bee;cat\nant;bee;cat",
    ]
    assert colours(fig) == [BLACK, "red", BLACK, BLACK]
    assert all(np.array_equal(g, w) for g, w in zip(shown(fig), as_shown(x)))
    assert fig.get_suptitle() == "target labels above, predicted ones (probability > 0.5) below"
    # sigmoid(1) = 0.73, sigmoid(1.5) = 0.82, sigmoid(2) = 0.88, sigmoid(3) = 0.95
    high = show_results(learn, thresh=0.85)
    assert [t.split("\n")[1] for t in titles(high)] == ["ant", "(none)", "(none)", "cat"]
    probs = show_results(learn, activation=lambda p: p / 2)  # "probabilities" above 0.5
    assert [t.split("\n")[1] for t in titles(probs)] == ["ant", "(none)", "(none)", "bee;cat"]


def test_multi_label_integer_targets_without_names() -> None:
    x, y = images(2), torch.tensor([[0, 1], [1, 0]])
    fig = show_results(lookup_learner(x, y, torch.tensor([[-1.0, 1], [-1, -1]])))
    assert titles(fig) == ["1\n1", "0\n(none)"] and colours(fig) == [BLACK, "red"]


# --- regression -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(-1,), (-1, 1)])
def test_regression_on_images_titles_target_and_prediction(shape: tuple[int, ...]) -> None:
    x = images(3, channels=3)
    y = torch.tensor([3.2, -1.0, 0.004]).reshape(shape)
    out = torch.tensor([3.05, 12345.0, 0.0]).reshape(shape)
    fig = show_results(lookup_learner(x, y, out))
    assert titles(fig) == ["3.20 / 3.05", "-1.00 / 1.23e+04", "0.004 / 0.00"]
    assert colours(fig) == [BLACK] * 3
    assert all(np.array_equal(g, w) for g, w in zip(shown(fig), as_shown(x)))


def test_regression_on_feature_vectors_is_a_scatter_of_predictions_against_targets() -> None:
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    y, out = torch.linspace(-2, 2, 10)[:, None], torch.linspace(-1, 3, 10).flip(0)[:, None]
    fig = show_results(lookup_learner(x, y, out), max_n=7)
    (ax,) = fig.axes
    points = ax.collections[0].get_offsets()
    assert np.array_equal(np.asarray(points), np.column_stack([y[:7, 0], out[:7, 0]]))
    (line,) = ax.lines  # prediction = target, over the range of both
    lo, hi = min(float(y[:7].min()), float(out[:7].min())), max(float(y[:7].max()), 3.0)
    assert np.allclose(line.get_xdata(), [lo, hi]) and np.allclose(line.get_ydata(), [lo, hi])
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "target", "prediction", "Predictions of 7 items"
    )  # fmt: skip


# --- image to image ---------------------------------------------------------------------------


def test_image_to_image_is_a_row_per_item_input_target_prediction() -> None:
    x = images(5)
    target, out = 1 - x, x.flip(-1)
    fig = show_results(lookup_learner(x, target, out), max_n=3)
    assert len(fig.axes) == 9
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (3, 3)
    assert titles(fig) == ["input", "target", "prediction"] + [""] * 6
    want = [im for i in range(3) for im in (x[i, 0], target[i, 0], out[i, 0])]
    assert all(np.array_equal(g, w.numpy()) for g, w in zip(shown(fig), want))


def test_image_to_image_from_feature_vectors_shows_target_and_prediction() -> None:
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))  # not images
    target, out = images(2)[:, 0], images(2, seed=1)[:, 0]  # (N, H, W)
    fig = show_results(lookup_learner(x, target, out))
    assert titles(fig) == ["target", "prediction", "", ""]
    want = [target[0], out[0], target[1], out[1]]
    assert all(np.array_equal(g, w.numpy()) for g, w in zip(shown(fig), want))


# --- what show_results does not draw ----------------------------------------------------------


@pytest.mark.parametrize(("as_dict", "pick"), [(False, "out[0]"), (True, "out['logits']")])
def test_several_outputs_are_an_error_saying_how_to_pick_one(as_dict: bool, pick: str) -> None:
    x, y = images(4), torch.tensor([0, 1, 2, 0])
    model = WithAux(Lookup(x, torch.zeros(4, 3)), as_dict)
    learn = lookup_learner(x, y, torch.zeros(4, 3), model=model)
    with pytest.raises(ValueError, match="outputs are several") as e:
        show_results(learn)
    assert f"BatchFormat(preds=lambda out: {pick})" in str(e.value)
    learn.batch_format = BatchFormat(preds=lambda out: out["logits"] if as_dict else out[0])
    assert titles(show_results(learn)) == ["0 / 0", "1 / 0", "2 / 0", "0 / 0"]


def test_an_unknown_kind_is_an_error_naming_what_it_got_and_what_each_kind_needs() -> None:
    x, y = images(4), torch.tensor([0, 1, 2, 0])
    learn = lookup_learner(x, y, torch.zeros(4, 3, 5))
    with pytest.raises(ValueError) as e:
        show_results(learn)
    message = str(e.value)
    assert "predictions Tensor(shape=(4, 3, 5), dtype=torch.float32" in message
    assert "targets Tensor(shape=(4,), dtype=torch.int64" in message
    for needs in ("single-label classification: predictions (N, n_classes)",
                  "multi-label classification", "regression: float targets (N,) or (N, 1)",
                  "image to image", "BatchFormat(preds=lambda out: out[0])",
                  "learn.get_preds(), then show_images"):  # fmt: skip
        assert needs in message


def test_other_errors_say_what_to_do() -> None:
    x, y = images(4), torch.tensor([0, 1, 2, 0])
    weights = torch.ones(4)
    valid = [(x, y, weights)]  # one input, two targets
    learn = Learner(Lookup(x, torch.zeros(4, 3)), DataLoaders(valid, valid), F.cross_entropy)
    with pytest.raises(ValueError, match=r"targets are several: tuple\[Tensor"):
        show_results(learn)
    learn.dls = DataLoaders([(x,)], [(x,)])
    with pytest.raises(ValueError, match="no targets"):
        show_results(learn)
    features = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"these inputs are not images: .*\(4, 5\)"):
        show_results(lookup_learner(features, y, F.one_hot(y, 3).float()))
    with pytest.raises(ValueError, match="max_n must be an int >= 1"):
        show_results(learn, max_n=0)


# --- show_batch on batches of any structure ---------------------------------------------------


def test_show_batch_of_three_items_with_one_input() -> None:
    x, y, w = images(3), torch.tensor([2, 0, 1]), torch.tensor([0.5, 1.0, 2.25])
    learn = Learner(Lookup(x, torch.zeros(3, 3)), DataLoaders([(x, y, w)]), F.cross_entropy)
    fig = show_batch(learn, classes=CLASSES)
    assert titles(fig) == ["cat, 0.50", "ant, 1.00", "bee, 2.25"]
    assert all(np.array_equal(g, wanted) for g, wanted in zip(shown(fig), as_shown(x)))
    two_inputs = BatchFormat(n_inp=2)  # (x, y) inputs, w the target: x shown, w the titles
    learn.batch_format = two_inputs
    assert titles(show_batch(learn)) == ["0.50", "1.00", "2.25"]


def test_show_batch_of_dict_batches() -> None:
    x, y = images(2), torch.tensor([[1.0, 0, 1], [0, 0, 0]])
    batch = {"image": x, "label": y}
    fmt = BatchFormat(inputs="image", targets="label")
    learn = Learner(Lookup(x, y), DataLoaders([batch]), F.mse_loss, batch_format=fmt)
    fig = show_batch(learn, classes=CLASSES)
    assert titles(fig) == ["ant;cat", "(none)"]
    assert all(np.array_equal(g, w) for g, w in zip(shown(fig), as_shown(x)))
    learn.batch_format = BatchFormat(targets="label")  # keyword inputs: no image to show
    with pytest.raises(ValueError, match=r"keyword arguments \['image'\].*inputs='image'"):
        show_batch(learn)


def test_label_text_and_image_input() -> None:
    assert label_text(torch.tensor(2), CLASSES) == "cat"
    assert label_text(torch.tensor([1]), None) == "1"
    assert label_text(torch.tensor(3.2)) == "3.20"
    assert label_text(torch.tensor([0, 1, 1])) == "1;2"
    assert label_text(torch.tensor([True])) == "0"  # a bool vector: the labels present
    assert label_text(torch.tensor([0.2, 0.7])) == ""  # not 0s and 1s
    assert label_text(torch.zeros(2, 2)) == ""  # an image target
    with pytest.raises(ValueError, match="label 3 has no name"):
        label_text(torch.tensor(3), CLASSES)
    x = torch.zeros(2, 1, 4, 4)
    assert image_input((x, torch.ones(2)), "f") is x
    with pytest.raises(ValueError, match=r"f shows image inputs.*got the inputs tuple\[int\]"):
        image_input((3,), "f")


# --- tta on batches of any structure ----------------------------------------------------------


def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def test_tta_of_dict_batches_is_the_mean_of_get_preds_over_the_views() -> None:
    torch.manual_seed(0)
    x, y = images(6, channels=3), torch.tensor([0, 1, 2, 2, 1, 0])
    valid = [{"image": x[i : i + 4], "label": y[i : i + 4], "id": torch.arange(i, i + 4)}
             for i in (0, 4)]  # fmt: skip
    model = ByKeyword(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)))
    fmt = BatchFormat(inputs="image", targets="label")
    learn = Learner(model, DataLoaders(valid, valid), F.cross_entropy, batch_format=fmt)
    preds, targets = tta(learn, [_flip])
    flipped = [{**b, "image": _flip(b["image"])} for b in valid]
    plain, plain_targets = get_preds(learn, valid)
    by_hand = (plain + get_preds(learn, flipped)[0]) / 2
    assert torch.equal(preds, by_hand) and torch.equal(targets, plain_targets)
    assert torch.equal(targets, y)
    learn.batch_format = BatchFormat(targets="label")  # keyword inputs: which one to flip?
    with pytest.raises(ValueError, match="name the image key"):
        tta(learn, [_flip])
    learn.batch_format = BatchFormat(split=lambda b: ((b["image"],), (b["label"],)))
    with pytest.raises(ValueError, match=r"tta transforms the first input"):
        tta(learn, [_flip])


def test_tta_with_several_targets_compares_them_all() -> None:
    torch.manual_seed(0)
    x, y, w = images(4), torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, 0.5, 2.0, float("nan")])
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    learn = Learner(model, DataLoaders([(x, y, w)], [(x, y, w)]), F.cross_entropy)
    preds, (targets, weights) = tta(learn, _flip)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(preds, (model(x) + model(_flip(x))) / 2)
    assert torch.equal(targets, y) and torch.equal(weights.isnan(), w.isnan())
    shuffled = [[(x, y, w)], [(x.flip(0), y.flip(0), w.flip(0))]]

    class Reshuffling:  # the second pass gives the items in another order
        def __init__(self) -> None:
            self.passes = iter(shuffled)

        def __iter__(self) -> Any:
            return iter(next(self.passes))

    with pytest.raises(ValueError, match="is it shuffled"):
        tta(learn, _flip, dl=Reshuffling())


# --- Interpretation on dict batches -----------------------------------------------------------


def test_interpretation_reads_the_images_of_dict_batches_again() -> None:
    x, y = images(6), torch.tensor([0, 1, 2, 2, 1, 0])
    logits = torch.tensor([[2.0, 0, 0], [0, 1, 0], [3, 0, 0], [0, 0, 5], [0, 2, 0], [0, 0, 4]])
    valid = [{"image": x[i : i + 4], "label": y[i : i + 4]} for i in (0, 4)]
    fmt = BatchFormat(inputs="image", targets="label")
    learn = Learner(Lookup(x, logits), DataLoaders(valid, valid), F.cross_entropy, batch_format=fmt)
    interp = interpret(learn)
    assert interp.batch_format is fmt
    _, idx = interp.top_losses(2)
    assert idx.tolist() == [5, 2]  # 0 predicted as 2 with logit 4, 2 predicted as 0 with 3
    fig = interp.plot_top_losses(2)
    assert all(np.array_equal(g, w) for g, w in zip(shown(fig), as_shown(x[[5, 2]])))
    assert [t.split(" / ")[:2] for t in titles(fig)] == [["0", "2"], ["2", "0"]]
