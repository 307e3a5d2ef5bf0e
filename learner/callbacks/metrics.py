"""Batch-size-weighted losses and metrics, accumulated on the device."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from learner.batches import batch_size
from learner.callbacks.order import ORDERS
from learner.core import BaseLearner
from learner.distributed import all_reduce_sum, is_distributed
from learner.events import Callback
from learner.utils import map_tensors, model_device, snake

__all__ = ["MetricsCB", "accuracy", "epoch_summary", "phase_samples"]


def accuracy(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows of `preds` whose argmax equals `targets` (a batch mean).

    Examples:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor(0.5000)
    """
    return (preds.argmax(dim=-1) == targets).float().mean()


def _is_stateful(metric: Any) -> bool:
    return all(callable(getattr(metric, a, None)) for a in ("update", "compute", "reset"))


def _metric_name(metric: Any) -> str:
    if isinstance(metric, functools.partial):
        metric = metric.func
    name = getattr(metric, "__name__", None)
    return name if isinstance(name, str) else snake(type(metric).__name__)


def _stateful_compute(metric: Any) -> Any:
    # torchmetrics metrics sum their states over ranks in compute(); torcheval's need
    # sync_and_compute. Other stateful metrics must do it themselves.
    if is_distributed() and type(metric).__module__.startswith("torcheval."):
        from torcheval.metrics.toolkit import sync_and_compute

        return sync_and_compute(metric)
    return metric.compute()


def _not_a_batch_mean(name: str, value: Any) -> str | None:
    """Why `value`, function metric `name`'s value for a batch, is not one number; None if it is."""
    try:
        shape = tuple(torch.as_tensor(value).shape)
    except (TypeError, ValueError, RuntimeError):
        return f"metric {name!r} returned {type(value).__name__}, not a number"
    if not shape:
        return None
    return f"metric {name!r} returned a value of shape {shape} for one batch, not a single number"


def _batch_mean_error(problem: str) -> ValueError:
    return ValueError(
        f"{problem}: a function metric f(preds, targets) returns the batch mean, one number "
        "(a 0-d tensor or a float), e.g. `(preds.argmax(-1) == targets).float().mean()`. For "
        "per-class or other non-scalar values, pass an object with update/compute/reset instead "
        "(e.g. torcheval's MulticlassAccuracy(average=None, num_classes=...)): its compute() may "
        "return a tensor."
    )


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


