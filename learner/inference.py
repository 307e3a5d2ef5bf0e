"""Predictions outside training: `learn.get_preds()` over a loader, `learn.infer(x)` for one
batch or one item: neither fires events, so no callback runs and nothing is recorded. And
`learn.capture_preds(cbs=...)`, the course's way: a validation pass that fires events, with
extra callbacks (test-time augmentation by a `BatchTransformCB`).

Both run the learner's training step `predict` (so a subclass's forward pass is used) in eval
mode under `torch.inference_mode()`: overriding the step changes inference and cannot break it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from learner.batches import first_tensor, item_count
from learner.callbacks.batch_transform import BatchTransformCB
from learner.callbacks.order import ORDERS
from learner.checks import describe
from learner.core import BaseLearner
from learner.events import Callback, as_cbs
from learner.snapshot import kept_state, side_run
from learner.utils import map_tensors, model_device, to_cpu, to_device

__all__ = ["CapturePredsCB", "capture_preds", "get_preds", "infer", "valid_transforms"]


@contextmanager
def _inference(learn: BaseLearner) -> Iterator[None]:
    """Eval mode and inference mode; afterwards the learner's state is as before."""
    with kept_state(learn):
        learn.model.eval()
        with torch.inference_mode():
            yield


def _cat(parts: list[Any]) -> Any:
    """Per-batch predictions (or targets) as one: tensors concatenated along the batch, tuples,
    lists and dicts per field (a field that is None in every batch stays None)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p.reshape(1) if p.ndim == 0 else p for p in parts])
    if first is None and all(p is None for p in parts):
        return None
    if isinstance(first, (list, tuple)):
        fields = [_cat(list(p)) for p in zip(*parts)]
        return type(first)(*fields) if hasattr(first, "_fields") else type(first)(fields)
    if isinstance(first, Mapping):
        return {k: _cat([p[k] for p in parts]) for k in first}
    raise TypeError(
        f"get_preds concatenates tensors (also in tuples and dicts), got {type(first).__name__}: "
        "pass Learner(batch_format=BatchFormat(preds=f)) with f(output) the tensor to keep."
    )


def _targets(yb: tuple[Any, ...]) -> Any:
    """A batch's targets as `get_preds` returns them: the one target, or a tuple of several."""
    return yb[0] if len(yb) == 1 else yb


