"""Mixed precision: autocast for the forward pass and loss, a GradScaler for float16."""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch

from learner.callbacks.order import ORDERS
from learner.checks import param_groups
from learner.core import BaseLearner, CancelStepException
from learner.events import Callback
from learner.utils import map_tensors, model_device

__all__ = ["MixedPrecisionCB"]

_SCALER_METHODS = ("scale", "unscale_", "step", "update", "state_dict", "load_state_dict")


class _Scaler(Protocol):
    """What MixedPrecisionCB uses of a `torch.amp.GradScaler`."""

    def scale(self, outputs: torch.Tensor) -> torch.Tensor: ...
    def unscale_(self, optimizer: Any) -> None: ...
    def step(self, optimizer: Any) -> Any: ...
    def update(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class _StepProbe:
    """Stands in for the optimizer in `GradScaler.step`, which calls `step()` only when the
    gradients are finite: the public way to learn whether the scaler would skip this step."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.param_groups = opt.param_groups
        self.stepped = False

    def step(self) -> None:
        self.stepped = True


_HALF = (torch.float16, torch.bfloat16)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


class MixedPrecisionCB(Callback):
    """Runs the forward pass and the loss under `torch.autocast`; with float16, scales the loss.

    Autocast is entered at `before_batch` and left at `after_loss` (also at `cleanup_batch` if an
    error came in between), so `backward`, the optimizer step and every other event run outside it.
    Low-precision predictions are cast to float32 at `after_predict`, so the loss and the metrics
    are computed in float32 as without autocast (the standard losses do so anyway).

    float16 gradients underflow, so with float16 on CUDA a `torch.amp.GradScaler` multiplies the
    loss before `backward` (`learn.loss_grad = scaler.scale(learn.loss_grad)`; `learn.loss`, and so
    the recorded loss, stays the true loss). At `before_step` the gradients are unscaled, once, so
    later `before_step` callbacks such as `GradClipCB` see the true gradients; when they hold inf
    or nan the step is skipped: the gradients are zeroed, the scale is lowered and
    `CancelStepException` is raised, so `after_step` does not fire and a scheduler does not advance.
    Deciding to skip reads one flag from the device once per step, as `GradScaler.step` does.
    `n_skipped` counts the skipped steps.

    The scaler is updated at `before_step`, right after it decided, rather than at `after_step`:
    a later `before_step` callback may still cancel the step, and the scaler must be updated once
    for each unscale. Callbacks that cancel steps to accumulate gradients (`GradAccumCB`) must
    have a lower order, so that the gradients are unscaled once per step, not once per batch.

    Events: `before_fit`, `before_batch`, `after_predict`, `after_loss`, `before_backward`,
    `before_step`, `cleanup_batch`. Order: 10 (after DeviceCB, -20, moved the model: the device
    type comes from the model's parameters).

    Args:
        dtype: `torch.float16` or `torch.bfloat16`; `None` picks float16 on CUDA, else bfloat16.
        scaler: `None` uses a GradScaler only for float16 on CUDA; `True` always (float16 on CPU
            needs one too); `False` never; or a `torch.amp.GradScaler` of your own (any object
            with its `scale`, `unscale_`, `step`, `update`, `state_dict`, `load_state_dict`).

    Examples:
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=[MixedPrecisionCB()])
        >>> learn.fit(1)  # bfloat16 on a CPU, float16 with a GradScaler on a GPU
    """

    order = ORDERS["MixedPrecisionCB"]

    def __init__(
        self, dtype: torch.dtype | None = None, scaler: bool | _Scaler | None = None
    ) -> None:
        if dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(
                f"MixedPrecisionCB dtype must be torch.float16 or torch.bfloat16 (or None for "
                f"the device's default), got {dtype!r}."
            )
        if not (scaler is None or isinstance(scaler, bool)):
            missing = [m for m in _SCALER_METHODS if not callable(getattr(scaler, m, None))]
            if missing:
                raise TypeError(
                    f"MixedPrecisionCB scaler must be None, a bool or a torch.amp.GradScaler; "
                    f"{type(scaler).__name__} has no {', '.join(missing)}."
                )
        self._dtype, self._want_scaler = dtype, scaler
        self.dtype: torch.dtype | None = dtype  # resolved at before_fit
        self.device_type = "cpu"
        self.scaler: _Scaler | None = None if scaler is None or isinstance(scaler, bool) else scaler
        self.n_skipped = 0
        self._autocast: torch.autocast | None = None
        self._in_autocast = False

    def before_fit(self, learn: BaseLearner) -> None:
        self.device_type = model_device(learn.model).type
        if not torch.amp.is_autocast_available(self.device_type):
            raise ValueError(
                f"torch.autocast does not support the model's device type "
                f"{self.device_type!r}: remove MixedPrecisionCB or train on cuda or cpu."
            )
        cuda = self.device_type == "cuda"
        self.dtype = self._dtype or (torch.float16 if cuda else torch.bfloat16)
        default = cuda and self.dtype == torch.float16
        if self.scaler is None and (
            self._want_scaler is True or (self._want_scaler is None and default)
        ):
            self.scaler = torch.amp.GradScaler(self.device_type)
        if self.scaler is not None and learn.run_train:
            param_groups(learn.opt, "MixedPrecisionCB's GradScaler")
        self._autocast = torch.autocast(self.device_type, dtype=self.dtype)

    def before_batch(self, learn: BaseLearner) -> None:
        assert self._autocast is not None  # made at before_fit
        self._autocast.__enter__()
        self._in_autocast = True

    def after_predict(self, learn: BaseLearner) -> None:
        preds = learn.preds
        if isinstance(preds, torch.Tensor):
            if preds.dtype in _HALF:
                learn.preds = preds.float()
        else:  # several outputs: each half-precision tensor in them
            learn.preds = map_tensors(preds, _full)

    def _exit_autocast(self) -> None:
        if self._in_autocast and self._autocast is not None:
            self._in_autocast = False
            self._autocast.__exit__(None, None, None)

    def after_loss(self, learn: BaseLearner) -> None:
        self._exit_autocast()

    def cleanup_batch(self, learn: BaseLearner) -> None:
        self._exit_autocast()

    def before_backward(self, learn: BaseLearner) -> None:
        if self.scaler is not None:
            learn.loss_grad = self.scaler.scale(learn.loss_grad)

    def before_step(self, learn: BaseLearner) -> None:
        if self.scaler is None:
            return
        assert learn.opt is not None  # training batches run only once fit made one
        probe = _StepProbe(learn.opt)
        self.scaler.unscale_(probe)
        self.scaler.step(probe)
        self.scaler.update()
        if not probe.stepped:
            self.n_skipped += 1
            learn.zero_grad()
            raise CancelStepException()

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state (its scale and growth tracker) and `n_skipped`."""
        state = self.scaler.state_dict() if self.scaler is not None else {}
        return {"scaler": state, "n_skipped": self.n_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (a resumed fit calls it once `before_fit` made
        the scaler)."""
        self.n_skipped = state.get("n_skipped", 0)
        scaler_state = state.get("scaler") or {}
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        elif scaler_state:
            warnings.warn(
                "MixedPrecisionCB: the checkpoint holds a GradScaler's state, but this callback "
                "uses no scaler (bfloat16, or scaler=False): the scale is not restored.",
                stacklevel=2,
            )
