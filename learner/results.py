"""What the model says of validation items: `learn.show_results()` draws its predictions for
the first of them beside their targets, and `learn.tta(tfms)` averages its predictions over the
inputs as they are and transformed (test-time augmentation).

`show_results` draws the results in the form their kind calls for (as fastai's does, which reads
the kind from the data blocks; here it is read from the shapes):

- single-label classification, outputs `(N, n_classes)` and integer labels `(N,)`: each image
  titled "target / prediction", mistakes in red;
- multi-label classification, outputs and 0/1 targets `(N, n_labels)`: each image titled with
  the names of the labels present in the target and predicted (sigmoid above `thresh`), each set
  joined by ";", red where they differ;
- regression, float targets `(N,)` or `(N, 1)` and one output per item: images titled
  "target / prediction" as numbers; inputs that are not images (feature vectors) get a scatter
  plot of the predictions against the targets instead;
- image to image, outputs and targets images of one shape: a row per item, its input, target and
  prediction side by side.

The inputs drawn are each batch's first positional input, as the learner's `batch_format` splits
it (`learner.vision.image_input`); that is also the input `tta` transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from learner.batches import BatchFormat, item_count
from learner.checks import check_int, describe
from learner.core import BaseLearner
from learner.inference import get_preds
from learner.plotting import new_figure
from learner.snapshot import kept_state
from learner.utils import model_device, to_device
from learner.vision import image_input, label_text, pick_loader, show_images

__all__ = ["show_results", "tta"]

_KINDS = (
    "single-label classification: predictions (N, n_classes), targets (N,) integer labels",
    "multi-label classification: predictions and targets (N, n_labels), the targets 0 or 1",
    "regression: float targets (N,) or (N, 1) and one prediction per item",
    "image to image: predictions and targets images of one shape, (N, C, H, W) with C 1 or 3, "
    "or (N, H, W)",
)


def _first_items(learn: BaseLearner, dl: Iterable[Any], n: int) -> list[Any]:
    """The first batches of `dl`, enough to hold `n` items (counted in their inputs)."""
    batches, count = [], 0
    for batch in dl:
        batches.append(batch)
        count += item_count(learn.batch_format.split(batch)[0])
        if count >= n:
            break
    return batches


def _is_images(t: Any) -> bool:
    """A batch of images as `show_images` draws them: `(N, H, W)`, or `(N, C, H, W)` with 1 or 3
    channels."""
    return isinstance(t, Tensor) and (t.ndim == 3 or (t.ndim == 4 and t.shape[1] in (1, 3)))


def _zeros_and_ones(t: Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def _kind(preds: Tensor, targets: Tensor) -> str | None:
    """Which of the kinds `show_results` draws these are, or None."""
    n = preds.shape[0]
    if targets.ndim == 0 or targets.shape[0] != n:
        return None
    if preds.shape == targets.shape and _is_images(preds):
        return "image"
    if preds.ndim == 2 and preds.shape == targets.shape and _zeros_and_ones(targets):
        return "multi-label"
    if preds.ndim == 2 and targets.ndim == 1 and not targets.is_floating_point():
        return "classification"
    one_each = preds.numel() == n and targets.numel() == n and preds.ndim <= 2 >= targets.ndim
    return "regression" if one_each and targets.is_floating_point() else None


def _several(what: str, value: Any) -> ValueError:
    if what == "outputs":
        pick = f"out[{next(iter(value))!r}]" if isinstance(value, Mapping) else "out[0]"
        fix = (
            f"pick the one to show with Learner(..., batch_format=BatchFormat(preds=lambda out: "
            f"{pick})) (what the loss and metrics see, too)"
        )
    else:
        fix = (
            "make the one to compare the only target, e.g. BatchFormat(split=lambda b: ((b[0],), "
            "(b[1],)))"
        )
    return ValueError(
        f"show_results compares one prediction with one target per item, but the batches' "
        f"{what} are several: {describe(value)}. Either {fix}, or draw your own: "
        "preds, targets = learn.get_preds(), then show_images(...)."
    )


def _check(preds: Any, targets: Any) -> str:
    """The kind of results, or a ValueError saying what each kind needs."""
    if not isinstance(preds, Tensor):
        raise _several("outputs", preds)
    if not isinstance(targets, Tensor):
        raise _several("targets", targets)
    kind = _kind(preds, targets)
    if kind is None:
        raise ValueError(
            f"show_results cannot tell what kind of results these are: predictions "
            f"{describe(preds)}, targets {describe(targets)}. It draws "
            + "; ".join(_KINDS)
            + ". For a model with several outputs, pick the one to show with Learner(..., "
            "batch_format=BatchFormat(preds=lambda out: out[0])); for anything else draw your "
            "own: preds, targets = learn.get_preds(), then show_images(...)."
        )
    return kind


def _inputs(learn: BaseLearner, batches: list[Any], n: int) -> Tensor:
    """The first `n` items of the batches' image inputs, on the CPU."""
    parts = [image_input(learn.batch_format.split(b)[0], "show_results") for b in batches]
    return torch.cat([p.detach().cpu() for p in parts])[:n]