def _per_item_loss(loss_func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    if isinstance(getattr(loss_func, "reduction", None), str):  # an nn loss module

        def module_loss(preds: Any, *targets: Any) -> torch.Tensor:
            old = loss_func.reduction  # type: ignore[attr-defined]
            loss_func.reduction = "none"  # type: ignore[attr-defined]
            try:
                return loss_func(preds, *targets)
            finally:
                loss_func.reduction = old  # type: ignore[attr-defined]

        return module_loss
    return lambda preds, *targets: loss_func(preds, *targets, reduction="none")


def _model_item_losses(learn: BaseLearner) -> torch.Tensor:
    """The model's own loss of each item of the batch in `learn.xb`: each item alone through
    `predict` and `get_loss` (a model's `.loss` is a batch mean). Tensors whose first dimension
    is the batch's are cut; others are passed whole."""
    xb, n = learn.xb, item_count(learn.xb)
    losses = []
    for i in range(n):

        def item(t: torch.Tensor, i: int = i) -> torch.Tensor:
            return t[i : i + 1] if t.ndim and t.shape[0] == n else t

        learn.xb = map_tensors(xb, item)
        learn.predict()
        learn.get_loss()
        losses.append(learn.loss.detach().float().reshape(()).cpu())
    learn.xb = xb
    return torch.stack(losses) if losses else torch.empty(0)


def _predict_batch(
    learn: BaseLearner, batch: Any, device: torch.device, transforms: list[Callable[[Any], Any]]
) -> None:
    """`batch` as the loop would run it in validation, without events: moved to `device`,
    through the validation batch transforms, split, predicted."""
    learn.batch = to_device(batch, device)
    for tfm in transforms:
        learn.batch = tfm(learn.batch)
    learn.split_batch()
    learn.predict()


def valid_transforms(learn: BaseLearner) -> list[Callable[[Any], Any]]:
    """The batch transforms the learner applies to validation batches, in the order they run:
    those of its `BatchTransformCB`s with `on_val` (a transform of another callback class runs
    only in runs that fire events: `capture_preds`)."""
    return [
        cb.tfm
        for cb in learn.callbacks_at("before_batch")
        if isinstance(cb, BatchTransformCB) and cb.on_val
    ]


def get_preds(
    learn: BaseLearner, dl: Any = None, with_targets: bool = True, with_loss: bool = False
) -> Any:
    """Predictions of the model over a loader, on the CPU: one tensor, or for a model with
    several outputs (a tuple, a dict) the same structure, each field concatenated.

    The model runs in eval mode under `torch.inference_mode()`, batch by batch through the
    learner's `predict` step (so a subclass's forward pass is used), each batch moved to the
    model's device and through the learner's validation batch transforms (`BatchTransformCB`s
    with `on_val`, so a normalisation done there applies here too), then split by the learner's
    `batch_format`. What is kept of each batch is `learn.preds` (for a Hugging Face model, its
    logits). No other callback runs, no event fires, and the recorder is untouched; afterwards
    every submodule's training flag, and `learn.batch`, `preds` and `loss`, are as before.

    Args:
        learn: the Learner.
        dl: an iterable of batches. Default None: `learn.dls.valid`.
        with_targets: also return the targets (`learn.yb`: the one target, or a tuple of
            several), concatenated.
        with_loss: also return the loss of each item: from `loss_func` with
            `reduction="none"` (torch's functional losses and loss modules support it), or with
            `loss_func=None` the model's own loss of each item run alone (one forward pass per
            item: slower).

    Returns:
        `preds`, or a tuple `(preds, targets)`, `(preds, losses)` or `(preds, targets, losses)`.

    Examples:
        >>> preds, targets = learn.get_preds()
        >>> (preds.argmax(1) == targets).float().mean()
    """
    if dl is None:
        dl = getattr(learn.dls, "valid", None)
        if dl is None:
            raise ValueError("get_preds: dls has no validation loader; pass one: get_preds(dl).")
    device = model_device(learn.model)
    loss_func = None
    if with_loss and learn.loss_func is not None:
        loss_func = _per_item_loss(learn.loss_func)
    preds, targets, losses = [], [], []
    transforms = valid_transforms(learn)
    with _inference(learn):
        for batch in dl:
            _predict_batch(learn, batch, device, transforms)
            preds.append(to_device(learn.preds, "cpu"))
            if (with_targets or loss_func is not None) and not learn.yb:
                raise ValueError(
                    "get_preds: the batches have no targets ("
                    + learn.batch_format.describe_targets(learn.batch, learn.yb)
                    + "); pass with_targets=False, with_loss=False."
                )
            if with_targets:
                targets.append(to_device(_targets(learn.yb), "cpu"))
            if with_loss and loss_func is None:
                losses.append(_model_item_losses(learn))
            elif loss_func is not None:
                try:
                    loss = loss_func(learn.preds, *learn.yb)
                except TypeError as e:
                    raise TypeError(
                        "get_preds(with_loss=True) needs the loss of each item: loss_func must "
                        "accept reduction='none' (as torch's functional losses do) or be a loss "
                        f"module with a .reduction attribute. ({e})"
                    ) from e
                losses.append(loss.cpu())
    if not preds:
        raise ValueError("get_preds: the loader yielded no batches.")
    out = [_cat(preds)]
    if with_targets:
        out.append(_cat(targets))
    if with_loss:
        out.append(torch.cat(losses))
    return out[0] if len(out) == 1 else tuple(out)


def _reference_inputs(learn: BaseLearner) -> Any:
    """The inputs of a training batch, to tell an item from a batch: of the last batch seen, or
    of one drawn from the training loader with every random state put back."""
    if learn.batch is not None:
        batch = learn.batch
    else:
        with kept_state(learn, rng=True):
            batch = next(iter(learn.dls.train))
    return learn.batch_format.split(batch)[0]


def _as_batch(x: Any, ref: Any) -> tuple[Any, bool]:
    """`x` (one item or one batch of inputs) as a batch the loaders could have yielded, and
    whether it was one item; `ref` is a training batch's inputs."""
    ref_t, x_t = first_tensor(ref), first_tensor(x)
    if x_t is None:
        raise TypeError(
            f"infer(x) takes a tensor, a tuple of tensors or a dict of them, got {describe(x)}."
        )
    if ref_t is None:
        raise ValueError("infer(x): a training batch's inputs hold no tensor to compare x with.")
    ndim = ref_t.ndim
    if x_t.ndim not in (ndim, ndim - 1):
        raise ValueError(
            f"infer(x): x has shape {tuple(x_t.shape)}, but a training batch's input has "
            f"{ndim} dimensions: pass one item ({ndim - 1} dims) or a batch ({ndim} dims)."
        )
    single = x_t.ndim == ndim - 1
    if single:
        x = map_tensors(x, lambda t: t.unsqueeze(0))
    if isinstance(x, torch.Tensor):
        # As a batch of the loaders would be, (x, y) with y None: validation transforms take it.
        return (x, None), single
    if isinstance(x, tuple):
        return (*x, None), single
    return x, single


def infer(learn: BaseLearner, x: Any) -> Any:
    """The model's predictions for one batch `x`, or for one item (returned without a batch
    dimension), in eval mode under `torch.inference_mode()`, on the learner's device.

    `x` is the model's inputs: a tensor, a tuple of the `n_inp` inputs, or a dict of named
    inputs (a tokenizer's output, without labels). It is one item when its first tensor has one
    dimension fewer than a training batch's (the last batch the learner saw, or else one drawn
    from `dls.train` without changing any random state); it is moved to the model's device,
    through the learner's validation batch transforms (as `get_preds`), and split by
    `batch_format`. What is returned is `learn.preds` (a Hugging Face model's logits), for one
    item each field of it without the batch dimension. Every submodule's training flag, and
    `learn.batch`, `preds` and `loss`, are restored; no event fires. The predictions stay on the
    model's device: `.cpu()` them if needed. Call it as `learn.infer(x)`. (fastai calls this
    `learn.predict(item)`; here `predict` is the training step, as in the course's miniai.)

    Examples:
        >>> learn.infer(x_valid[0]).argmax()  # one item
        >>> learn.infer(x_valid[:8]).shape    # one batch
        >>> learn.infer(tokenizer("a fine film", return_tensors="pt"))  # a dict batch
    """
    if isinstance(x, Mapping) and not isinstance(x, dict):
        x = dict(x)  # a tokenizer's BatchEncoding
    batch, single = _as_batch(x, _reference_inputs(learn))
    with _inference(learn):
        _predict_batch(learn, batch, model_device(learn.model), valid_transforms(learn))
        preds = learn.preds
    return map_tensors(preds, lambda t: t[0]) if single else preds


class CapturePredsCB(Callback):
    """Keeps the predictions and targets of every batch, on the CPU (the course's CapturePreds),
    and with `inps=True` the inputs too.

    After the fit, `all_preds` and `all_targs` are the concatenated tensors (per field for
    several outputs or targets; `all_targs` is None for batches without targets), and `all_inps`
    the inputs as the model saw them (after the callbacks' `before_batch`: on the device,
    transformed), concatenated the same way (a tuple for several inputs; None without `inps`).
    Used by `capture_preds`; usable in any fit.

    Events: `before_fit`, `after_batch`, `after_fit`. Order: 80 (after the callbacks that change
    the predictions).

    Examples:
        >>> cp = CapturePredsCB()
        >>> learn.fit(1, train=False, cbs=cp)
        >>> cp.all_preds.shape
    """

    order = ORDERS["CapturePredsCB"]
    in_side_runs = False

    def __init__(self, inps: bool = False) -> None:
        self.inps = inps
        self.all_preds: Any = []
        self.all_targs: Any = []
        self.all_inps: Any = None

    def before_fit(self, learn: BaseLearner) -> None:
        self.all_preds, self.all_targs = [], []
        self.all_inps = [] if self.inps else None

    def after_batch(self, learn: BaseLearner) -> None:
        self.all_preds.append(to_cpu(learn.preds))
        self.all_targs.append(to_cpu(_targets(learn.yb)) if learn.yb else None)
        if self.all_inps is not None:
            xb = learn.xb  # keyword inputs (a dict) stay a dict
            self.all_inps.append(
                to_cpu(xb if isinstance(xb, Mapping) else _targets(xb)) if xb else None
            )

    def after_fit(self, learn: BaseLearner) -> None:
        if self.all_preds:
            self.all_preds, self.all_targs = _cat(self.all_preds), _cat(self.all_targs)
            if self.all_inps is not None:
                self.all_inps = _cat(self.all_inps)


def capture_preds(
    learn: BaseLearner, cbs: Callback | Iterable[Callback] | None = None, inps: bool = False
) -> tuple[Any, ...]:
    """Predictions and targets over `dls.valid` from a validation pass that fires events, with
    the callbacks `cbs` added for it (the course's `capture_preds`).

    Unlike `get_preds`, the learner's callbacks that take part in side runs
    (`Callback.in_side_runs`: device, train/eval, batch transforms, mixed precision, your own)
    run, as copies, with `cbs`; the recorder, the metrics and the loggers sit it out, so the run
    records nothing, and the learner's state and random states are put back afterwards. So a
    `BatchTransformCB` in `cbs` gives test-time augmentation.

    Args:
        learn: the Learner.
        cbs: callbacks for this pass (one, or an iterable).
        inps: also return the inputs, as the model saw them.

    Returns:
        `(preds, targets)`, or with `inps` `(preds, targets, inputs)` (the course's order), on
        the CPU.

    Examples:
        >>> preds, targs = learn.capture_preds()
        >>> flip = BatchTransformCB(partial(tfm_batch, tfm_x=torch.fliplr))
        >>> preds_flip, _ = learn.capture_preds(cbs=flip)
        >>> ((preds + preds_flip) / 2).argmax(1)  # averaged over the two views
        >>> preds, targs, inputs = learn.capture_preds(inps=True)
    """
    if getattr(learn.dls, "valid", None) is None:
        raise ValueError("capture_preds runs over dls.valid, and dls has no validation loader.")
    capture = CapturePredsCB(inps=inps)
    with side_run(learn, weights=False) as copies:
        learn.fit(1, train=False, cbs=[*copies, *as_cbs(cbs), capture])
    if inps:
        return capture.all_preds, capture.all_targs, capture.all_inps
    return capture.all_preds, capture.all_targs
