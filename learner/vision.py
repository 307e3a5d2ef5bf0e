"""Looking at images: a grid of them (`show_images`) and a training batch as the model sees it
(`learn.show_batch()`). Validation results (`learn.show_results()`) and test-time augmentation
(`learn.tta(tfms)`) are in `learner.results`.

A batch's images are its first positional input as the learner's `batch_format` splits it
(`image_input`), and its labels read as `label_text` writes them, so tuple batches `(x, y, ...)`
and dict batches with `BatchFormat(inputs="image")` are shown alike.

Every picture is a matplotlib `Figure` returned to the caller (`learner.plotting.new_figure`):
a notebook shows it inline, a script calls `fig.savefig(...)`. None of these leaves a trace on
the learner: no optimizer is made, nothing is recorded, and the random states, the callbacks and
the loop's state are as before.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from learner.batches import Inputs
from learner.callbacks.progress import ProgressCB
from learner.checks import describe
from learner.core import BaseLearner, CancelFitException
from learner.data import DataLoaders
from learner.events import Callback, as_cbs
from learner.plotting import new_figure
from learner.snapshot import side_run

__all__ = [
    "image_input",
    "label_text",
    "pick_loader",
    "show_batch",
    "show_image_batch",
    "show_images",
]

_INCHES = 2.0  # the side of one image in a grid, by default


# --- a grid of images -------------------------------------------------------------------------


def _as_images(ims: Any) -> list[Tensor]:
    """`ims` as a list of float32 CPU tensors `(C, H, W)` with C 1 or 3."""
    if isinstance(ims, (list, tuple)):
        items = [
            torch.as_tensor(np.asarray(im) if not isinstance(im, Tensor) else im) for im in ims
        ]
        images = [im.unsqueeze(0) if im.ndim == 2 else im for im in items]
        if any(im.ndim != 3 for im in images):
            shapes = sorted({tuple(im.shape) for im in images if im.ndim != 3})
            raise ValueError(
                f"show_images: each image of a list is (C, H, W) or (H, W); got shapes {shapes}."
            )
    else:
        batch = torch.as_tensor(ims if isinstance(ims, Tensor) else np.asarray(ims))
        if batch.ndim == 2:  # flattened images (N, D): square ones, of 1 or 3 channels
            batch = _unflatten(batch)
        elif batch.ndim == 3:  # (N, H, W)
            batch = batch.unsqueeze(1)
        elif batch.ndim != 4:
            raise ValueError(
                "show_images takes a batch (N, C, H, W) or (N, H, W), or a list of images "
                f"(C, H, W) or (H, W); got a tensor of shape {tuple(batch.shape)}."
            )
        images = list(batch)
    for im in images:
        if im.shape[0] not in (1, 3):
            raise ValueError(
                f"show_images shows images of 1 or 3 channels, channels first (C, H, W); got one "
                f"of shape {tuple(im.shape)}. Channels-last images: .permute(0, 3, 1, 2) them."
            )
    return [im.detach().to("cpu", torch.float32) for im in images]


def _unflatten(batch: Tensor) -> Tensor:
    """Flattened square images `(N, C*S*S)` as `(N, C, S, S)`, C being 1 or 3."""
    n, d = batch.shape
    for c in (1, 3):
        side = math.isqrt(d // c)
        if d % c == 0 and side * side * c == d:
            return batch.reshape(n, c, side, side)
    raise ValueError(
        f"show_images: a batch of shape {tuple(batch.shape)} is not of square images (N, S*S) "
        "or (N, 3*S*S); reshape it to (N, C, H, W) first."
    )


def _for_display(images: list[Tensor]) -> list[Tensor]:
    """Values in [0, 1] as they are; otherwise each image stretched from its own min to max."""
    lo = min(float(im.min()) for im in images)
    hi = max(float(im.max()) for im in images)
    if lo >= 0.0 and hi <= 1.0:
        return images
    out = []
    for im in images:
        low, span = im.min(), im.max() - im.min()
        out.append((im - low) / span if span > 0 else torch.zeros_like(im))
    return out


def _grid(n: int, nrows: int | None, ncols: int | None) -> int:
    """The number of columns of a grid of `n` images."""
    for name, value in (("nrows", nrows), ("ncols", ncols)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"show_images: {name} must be a positive integer, got {value!r}.")
    if nrows is not None and ncols is not None and nrows * ncols < n:
        raise ValueError(
            f"show_images: {n} images do not fit in nrows={nrows} x ncols={ncols}; give one of "
            "them and the other follows."
        )
    if ncols is not None:
        return min(ncols, n)
    if nrows is not None:
        return -(-n // nrows)
    return math.ceil(math.sqrt(n))


def _show(
    images: list[Tensor],
    titles: Sequence[str] | None = None,
    colors: Sequence[str | None] | None = None,
    nrows: int | None = None,
    ncols: int | None = None,
    figsize: tuple[float, float] | None = None,
    imsize: float | None = None,
    suptitle: str | None = None,
) -> Figure:
    """`show_images`, with a colour for each title (None: the default)."""
    n = len(images)
    if n == 0:
        raise ValueError("show_images: no images to show.")
    if titles is not None and len(titles) != n:
        raise ValueError(f"show_images: {n} images but {len(titles)} titles; pass one per image.")
    if colors is not None and (titles is None or len(colors) != n):
        raise ValueError(
            f"show_images: colors colour the titles, one per image: {n} images, "
            f"{len(titles or ())} titles and {len(colors)} colors."
        )
    cols = _grid(n, nrows, ncols)
    rows = -(-n // cols)
    if imsize is not None and not (isinstance(imsize, (int, float)) and imsize > 0):
        raise ValueError(
            f"show_images: imsize must be a positive number of inches, got {imsize!r}."
        )
    side = _INCHES if imsize is None else float(imsize)
    width, height = figsize if figsize is not None else (side * cols, side * rows)
    fig, axes = new_figure(n, width / cols, height / rows, cols)
    if suptitle is not None:
        fig.suptitle(suptitle)
    for i, (ax, im) in enumerate(zip(axes, _for_display(images))):
        if im.shape[0] == 1:
            ax.imshow(im[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(im.permute(1, 2, 0).clamp(0.0, 1.0).numpy())
        ax.set_axis_off()
        if titles is not None:
            color = colors[i] if colors is not None else None
            ax.set_title(titles[i], fontsize=9, **({"color": color} if color else {}))
    return fig


def show_images(
    ims: Any,
    nrows: int | None = None,
    ncols: int | None = None,
    titles: Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    colors: Sequence[str | None] | None = None,
    imsize: float | None = None,
    suptitle: str | None = None,
) -> Figure:
    """A grid of images, as a matplotlib `Figure`.

    Images have 1 channel (shown in grey) or 3 (RGB), channels first. Values that all lie in
    [0, 1] are shown as they are; otherwise (normalised data, bytes 0..255) each image is
    stretched from its own minimum (black) to its own maximum (white), so nothing is clipped,
    and images are comparable in shape, not in brightness. Tensors may be on any device.

    Args:
        ims: a batch `(N, C, H, W)` or `(N, H, W)`, flattened square images `(N, S*S)`, or a
            list of images `(C, H, W)` or `(H, W)`: tensors or NumPy arrays.
        nrows: rows of the grid. Default None: from `ncols`, or as square as it gets.
        ncols: columns of the grid. Default None: from `nrows`, or as square as it gets.
        titles: one title per image, or None.
        figsize: the whole figure's `(width, height)` in inches. Default None: 2 inches an
            image.
        colors: the colour of each title (a matplotlib colour, or None for the default), or
            None: all in the default colour.
        imsize: the side of one image in inches (the course's argument), when `figsize` is
            not given. Default None: 2.
        suptitle: a title above the grid.

    Returns:
        The `Figure`, one axes per image (closed in pyplot: a notebook shows it once).

    Examples:
        >>> xb, yb = next(iter(dls.train))
        >>> fig = show_images(xb[:8], ncols=4, titles=[str(int(y)) for y in yb[:8]])
        >>> fig.savefig("batch.png")  # doctest: +SKIP
    """
    return _show(_as_images(ims), titles, colors, nrows, ncols, figsize, imsize, suptitle)


# --- what the learner sees and says ----------------------------------------------------------


def _classes(learn: BaseLearner, classes: Sequence[str] | None) -> Sequence[str] | None:
    return classes if classes is not None else getattr(learn.dls, "classes", None)


def _number(value: float) -> str:
    """A regression target or prediction in a title: 2 decimals, or 3 significant digits for
    values too small or too large for them."""
    return f"{value:.2f}" if value == 0 or 0.01 <= abs(value) < 1e4 else f"{value:.3g}"


def _class_name(i: int, classes: Sequence[str] | None) -> str:
    if classes is None:
        return str(i)
    if not 0 <= i < len(classes):
        raise ValueError(f"label {i} has no name: classes has {len(classes)} ({list(classes)}).")
    return classes[i]


def label_text(label: Tensor, classes: Sequence[str] | None = None) -> str:
    """One item's label as a title: a class's name, a number, or the names of several labels.

    An integer label is a class: its name in `classes`, or its number. A float is a value
    (regression): 2 decimals. A vector of 0s and 1s that is bool or holds 2 or more values is a
    multi-label target: the names of its 1s joined by ";" ("(none)" when there are none).
    Anything else (an image target, say) reads as "".

    Args:
        label: one item's label, a tensor.
        classes: the name of each class, or None: the numbers.

    Examples:
        >>> label_text(torch.tensor(2), ["ant", "bee", "cat"])
        'cat'
        >>> label_text(torch.tensor([1.0, 0.0, 1.0]), ["ant", "bee", "cat"])
        'ant;cat'
        >>> label_text(torch.tensor(3.2))
        '3.20'
    """
    if label.ndim == 1 and (label.dtype == torch.bool or label.numel() > 1):
        if bool(((label == 0) | (label == 1)).all()):
            names = [_class_name(int(i), classes) for i in label.nonzero().flatten()]
            return ";".join(names) if names else "(none)"
        return ""
    if label.numel() != 1:
        return ""
    if label.is_floating_point():
        return _number(float(label.item()))
    return _class_name(int(label.item()), classes)


def image_input(inputs: Inputs, caller: str) -> Tensor:
    """The images of a batch: the first of its positional `inputs`, as `BatchFormat.split`
    gives them (`learn.batch_format.split(batch)[0]`).

    Args:
        inputs: a batch's inputs, a tuple of positional ones or a dict of keyword ones.
        caller: the function that wants them, to name it in an error.

    Raises:
        ValueError: the inputs are keyword arguments (a dict), or hold no tensor first.

    Examples:
        >>> fmt = BatchFormat(inputs="image", targets="label")
        >>> image_input(fmt.split({"image": x, "label": y})[0], "show_batch") is x
        True
    """
    if isinstance(inputs, Mapping):
        raise ValueError(
            f"{caller} shows image inputs: the first positional input of each batch. This "
            f"batch's inputs are keyword arguments {list(inputs)}; for a dict batch name its "
            "image key: Learner(..., batch_format=BatchFormat(inputs='image', targets='label'))."
        )
    if not inputs or not isinstance(inputs[0], Tensor):
        raise ValueError(
            f"{caller} shows image inputs: the first positional input of each batch, a tensor; "
            f"got the inputs {describe(inputs)}."
        )
    return inputs[0]


def pick_loader(learn: BaseLearner, dl: Any, split: str, caller: str) -> Any:
    """`dl` if given, else `learn.dls.<split>`; a ValueError naming `caller` if there is none.

    Examples:
        >>> pick_loader(learn, None, "valid", "show_results") is learn.dls.valid
        True
    """
    if dl is not None:
        return dl
    dl = getattr(learn.dls, split, None)
    if dl is None:
        raise ValueError(f"{caller}: dls has no {split} loader; pass one: {caller}(dl=...).")
    return dl


class _GrabBatchCB(Callback):
    """Keeps the first batch as it is after every other callback's `before_batch`, then ends
    the fit before the model sees it."""

    order = sys.maxsize  # after every callback's before_batch
    in_side_runs = False

    def __init__(self) -> None:
        self.batch: Any = None

    def before_batch(self, learn: BaseLearner) -> None:
        self.batch = learn.batch
        raise CancelFitException()


class _NoSteps:
    """Stands in for the optimizer that `fit` would otherwise make for a training run that never
    reaches a step (`show_batch`'s)."""

    def __init__(self) -> None:
        self.param_groups: list[dict[str, Any]] = []

    def step(self) -> None:
        raise RuntimeError("show_batch's run takes no optimizer step.")

    def zero_grad(self) -> None:
        raise RuntimeError("show_batch's run takes no optimizer step.")


@contextmanager
def _training_loader(learn: BaseLearner, dl: Any) -> Iterator[None]:
    """Within the block `dls.train` is `dl` (when given) and there is no validation loader."""
    dls = learn.dls
    if dl is not None:
        learn.dls = DataLoaders(dl)
    try:
        yield
    finally:
        learn.dls = dls


def _training_batch(learn: BaseLearner, dl: Any, cbs: Iterable[Callback] = ()) -> Any:
    """The first batch of `dl` (default `dls.train`) as the model would see it in training,
    with the callbacks `cbs` added for the run."""
    grab = _GrabBatchCB()
    with _training_loader(learn, dl), side_run(learn, weights=False) as copies:
        if learn.opt is None:
            learn.opt = _NoSteps()  # put back (None) when the side run ends
        # A progress bar for one batch that is never trained on is noise.
        copies = [cb for cb in copies if not isinstance(cb, ProgressCB)]
        learn.fit(1, cbs=[*copies, *cbs, grab], valid=False)
    if grab.batch is None:
        raise ValueError("show_batch: the loader yielded no batch.")
    return grab.batch


def show_batch(
    learn: BaseLearner, max_n: int = 9, dl: Any = None, classes: Sequence[str] | None = None
) -> Figure:
    """The first training batch as the model sees it, with its labels as titles.

    The batch is drawn and prepared as in training: the learner's callbacks that take part in
    side runs (`Callback.in_side_runs`: `DeviceCB`, `BatchTransformCB`'s normalisation and
    augmentation, your own) run, as copies, up to `before_batch`; then the run stops, before the
    model sees the batch. No optimizer is made and no step taken; nothing is recorded; the random
    states are put back, so a seeded run afterwards is the one it would have been. Images are
    shown as `show_images` does (normalised ones rescaled).

    The images are the batch's first positional input and the titles its targets, as the
    learner's `batch_format` splits the batch (`image_input`; `label_text` writes each label;
    several targets are joined by ", "). A dict batch of keyword inputs has no image input to
    show: name its image key with `BatchFormat(inputs="image")`.

    Args:
        learn: the Learner.
        max_n: show at most this many images of the batch. Default 9.
        dl: the loader to draw the batch from, treated as a training loader. Default None:
            `dls.train`.
        classes: the name of each label. Default None: `dls.classes` if the loaders have it,
            else the labels' numbers.

    Returns:
        A `Figure`, one axes per image.

    Examples:
        >>> learn.show_batch()  # in a notebook: shown inline
        >>> learn.show_batch(max_n=16).savefig("batch.png")  # doctest: +SKIP
    """
    classes = _classes(learn, classes)
    if dl is None:
        pick_loader(learn, None, "train", "show_batch")  # a clear error if there is none
    batch = _training_batch(learn, dl)
    inputs, targets = learn.batch_format.split(batch)
    x = image_input(inputs, "show_batch")[:max_n]
    # Targets with a label per item title the images; a lone number (a batch weight) does not.
    labels = [y for y in targets if isinstance(y, Tensor) and y.ndim > 0 and len(y) >= len(x)]
    if not labels:
        return show_images(x)
    texts = [[label_text(y[i], classes) for y in labels] for i in range(len(x))]
    return show_images(x, titles=[", ".join(t for t in item if t) for item in texts])


def show_image_batch(
    learn: BaseLearner,
    max_n: int = 9,
    cbs: Callback | Iterable[Callback] | None = None,
    **kwargs: Any,
) -> Figure:
    """The images of the first training batch as the model sees it, with the callbacks `cbs`
    added for the run (the course's `show_image_batch`, notebook 14); `kwargs` go to
    `show_images` (`imsize=`, `ncols=`, `suptitle=`...).

    As `show_batch` (which also titles the images with their labels), the run stops before the
    model sees the batch: no step is taken, nothing is recorded, the random states are put back.
    The course's version trains on that batch; this one leaves the model alone.

    Examples:
        >>> learn.show_image_batch(max_n=16, imsize=1.5)
        >>> learn.show_image_batch(cbs=BatchTransformCB(augment), suptitle="augmented")
    """
    pick_loader(learn, None, "train", "show_image_batch")
    batch = _training_batch(learn, None, as_cbs(cbs))
    inputs, _ = learn.batch_format.split(batch)
    return show_images(image_input(inputs, "show_image_batch")[:max_n], **kwargs)
