"""Pictures of data and results, and test-time augmentation: every figure's images and titles
checked against the data they show, a hand-written loop as the oracle of `tta`, and a seeded
run that `show_batch` must leave bitwise unchanged."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

import learner
from learner import BatchTransformCB, DataLoaders, Learner, ProgressCB, set_seed
from learner.data import (
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    TensorData,
    digits,
    fashion_mnist,
    mnist,
)
from learner.inference import get_preds
from learner.results import show_results, tta
from learner.utils import model_device
from learner.vision import show_batch, show_images

CLASSES = ("ant", "bee", "cat")
ROOT = Path(__file__).parent.parent


def image_data(channels: int = 1, normalised: bool = False, n: int = 40) -> tuple[Any, Any]:
    """`n` random images (N, C, 8, 8) in [0, 1] (or standardised) and labels of 3 classes."""
    g = torch.Generator().manual_seed(channels)
    x = torch.rand(n, channels, 8, 8, generator=g)
    if normalised:
        x = (x - 0.5) / 0.25
    return x, torch.randint(0, 3, (n,), generator=g)


def make_learner(
    channels: int = 1,
    normalised: bool = False,
    classes: Any = CLASSES,
    cbs: Any = None,
    seed: int = 0,
    **kwargs: Any,
) -> Learner:
    """28 training images in batches of 4 (shuffled), 12 validation ones in batches of 8."""
    x, y = image_data(channels, normalised)
    dls = DataLoaders.from_tensors(x[:28], y[:28], x[28:], y[28:], bs=4, classes=classes)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, 8), nn.ReLU(), nn.Linear(8, 3))
    args = dict(lr=0.1, opt_func=torch.optim.SGD) | kwargs
    return Learner(model, dls, F.cross_entropy, cbs=cbs, **args)


def shown(fig: Figure) -> list[np.ndarray]:
    """The data of each axes' image: (H, W) for grey, (H, W, 3) for colour."""
    assert all(len(ax.images) == 1 for ax in fig.axes)
    return [np.asarray(ax.images[0].get_array()) for ax in fig.axes]


def titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def as_shown(x: torch.Tensor) -> list[np.ndarray]:
    """What `show_images` shows of images (N, C, H, W) whose values lie in [0, 1]."""
    return [im[0].numpy() if im.shape[0] == 1 else im.permute(1, 2, 0).numpy() for im in x]


def stretched(x: torch.Tensor) -> torch.Tensor:
    """Each image from its own minimum to its maximum (what is shown of data outside [0, 1])."""
    flat = x.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    return (x - lo[:, None, None, None]) / (hi - lo)[:, None, None, None]


# --- show_images ------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("form", ["batch", "list", "numpy"])
def test_show_images_shows_each_image_as_it_is(channels: int, form: str) -> None:
    x, _ = image_data(channels, n=6)
    ims: Any = {"batch": x, "list": list(x), "numpy": x.numpy()}[form]
    fig = show_images(ims, titles=[f"#{i}" for i in range(6)])
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    assert titles(fig) == [f"#{i}" for i in range(6)]
    for got, want in zip(shown(fig), as_shown(x)):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("channels", [1, 3])
def test_show_images_stretches_each_normalised_image(channels: int) -> None:
    x, _ = image_data(channels, normalised=True, n=5)
    assert x.min() < 0 and x.max() > 1
    got = shown(show_images(x))
    for g, want in zip(got, as_shown(stretched(x))):
        assert g.min() == 0 and g.max() == 1
        assert np.allclose(g, want, atol=1e-6)


def test_show_images_takes_grey_batches_flattened_images_and_a_constant_image() -> None:
    x, _ = image_data(1, n=4)
    for ims in (x[:, 0], x.flatten(1), [im[0] for im in x]):  # (N, H, W), (N, H*W), [(H, W)]
        assert all(np.array_equal(g, w) for g, w in zip(shown(show_images(ims)), as_shown(x)))
    flat_rgb = image_data(3, n=2)[0]
    assert shown(show_images(flat_rgb.flatten(1)))[0].shape == (8, 8, 3)
    constant = torch.full((2, 1, 4, 4), -3.0)
    assert all(np.array_equal(g, np.zeros((4, 4))) for g in shown(show_images(constant)))


