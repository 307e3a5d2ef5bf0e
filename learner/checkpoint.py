"""Checkpoints: one file holding everything a run needs to go on exactly where it stopped.

A checkpoint is a dict of tensors, plain containers, numbers and strings only, so that it loads
with `torch.load(path, weights_only=True)`: a file from an untrusted source cannot run code.

- `format`, `version`: what the file is.
- `model`: the model's `state_dict()`, unwrapped (no `_orig_mod.` from `torch.compile`, no
  `module.` from `DataParallel`/`DistributedDataParallel`), so it loads into a wrapped model or
  a plain one alike; `grads`: the gradients held between steps (gradient accumulation).
- `opt`: the optimizer's `state_dict()` (None before the first fit).
- `callbacks`: `cb.state_dict()` of every callback that has one, by `cb.name` (the recorder's
  history, the schedules' positions, the metrics' accumulators mid-epoch, the GradScaler...).
- `progress`: `{"epoch": e, "iter": k, "n_epochs": n}`: epochs before `e` are complete, and so
  are the first `k` training batches of epoch `e`.
- `rng`: the Python, NumPy, torch (and CUDA) random states and those of the loaders'
  generators now; `epoch_rng`: those the current epoch's shuffle was drawn from (mid-epoch only).

`fit(n_epochs, resume_from=path)` continues the saved run: see `Resume`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from learner.core import Callback, Learner
from learner.io import atomic_save
from learner.rng import rng_state, set_rng_state

__all__ = ["FORMAT", "Resume", "load", "read_checkpoint", "save", "unwrap_model"]

FORMAT, VERSION = "learner.checkpoint", 1
StrPath = str | os.PathLike[str]


# -- the model, unwrapped -----------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside `torch.compile`, `DataParallel` and `DistributedDataParallel` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _plain_key(key: str) -> str:
    # A compiled submodule (`model.body = torch.compile(body)`) puts `_orig_mod.` mid-key.
    return key.replace("_orig_mod.", "")


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {_plain_key(k): v for k, v in unwrap_model(model).state_dict().items()}


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {_plain_key(k): p for k, p in unwrap_model(model).named_parameters()}


# -- random states, as tensors and plain values -------------------------------------------------


# -- writing ------------------------------------------------------------------------------------


def _callback_states(learn: Learner) -> dict[str, Any]:
    return {cb.name: cast(Any, cb).state_dict() for cb in learn.cbs if _stateful(cb)}


def _stateful(cb: Callback) -> bool:
    # `state_dict` / `load_state_dict` are a convention callbacks opt into, not part of Callback.
    return callable(getattr(cb, "state_dict", None)) and callable(
        getattr(cb, "load_state_dict", None)
    )


def _check_plain(obj: Any, where: str) -> None:
    # Fail when writing, naming the culprit, rather than when a later load refuses the file.
    if obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool, torch.Size)):
        return
    if isinstance(obj, (list, tuple)):
        for i, o in enumerate(obj):
            _check_plain(o, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    else:
        raise TypeError(
            f"checkpoint{where} is a {type(obj).__name__}; a checkpoint holds only tensors, "
            "containers, numbers and strings (so that it loads with weights_only=True). Make "
            "the state_dict() that returns it return plain values."
        )


def checkpoint(
    learn: Learner,
    progress: Mapping[str, int] | None = None,
    epoch_rng: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of `learn` as a dict (see the module docstring); `save` writes it.

    `progress` defaults to the end of the last fit's last epoch run (the start before any fit).
    """
    if progress is None:
        progress = {"epoch": learn.epoch + 1 if learn.n_epochs else 0, "iter": 0}
    grads = {k: p.grad for k, p in _named_params(learn.model).items() if p.grad is not None}
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "model": _model_state(learn.model),
        "grads": grads,
        "opt": learn.opt.state_dict() if learn.opt is not None else None,
        "callbacks": _callback_states(learn),
        "progress": {**progress, "n_epochs": learn.n_epochs},
        "rng": rng_state(learn.dls),
        "epoch_rng": dict(epoch_rng) if epoch_rng is not None else None,
    }
    _check_plain(ckpt, "")
    return ckpt


