"""Matplotlib figures made the same way everywhere: returned to the caller, never left open;
and the course's helpers (`subplots`, `get_grid`, `show_image`), whose figures the caller
draws into."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["get_grid", "new_figure", "show_image", "subplots"]


def new_figure(
    n_axes: int = 1, width: float = 6.0, height: float = 4.0, ncols: int | None = None
) -> tuple[Figure, list[Any]]:
    """A Figure with `n_axes` axes of `width` x `height` inches, `ncols` to a row (default all).

    The figure is closed in pyplot right away: a notebook shows the returned Figure once (not a
    second time at the end of the cell), and scripts that make many plots do not pile them up.

    Examples:
        >>> fig, (ax,) = new_figure()
        >>> ax.plot([1, 2, 3]); fig.savefig("line.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    ncols = n_axes if ncols is None else max(1, min(ncols, n_axes))
    nrows = -(-n_axes // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained"
    )
    plt.close(fig)
    flat = list(axes.flat)
    for ax in flat[n_axes:]:  # the unused end of a last, partly filled row
        ax.remove()
    return fig, flat[:n_axes]


# --- the course's helpers (miniai.datasets): pyplot figures to draw into ----------------------
# Unlike `new_figure`, these leave their figure open in pyplot, as the course's do: the caller
# draws into the axes they return, and a notebook shows the figure when the cell ends.


def subplots(
    nrows: int = 1,
    ncols: int = 1,
    figsize: tuple[float, float] | None = None,
    imsize: float = 3,
    suptitle: str | None = None,
    **kwargs: Any,
) -> tuple[Figure, np.ndarray]:
    """A figure and an array of `nrows` x `ncols` axes for images of `imsize` inches (the
    course's `subplots`); `axs` is a NumPy array even for one axes. `kwargs` go to
    `plt.subplots`.

    Examples:
        >>> fig, axs = subplots(1, 2, imsize=2, suptitle="two")
        >>> axs.shape
        (2,)
    """
    import matplotlib.pyplot as plt

    if figsize is None:
        figsize = (ncols * imsize, nrows * imsize)
    fig, axs = plt.subplots(nrows, ncols, figsize=figsize, **kwargs)
    if suptitle is not None:
        fig.suptitle(suptitle)
    return fig, axs if isinstance(axs, np.ndarray) else np.array([axs])


def get_grid(
    n: int,
    nrows: int | None = None,
    ncols: int | None = None,
    title: str | None = None,
    weight: str = "bold",
    size: int = 14,
    **kwargs: Any,
) -> tuple[Figure, np.ndarray]:
    """A grid of axes for `n` images (the course's `get_grid`): `nrows` defaults to
    `int(sqrt(n))` and `ncols` to as many as the rows need; axes past the `n`-th are switched
    off. `title` is the figure's title, in `weight` and `size`; `kwargs` go to `subplots`
    (`imsize=`, `figsize=`, `suptitle=`).

    Examples:
        >>> fig, axs = get_grid(8, imsize=1.5)  # 2 rows of 4
        >>> for im, ax in zip(xb, axs.flat):
        ...     show_image(im, ax=ax)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"get_grid: n, the number of axes, must be a positive integer, got {n!r}.")
    if nrows:
        ncols = ncols or math.ceil(n / nrows)
    elif ncols:
        nrows = math.ceil(n / ncols)
    else:
        nrows = math.isqrt(n)
        ncols = math.ceil(n / nrows)
    fig, axs = subplots(nrows, ncols, **kwargs)
    for ax in axs.flat[n:]:
        ax.set_axis_off()
    if title is not None:
        fig.suptitle(title, weight=weight, size=size)
    return fig, axs


def show_image(
    im: Any,
    ax: Any = None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    noframe: bool = True,
    **kwargs: Any,
) -> Any:
    """Show a tensor, array or PIL image on `ax` (a new figure if None) and return `ax` (the
    course's `show_image`). A tensor of 3 dimensions with fewer than 5 in the first is taken as
    channels first; a last dimension of 1 is dropped. `kwargs` go to `ax.imshow` (`cmap=`,
    `vmin=`...).

    Examples:
        >>> ax = show_image(xb[0], title=str(int(yb[0])), cmap="gray")
    """
    import matplotlib.pyplot as plt

    if isinstance(im, torch.Tensor):
        im = im.detach().float().cpu()
        if im.ndim == 3 and im.shape[0] < 5:
            im = im.permute(1, 2, 0)
        im = im.numpy()
    elif not isinstance(im, np.ndarray):
        im = np.array(im)
    if im.shape[-1] == 1:
        im = im[..., 0]
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    ax.imshow(im, **kwargs)
    if title is not None:
        ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if noframe:
        ax.axis("off")
    return ax
