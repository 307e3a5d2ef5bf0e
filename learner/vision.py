"""Looking at images: a grid of them (`show_images`), a training batch as the model sees it
(`learn.show_batch()`), validation images with their predictions (`learn.show_results()`), and
predictions averaged over flipped or otherwise transformed inputs (`learn.tta(tfms)`).

Every picture is a matplotlib `Figure` returned to the caller (`learner.plotting.new_figure`):
a notebook shows it inline, a script calls `fig.savefig(...)`. None of these leaves a trace on
the learner: no optimizer is made, nothing is recorded, and the random states, the callbacks and
the loop's state are as before.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from learner.callbacks.progress import ProgressCB
from learner.core import BaseLearner, CancelFitException
from learner.data import DataLoaders
from learner.events import Callback
from learner.inference import get_preds
from learner.plotting import new_figure
from learner.snapshot import kept_state, side_run
from learner.utils import model_device, to_device

__all__ = ["show_batch", "show_images", "show_results", "tta"]

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
) -> Figure:
    """`show_images`, with a colour for each title (None: the default)."""
    n = len(images)
    if n == 0:
        raise ValueError("show_images: no images to show.")
    if titles is not None and len(titles) != n:
        raise ValueError(f"show_images: {n} images but {len(titles)} titles; pass one per image.")
    cols = _grid(n, nrows, ncols)
    rows = -(-n // cols)
    width, height = figsize if figsize is not None else (_INCHES * cols, _INCHES * rows)
    fig, axes = new_figure(n, width / cols, height / rows, cols)
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

    Returns:
        The `Figure`, one axes per image (closed in pyplot: a notebook shows it once).

    Examples:
        >>> xb, yb = next(iter(dls.train))
        >>> fig = show_images(xb[:8], ncols=4, titles=[str(int(y)) for y in yb[:8]])
        >>> fig.savefig("batch.png")  # doctest: +SKIP
    """
    return _show(_as_images(ims), titles, None, nrows, ncols, figsize)


# --- what the learner sees and says ----------------------------------------------------------


def _classes(learn: BaseLearner, classes: Sequence[str] | None) -> Sequence[str] | None:
    return classes if classes is not None else getattr(learn.dls, "classes", None)


def _name(label: Tensor, classes: Sequence[str] | None) -> str:
    """A label as text: its class name, the number, or a rounded value."""
    if label.numel() != 1:
        return ""
    if label.is_floating_point():
        return f"{label.item():.3g}"
    i = int(label.item())
    if classes is None:
        return str(i)
    if not 0 <= i < len(classes):
        raise ValueError(f"label {i} has no name: classes has {len(classes)} ({list(classes)}).")
    return classes[i]


def _loader(learn: BaseLearner, dl: Any, split: str, caller: str) -> Any:
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


def _training_batch(learn: BaseLearner, dl: Any) -> Any:
    """The first batch of `dl` (default `dls.train`) as the model would see it in training."""
    grab = _GrabBatchCB()
    with _training_loader(learn, dl), side_run(learn, weights=False) as copies:
        if learn.opt is None:
            learn.opt = _NoSteps()  # put back (None) when the side run ends
        # A progress bar for one batch that is never trained on is noise.
        copies = [cb for cb in copies if not isinstance(cb, ProgressCB)]
        learn.fit(1, cbs=[*copies, grab], valid=False)
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
        _loader(learn, None, "train", "show_batch")  # a clear error if there is none
    batch = _training_batch(learn, dl)
    x = batch[0][:max_n]
    titles = None
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], Tensor):
        titles = [_name(y, classes) for y in batch[1][: len(x)]]
    return show_images(x, titles=titles)


def _first_items(dl: Iterable[Any], n: int) -> list[Any]:
    """The first batches of `dl`, enough to hold `n` items."""
    batches, count = [], 0
    for batch in dl:
        batches.append(batch)
        count += len(batch[0])
        if count >= n:
            break
    return batches


