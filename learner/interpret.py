"""What a classifier gets wrong: `learn.interpret()` computes the predictions, targets and
per-item losses over a loader once, and its `Interpretation` shows them as a confusion matrix,
the classes most confused, and the items with the largest losses (fastai's
`ClassificationInterpretation`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from learner.batches import BatchFormat
from learner.checks import describe
from learner.core import BaseLearner
from learner.data import DataLoaders
from learner.inference import get_preds
from learner.plotting import new_figure
from learner.rng import rng_state, set_rng_state
from learner.snapshot import kept_state
from learner.vision import image_input, show_images

__all__ = ["Interpretation", "interpret"]


class Interpretation:
    """A classifier's predictions, targets and per-item losses over a loader, and what they show.

    Made by `learn.interpret()`, or from tensors of your own. The predicted class of an item is
    the largest of its outputs; its probabilities are the softmax of the outputs (the model
    returns logits, as `F.cross_entropy` takes them).

    Args:
        preds: the model's outputs, `(N, n_classes)`.
        targets: the labels, `(N,)` integers in `0..n_classes-1`.
        losses: the loss of each item, `(N,)`.
        dl: the loader the items came from, in the same order (unshuffled): `plot_top_losses`
            reads the images of its items from it again. None: no pictures of items.
        classes: the name of each class, `n_classes` of them, or None.
        batch_format: how `dl`'s batches split into inputs (the images are the first positional
            one) and the one target. Default None: `BatchFormat()`, `(x, y)` tuples;
            `learn.interpret()` passes the learner's.

    Examples:
        >>> interp = learn.interpret()
        >>> interp.most_confused()[:3]  # [(actual, predicted, count), ...]
        >>> interp.plot_confusion_matrix().savefig("confusion.png")  # doctest: +SKIP
    """

    def __init__(
        self,
        preds: Tensor,
        targets: Tensor,
        losses: Tensor,
        dl: Iterable[Any] | None = None,
        classes: Sequence[str] | None = None,
        batch_format: BatchFormat | None = None,
    ) -> None:
        if not isinstance(preds, Tensor) or preds.ndim != 2:
            got = tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__
            raise ValueError(f"Interpretation: preds are a classifier's (N, n_classes); got {got}.")
        n, n_classes = preds.shape
        if not isinstance(targets, Tensor):
            raise ValueError(
                f"Interpretation: targets are {n} integer labels (N,), one tensor; got "
                f"{describe(targets)} (batches of several targets?)."
            )
        if targets.shape != (n,) or targets.is_floating_point():
            raise ValueError(
                f"Interpretation: targets are {n} integer labels (N,); got {targets.dtype} of "
                f"shape {tuple(targets.shape)}."
            )
        if losses.shape != (n,):
            raise ValueError(
                f"Interpretation: losses are (N,) = ({n},); got {tuple(losses.shape)}."
            )
        if n and not 0 <= int(targets.min()) <= int(targets.max()) < n_classes:
            raise ValueError(
                f"Interpretation: targets run from {int(targets.min())} to {int(targets.max())}, "
                f"but the model has {n_classes} outputs."
            )
        if classes is not None and len(classes) != n_classes:
            raise ValueError(
                f"Interpretation: {len(classes)} class names for {n_classes} classes (the model's "
                "outputs); pass one name per class."
            )
        self.preds, self.targets, self.losses = preds.cpu(), targets.cpu(), losses.cpu()
        self.dl = dl
        self.batch_format = batch_format if batch_format is not None else BatchFormat()
        self.classes: tuple[str, ...] | None = None if classes is None else tuple(classes)
        self.decoded = self.preds.argmax(1)
        """The predicted class of each item."""

    @property
    def n_classes(self) -> int:
        """The number of classes: the model's outputs per item."""
        return int(self.preds.shape[1])

    def class_name(self, label: int) -> str | int:
        """The name of class `label`, or the number itself when there are no names."""
        return self.classes[label] if self.classes is not None else label

    def confusion_matrix(self) -> Tensor:
        """How many items of each actual class (rows) were predicted as each class (columns).

        Returns:
            An int64 tensor `(n_classes, n_classes)` whose entries sum to the number of items.

        Examples:
            >>> cm = interp.confusion_matrix()
            >>> cm.diag().sum() / cm.sum()  # accuracy
        """
        n = self.n_classes
        cells = self.targets.long() * n + self.decoded
        return torch.bincount(cells, minlength=n * n).reshape(n, n)

    def plot_confusion_matrix(self, normalize: bool = False) -> Figure:
        """The confusion matrix as a picture, each cell's count (or row fraction) written in it.

        Args:
            normalize: show each row as fractions of its actual class (rows sum to 1; a class
                with no items is all 0). Default False: counts.

        Returns:
            A `Figure` with one axes: actual classes down, predicted across.

        Examples:
            >>> interp.plot_confusion_matrix(normalize=True).savefig("cm.png")  # doctest: +SKIP
        """
        cm = self.confusion_matrix()
        values = cm / cm.sum(1, keepdim=True).clamp_min(1) if normalize else cm.float()
        n = self.n_classes
        side = max(3.0, 0.5 * n + 1.5)
        fig, (ax,) = new_figure(1, side, side)
        ax.imshow(values.numpy(), cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
        names = [str(self.class_name(i)) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 2 else 0)
        ax.set_yticks(range(n), names)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("Actual")
        ax.set_title("Confusion matrix" + (" (fraction of each row)" if normalize else ""))
        dark = float(values.max()) / 2
        for i in range(n):
            for j in range(n):
                value = float(values[i, j])
                text = f"{value:.2f}" if normalize else str(int(cm[i, j]))
                color = "white" if value > dark else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
        return fig

    def most_confused(self, min_val: int = 1) -> list[tuple[str | int, str | int, int]]:
        """The mistakes made most often: off-diagonal cells of the confusion matrix.

        Args:
            min_val: leave out cells with fewer items. Default 1.

        Returns:
            `(actual, predicted, count)` for each, largest count first (ties in class order),
            with class names when known, else the labels.

        Examples:
            >>> interp.most_confused(min_val=2)
            [('4', '9', 7), ('7', '2', 5)]
        """
        cm = self.confusion_matrix()
        cells = [
            (int(cm[i, j]), i, j)
            for i in range(self.n_classes)
            for j in range(self.n_classes)
            if i != j and int(cm[i, j]) >= min_val
        ]
        cells.sort(key=lambda cell: -cell[0])  # stable: ties stay in class order
        return [(self.class_name(i), self.class_name(j), count) for count, i, j in cells]

    def top_losses(self, k: int | None = 9) -> tuple[Tensor, Tensor]:
        """The `k` largest losses and the indices of their items, largest first.

        Args:
            k: how many. Default 9; None: all.

        Returns:
            `(losses, indices)`; equal losses keep their items' order.

        Examples:
            >>> losses, idx = interp.top_losses(3)
        """
        losses, indices = torch.sort(self.losses, descending=True, stable=True)
        return losses[:k], indices[:k]

    def plot_top_losses(self, k: int = 9) -> Figure:
        """The `k` items with the largest losses, titled "target / prediction / loss /
        probability" (the probability the model gave its prediction).

        The images are read again from `dl`, which must give the items in the same order as
        when the predictions were made (the random states are put back afterwards).

        Args:
            k: how many. Default 9.

        Returns:
            A `Figure`, one axes per item.

        Examples:
            >>> interp.plot_top_losses(9).savefig("top_losses.png")  # doctest: +SKIP
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"plot_top_losses: k is how many items to show, at least 1; got {k!r}."
            )
        losses, indices = self.top_losses(k)
        probs = self.preds.float().softmax(1)
        titles = [
            f"{self.class_name(int(self.targets[i]))} / {self.class_name(int(self.decoded[i]))} / "
            f"{float(loss):.2f} / {float(probs[i, self.decoded[i]]):.2f}"
            for loss, i in zip(losses, indices)
        ]
        # 3 inches an image: room for a title of two class names and two numbers.
        ncols = math.ceil(math.sqrt(len(titles)))
        nrows = -(-len(titles) // ncols)
        images = self.inputs(indices.tolist())
        return show_images(images, ncols=ncols, titles=titles, figsize=(3 * ncols, 3 * nrows))

    def inputs(self, indices: Sequence[int]) -> list[Tensor]:
        """The inputs of the items at `indices`, read again from `dl`, on the CPU.

        Raises:
            ValueError: there is no `dl`, or it gives other targets at these indices than when
                the predictions were made (a shuffled loader).
        """
        if self.dl is None:
            raise ValueError(
                "Interpretation has no dl to read the items from: make it with "
                "learn.interpret(), or pass dl=."
            )
        wanted: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            wanted.setdefault(int(i), []).append(pos)
        found: list[Tensor | None] = [None] * len(indices)
        loaders = DataLoaders(self.dl)
        rng = rng_state(loaders)  # a loader may draw random numbers when iterated
        try:
            start = 0
            for batch in self.dl:
                inputs, targets = self.batch_format.split(batch)
                x = image_input(inputs, "Interpretation")
                if len(targets) != 1 or not isinstance(targets[0], Tensor):
                    raise ValueError(
                        "Interpretation: each batch of dl has one target, the labels; got "
                        f"{self.batch_format.describe_targets(batch, targets)}."
                    )
                y = targets[0]
                for i in [i for i in wanted if start <= i < start + len(x)]:
                    if int(y[i - start]) != int(self.targets[i]):
                        raise ValueError(
                            f"Interpretation: dl gives item {i} another target than when the "
                            "predictions were made: interpret an unshuffled loader (dls.valid)."
                        )
                    for pos in wanted.pop(i):
                        found[pos] = x[i - start].detach().cpu()
                start += len(x)
                if not wanted:
                    break
        finally:
            set_rng_state(loaders, rng)
        if wanted:
            raise ValueError(f"Interpretation: dl has no items {sorted(wanted)}.")
        return [x for x in found if x is not None]


def interpret(
    learn: BaseLearner, dl: Any = None, classes: Sequence[str] | None = None
) -> Interpretation:
    """The predictions, targets and per-item losses of a classifier over `dl`, computed once
    (`get_preds(with_loss=True)`: eval mode, no callback run), to look at what it gets wrong.

    The random states are put back afterwards.

    Args:
        learn: the Learner.
        dl: an unshuffled loader. Default None: `dls.valid`.
        classes: the name of each class. Default None: `dls.classes` if the loaders have it,
            else the labels' numbers.

    Returns:
        An `Interpretation`.

    Examples:
        >>> interp = learn.interpret()
        >>> interp.confusion_matrix()
        >>> interp.most_confused()
        >>> interp.plot_top_losses(9)
    """
    if dl is None:
        dl = getattr(learn.dls, "valid", None)
        if dl is None:
            raise ValueError("interpret: dls has no validation loader; pass one: interpret(dl).")
    if classes is None:
        classes = getattr(learn.dls, "classes", None)
    with kept_state(learn, rng=True):
        preds, targets, losses = get_preds(learn, dl, with_loss=True)
    return Interpretation(
        preds, targets, losses, dl=dl, classes=classes, batch_format=learn.batch_format
    )
