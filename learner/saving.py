"""Checkpoints: one file holding everything a run needs to go on exactly where it stopped.

A checkpoint is a dict of tensors, plain containers, numbers and strings only, so that it loads
with `torch.load(path, weights_only=True)`: a file from an untrusted source cannot run code.

- `format`, `version`: what the file is.
- `model`: the model's `state_dict()`, unwrapped (no `_orig_mod.` from `torch.compile`, no
  `module.` from `DataParallel`/`DistributedDataParallel`), so it loads into a wrapped model or
  a plain one alike; `grads`: the gradients held between steps (gradient accumulation).
- `opt`: the optimizer's `state_dict()` (None before the first fit).
- `callbacks`: every non-empty `cb.state_dict()`, by `cb.name` (the recorder's
  history, the schedules' positions, the metrics' accumulators mid-epoch, the GradScaler...).
- `progress`: `{"epoch": e, "iter": k, "n_epochs": n}`: epochs before `e` are complete, and so
  are the first `k` training batches of epoch `e`.
- `rng`: the Python, NumPy, torch (and CUDA) random states and those of the loaders'
  generators now; `epoch_rng`: those the current epoch's shuffle was drawn from (mid-epoch only).

`fit(n_epochs, resume_from=path)` continues the saved run: see `learner.callbacks.resume`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from learner.core import BaseLearner
from learner.io import atomic_save
from learner.rng import rng_state, set_rng_state
from learner.utils import unwrap_model

__all__ = [
    "FORMAT",
    "VERSION",
    "check_model",
    "check_optimizer",
    "checkpoint",
    "load",
    "read_checkpoint",
    "restore",
    "save",
]

FORMAT, VERSION = "learner.checkpoint", 1
StrPath = str | os.PathLike[str]


# -- the model, unwrapped -----------------------------------------------------------------------


def _plain_key(key: str) -> str:
    # A compiled submodule (`model.body = torch.compile(body)`) puts `_orig_mod.` mid-key.
    return key.replace("_orig_mod.", "")


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {_plain_key(k): v for k, v in unwrap_model(model).state_dict().items()}


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {_plain_key(k): p for k, p in unwrap_model(model).named_parameters()}


# -- writing ------------------------------------------------------------------------------------


def _callback_states(learn: BaseLearner) -> dict[str, Any]:
    states = {cb.name: cb.state_dict() for cb in learn.cbs}
    return {name: state for name, state in states.items() if state}


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
    learn: BaseLearner,
    progress: Mapping[str, int] | None = None,
    epoch_rng: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of `learn` as a dict (see the module docstring); `save` writes it.

    `progress` defaults to the end of the last fit's last epoch run (the start before any fit).
    """
    if progress is None:
        progress = {"epoch": learn.epoch + 1 if learn.n_epochs else 0, "iter": 0}
    if learn.opt is not None and not callable(getattr(learn.opt, "state_dict", None)):
        raise TypeError(
            f"A checkpoint holds the optimizer's state_dict(), and {type(learn.opt).__name__} "
            "has none (a hand-written optimizer?): give it state_dict() and load_state_dict(), "
            "or save the weights alone: torch.save(learn.model.state_dict(), path)."
        )
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


def save(learn: BaseLearner, path: StrPath, **kwargs: Any) -> Path:
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


def check_optimizer(opt: torch.optim.Optimizer, state: Mapping[str, Any], path: StrPath) -> None:
    """A ValueError if the optimizer state `state` does not fit `opt` (its param groups)."""
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


def _checked_optimizer(
    learn: BaseLearner, ckpt: Mapping[str, Any], path: StrPath
) -> torch.optim.Optimizer | None:
    # The learner's optimizer, or one created for it, checked against the checkpoint's state.
    if ckpt["opt"] is None:
        return None
    opt = learn.opt or learn.opt_func(learn.model.parameters(), lr=learn.lr)
    check_optimizer(opt, ckpt["opt"], path)
    return opt


def load(learn: BaseLearner, path: StrPath, with_opt: bool = True) -> dict[str, Any]:
    """Load the weights (and with `with_opt` the optimizer state) of the checkpoint at `path`.

    Everything is checked before anything is assigned, so a bad file leaves `learn` unchanged.
    An optimizer is created first if the learner has none yet. Returns the checkpoint.

    Examples:
        >>> learn.save("model.pt")
        >>> learn.load("model.pt")  # the weights and the optimizer of that moment
    """
    ckpt = read_checkpoint(path)
    check_model(learn.model, ckpt["model"], path)
    opt = _checked_optimizer(learn, ckpt, path) if with_opt else None
    _load_model(learn.model, ckpt["model"])
    if opt is not None:
        opt.load_state_dict(ckpt["opt"])
        learn.opt = opt
    return ckpt


def restore(learn: BaseLearner, ckpt: Mapping[str, Any], path: StrPath) -> None:
    """Put the whole run of a checkpoint back into `learn`: the weights, the gradients held
    between steps, the optimizer, every callback's state (`load_state_dict`) and the random
    states. Checked first (the model and the optimizer), so a bad file changes nothing.

    Warns when the checkpoint holds the state of a callback the learner lacks."""
    check_model(learn.model, ckpt["model"], path)
    opt = _checked_optimizer(learn, ckpt, path)
    states = ckpt["callbacks"]
    unknown = [n for n in states if n not in {cb.name for cb in learn.cbs}]
    if unknown:
        warnings.warn(
            f"{path} holds the state of callbacks this learner lacks: {', '.join(unknown)}; "
            "the resumed run may differ from the saved one. Add them to the learner.",
            stacklevel=3,
        )
    _load_model(learn.model, ckpt["model"])
    if opt is not None:
        opt.load_state_dict(ckpt["opt"])
        learn.opt = opt
    for name, p in _named_params(learn.model).items():
        grad = ckpt["grads"].get(name)
        p.grad = None if grad is None else grad.to(p.device)
    for cb in learn.cbs:
        if cb.name in states:
            cb.load_state_dict(states[cb.name])
    set_rng_state(learn.dls, ckpt["rng"])