def _image_inputs(learn: BaseLearner, batches: list[Any], n: int) -> Tensor | None:
    """The batches' first inputs when they are images `(N, [C,] H, W)`, else None."""
    parts = []
    for batch in batches:
        inputs = learn.batch_format.split(batch)[0]
        if not isinstance(inputs, tuple) or not inputs or not _is_images(inputs[0]):
            return None
        parts.append(inputs[0].detach().cpu())
    return torch.cat(parts)[:n]


def _on_images(images: Tensor, titles: list[str], colors: list[str | None] | None) -> Figure:
    try:
        return show_images(images, titles=titles, colors=colors)
    except ValueError as e:
        raise ValueError(
            f"show_results draws a classifier's results on its input images, and these inputs "
            f"are not images: {e} For other inputs look at learn.get_preds() or "
            "learn.interpret()."
        ) from e


def _scatter(targets: Tensor, preds: Tensor) -> Figure:
    """Predictions against targets, and the line where they would be equal."""
    fig, (ax,) = new_figure(1, 4.5, 4.5)
    t, p = targets.numpy(), preds.numpy()
    ax.scatter(t, p, s=16, alpha=0.7)
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    ax.plot(
        [lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="prediction = target"
    )
    ax.set_xlabel("target")
    ax.set_ylabel("prediction")
    ax.set_title(f"Predictions of {len(t)} items")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _image_to_image(x: Tensor | None, targets: Tensor, preds: Tensor) -> Figure:
    """A row per item: its input (when it is an image), target and prediction."""
    columns = ([] if x is None else [x]) + [targets, preds]
    names = ["input", "target", "prediction"][-len(columns) :]
    images = [column[i] for i in range(len(preds)) for column in columns]
    titles = names + [""] * (len(images) - len(names))  # the columns named once, on top
    return show_images(images, ncols=len(columns), titles=titles)


def show_results(
    learn: BaseLearner,
    max_n: int = 9,
    dl: Any = None,
    classes: Sequence[str] | None = None,
    thresh: float = 0.5,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> Figure:
    """The first validation items with the model's predictions, drawn as their kind calls for.

    The kind is read from the predictions and targets (see `learner.results`): single-label
    classification (images titled "target / prediction", the prediction the largest output,
    mistakes in red), multi-label (images titled with the labels present in the target and
    predicted, joined by ";", red where they differ), regression (images titled with the
    target and prediction as numbers; for inputs that are not images, such as feature vectors, a
    scatter plot of predictions against targets), or image to image (a row per item: input,
    target, prediction). Anything else is a ValueError saying what each kind needs.

    The predictions are `get_preds`'s over as many batches of `dl` as `max_n` items need: eval
    mode, through the learner's validation batch transforms, no event fired. The inputs drawn
    are the batches' first positional input as they come from `dl` (before those transforms),
    as `learn.batch_format` splits them. The random states are put back afterwards.

    Args:
        learn: the Learner.
        max_n: show at most this many items. Default 9.
        dl: the loader. Default None: `dls.valid`.
        classes: the name of each class or label. Default None: `dls.classes`, else the
            numbers.
        thresh: multi-label only: a label is predicted when its probability is above this.
            Default 0.5 (fastai's).
        activation: multi-label only: what turns the outputs into probabilities. Default None:
            the sigmoid, for a model returning logits (as `BCEWithLogitsLoss` takes them); pass
            `lambda p: p` for a model that returns probabilities.

    Returns:
        A `Figure`: one axes per item (three, or two, per item for image to image; one scatter
        plot for regression on feature vectors).

    Examples:
        >>> learn.fit(3)
        >>> learn.show_results()  # in a notebook: shown inline
        >>> learn.show_results(max_n=16, thresh=0.3).savefig("results.png")  # doctest: +SKIP
    """
    check_int("show_results max_n", max_n, 1)
    classes = classes if classes is not None else getattr(learn.dls, "classes", None)
    dl = pick_loader(learn, dl, "valid", "show_results")
    with kept_state(learn, rng=True):
        batches = _first_items(learn, dl, max_n)
        if not batches:
            raise ValueError("show_results: the loader yielded no batch.")
        preds, targets = get_preds(learn, batches)
    kind = _check(preds, targets)
    preds, targets = preds[:max_n], targets[:max_n]
    if kind == "image":
        return _image_to_image(_image_inputs(learn, batches, max_n), targets, preds)
    if kind == "regression":
        t, p = targets.reshape(-1).float(), preds.reshape(-1).float()
        x = _image_inputs(learn, batches, max_n)
        if x is None:
            return _scatter(t, p)
        fig = show_images(x, titles=[f"{label_text(a)} / {label_text(b)}" for a, b in zip(t, p)])
        return _headed(fig, "target / prediction")
    if kind == "classification":
        actual, predicted = targets, preds.argmax(1)
        between, head = " / ", "target / prediction"
    else:  # multi-label: two lines, as sets of several names are too wide for one
        probs = (torch.sigmoid if activation is None else activation)(preds.float())
        actual, predicted = targets.bool(), probs > thresh
        between, head = "\n", f"target labels above, predicted ones (probability > {thresh}) below"
    titles = [
        label_text(a, classes) + between + label_text(b, classes) for a, b in zip(actual, predicted)
    ]
    colors: list[str | None] = [
        None if bool((a == b).all()) else "red" for a, b in zip(actual, predicted)
    ]
    return _headed(_on_images(_inputs(learn, batches, max_n), titles, colors), head)


def _headed(fig: Figure, head: str) -> Figure:
    """`fig` with a heading that says how to read its titles."""
    fig.suptitle(head, fontsize=10)
    return fig


# --- test-time augmentation -------------------------------------------------------------------


def _transformed(batch: Any, tfm: Callable[[Tensor], Tensor], fmt: BatchFormat) -> Any:
    """`batch` with `tfm` applied to its first input, in a structure `fmt` still splits."""
    if fmt.custom_split is None:
        if isinstance(batch, Tensor):  # the input alone
            return tfm(batch)
        if isinstance(batch, (tuple, list)) and batch:
            items = [tfm(batch[0]), *batch[1:]]
            return tuple(items) if isinstance(batch, tuple) else items
        if isinstance(batch, Mapping) and fmt.positional and fmt.inputs is not None:
            fmt.split(batch)  # a clear error when the key is missing
            key = fmt.inputs[0]
            return {**batch, key: tfm(batch[key])}
        if isinstance(batch, Mapping):
            raise ValueError(
                f"tta transforms one image input, but this dict batch's inputs are keyword "
                f"arguments (its keys {list(batch)}): name the image key, Learner(..., "
                "batch_format=BatchFormat(inputs='image', targets='label'))."
            )
    raise ValueError(
        f"tta transforms the first input of each batch: item 0 of a tuple batch (x, ...), or "
        f"the key of BatchFormat(inputs='image') in a dict batch; this batch is "
        f"{describe(batch)}, split by {fmt!r}. For another structure, make loaders of "
        "transformed batches and average get_preds over them yourself."
    )


class _TransformedX:
    """`dl`'s batches moved to `device`, with `tfm` applied to each batch's first input."""

    def __init__(
        self, dl: Iterable[Any], tfm: Callable[[Tensor], Tensor], device: Any, fmt: BatchFormat
    ) -> None:
        self.dl, self.tfm, self.device, self.fmt = dl, tfm, device, fmt

    def __iter__(self) -> Iterator[Any]:
        for batch in self.dl:
            yield _transformed(to_device(batch, self.device), self.tfm, self.fmt)


def _same(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are the same targets: equal tensors (NaN equal to NaN) in the same
    structure of tuples, lists and dicts."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape):
            return False
        if torch.equal(a, b):
            return True
        return a.is_floating_point() and bool(torch.isclose(a, b, 0, 0, equal_nan=True).all())
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (
            isinstance(a, Mapping)
            and isinstance(b, Mapping)
            and list(a) == list(b)
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (
            isinstance(a, (tuple, list))
            and isinstance(b, (tuple, list))
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    return bool(a == b)


def tta(
    learn: BaseLearner,
    tfms: Callable[[Tensor], Tensor] | Iterable[Callable[[Tensor], Tensor]],
    dl: Any = None,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Any]:
    """Test-time augmentation: the model's outputs averaged over the inputs as they are and
    transformed by each of `tfms`.

    Each view is a `get_preds` pass over `dl` (eval mode, the learner's validation batch
    transforms, no event fired), with the transform applied on the model's device to each batch's
    first input: item 0 of a tuple batch `(x, ...)` (or the batch, when it is a tensor), or for a
    dict batch the value of the key named by `BatchFormat(inputs="image")`; the rest of the batch
    is left as it is. So `dl` must give the same items in the same order in each pass (not
    shuffled); random transforms draw new numbers in each view.
    What is averaged is the model's raw outputs (for a classifier, its logits, as `get_preds`
    returns them): with no transforms the result is exactly `get_preds`'s, and `argmax`,
    `interpret` or a softmax apply to it as to `get_preds`'s. fastai averages probabilities
    instead: pass `activation=lambda p: p.softmax(1)` for that. The random states are put back
    afterwards.

    Args:
        learn: the Learner.
        tfms: a function of a batch's first input, or several (e.g. a horizontal flip,
            `lambda x: x.flip(-1)`); each adds one view to the identity.
        dl: the loader. Default None: `dls.valid`.
        activation: applied to each view's outputs before averaging. Default None: none.

    Returns:
        `(preds, targets)` on the CPU: the mean over the `1 + len(tfms)` views, and the targets
        as `get_preds` returns them (a tuple of several).

    Examples:
        >>> preds, targets = learn.tta([lambda x: x.flip(-1)])
        >>> (preds.argmax(1) == targets).float().mean()
    """
    views = [tfms] if callable(tfms) else list(tfms)
    for tfm in views:
        if not callable(tfm):
            raise TypeError(f"tta: tfms are functions of a batch's input x, got {tfm!r}.")
    dl = pick_loader(learn, dl, "valid", "tta")
    device = model_device(learn.model)
    with kept_state(learn, rng=True):
        preds, targets = get_preds(learn, dl)
        if not isinstance(preds, Tensor):
            raise TypeError(
                f"tta averages one tensor of predictions; the model returns {describe(preds)}: "
                "pick one with Learner(..., batch_format=BatchFormat(preds=lambda out: out[0]))."
            )
        outs = [preds]
        for tfm in views:
            out, view_targets = get_preds(learn, _TransformedX(dl, tfm, device, learn.batch_format))
            if not _same(view_targets, targets):
                raise ValueError(
                    "tta: dl gave other items in another pass (is it shuffled?); pass a loader "
                    "that gives the same items in the same order each time, such as dls.valid."
                )
            outs.append(out)
    if activation is not None:
        outs = [activation(out) for out in outs]
    total = outs[0]
    for out in outs[1:]:
        total = total + out
    return total / len(outs), targets
