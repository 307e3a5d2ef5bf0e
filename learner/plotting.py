"""Matplotlib figures made the same way everywhere: returned to the caller, never left open."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

__all__ = ["new_figure"]


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
