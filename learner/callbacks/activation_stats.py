"""Per-layer activation statistics while training: means, standard deviations, histograms."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from learner.callbacks.hooks_cb import HooksCB
from learner.callbacks.order import ORDERS
from learner.checks import check_int
from learner.core import BaseLearner
from learner.hooks import Hook, ModuleSpec
from learner.plotting import new_figure

__all__ = ["ActivationStatsCB"]


class ActivationStatsCB(HooksCB):
    """Records the mean, standard deviation and a histogram of |activation| of chosen layers at
    every training batch, and draws the fastai course's diagnostic plots from them.

    The statistics of a batch are computed on the device and stay there; they are read to the
    host once per epoch (or when you access them), so recording adds no host synchronisation per
    batch. The histogram counts |activation| in `bins` equal bins over `hist_range` (the course's
    40 bins over 0..10); values beyond the range count in the last bin, so each row sums to the
    number of activations (the course's `histc` leaves them out). A layer called several times in
    one forward pass adds a row per call.

    A `HooksCB`: hooks are registered at `before_fit` and removed at `cleanup_fit`, also when
    `fit` fails, and see only the batches of the phases recorded. Records accumulate across fits
    on the same layers (hooking other layers starts over); `reset()` clears them. After a fit:

    - `names`: the hooked layers, as `"<name in the model> (<type>)"`.
    - `means`, `stds`: per layer, a CPU tensor with one value per recorded batch.
    - `hists`: per layer, a CPU tensor of counts, shape (recorded batches, bins).
    - `plot_stats()`, `color_dim()`, `dead_chart()`: matplotlib Figures.
    - `for h in stats`: the course's way, one hook per layer whose `h.stats` is (means, stds,
      hists), lists with an entry per recorded batch, for the course's `get_hist(h)` and
      `get_min(h)`. `len(stats)` is the number of layers.

    Args:
        modules: the layers to watch: a predicate (`lambda m: isinstance(m, nn.ReLU)`, the
            course's `fc.risinstance(GeneralRelu)`), a module type (`nn.ReLU`), a name (`"0"`), a
            module, or a list of these (see `learner.find_modules`). Default None: every leaf
            module that has parameters.
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
        >>> [get_min(h)[-1] for h in stats]  # the last batch's fraction of dead activations
    """

    order = ORDERS["ActivationStatsCB"]
    unique = True  # one replaces another; it does not replace a HooksCB it derives from
    in_side_runs = False  # its records are the run's

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
        super().__init__(self._record, mod_filter=modules, on_train=True, on_valid=with_valid)
        self.every, self.bins = every, bins
        self.low, self.high = low, high
        self.reset()

    @property
    def modules(self) -> ModuleSpec | None:
        """The layers to watch, as passed (`HooksCB.mod_filter`)."""
        return self.mod_filter

    @modules.setter
    def modules(self, value: ModuleSpec | None) -> None:
        self.mod_filter = value

    @property
    def with_valid(self) -> bool:
        """Whether validation batches are recorded too (`HooksCB.on_valid`)."""
        return self.on_valid

    @with_valid.setter
    def with_valid(self, value: bool) -> None:
        self.on_valid = value

    def reset(self) -> None:
        """Forget everything recorded."""
        self.names: list[str] = []
        self._layers: list[nn.Module] = []
        self._device: list[list[torch.Tensor]] = []  # per layer, one row per recorded batch
        self._host: list[torch.Tensor] = []  # per layer, (rows, 2 + bins): mean, std, hist
        self.n_seen = 0  # batches that could be recorded, to pick one in `every`

    # -- recording ------------------------------------------------------------------------------

    def before_fit(self, learn: BaseLearner) -> None:
        super().before_fit(learn)  # the hooks, on `choose_modules(learn.model)`
        layers = [hook.module for hook in self.hooks or ()]
        if [id(m) for m in layers] != [id(m) for m in self._layers]:  # other layers: start over
            self.reset()
            names = {id(m): n for n, m in learn.model.named_modules()}
            self.names = [_label(names[id(m)], m) for m in layers]
            self._layers = layers
            self._device = [[] for _ in layers]
            self._host = [torch.zeros(0, 2 + self.bins) for _ in layers]

    def choose_modules(self, model: nn.Module) -> list[nn.Module]:
        """`modules`, or by default every leaf module of `model` that has parameters."""
        if self.mods is not None or self.mod_filter is not None:
            return super().choose_modules(model)
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
        super().before_batch(learn)  # recording: a batch of a phase asked for
        wanted = self.recording
        self.recording = wanted and self.n_seen % self.every == 0
        self.n_seen += wanted

    def _record(self, hook: Hook, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
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
        if self.recording:
            for hook, rows in zip(self.hooks or (), self._device):
                rows.extend(hook.stored)

    def cleanup_batch(self, learn: BaseLearner) -> None:
        super().cleanup_batch(learn)
        for hook in self.hooks or ():
            hook.stored.clear()

    def after_epoch(self, learn: BaseLearner) -> None:
        self._flush()

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

    def __iter__(self) -> Iterator[Hook]:
        """The hooks, one per layer, each with `stats` = (means, stds, hists) of every batch
        recorded (the course's layout: lists of a 0-d tensor, a 0-d tensor, a (bins,) tensor)."""
        if not self.names:
            return iter(())
        hooks = list(self.hooks or ())
        for hook, rows in zip(hooks, self._rows()):
            hook.stats = (list(rows[:, 0]), list(rows[:, 1]), list(rows[:, 2:]))
        return iter(hooks)

    def __len__(self) -> int:
        return len(self.names)

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