class MetricsCB(Callback):
    """Tracks the loss and metrics of each phase, weighted by the number of samples per batch.

    The value of a phase equals the value computed on the whole dataset at once, whatever the
    batch sizes (a ragged last batch counts for what it holds). Sums accumulate on the device and
    are read once per phase, so training never waits on the host.

    A metric is either a function `f(preds, targets) -> batch mean` (one number: a 0-d tensor or a
    float), or an object with `update(preds, targets)`, `compute()` and `reset()` (torcheval and
    torchmetrics metrics work as given; they are moved to the model's device). A function that
    returns anything else (e.g. per-class values) is an error at the first batch of a phase, which
    names the metric and the shape; a stateful metric's `compute()` may return a tensor of any
    shape (the row holds it as a list). The loss is tracked in both phases; metrics are computed
    on the validation phase, or on the training phase when `fit` runs no validation.

    Under torch.distributed (`DistributedCB`) the weighted sums and sample counts of all ranks are
    added once per phase (float64), so every rank gets the value over the whole dataset. Stateful
    metrics must sum over ranks themselves: torchmetrics' do in `compute()`, torcheval's are
    computed with `sync_and_compute`.

    Metrics receive `learn.preds` (what the model returned, or its `.logits`: see
    `learner.batches`) and the targets `learn.yb`, as `metric(preds, *targets)`: a model with
    several outputs hands its tuple or dict to the metrics, and a batch without targets calls
    them with the predictions alone. Values a training step logs with `learn.log(name=value)`
    (a GAN's `g_loss` and `d_loss`) are averaged over each phase the same way, weighted by the
    size of the batches that logged them, and shown as `train_<name>` and `valid_<name>`.

    After each phase, `values["train"]` or `values["valid"]` holds plain Python numbers,
    `samples["train"]` or `samples["valid"]` the number of samples it counted (over all ranks:
    what `ProgressCB`'s throughput divides), and `epoch_summary()` the epoch's row:
    `train_loss`, `valid_loss`, each metric, then the logged values.

    `state_dict()` holds `values` and, during a training phase, its accumulators (per-batch
    sizes and values, and the state of stateful metrics: their `state_dict`, or for torchmetrics
    the accumulated states it leaves out of it, given back with `merge_state`); a fit resumed
    mid-epoch (`learn.start_iter > 0`) goes on accumulating them in its first training phase.
    `lr_find` runs without it, so the metric objects you passed are not touched by the sweep.

    **Subclassing, the course's way.** After each phase, `_log(d)` receives that phase's results
    as a dict: each metric (NaN where the phase computed none: training, when validation runs),
    `"loss"`, the logged values, then `"epoch"` and `"train"` (`"train"` or `"eval"`), with
    `self.train` telling the phase. These are the numbers of `values` (the same that the
    recorder's rows, `ProgressCB`'s table, `CSVLoggerCB` and `TensorBoardCB` show, through
    `epoch_summary`). The default `_log` does nothing: override it to send results elsewhere
    (the course's `WandBCB`). `all_metrics` lists the names of the metrics and `"loss"`. A
    subclass may override any event without calling `super()`: the set-up of `before_fit` is
    then done at the first phase.

    Events: `before_fit`, `before_epoch`, `before_train`, `before_validate`, `after_batch`,
    `after_train`, `after_validate`, `cleanup_train`, `cleanup_validate`, `after_epoch`,
    `cleanup_fit`. Order: -10.

    Examples:
        >>> from torcheval.metrics import MulticlassAccuracy
        >>> cbs = [MetricsCB(accuracy, top1=MulticlassAccuracy())]
        >>> Learner(model, dls, F.cross_entropy, cbs=cbs).fit(1)
        >>> class PrintCB(MetricsCB):
        ...     def _log(self, d):
        ...         print({m: d[m] for m in self.all_metrics}, d["train"])
    """

    order = ORDERS["MetricsCB"]
    in_side_runs = False

    def __init__(self, *metrics: Any, **named_metrics: Any) -> None:
        self.metrics: dict[str, Any] = {}
        for m in [*((_metric_name(m), m) for m in metrics), *named_metrics.items()]:
            name, metric = m
            if not (_is_stateful(metric) or callable(metric)):
                raise TypeError(
                    f"metric {name!r} must be a function f(preds, targets) or an object with "
                    f"update/compute/reset, got {type(metric).__name__}."
                )
            if name == "loss" or name in self.metrics:
                raise ValueError(
                    f"metric name {name!r} is taken; pass it by keyword with "
                    "another name, e.g. MetricsCB(acc2=...)."
                )
            self.metrics[name] = metric
        self.values: dict[str, dict[str, Any]] = {}
        self.samples: dict[str, int] = {}  # phase -> samples it counted, over all ranks
        self.phase: str | None = None  # "train" or "valid" while one runs
        self.checked = False  # whether this phase's function metrics have returned one number
        self.metrics_on_train = False
        self.device = torch.device("cpu")
        self.train = False  # whether the phase `_log` is given is a training phase
        self.ready = False  # whether this fit's set-up (`before_fit`) ran
        self._kinds = [(name, m, _is_stateful(m)) for name, m in self.metrics.items()]
        self._reset(with_metrics=False)

    @property
    def all_metrics(self) -> list[str]:
        """The names `_log`'s dict has a value for: each metric's, then `"loss"` (the course's
        `all_metrics`, whose keys these are)."""
        return [*self.metrics, "loss"]

    def before_fit(self, learn: BaseLearner) -> None:
        valid = getattr(learn.dls, "valid", None)
        self.metrics_on_train = not (learn.run_valid and valid is not None)
        self.device = model_device(learn.model)
        for m in self.metrics.values():
            if _is_stateful(m) and callable(getattr(m, "to", None)):
                m.to(self.device)
        self.ready = True

    def cleanup_fit(self, learn: BaseLearner) -> None:
        self.ready = False

    def before_epoch(self, learn: BaseLearner) -> None:
        self.values, self.samples = {}, {}

    def before_train(self, learn: BaseLearner) -> None:
        if not self.ready:  # a subclass's before_fit did not call super()
            MetricsCB.before_fit(self, learn)
        if learn.start_iter:  # resuming mid-epoch: the loaded accumulators go on
            self.with_metrics, self.checked = self.metrics_on_train, False
        else:
            self._reset(with_metrics=self.metrics_on_train)
        self.phase = "train"

    def before_validate(self, learn: BaseLearner) -> None:
        if not self.ready:
            MetricsCB.before_fit(self, learn)
        self._reset(with_metrics=True)
        self.phase = "valid"

    def cleanup_train(self, learn: BaseLearner) -> None:
        self.phase = None

    def cleanup_validate(self, learn: BaseLearner) -> None:
        self.phase = None

    def _reset(self, with_metrics: bool) -> None:
        self.with_metrics = with_metrics
        self.checked = False
        # Per batch: its size, and its loss and function-metric values left on the device; they
        # are weighted and summed once per phase, so a batch costs two list appends.
        self.counts: list[int] = []
        names = ["loss"] + [
            n for n, m in self.metrics.items() if with_metrics and not _is_stateful(m)
        ]
        self.batch_values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        # learn.log(name=value): per name, each batch's value and size (not every batch need log).
        self.logged: dict[str, tuple[list[torch.Tensor], list[int]]] = {}
        if with_metrics:
            for m in self.metrics.values():
                if _is_stateful(m):
                    m.reset()

    @property
    def count(self) -> int:
        """Samples seen in the current phase."""
        return sum(self.counts)

    def after_batch(self, learn: BaseLearner) -> None:
        bs = batch_size(learn.xb, learn.yb)
        self.counts.append(bs)
        loss = learn.loss  # a training loss is detached by the Learner once the step is done
        self.batch_values["loss"].append(loss.detach() if loss.requires_grad else loss)
        if learn.logged:
            self._add_logged(learn.logged, bs)
        if not (self.with_metrics and self._kinds):
            return
        preds, targets = learn.preds, learn.yb
        if not isinstance(preds, torch.Tensor):  # several outputs: each detached
            preds = map_tensors(preds, torch.Tensor.detach)
        elif preds.requires_grad:  # metrics on the training phase; validation needs no copy
            preds = preds.detach()
        check = not self.checked  # the first batch of each phase; later batches cost nothing
        for name, m, stateful in self._kinds:
            if stateful:
                m.update(preds, *targets)
            else:
                value = m(preds, *targets)
                if check and (problem := _not_a_batch_mean(name, value)):
                    phase = "training" if learn.training else "validation"
                    raise _batch_mean_error(f"{problem} (at {phase} batch {learn.iter})")
                self.batch_values[name].append(
                    (value.detach() if value.requires_grad else value)
                    if isinstance(value, torch.Tensor)
                    else torch.tensor(value, device=learn.loss.device)
                )
        self.checked = True

    def _add_logged(self, logged: dict[str, Any], bs: int) -> None:
        for name, value in logged.items():
            if name in self.batch_values or name in self.metrics:
                raise ValueError(
                    f"learn.log({name}=...): {name!r} is the name of the loss or a metric; "
                    "log it under another name."
                )
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(float(value), device=self.device)
            elif value.requires_grad:
                value = value.detach()
            if value.numel() != 1:
                raise ValueError(
                    f"learn.log({name}=...) takes one number per batch (a batch mean), got a "
                    f"tensor of shape {tuple(value.shape)}."
                )
            self.logged.setdefault(name, ([], []))
            self.logged[name][0].append(value.reshape(()))
            self.logged[name][1].append(bs)

    def _compute(self) -> dict[str, Any]:
        names = ["loss", *self.metrics] if self.with_metrics else ["loss"]
        device = self.batch_values["loss"][0].device if self.counts else self.device
        # float64 keeps the weighted sum exact to ~1e-12 over millions of samples (mps has none).
        dtype = torch.float32 if device.type == "mps" else torch.float64
        weights = torch.tensor(self.counts, dtype=dtype, device=device)
        if self.counts:
            try:
                per_batch = torch.stack(
                    [
                        torch.stack(vals).to(device=device, dtype=dtype)
                        for vals in self.batch_values.values()
                    ]
                )
            except RuntimeError:  # a function metric whose value changed shape after batch 0
                for name, vals in self.batch_values.items():
                    for i, v in enumerate(vals):
                        if name != "loss" and (problem := _not_a_batch_mean(name, v)):
                            raise _batch_mean_error(f"{problem} (at batch {i})") from None
                raise
            sums = per_batch @ weights
        else:  # no batch here, but under DDP this rank still takes part in the sum below
            sums = torch.zeros(len(self.batch_values), dtype=dtype, device=device)
        # Each logged value's weighted sum and sample count (the same names on every rank).
        logged = sorted(self.logged)
        extra = []
        for name in logged:
            values, sizes = self.logged[name]
            w = torch.tensor(sizes, dtype=dtype, device=device)
            extra.append(torch.stack([torch.stack(values).to(device, dtype) @ w, w.sum()]))
        # The weighted sums and the sample counts of every rank, added in one collective (a no-op
        # on one process), then read on the host once for every value of the phase.
        reduced = all_reduce_sum(torch.cat([sums, weights.sum().reshape(1), *extra])).tolist()
        *totals, count = reduced[: len(sums) + 1]
        self.samples[self.phase or "train"] = int(count)
        pairs = reduced[len(sums) + 1 :]
        logged_values = {
            name: total / n if n else math.nan
            for name, total, n in zip(logged, pairs[0::2], pairs[1::2])
        }
        if count == 0:
            return {**dict.fromkeys(names, math.nan), **logged_values}
        out: dict[str, Any] = {
            name: total / count for name, total in zip(self.batch_values, totals)
        }
        if self.with_metrics:
            for name, m in self.metrics.items():
                if _is_stateful(m):
                    out[name] = _to_python(_stateful_compute(m))
        return {**{name: out[name] for name in names}, **logged_values}

    def after_train(self, learn: BaseLearner) -> None:
        self.values["train"] = self._compute()
        self._log_phase(learn, "train")

    def after_validate(self, learn: BaseLearner) -> None:
        self.values["valid"] = self._compute()
        self._log_phase(learn, "valid")

    def after_epoch(self, learn: BaseLearner) -> None:
        """Nothing: each phase was logged when it ended. Here so that a subclass's
        `after_epoch` may call `super().after_epoch(learn)`, as the course's do."""

    def _log_phase(self, learn: BaseLearner, phase: str) -> None:
        values = self.values[phase]
        d = {name: values.get(name, math.nan) for name in self.metrics}
        d.update((k, v) for k, v in values.items() if k not in d)  # the loss, logged values
        d.update(epoch=learn.epoch, train="train" if phase == "train" else "eval")
        self.train = phase == "train"
        self._log(d)

    def _log(self, d: dict[str, Any]) -> None:
        """The hook a subclass overrides: called after each phase with its results (see the
        class docstring); does nothing here."""

    def state_dict(self) -> dict[str, Any]:
        """`values`, and mid-training-phase its accumulators, as tensors and plain values."""
        state: dict[str, Any] = {"values": {k: dict(v) for k, v in self.values.items()}}
        if self.phase == "train":
            state["train"] = {
                "counts": list(self.counts),
                "batch_values": {
                    name: torch.stack(vals).cpu() if vals else torch.empty(0)
                    for name, vals in self.batch_values.items()
                },
                "metrics": {
                    name: _metric_state(m)
                    for name, m in self.metrics.items()
                    if _is_stateful(m) and callable(getattr(m, "state_dict", None))
                },
                "logged": {
                    name: {"values": torch.stack(vals).cpu(), "counts": list(counts)}
                    for name, (vals, counts) in self.logged.items()
                },
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take `values` and the accumulators of a training phase, onto the model's device."""
        self.values = {k: dict(v) for k, v in state["values"].items()}
        phase = state.get("train")
        if phase is None:
            return
        self.counts = list(phase["counts"])
        self.batch_values = {
            name: list(values.to(self.device).unbind())
            for name, values in phase["batch_values"].items()
        }
        for name, m in self.metrics.items():
            if name in phase["metrics"]:
                _load_metric_state(m, phase["metrics"][name], self.device)
        self.logged = {
            name: (list(v["values"].to(self.device).unbind()), list(v["counts"]))
            for name, v in phase.get("logged", {}).items()
        }

    def epoch_summary(self) -> dict[str, Any]:
        """The epoch so far as one row: `train_loss`, `valid_loss` (None if not run), metrics."""
        train, valid = self.values.get("train", {}), self.values.get("valid", {})
        row = {"train_loss": train.get("loss"), "valid_loss": valid.get("loss")}
        source = train if self.metrics_on_train else valid
        row.update({name: source.get(name) for name in self.metrics})
        known = {"loss", *self.metrics}
        for phase, values in (("train", train), ("valid", valid)):  # learn.log's values
            row.update({f"{phase}_{n}": v for n, v in values.items() if n not in known})
        return row


def epoch_summary(learn: BaseLearner) -> dict[str, Any]:
    """The current epoch's row from the learner's `MetricsCB` (empty if it has none)."""
    cb = next((c for c in learn.cbs if isinstance(c, MetricsCB)), None)
    return cb.epoch_summary() if cb is not None else {}


def phase_samples(learn: BaseLearner, phase: str) -> int | None:
    """The samples the learner's `MetricsCB` counted in the current epoch's `phase` ("train"
    or "valid"), over all ranks; None without a `MetricsCB` or before that phase ended."""
    cb = next((c for c in learn.cbs if isinstance(c, MetricsCB)), None)
    return None if cb is None else cb.samples.get(phase)


def _accumulates(metric: Any) -> bool:
    # torchmetrics: the accumulated states are attributes listed in `metric_state`, left out of
    # `state_dict()` by default; `merge_state` takes them back.
    return isinstance(getattr(metric, "metric_state", None), dict) and callable(
        getattr(metric, "merge_state", None)
    )


def _metric_state(metric: Any) -> dict[str, Any]:
    """What a checkpoint keeps of a stateful metric mid-phase: its `state_dict()`, and for
    torchmetrics its accumulated states (tensors, lists of tensors), on the CPU."""
    if not _accumulates(metric):
        return dict(metric.state_dict())
    return {
        "metric_state": {
            k: [t.detach().cpu() for t in v] if isinstance(v, list) else v.detach().cpu()
            for k, v in metric.metric_state.items()
        }
    }


def _load_metric_state(metric: Any, state: dict[str, Any], device: torch.device) -> None:
    if "metric_state" in state and _accumulates(metric):
        metric.reset()
        metric.merge_state(
            {
                k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device)
                for k, v in state["metric_state"].items()
            }
        )
    else:
        metric.load_state_dict(state)
    if callable(getattr(metric, "to", None)):
        metric.to(device)
