"""Training with Hugging Face Accelerate: the course's `AccelerateCB` (miniai/accel.py)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from learner.callbacks.device import DeviceCB
from learner.callbacks.mixed_precision import MixedPrecisionCB
from learner.callbacks.order import ORDERS
from learner.callbacks.parallel import DistributedCB
from learner.core import BaseLearner, CancelStepException
from learner.distributed import broadcast_tensors, torchrun_env, world_size
from learner.events import Callback
from learner.utils import move

__all__ = ["AccelerateCB"]

# What `Accelerator.prepare` leaves on the objects handed to it: on the model the autocast
# wrapper of its forward (mixed precision) and the flag that makes a later prepare return it
# untouched; on the optimizer the `step` that a GradScaler's step rebinds. Put back (or removed)
# at the end of fit, so that the next fit, or a side run, prepares the model afresh.
_MODEL_ATTRS = ("forward", "_original_forward", "_is_accelerate_prepared")
_OPT_ATTRS = ("step", "_is_accelerate_prepared")
_ABSENT = object()
_FLOAT32_ON_CPU = ("fp16", "no")  # what Accelerate trains in float32 on a CPU
_OWN_PRECISION = ("DEEPSPEED", "MEGATRON_LM")  # distributed types whose engine does it instead


def _accelerate() -> tuple[Any, Any]:
    """`accelerate.Accelerator`, and the process's `AcceleratorState` if there is one, else None."""
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, is_initialized
    except ImportError as e:
        raise ImportError(
            'AccelerateCB needs Hugging Face Accelerate: pip install "learner[accelerate]" '
            "(or pip install accelerate)."
        ) from e
    return Accelerator, AcceleratorState() if is_initialized() else None


def _instance_attrs(obj: object, names: tuple[str, ...]) -> dict[str, Any]:
    """The instance attributes `names` of `obj` (`_ABSENT` for those it has not set)."""
    own = getattr(obj, "__dict__", {})
    return {name: own.get(name, _ABSENT) for name in names}


def _put_back(obj: object, saved: dict[str, Any]) -> None:
    own = getattr(obj, "__dict__", None)
    if own is None:
        return
    for name, value in saved.items():
        if value is _ABSENT:
            own.pop(name, None)
        else:
            own[name] = value