@pytest.mark.parametrize(
    ("n", "nrows", "ncols", "grid"),
    [(9, None, None, (3, 3)), (10, None, None, (3, 4)), (10, 2, None, (2, 5)),
     (10, None, 4, (3, 4)), (3, None, 5, (1, 3)), (6, 2, 3, (2, 3))],
)  # fmt: skip
def test_show_images_grid(n: int, nrows: Any, ncols: Any, grid: tuple[int, int]) -> None:
    fig = show_images(torch.rand(n, 1, 4, 4), nrows=nrows, ncols=ncols)
    assert len(fig.axes) == n
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == grid
    assert tuple(fig.get_size_inches()) == (2.0 * grid[1], 2.0 * grid[0])
    assert tuple(show_images(torch.rand(n, 1, 4, 4), figsize=(7, 3)).get_size_inches()) == (7, 3)


@pytest.mark.parametrize(
    ("ims", "kwargs", "match"),
    [
        (torch.rand(2, 2, 4, 4), {}, "1 or 3 channels"),
        (torch.rand(2, 5, 4, 4, 1), {}, r"got a tensor of shape \(2, 5, 4, 4, 1\)"),
        (torch.rand(2, 10), {}, "not of square images"),
        ([torch.rand(4)], {}, r"\(C, H, W\) or \(H, W\)"),
        (torch.rand(0, 1, 4, 4), {}, "no images"),
        (torch.rand(3, 1, 4, 4), {"titles": ["a"]}, "3 images but 1 titles"),
        (torch.rand(7, 1, 4, 4), {"nrows": 2, "ncols": 3}, "do not fit in nrows=2 x ncols=3"),
        (torch.rand(3, 1, 4, 4), {"ncols": 0}, "ncols must be a positive integer"),
    ],
)
def test_show_images_errors_say_what_to_pass(ims: Any, kwargs: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        show_images(ims, **kwargs)


# --- show_batch -------------------------------------------------------------------------------


def _one_minus(b: Any) -> Any:
    return 1 - b[0], b[1]


@pytest.mark.parametrize("channels", [1, 3])
def test_show_batch_shows_the_batch_after_the_transforms_with_class_names(channels: int) -> None:
    learn = make_learner(channels, cbs=BatchTransformCB(_one_minus))
    fig = show_batch(learn, max_n=3)
    # show_batch put the random states back: the next draw of dls.train is the batch it showed.
    xb, yb = next(iter(learn.dls.train))
    assert len(fig.axes) == 3
    assert titles(fig) == [CLASSES[int(y)] for y in yb[:3]]
    assert all(np.array_equal(g, w) for g, w in zip(shown(fig), as_shown(1 - xb[:3])))


def test_show_batch_shows_negated_normalised_data_stretched() -> None:
    learn = make_learner(cbs=BatchTransformCB(lambda b: (-b[0], b[1])), normalised=True)
    fig = show_batch(learn)
    xb, _ = next(iter(learn.dls.train))
    assert len(fig.axes) == 4  # max_n=9, but a batch holds 4
    for got, want in zip(shown(fig), as_shown(stretched(-xb))):
        assert np.allclose(got, want, atol=1e-6)


def test_show_batch_class_names_from_the_argument_or_numbers() -> None:
    learn = make_learner(classes=None)
    fig = show_batch(learn)
    yb = next(iter(learn.dls.train))[1]  # the batch shown: show_batch put the random states back
    assert titles(fig) == [str(int(y)) for y in yb]
    names = ["zero", "one", "two"]
    fig = show_batch(learn, classes=names)
    yb = next(iter(learn.dls.train))[1]
    assert titles(fig) == [names[int(y)] for y in yb]
    with pytest.raises(ValueError, match=r"label 2 has no name: classes has 2"):
        show_batch(learn, classes=["zero", "one"], dl=[(torch.rand(1, 1, 8, 8), torch.tensor([2]))])


def test_show_batch_from_another_loader_then_the_learners_loaders_are_back() -> None:
    learn = make_learner()
    dls = learn.dls
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    fig = show_batch(learn, dl=[(x, y)])
    assert learn.dls is dls
    assert titles(fig) == ["ant", "bee", "cat", "bee", "ant"]  # dls.classes
    assert all(np.array_equal(g, w) for g, w in zip(shown(fig), as_shown(x)))


def _noise(b: Any) -> Any:
    """An augmentation that draws random numbers, as real ones do."""
    return b[0] + 0.1 * torch.randn_like(b[0]), b[1]


def _seeded_run(show: bool, opt_calls: list[int]) -> tuple[Any, ...]:
    def opt_func(params: Any, lr: float) -> torch.optim.Optimizer:
        opt_calls.append(1)
        return torch.optim.SGD(params, lr=lr)

    set_seed(1)
    learn = make_learner(cbs=BatchTransformCB(_noise), opt_func=opt_func)
    if show:
        cbs, model_flags = list(learn.cbs), [m.training for m in learn.model.modules()]
        state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
        made = len(opt_calls)
        show_batch(learn)
        assert learn.opt is None and len(opt_calls) == made  # no optimizer made
        assert learn.cbs == cbs and learn.recorder.losses == [] and learn.batch is None
        assert (learn.epoch, learn.iter, learn.training) == (0, 0, False)
        assert [m.training for m in learn.model.modules()] == model_flags
        assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
        assert np.array_equal(np.random.get_state()[1], state[2])
    learn.fit(2)
    return (
        [p.detach().clone() for p in learn.model.parameters()],
        list(learn.recorder.losses),
        learn.recorder.history,
    )


def test_show_batch_leaves_a_seeded_run_bitwise_unchanged() -> None:
    calls: list[int] = []
    params, losses, history = _seeded_run(False, calls)
    params2, losses2, history2 = _seeded_run(True, calls)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert losses == losses2 and history == history2
    assert len(calls) == 2  # one optimizer per run, made by fit


def test_show_batch_after_training_takes_no_step(capsys: Any) -> None:
    learn = make_learner(cbs=ProgressCB(bars=True))
    learn.fit(1)
    capsys.readouterr()
    opt, params = learn.opt, [p.detach().clone() for p in learn.model.parameters()]
    opt_state = str(opt.state_dict())
    show_batch(learn)
    assert learn.opt is opt and str(opt.state_dict()) == opt_state
    assert all(torch.equal(a, b) for a, b in zip(params, learn.model.parameters()))
    assert capsys.readouterr().out == ""  # no progress bar for one batch never trained on


# --- show_results -----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("normalised", [False, True])
def test_show_results_titles_targets_and_predictions_mistakes_in_red(
    channels: int, normalised: bool
) -> None:
    learn = make_learner(channels, normalised)
    learn.fit(1)
    preds, targets = get_preds(learn)
    predicted = preds.argmax(1)
    x_valid = torch.cat([x for x, _ in learn.dls.valid])
    state = torch.get_rng_state()
    fig = show_results(learn)  # 9 of the 12 images: the first batch of 8 and one more
    assert torch.equal(torch.get_rng_state(), state)
    assert len(fig.axes) == 9
    assert titles(fig) == [f"{CLASSES[t]} / {CLASSES[p]}" for t, p in zip(targets, predicted)][:9]
    red = [ax.title.get_color() == "red" for ax in fig.axes]
    assert red == (targets != predicted)[:9].tolist()
    want = as_shown(stretched(x_valid[:9]) if normalised else x_valid[:9])
    assert all(np.allclose(g, w, atol=1e-6) for g, w in zip(shown(fig), want))


def test_show_results_options() -> None:
    learn = make_learner(classes=None)
    preds, targets = get_preds(learn)
    fig = show_results(learn, max_n=2)
    assert titles(fig) == [f"{int(t)} / {int(p)}" for t, p in zip(targets, preds.argmax(1))][:2]
    fig = show_results(learn, max_n=20, classes=["x", "y", "z"], dl=learn.dls.train)
    assert len(fig.axes) == 20 and all(re.fullmatch("[xyz] / [xyz]", t) for t in titles(fig))
    learn.dls.valid = None
    with pytest.raises(ValueError, match=r"no valid loader; pass one: show_results\(dl=...\)"):
        show_results(learn)


# --- tta --------------------------------------------------------------------------------------


def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _by_hand(learn: Learner, tfm: Any) -> torch.Tensor:
    """The model's outputs over dls.valid, batch by batch on its device, each input `tfm`ed."""
    device = model_device(learn.model)
    learn.model.eval()
    with torch.no_grad():
        return torch.cat([learn.model(tfm(x.to(device))).cpu() for x, _ in learn.dls.valid])


def test_tta_with_the_identity_alone_is_get_preds() -> None:
    learn = make_learner(3)
    learn.fit(1)
    preds, targets = tta(learn, [])
    want, want_targets = get_preds(learn)
    assert torch.equal(preds, want) and torch.equal(targets, want_targets)


def test_tta_averages_the_outputs_of_each_view() -> None:
    learn = make_learner(3)
    learn.fit(1)
    learn.model.train()
    state = torch.get_rng_state()
    preds, targets = tta(learn, [_flip])
    assert learn.model.training and torch.equal(torch.get_rng_state(), state)
    plain, flipped = _by_hand(learn, lambda x: x), _by_hand(learn, _flip)
    assert torch.equal(preds, (plain + flipped) / 2)
    assert torch.equal(targets, torch.cat([y for _, y in learn.dls.valid]))
    probs, _ = tta(learn, _flip, activation=lambda p: p.softmax(1))  # fastai's average
    assert torch.equal(probs, (plain.softmax(1) + flipped.softmax(1)) / 2)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    three, _ = tta(learn, [_flip, lambda x: -x], dl=[(x, y)])
    x = x.to(model_device(learn.model))
    with torch.no_grad():
        want = ((learn.model(x) + learn.model(_flip(x)) + learn.model(-x)) / 3).cpu()
    assert torch.allclose(three, want, atol=1e-6)
    with pytest.raises(TypeError, match="tfms are functions"):
        tta(learn, [_flip, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="is it shuffled"):
        tta(learn, [_flip], dl=learn.dls.train)


# --- class names from the data ---------------------------------------------------------------


def test_dataloaders_carry_classes() -> None:
    x, y = image_data(n=8)
    assert DataLoaders([(x, y)]).classes is None
    assert DataLoaders([(x, y)], classes=["a", "b"]).classes == ("a", "b")
    dls = DataLoaders.from_tensors(x[:6], y[:6], x[6:], y[6:], bs=2, classes=list(CLASSES))
    assert dls.classes == CLASSES and len(dls.train) == 3
    ds = torch.utils.data.TensorDataset(x, y)
    assert DataLoaders.from_datasets(ds, ds, bs=4, classes=CLASSES).classes == CLASSES
    with pytest.raises(TypeError, match="sequence of names"):
        DataLoaders([(x, y)], classes="abc")
    with pytest.raises(TypeError, match="sequence of names"):
        DataLoaders([(x, y)], classes=[0, 1])


def test_tensor_data_is_four_tensors_and_their_class_names() -> None:
    x, y = image_data(n=8)
    data = TensorData(x[:6], y[:6], x[6:], y[6:], classes=["a", "b", "c"])
    x_train, _, _, y_valid = data  # four tensors, as before
    assert len(data) == 4 and x_train is data.x_train and y_valid is data.y_valid
    assert data.classes == ("a", "b", "c")
    assert TensorData(x, y, x, y).classes is None
    assert data._replace(x_train=x).classes == data.classes
    copy = pickle.loads(pickle.dumps(data))
    assert copy.classes == data.classes and torch.equal(copy.x_train, data.x_train)
    dls = DataLoaders.from_tensors(*data, bs=2, classes=data.classes)
    assert dls.classes == ("a", "b", "c") and len(dls.valid) == 1


@pytest.mark.parametrize(
    ("loader", "dataset", "names"),
    [(mnist, "MNIST", DIGIT_CLASSES), (fashion_mnist, "FashionMNIST", FASHION_MNIST_CLASSES)],
)
def test_the_mnist_helpers_name_their_classes(
    loader: Any, dataset: str, names: tuple[str, ...], tmp_path: Path, monkeypatch: Any
) -> None:
    torchvision = pytest.importorskip("torchvision")

    class Fake:  # the torchvision dataset, with 3 training and 2 validation images
        def __init__(self, root: Any, train: bool = True, download: bool = False) -> None:
            self.data = torch.zeros(3 if train else 2, 28, 28, dtype=torch.uint8)
            self.targets = torch.tensor([0, 9, 5][: len(self.data)])

    monkeypatch.setattr(torchvision.datasets, dataset, Fake)
    data = loader(root=tmp_path)
    assert data.classes == names and data.x_train.shape == (3, 1, 28, 28)


def test_digits_and_mnist_class_names() -> None:
    assert tuple("0123456789") == DIGIT_CLASSES
    fashion = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip
    assert fashion == FASHION_MNIST_CLASSES
    pytest.importorskip("sklearn", reason="digits() needs scikit-learn")
    assert digits().classes == DIGIT_CLASSES


# --- the Learner's methods and the docs -------------------------------------------------------


def test_the_learner_takes_them_as_methods_and_the_package_exports_show_images() -> None:
    assert learner.show_images is show_images
    assert Learner.show_batch is show_batch
    assert Learner.show_results is show_results
    assert Learner.tta is tta


def test_the_pictures_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/pictures.md, every python block in order, as one script."""
    pytest.importorskip("sklearn", reason="the page uses digits(), from scikit-learn")
    monkeypatch.chdir(tmp_path)
    page = (ROOT / "docs" / "pictures.md").read_text("utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    assert len(blocks) >= 4
    scope: dict[str, Any] = {}
    for code in blocks:
        exec(code, scope)
    assert isinstance(scope["learn"], Learner)
    assert (tmp_path / "batch.png").stat().st_size > 0
