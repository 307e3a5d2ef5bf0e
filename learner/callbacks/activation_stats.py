"""Per-layer activation statistics while training: means, standard deviations, histograms."""

from __future__ import annotations

import math
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from learner.callbacks.order import ORDERS
from learner.checks import check_int
from learner.core import BaseLearner, Callback
from learner.hooks import Hook, Hooks, ModuleSpec, find_modules
from learner.plotting import new_figure

__all__ = ["ActivationStatsCB"]


class ActivationStatsCB(Callback):
    """Records the mean, standard deviation and a histogram of |activation| of chosen layers at
    every training batch, and draws the fastai course's diagnostic plots from them.

    The statistics of a batch are computed on the device and stay there; they are read to the
    host once per epoch (or when you access them), so recording adds no host synchronisation per
    batch. The histogram counts |activation| in `bins` equal bins over `hist_range` (the course's
    40 bins over 0..10); values beyond the range count in the last bin, so each row sums to the
    number of activations. A layer called several times in one forward pass adds a row per call.

    Hooks are registered at `before_fit` and removed at `cleanup_fit`, also when `fit` fails.
    Records accumulate across fits on the same layers (hooking other layers starts over);
    `reset()` clears them. After a fit:

    - `names`: the hooked layers, as `"<name in the model> (<type>)"`.
    - `means`, `stds`: per layer, a CPU tensor with one value per recorded batch.
    - `hists`: per layer, a CPU tensor of counts, shape (recorded batches, bins).
    - `plot_stats()`, `color_dim()`, `dead_chart()`: matplotlib Figures.

    Args:
        modules: the layers to watch: a module type (`nn.ReLU`), a name (`"0"`), a module, or a
            list of these (see `learner.find_modules`). Default None: every leaf module that has
            parameters.
        every: record one batch in `every`.
        bins: number of histogram bins.
        hist_range: `(low, high)` of |activation| covered by the histogram.
        with_valid: also record validation batches (by default only training batches).

    Events: `before_fit`, `before_batch`, `after_batch`, `cleanup_batch`, `after_epoch`,
    `cleanup_fit`. Order: 0.

    Examples:
        >>> stats = ActivationStatsCB(nn.ReLU)
        >>> learn.fit(1, cbs=[stats])
        >>> stats.plot_stats().savefig("stats.png")
        >>> stats.color_dim().savefig("color_dim.png")
    """

    order = ORDERS["ActivationStatsCB"]
    in_lr_find = False  # its records are the run's

    def __init__(
        self,
        modules: ModuleSpec | None = None,
        every: int = 1,
        bins: int = 40,
        hist_range: tuple[float, float] = (0.0, 10.0),
        with_valid: bool = False,
    ) -> None:
        check_int("every", every, 1)
        check_int("bins", bins, 1)
        low, high = (float(v) for v in hist_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"hist_range must be finite, low < high; got {hist_range!r}.")
        self.modules, self.every, self.bins, self.with_valid = modules, every, bins, with_valid
        self.low, self.high = low, high
        self.hooks: Hooks | None = None
        self.recording = False
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        self.names: list[str] = []
        self._layers: list[nn.Module] = []
        self._device: list[list[torch.Tensor]] = []  # per layer, one row per recorded batch
        self._host: list[torch.Tensor] = []  # per layer, (rows, 2 + bins): mean, std, hist
        self.n_seen = 0  # batches that could be recorded, to pick one in `every`

    # -- recording ------------------------------------------------------------------------------

    def before_fit(self, learn: BaseLearner) -> None:
        model = learn.model
        layers = self._choose(model)
        if [id(m) for m in layers] != [id(m) for m in self._layers]:  # other layers: start over
            self.reset()
            names = {id(m): n for n, m in model.named_modules()}
            self.names = [_label(names[id(m)], m) for m in layers]
            self._layers = layers
            self._device = [[] for _ in layers]
            self._host = [torch.zeros(0, 2 + self.bins) for _ in layers]
        self.hooks = Hooks(layers, self._record)

    def _choose(self, model: nn.Module) -> list[nn.Module]:
        if self.modules is not None:
            return find_modules(model, self.modules)
        leaves = [
            m
            for m in model.modules()
            if next(m.children(), None) is None and next(m.parameters(False), None) is not None
        ]
        if not leaves:
            raise ValueError(
                "ActivationStatsCB found no layer with parameters to watch: pass modules=, "
                "e.g. ActivationStatsCB(nn.ReLU)."
            )
        return leaves

    def before_batch(self, learn: BaseLearner) -> None:
        wanted = learn.training or self.with_valid
        self.recording = wanted and self.n_seen % self.every == 0
        self.n_seen += wanted

    def _record(self, hook: Hook, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not self.recording:
            return
        if isinstance(output, (tuple, list)) and output:
            output = output[0]  # an LSTM's (output, state): the output
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"ActivationStatsCB can only watch layers that output a tensor; "
                f"{type(module).__name__} returned {type(output).__name__}."
            )
        acts = output.detach().float()
        std, mean = torch.std_mean(acts)
        # clamp_ puts out-of-range values in the end bins: histc would drop them.
        hist = torch.histc(acts.abs().clamp_(self.low, self.high), self.bins, self.low, self.high)
        hook.stored.append(torch.cat([mean[None], std[None], hist]))

    def after_batch(self, learn: BaseLearner) -> None:
        # Rows wait on their hook until the batch completes, so a cancelled batch records nothing.
        if self.recording and self.hooks is not None:
            for hook, rows in zip(self.hooks, self._device):
                rows.extend(hook.stored)

    def cleanup_batch(self, learn: BaseLearner) -> None:
        self.recording = False
        for hook in self.hooks or ():
            hook.stored.clear()

    def after_epoch(self, learn: BaseLearner) -> None:
        self._flush()

    def cleanup_fit(self, learn: BaseLearner) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks, self.recording = None, False

    def _flush(self) -> None:
        for i, rows in enumerate(self._device):
            if rows:
                self._host[i] = torch.cat([self._host[i], torch.stack(rows).cpu()])
                self._device[i] = []

    # -- results --------------------------------------------------------------------------------

    def _rows(self) -> list[torch.Tensor]:
        if not self.names:
            raise RuntimeError(
                "ActivationStatsCB has recorded nothing yet: pass it to fit first, e.g. "
                "learn.fit(1, cbs=[stats])."
            )
        self._flush()
        return self._host

    @property
    def means(self) -> list[torch.Tensor]:
        """Per layer, the mean activation of each recorded batch."""
        return [r[:, 0] for r in self._rows()]

    @property
    def stds(self) -> list[torch.Tensor]:
        """Per layer, the standard deviation of the activations of each recorded batch."""
        return [r[:, 1] for r in self._rows()]

    @property
    def hists(self) -> list[torch.Tensor]:
        """Per layer, the histogram of |activation| of each recorded batch: (batches, bins)."""
        return [r[:, 2:] for r in self._rows()]

    def _xlabel(self) -> str:
        return "batch" if self.every == 1 else f"batch (one in {self.every})"

    def plot_stats(self) -> Figure:
        """Mean and standard deviation of each layer's activations over batches."""
        means, stds = self.means, self.stds
        fig, (ax_mean, ax_std) = new_figure(2)
        for name, mean, std in zip(self.names, means, stds):
            ax_mean.plot(mean.tolist(), label=name)
            ax_std.plot(std.tolist(), label=name)
        ax_mean.set(title="means", xlabel=self._xlabel())
        ax_std.set(title="standard deviations", xlabel=self._xlabel())
        ax_mean.legend()
        return fig

    def color_dim(self, ncols: int = 4) -> Figure:
        """The course's "colorful dimension": per layer, an image of the log histogram of
        |activation| (vertical, low values at the bottom) over batches (horizontal)."""
        hists = self.hists
        fig, axes = new_figure(len(hists), width=4.0, height=3.0, ncols=ncols)
        for ax, name, hist in zip(axes, self.names, hists):
            ax.set(title=name, xlabel=self._xlabel(), ylabel="|activation|")
            if len(hist):
                # log1p: the many near-zero activations would otherwise wash out the rest.
                extent = (0.0, float(len(hist)), self.low, self.high)
                ax.imshow(hist.t().log1p().numpy(), origin="lower", aspect="auto", extent=extent)
        return fig

    def dead_chart(self, ncols: int = 4) -> Figure:
        """Per layer, the fraction of activations in the lowest histogram bin over batches: near 1,
        the layer is mostly dead (a ReLU outputting zeros)."""
        hists = self.hists
        fig, axes = new_figure(len(hists), width=4.0, height=3.0, ncols=ncols)
        for ax, name, hist in zip(axes, self.names, hists):
            ax.plot((hist[:, 0] / hist.sum(1)).tolist())
            ax.set(title=name, xlabel=self._xlabel(), ylabel="fraction in lowest bin", ylim=(0, 1))
        return fig


def _label(name: str, module: nn.Module) -> str:
    return f"{name} ({type(module).__name__})" if name else type(module).__name__