def show_results(
    learn: BaseLearner, max_n: int = 9, dl: Any = None, classes: Sequence[str] | None = None
) -> Figure:
    """The first validation images, each titled "target / prediction", mistakes in red.

    The predictions are `get_preds`'s, over as many batches of `dl` as `max_n` images need: the
    model in eval mode, no callback run (so a transform in a `BatchTransformCB` is not applied:
    see `get_preds`). The random states are put back afterwards.

    Args:
        learn: the Learner (a classifier: its outputs are `(N, n_classes)`; the prediction is
            the largest).
        max_n: show at most this many images. Default 9.
        dl: the loader. Default None: `dls.valid`.
        classes: the name of each label. Default None: `dls.classes`, else the numbers.

    Returns:
        A `Figure`, one axes per image.

    Examples:
        >>> learn.fit(3)
        >>> learn.show_results()  # in a notebook: shown inline
    """
    classes = _classes(learn, classes)
    dl = _loader(learn, dl, "valid", "show_results")
    with kept_state(learn, rng=True):
        batches = _first_items(dl, max_n)
        preds, targets = get_preds(learn, batches)
    if not isinstance(preds, Tensor) or preds.ndim != 2:
        shape = tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__
        raise ValueError(
            f"show_results shows a classifier's results: outputs (N, n_classes); got {shape}."
        )
    x = torch.cat([b[0].detach().cpu() for b in batches])[:max_n]
    predicted, targets = preds.argmax(1)[:max_n], targets[:max_n]
    titles = [f"{_name(t, classes)} / {_name(p, classes)}" for t, p in zip(targets, predicted)]
    colors = [None if bool(t == p) else "red" for t, p in zip(targets, predicted)]
    return _show(_as_images(x), titles, colors)


# --- test-time augmentation -------------------------------------------------------------------


class _TransformedX:
    """`dl`'s batches moved to `device`, with `tfm` applied to each batch's input."""

    def __init__(self, dl: Iterable[Any], tfm: Callable[[Tensor], Tensor], device: Any) -> None:
        self.dl, self.tfm, self.device = dl, tfm, device

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for batch in self.dl:
            x, *rest = to_device(batch, self.device)
            yield (self.tfm(x), *rest)


def tta(
    learn: BaseLearner,
    tfms: Callable[[Tensor], Tensor] | Iterable[Callable[[Tensor], Tensor]],
    dl: Any = None,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Test-time augmentation: the model's outputs averaged over the inputs as they are and
    transformed by each of `tfms`.

    Each view is a `get_preds` pass over `dl` (eval mode, no callback run), with the transform
    applied to each batch's input `x` on the model's device, so `dl` must give the same items in
    the same order in each pass (not shuffled); random transforms draw new numbers in each view.
    What is averaged is the model's raw outputs (for a classifier, its logits, as `get_preds`
    returns them): with no transforms the result is exactly `get_preds`'s, and `argmax`,
    `interpret` or a softmax apply to it as to `get_preds`'s. fastai averages probabilities
    instead: pass `activation=lambda p: p.softmax(1)` for that. The random states are put back
    afterwards.

    Args:
        learn: the Learner.
        tfms: a function of a batch's input, or several (e.g. a horizontal flip,
            `lambda x: x.flip(-1)`); each adds one view to the identity.
        dl: the loader. Default None: `dls.valid`.
        activation: applied to each view's outputs before averaging. Default None: none.

    Returns:
        `(preds, targets)` on the CPU: the mean over the `1 + len(tfms)` views, and the targets.

    Examples:
        >>> preds, targets = learn.tta([lambda x: x.flip(-1)])
        >>> (preds.argmax(1) == targets).float().mean()
    """
    views = [tfms] if callable(tfms) else list(tfms)
    for tfm in views:
        if not callable(tfm):
            raise TypeError(f"tta: tfms are functions of a batch's input x, got {tfm!r}.")
    dl = _loader(learn, dl, "valid", "tta")
    device = model_device(learn.model)
    with kept_state(learn, rng=True):
        preds, targets = get_preds(learn, dl)
        outs = [preds]
        for tfm in views:
            out, view_targets = get_preds(learn, _TransformedX(dl, tfm, device))
            if not torch.equal(view_targets, targets):
                raise ValueError(
                    "tta: dl gave other items in another pass (is it shuffled?); pass a loader "
                    "that gives the same items in the same order each time, such as dls.valid."
                )
            outs.append(out)
    if not isinstance(preds, Tensor):
        raise TypeError(f"tta averages tensors; the model returns {type(preds).__name__}.")
    if activation is not None:
        outs = [activation(out) for out in outs]
    total = outs[0]
    for out in outs[1:]:
        total = total + out
    return total / len(outs), targets
