"""Predictions outside training: `learn.get_preds()` over a loader, `learn.infer(x)` for one
batch or one item: neither fires events, so no callback runs and nothing is recorded. And
`learn.capture_preds(cbs=...)`, the course's way: a validation pass that fires events, with
extra callbacks (test-time augmentation by a `BatchTransformCB`).

Both run the learner's training step `predict` (so a subclass's forward pass is used) in eval
mode under `torch.inference_mode()`: overriding the step changes inference and cannot break it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from learner.callbacks.batch_transform import BatchTransformCB
from learner.callbacks.order import ORDERS
from learner.core import BaseLearner, Callback, as_cbs
from learner.snapshot import kept_state, side_run
from learner.utils import model_device, to_cpu, to_device

__all__ = ["CapturePredsCB", "capture_preds", "get_preds", "infer", "valid_transforms"]


@contextmanager
def _inference(learn: BaseLearner) -> Iterator[None]:
    """Eval mode and inference mode; afterwards the learner's state is as before."""
    with kept_state(learn):
        learn.model.eval()
        with torch.inference_mode():
            yield


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (list, tuple)):
        return type(first)(_cat(list(p)) for p in zip(*parts))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    raise TypeError(f"get_preds concatenates tensors, got predictions of type {type(first)}.")


def _per_item_loss(loss_func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    if isinstance(getattr(loss_func, "reduction", None), str):  # an nn loss module

        def module_loss(preds: Any, targets: Any) -> torch.Tensor:
            old = loss_func.reduction  # type: ignore[attr-defined]
            loss_func.reduction = "none"  # type: ignore[attr-defined]
            try:
                return loss_func(preds, targets)
            finally:
                loss_func.reduction = old  # type: ignore[attr-defined]

        return module_loss
    return lambda preds, targets: loss_func(preds, targets, reduction="none")


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
    """Predictions of the model over a loader, as one tensor on the CPU.

    The model runs in eval mode under `torch.inference_mode()`, batch by batch through the
    learner's `predict` step (so a subclass's forward pass is used), each batch moved to the
    model's device and through the learner's validation batch transforms (`BatchTransformCB`s
    with `on_val`, so a normalisation done there applies here too). No other callback runs, no
    event fires, and the recorder is untouched;
    afterwards every submodule's training flag, and `learn.batch`, `preds` and `loss`, are as
    before.

    Args:
        learn: the Learner.
        dl: an iterable of `(x, y)` batches. Default None: `learn.dls.valid`.
        with_targets: also return the targets (`batch[1]`), concatenated.
        with_loss: also return the loss of each item, from `loss_func` with
            `reduction="none"` (torch's functional losses and loss modules support it).

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
    loss_func = _per_item_loss(learn.loss_func) if with_loss else None
    preds, targets, losses = [], [], []
    transforms = valid_transforms(learn)
    with _inference(learn):
        for batch in dl:
            learn.batch = to_device(batch, device)
            for tfm in transforms:
                learn.batch = tfm(learn.batch)
            learn.predict()
            preds.append(to_device(learn.preds, "cpu"))
            if with_targets or with_loss:
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise ValueError(
                        "get_preds: the batches have no targets (batch[1]); pass "
                        "with_targets=False, with_loss=False."
                    )
                targets.append(to_device(learn.batch[1], "cpu"))
            if loss_func is not None:
                try:
                    loss = loss_func(learn.preds, learn.batch[1])
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


def _input_ndim(learn: BaseLearner) -> int:
    """The number of dimensions of a batch's input: from the last batch seen, or one drawn
    from the training loader with every random state put back."""
    if learn.batch is not None:
        return int(learn.batch[0].ndim)
    with kept_state(learn, rng=True):
        return int(next(iter(learn.dls.train))[0].ndim)


def infer(learn: BaseLearner, x: torch.Tensor) -> Any:
    """The model's predictions for one batch `x`, or for one item (returned without a batch
    dimension), in eval mode under `torch.inference_mode()`, on the learner's device.

    `x` is one item when it has one dimension fewer than a training batch's input (the last
    batch the learner saw, or else one drawn from `dls.train` without changing any random
    state), moved to the model's device and through the learner's validation batch transforms
    (as `get_preds`). Every submodule's training flag, and `learn.batch`, `preds` and `loss`, are
    restored; no event fires. The predictions stay on the model's device: `.cpu()` them if
    needed. Call it as `learn.infer(x)`. (fastai calls this `learn.predict(item)`; here
    `predict` is the training step, as in the course's miniai.)

    Examples:
        >>> learn.infer(x_valid[0]).argmax()  # one item
        >>> learn.infer(x_valid[:8]).shape    # one batch
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"infer(x) takes a tensor, got {type(x).__name__}.")
    ndim = _input_ndim(learn)
    if x.ndim not in (ndim, ndim - 1):
        raise ValueError(
            f"infer(x): x has shape {tuple(x.shape)}, but a training batch's input has "
            f"{ndim} dimensions: pass one item ({ndim - 1} dims) or a batch ({ndim} dims)."
        )
    single = x.ndim == ndim - 1
    with _inference(learn):
        # As a batch of the loaders would be: moved, then through the validation transforms
        # (which take an (x, y) batch: y is None here).
        learn.batch = (to_device(x.unsqueeze(0) if single else x, model_device(learn.model)), None)
        for tfm in valid_transforms(learn):
            learn.batch = tfm(learn.batch)
        learn.predict()
        preds = learn.preds
    return preds[0] if single else preds


class CapturePredsCB(Callback):
    """Keeps the predictions and targets of every batch, on the CPU (the course's CapturePreds).

    After the fit, `all_preds` and `all_targs` are the concatenated tensors. Used by
    `capture_preds`; usable in any fit.

    Events: `before_fit`, `after_batch`, `after_fit`. Order: 80 (after the callbacks that change
    the predictions).

    Examples:
        >>> cp = CapturePredsCB()
        >>> learn.fit(1, train=False, cbs=cp)
        >>> cp.all_preds.shape
    """

    order = ORDERS["CapturePredsCB"]
    in_side_runs = False

    def __init__(self) -> None:
        self.all_preds: Any = []
        self.all_targs: Any = []

    def before_fit(self, learn: BaseLearner) -> None:
        self.all_preds, self.all_targs = [], []

    def after_batch(self, learn: BaseLearner) -> None:
        self.all_preds.append(to_cpu(learn.preds))
        self.all_targs.append(to_cpu(learn.batch[1]))

    def after_fit(self, learn: BaseLearner) -> None:
        if self.all_preds:
            self.all_preds, self.all_targs = _cat(self.all_preds), _cat(self.all_targs)


def capture_preds(
    learn: BaseLearner, cbs: Callback | Iterable[Callback] | None = None
) -> tuple[Any, Any]:
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

    Returns:
        `(preds, targets)`, on the CPU.

    Examples:
        >>> preds, targs = learn.capture_preds()
        >>> flip = BatchTransformCB(partial(tfm_batch, tfm_x=torch.fliplr))
        >>> preds_flip, _ = learn.capture_preds(cbs=flip)
        >>> ((preds + preds_flip) / 2).argmax(1)  # averaged over the two views
    """
    if getattr(learn.dls, "valid", None) is None:
        raise ValueError("capture_preds runs over dls.valid, and dls has no validation loader.")
    capture = CapturePredsCB()
    with side_run(learn, weights=False) as copies:
        learn.fit(1, train=False, cbs=[*copies, *as_cbs(cbs), capture])
    return capture.all_preds, capture.all_targs