class AccelerateCB(Callback):
    """Trains with Hugging Face Accelerate: `accelerate.Accelerator.prepare` gets the model, the
    optimizer and the loaders at `before_fit`, and `Accelerator.backward` runs each backward pass,
    as the course's `AccelerateCB` does (miniai/accel.py, notebook 17).

    Accelerate then does what its configuration says: the device, mixed precision and, launched
    by `accelerate launch` or torchrun with several processes, DDP and the sharding of torch
    `DataLoader`s (other loaders are then refused; on CPUs several processes need `cpu=True`,
    and without it are refused too, as Accelerate would train each alone). Under DDP the batches
    between `GradAccumCB`'s steps skip the gradient all-reduce (`learn.grad_sync`), and every
    rank validates with rank 0's buffers (BatchNorm statistics). Accelerate's loaders repeat a
    few samples to even out the ranks' last batches, which `MetricsCB` counts: pass
    `dataloader_config=DataLoaderConfiguration(even_batches=False)` to count each once. Its
    DeepSpeed, FSDP and TPU set-ups are Accelerate's, untested here.

    During fit `learn.model`, `learn.opt` and `learn.dls.train`/`valid` are the prepared objects
    (`learn.dls` a copy holding them, so your `DataLoaders` is not changed); at `cleanup_fit`,
    also after an error, your own model, optimizer and `dls` are back, the autocast wrapper
    Accelerate put on the model's `forward` is removed, and the accelerator lets go of the
    prepared objects (`Accelerator.free_memory`), so a second fit prepares afresh.

    Mixed precision: `"fp16"` (the course's default) autocasts to float16 with a GradScaler
    where the device has float16 autocast (CUDA, and Accelerate's other accelerators). On a
    CPU Accelerate does not autocast to float16 and trains in float32; the callback warns
    that it does, and `mixed_precision` (the effective one) is then `"no"`. Pass `"bf16"` for
    bfloat16 autocast on a CPU, `"no"` for float32 without the warning, or None for what
    `accelerate config` / `accelerate launch --mixed_precision` chose. Accelerate keeps one
    state per process: every `Accelerator` in it, this callback's included, must ask for the
    same `mixed_precision` (to change it in a notebook, restart the kernel); on a CPU, where both
    mean float32, `"fp16"` and `"no"` go together.

    With a GradScaler (float16), the gradients are unscaled at `before_step` of each batch that
    steps (those with `learn.grad_sync` set: `GradAccumCB` clears it for the others), so that
    `GradClipCB` clips the true gradients; a step the scaler skips for inf/nan gradients is
    cancelled (no `after_step`, the gradients zeroed), counted in `n_skipped`.

    Cooperation with the standard callbacks: `DeviceCB` may stay (the default one picks the same
    device); Accelerate's placement comes after it and wins, and each batch is moved on to
    Accelerate's device at `before_batch` if it is not there. `MetricsCB` runs after it at
    `before_fit`, so it accumulates on that device. It cannot be combined with `DistributedCB`
    (`Learner` does not add one under a launcher when `cbs=` holds an AccelerateCB), nor with
    `MixedPrecisionCB` when Accelerate does mixed precision itself, nor with
    `Accelerator(gradient_accumulation_steps=...)`: accumulate with `GradAccumCB`. In side runs
    (`lr_find`) a copy of it takes part, sharing the accelerator, and leaves no trace.

    It provides the training steps `backward` (`Accelerator.backward(learn.loss_grad)`) and
    `step` (the prepared optimizer's); `predict`, `get_loss` and `zero_grad` stay the learner's,
    so a `Learner` subclass (the course's `TrainLearner`) keeps its own, and the batch is split
    by `learn.batch_format` (whose `n_inp` must be this `n_inp`).

    Events: `before_fit`, `before_batch`, `before_step`, `before_validate`, `cleanup_fit`.
    Order: -16 (after `DeviceCB`, -20, so that Accelerate places the model last; before
    `DistributedCB`, -15, so that the two together are refused before either sets anything up;
    before `MetricsCB`, -10, which reads the model's device, and `GradClipCB`, 15, which clips
    the unscaled gradients. The course's is `DeviceCB.order + 10`).

    Args:
        n_inp: how many leading items of a tuple batch are the model's inputs, as in the course's
            `TrainCB`; here the learner's `batch_format` splits batches, so it must agree
            (`Learner(..., batch_format=BatchFormat(n_inp=2))`).
        mixed_precision: `"fp16"`, `"bf16"`, `"fp8"` or `"no"`, as `Accelerator` takes it; None:
            Accelerate's configuration.
        **kwargs: passed to `accelerate.Accelerator`, e.g. `cpu=True`, `dataloader_config=...`,
            `kwargs_handlers=[...]`.

    Needs accelerate: `pip install "learner[accelerate]"`.

    Examples:
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=[AccelerateCB()])
        >>> learn.fit(3)  # float16 with a GradScaler on a GPU; float32, with a warning, on a CPU
        >>> learn.accelerate.acc.device
    """

    order = ORDERS["AccelerateCB"]

    def __init__(self, n_inp: int = 1, mixed_precision: str | None = "fp16", **kwargs: Any) -> None:
        if isinstance(n_inp, bool) or not isinstance(n_inp, int) or n_inp < 1:
            raise ValueError(f"AccelerateCB n_inp must be an int >= 1, got {n_inp!r}.")
        accelerator, state = _accelerate()
        asked = mixed_precision
        # Both train in float32 on a CPU, and Accelerate holds every Accelerator of a process
        # to the first one's mixed_precision: take its name for it.
        on_cpu = state is not None and state.device.type == "cpu"
        if on_cpu and asked in _FLOAT32_ON_CPU and state.mixed_precision in _FLOAT32_ON_CPU:
            mixed_precision = state.mixed_precision
        try:
            self.acc: Any = accelerator(mixed_precision=mixed_precision, **kwargs)
        except ValueError as e:
            if "already been initialized" in str(e):
                e.add_note(
                    "Accelerate keeps one state per process: every Accelerator in it, "
                    "AccelerateCB's included, takes the mixed_precision (and cpu) of the first. "
                    "Pass the same, or restart the kernel to change it."
                )
            raise
        if self.acc.distributed_type != "DEEPSPEED" and self.acc.gradient_accumulation_steps != 1:
            raise ValueError(
                "AccelerateCB steps after every backward pass: accumulate gradients with "
                "GradAccumCB(n), not Accelerator(gradient_accumulation_steps=n)."
            )
        if torchrun_env() and self.acc.num_processes == 1:
            raise ValueError(
                f"The launcher started {world_size()} processes, and Accelerate trains each one "
                "alone, on all the data: on CPUs pass AccelerateCB(cpu=True) (or launch with "
                "accelerate launch --cpu)."
            )
        self.n_inp = n_inp
        self.mixed_precision: str = self._effective_precision(asked)
        """What the forward pass runs in: the accelerator's `mixed_precision`, or `"no"` where
        it cannot autocast to float16 (a CPU)."""
        self.n_skipped = 0
        self.device = torch.device("cpu")  # the accelerator's, with its index, at before_fit
        self._saved: tuple[Any, Any, Any] | None = None  # your model, optimizer and dls
        self._attrs: list[tuple[object, dict[str, Any]]] = []
        self._hook: Any = None  # the forward pre-hook that applies learn.grad_sync to DDP

    def _effective_precision(self, asked: str | None) -> str:
        acc = self.acc
        precision = str(acc.mixed_precision)
        # Where Accelerate itself gives fp16 no autocast (nor GradScaler), and says nothing.
        cpu = acc.device.type == "cpu"
        if precision in _FLOAT32_ON_CPU and cpu and acc.distributed_type not in _OWN_PRECISION:
            if (asked or precision) == "fp16":  # asked for, or Accelerate's configuration's
                warnings.warn(
                    f'AccelerateCB: mixed_precision="fp16" needs a device with float16 '
                    f"autocast; on {acc.device.type} Accelerate trains in float32. Pass "
                    'mixed_precision="bf16" for bfloat16 autocast there, or "no" for float32 '
                    "without this warning.",
                    stacklevel=3,
                )
            return "no"
        return precision

    def _check(self, learn: BaseLearner) -> None:
        if self.n_inp != learn.batch_format.n_inp:
            raise ValueError(
                f"AccelerateCB(n_inp={self.n_inp}), but the learner splits batches with "
                f"n_inp={learn.batch_format.n_inp}: here the Learner's batch_format splits "
                f"them. Pass Learner(..., batch_format=BatchFormat(n_inp={self.n_inp}))."
            )
        for cb in learn.cbs:
            if isinstance(cb, DistributedCB):
                raise ValueError(
                    "AccelerateCB and DistributedCB both distribute training: use one. (Learner "
                    "adds a DistributedCB under a launcher unless its cbs= holds an "
                    "AccelerateCB; learn.remove_cb(learn.distributed) takes it out.)"
                )
            if isinstance(cb, MixedPrecisionCB) and self.mixed_precision != "no":
                raise ValueError(
                    f'AccelerateCB(mixed_precision="{self.mixed_precision}") autocasts already: '
                    'remove MixedPrecisionCB, or pass AccelerateCB(mixed_precision="no").'
                )
            if isinstance(cb, DeviceCB) and cb.device.type != self.acc.device.type:
                warnings.warn(
                    f"DeviceCB moves the model and batches to {cb.device}, and Accelerate "
                    f"trains on {self.acc.device}: Accelerate's device wins, each batch is "
                    f"moved twice. Pass DeviceCB({self.acc.device.type!r}), or Accelerator "
                    "options through AccelerateCB(...).",
                    stacklevel=2,
                )
        opt = learn.opt
        if self.acc.scaler is not None and not isinstance(opt, torch.optim.Optimizer | None):
            raise ValueError(
                f"float16's GradScaler steps a torch.optim.Optimizer, and learn.opt is "
                f'{type(opt).__name__}: pass AccelerateCB(mixed_precision="bf16") or '
                '"no", or a torch optimizer as opt_func.'
            )

    def before_fit(self, learn: BaseLearner) -> None:
        self._check(learn)
        model, opt, dls = learn.model, learn.opt, learn.dls
        self._saved = (model, opt, dls)
        self._attrs = [(model, _instance_attrs(model, _MODEL_ATTRS))]
        if opt is not None:
            self._attrs.append((opt, _instance_attrs(opt, _OPT_ATTRS)))
        loaders = {n: dl for n in ("train", "valid") if (dl := getattr(dls, n, None)) is not None}
        if self.acc.num_processes > 1:
            for name, dl in loaders.items():
                if not isinstance(dl, DataLoader):
                    raise ValueError(
                        f"Accelerate shards torch DataLoaders only, and dls.{name} is a "
                        f"{type(dl).__name__}: under {self.acc.num_processes} processes every "
                        "rank would train on all of it. Pass torch DataLoaders."
                    )
        objects = [model, *([opt] if opt is not None else []), *loaders.values()]
        prepared = self.acc.prepare(*objects)
        prepared = list(prepared) if len(objects) > 1 else [prepared]
        learn.model = prepared.pop(0)
        if opt is not None:
            learn.opt = prepared.pop(0)
        if loaders:
            learn.dls = copy.copy(dls)
            for name, dl in zip(loaders, prepared):
                setattr(learn.dls, name, dl)
        # Tensors report "cuda:0", "mps:0": with the index filled in, a batch already there
        # compares equal and is not moved again.
        self.device = torch.empty(0, device=self.acc.device).device
        if isinstance(learn.model, DistributedDataParallel):

            def no_sync(ddp: torch.nn.Module, args: Any) -> None:  # DDP reads it in its forward
                ddp.require_backward_grad_sync = learn.grad_sync  # type: ignore[assignment]

            self._hook = learn.model.register_forward_pre_hook(no_sync)

    def before_batch(self, learn: BaseLearner) -> None:
        learn.batch = move(learn.batch, self.device)

    def before_validate(self, learn: BaseLearner) -> None:
        # Under DDP each rank's last training forward updated its own BatchNorm statistics:
        # every rank validates rank 0's, so all ranks validate the same model.
        if isinstance(learn.model, DistributedDataParallel):
            broadcast_tensors(learn.model.module.buffers())

    def backward(self, learn: BaseLearner) -> None:
        """The training step: `acc.backward(learn.loss_grad)`, which scales the loss for fp16."""
        self.acc.backward(learn.loss_grad)

    def before_step(self, learn: BaseLearner) -> None:
        if self.acc.scaler is not None and learn.grad_sync:  # a batch that steps: unscale once
            self.acc.unscale_gradients(learn.opt)

    def step(self, learn: BaseLearner) -> None:
        """The training step: the prepared optimizer's `step()`; one the GradScaler skipped
        (inf/nan gradients) zeroes the gradients and cancels the step."""
        learn.opt.step()
        if self.acc.scaler is not None and self.acc.optimizer_step_was_skipped:
            self.n_skipped += 1
            learn.zero_grad()
            raise CancelStepException()

    def cleanup_fit(self, learn: BaseLearner) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._saved is not None:
            learn.model, learn.opt, learn.dls = self._saved
            self._saved = None
        for obj, attrs in self._attrs:
            _put_back(obj, attrs)
        self._attrs = []
        self.acc.free_memory()  # the prepared objects, and their memory, go

    def state_dict(self) -> dict[str, Any]:
        """With a GradScaler (float16): its state (scale, growth tracker) and `n_skipped`;
        without one, nothing."""
        if self.acc.scaler is None:
            return {}
        return {"scaler": self.acc.scaler.state_dict(), "n_skipped": self.n_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned."""
        self.n_skipped = int(state.get("n_skipped", 0))
        if self.acc.scaler is not None and state.get("scaler"):
            self.acc.scaler.load_state_dict(state["scaler"])