def save(learn: Learner, path: StrPath, **kwargs: Any) -> Path:
    """Write `checkpoint(learn, **kwargs)` to `path` atomically (see `learner.io.atomic_save`)."""
    return atomic_save(checkpoint(learn, **kwargs), path)


# -- reading and checking -----------------------------------------------------------------------


def read_checkpoint(path: StrPath) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` and check that it is one; clear errors if not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects other than tensors, containers, numbers and strings, so it is "
            "not a learner checkpoint, and loading it could run code: refused (weights_only). "
            f"{str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... by format
        raise ValueError(
            f"{path} is not a readable torch file: it may be truncated (a copy that did not "
            f"finish) or of another format. ({str(e).splitlines()[0]})"
        ) from e
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT):
        hint = ""
        if (
            isinstance(ckpt, dict)
            and ckpt
            and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        ):
            hint = (
                " It looks like a model's state_dict (as SaveBestCB writes): load it with "
                "learn.model.load_state_dict(torch.load(path, weights_only=True))."
            )
        raise ValueError(f"{path} is not a learner checkpoint (written by learn.save).{hint}")
    if ckpt.get("version") != VERSION:
        raise ValueError(
            f"{path} is a checkpoint of version {ckpt.get('version')!r}; this learner reads "
            f"version {VERSION}."
        )
    return ckpt


def _list(keys: list[str], n: int = 8) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_model(model: nn.Module, state: Mapping[str, torch.Tensor], path: StrPath) -> None:
    """A ValueError naming the missing and unexpected keys and the shape mismatches, if any."""
    own = _model_state(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys (in the model, not the checkpoint): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not the model): {_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_list(shapes)}")
    if problems:
        raise ValueError(
            f"The checkpoint {path} does not fit this model; nothing was loaded.\n  "
            + "\n  ".join(problems)
        )


def _check_opt(opt: torch.optim.Optimizer, state: Mapping[str, Any], path: StrPath) -> None:
    ours = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g["params"]) for g in state["param_groups"]]
    if ours != theirs:
        raise ValueError(
            f"The optimizer state in {path} has param groups of {theirs} parameters, the "
            f"learner's optimizer {ours}; nothing was loaded. Build the optimizer as in the "
            "saved run, or load the weights only: learn.load(path, with_opt=False)."
        )


def _load_model(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    inner = unwrap_model(model)
    real = {_plain_key(k): k for k in inner.state_dict()}
    inner.load_state_dict({real[k]: v for k, v in state.items()})


def load(learn: Learner, path: StrPath, with_opt: bool = True) -> dict[str, Any]:
    """Load the weights (and with `with_opt` the optimizer state) of the checkpoint at `path`.

    Everything is checked before anything is assigned, so a bad file leaves `learn` unchanged.
    An optimizer is created first if the learner has none yet. Returns the checkpoint.
    """
    ckpt = read_checkpoint(path)
    _apply(learn, ckpt, path, with_opt=with_opt, resume=False)
    return ckpt


def _apply(
    learn: Learner, ckpt: Mapping[str, Any], path: StrPath, with_opt: bool, resume: bool
) -> None:
    check_model(learn.model, ckpt["model"], path)
    opt = learn.opt
    if with_opt and ckpt["opt"] is not None:
        if opt is None:
            opt = learn.opt_func(learn.model.parameters(), lr=learn.lr)
        _check_opt(opt, ckpt["opt"], path)
    states = ckpt["callbacks"] if resume else {}
    if resume:
        names = {cb.name for cb in learn.cbs}
        unknown = [n for n in states if n not in names]
        if unknown:
            warnings.warn(
                f"{path} holds the state of callbacks this learner lacks: {', '.join(unknown)}; "
                "the resumed run may differ from the saved one. Add them to the learner.",
                stacklevel=4,
            )
    # Checked: now assign.
    _load_model(learn.model, ckpt["model"])
    if with_opt and ckpt["opt"] is not None:
        assert opt is not None
        opt.load_state_dict(ckpt["opt"])
        learn.opt = opt
    if not resume:
        return
    params = _named_params(learn.model)
    for name, p in params.items():
        grad = ckpt["grads"].get(name)
        p.grad = None if grad is None else grad.to(p.device)
    for cb in learn.cbs:
        if cb.name in states and _stateful(cb):
            cast(Any, cb).load_state_dict(states[cb.name])
    set_rng_state(learn.dls, ckpt["rng"])


# -- resuming -----------------------------------------------------------------------------------


class _SkipBatches:
    """The first resumed training loader: iterated from the random states its epoch's shuffle
    was drawn from, it skips the `start_iter` batches the saved run trained on (without running
    them), then restores the random states of the moment the checkpoint was written."""

    def __init__(self, dl: Any, start_iter: int, dls: Any, rng: Mapping[str, Any]) -> None:
        self.dl, self.start_iter, self.dls, self.rng = dl, start_iter, dls, rng

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.dl)
        for i in range(self.start_iter):
            if next(it, None) is None:
                raise ValueError(
                    f"Cannot resume at batch {self.start_iter} of the epoch: the training loader "
                    f"yields only {i} batches now. Resume with the data of the saved run."
                )
        set_rng_state(self.dls, self.rng)
        yield from it


class Resume(Callback):
    """What `fit(n_epochs, resume_from=path)` adds for that fit: continues the saved run.

    The file is read and checked against the model when the fit is called. At `before_fit`
    (after `DeviceCB` moved the model, so the optimizer state lands on its device, and before
    the callbacks whose state it restores) it loads the weights, gradients, optimizer, every
    callback's state and the random states, and sets `learn.start_epoch`. Mid-epoch, at the first
    `before_train` it restores the random states the epoch's shuffle was drawn from and hands the
    loop a loader that skips the batches already trained on (see `learn.dl.start_iter`).

    Events: `before_fit`, `before_train`. Order: -15.
    """

    order = -15

    def __init__(self, learn: Learner, path: StrPath) -> None:
        self.path = path
        self.ckpt = read_checkpoint(path)
        check_model(learn.model, self.ckpt["model"], path)  # before anything runs
        self.start_iter = 0

    def before_fit(self, learn: Learner) -> None:
        _apply(learn, self.ckpt, self.path, with_opt=True, resume=True)
        # Keep what the first training phase needs, not a second copy of the weights.
        self.ckpt = {k: self.ckpt[k] for k in ("progress", "rng", "epoch_rng")}
        epoch, self.start_iter = self.ckpt["progress"]["epoch"], self.ckpt["progress"]["iter"]
        if epoch >= learn.n_epochs:
            print(
                f"resume_from={str(self.path)!r}: the checkpoint is at the end of epoch "
                f"{epoch - 1}, and this fit has {learn.n_epochs} epochs: nothing to train.",
                flush=True,
            )
            epoch, self.start_iter = learn.n_epochs, 0
        learn.start_epoch = epoch

    def before_train(self, learn: Learner) -> None:
        if not self.start_iter:
            return
        epoch_rng = self.ckpt["epoch_rng"]
        if epoch_rng is None:
            raise ValueError(
                f"{self.path} was written mid-epoch without the random states the epoch's "
                "shuffle was drawn from, so the epoch cannot be resumed exactly. Write mid-epoch "
                "checkpoints with CheckpointCB."
            )
        set_rng_state(learn.dls, epoch_rng)
        learn.dl = _SkipBatches(learn.dl, self.start_iter, learn.dls, self.ckpt["rng"])
        self.start_iter = 0
