"""Checkpoints: one file holding everything a run needs to go on exactly where it stopped.

A checkpoint is a dict of tensors, plain containers, numbers and strings only, so that it loads
with `torch.load(path, weights_only=True)`: a file from an untrusted source cannot run code.

- `format`, `version`: what the file is.
- `model`: the model's `state_dict()`, unwrapped (no `_orig_mod.` from `torch.compile`, no
  `module.` from `DataParallel`/`DistributedDataParallel`), so it loads into a wrapped model or
  a plain one alike; `grads`: the gradients held between steps (gradient accumulation).
- `opt`: the optimizer's `state_dict()` (None before the first fit); `opt_class`: the name of
  its class (`"AdamW"`), so that a checkpoint is not loaded into another kind of optimizer.
- `callbacks`: every non-empty `cb.state_dict()`, by `cb.name` (the recorder's
  history, the schedules' positions, the metrics' accumulators mid-epoch, the GradScaler...).
- `progress`: `{"epoch": e, "iter": k, "n_epochs": n}`: epochs before `e` are complete, and so
  are the first `k` training batches of epoch `e`. Mid-epoch (`k > 0`) also `"train_loader":
  {"bs", "n", "batches"}`, what the training loader told of its batch size, number of samples and
  of batches (None where it does not tell): what the position in the epoch depends on.
  `"global_step"`: the learner's optimizer steps. A fit budgeted in steps (`learner.steps`) adds
  `"step"`, `"n_steps"`, `"valid_every"` and, during the fit, `"stream"`: `{"passes",
  "pass_iter", "loader"}`, the position in the training loader (its own `state_dict()` where it
  has one); `epoch_rng` then holds the random states the current pass started from.
- `rng`: the Python, NumPy, torch (and CUDA) random states and those of the loaders'
  generators now; `epoch_rng`: those the current epoch's shuffle was drawn from (mid-epoch only).
- `ranks`: `{"world_size": N, "states": [...]}`: the number of processes that wrote it, and for
  ranks 1 to N-1 their own `callbacks`, `rng` and `epoch_rng` (rank 0's are the sections above):
  under DDP or FSDP each rank accumulates its own metrics and draws its own random numbers.
- `checksum`: `{"algorithm": "crc32", "sections": {name: hex digest}}`, a CRC-32 of every other
  section (each tensor's dtype, shape and bytes, and the plain values, in order), so that a
  damaged file is refused instead of loaded.

Reading a file (`read_checkpoint`) checks all of it before anything is assigned: the checksum,
then every section's type and layout (the random states by setting them on throwaway
generators). `load` and `fit(resume_from=...)` then check it against the learner (`check_fits`:
the model's keys and shapes, the gradients', the optimizer's class, param groups and keys) and a
resume mid-epoch against the training loader (`check_position`). Version 1 files (before the
checksum, `opt_class` and `train_loader`) are read with a warning, without those three checks;
version 2 files (before `ranks`) as written by one process.

Under torch.distributed (`DistributedCB`) writing is a collective: every rank calls `save` (as
`CheckpointCB` does), each hands its own states to rank 0, and rank 0 writes. A sharded model's
(FSDP) weights, gradients and optimizer state are gathered whole (`learner.fsdp`), so the file
is the same as one process would write and loads into a plain model. Resuming with another
number of processes keeps the weights, the optimizer, the schedules and the position at an
epoch boundary (every rank takes rank 0's random states); mid-epoch it is refused, since the
rest of the epoch would be sharded otherwise.

`fit(n_epochs, resume_from=path)` continues the saved run: see `learner.callbacks.resume`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import sys
import warnings
import zlib
from array import array
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.core import BaseLearner
from learner.distributed import is_distributed, is_main_process, rank, world_size
from learner.fsdp import (
    full_grads,
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_grads,
    load_model_state,
    load_optimizer_state,
)
from learner.io import atomic_save
from learner.optimizers import Optimizers, as_optimizer, unwrap_optimizer
from learner.rng import rng_state, set_rng_state
from learner.utils import map_tensors, unwrap_model

__all__ = [
    "FORMAT",
    "VERSION",
    "check_fits",
    "check_model",
    "check_optimizer",
    "check_position",
    "check_world_size",
    "checkpoint",
    "for_this_rank",
    "load",
    "loader_shape",
    "mid_pass",
    "read_checkpoint",
    "restore",
    "save",
    "saved_world_size",
]

FORMAT, VERSION = "learner.checkpoint", 3
StrPath = str | os.PathLike[str]

# The sections of each version this learner reads, in the order they are written.
_V2 = (
    "model",
    "grads",
    "opt",
    "opt_class",
    "callbacks",
    "progress",
    "rng",
    "epoch_rng",
    "checksum",
)
_SECTIONS = {
    1: ("model", "grads", "opt", "callbacks", "progress", "rng", "epoch_rng"),
    2: _V2,
    3: (*_V2[:-1], "ranks", "checksum"),  # the per-rank states, before the checksum
}
_PER_RANK = ("callbacks", "rng", "epoch_rng")  # what each rank of a distributed run has of its own


class _CRC32:
    """`zlib.crc32` with hashlib's interface. CRC-32 is made to detect accidental damage (every
    burst of up to 32 flipped bits, anything else but for one chance in 2**32) and costs a third
    of SHA-256 here; it proves nothing against tampering, which weights_only loading guards."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


_CHECKSUMS: dict[str, Callable[[], Any]] = {"crc32": _CRC32}
_CHECKSUM = "crc32"


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


def _weights(learn: BaseLearner) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The model's state, the gradients held and the optimizer's state; of a sharded model
    gathered whole (a collective; empty on ranks other than 0)."""
    model = unwrap_model(learn.model)
    if is_sharded(model):
        opt = full_optimizer_state(model, learn.opt) if learn.opt is not None else None
        return full_model_state(model), full_grads(model, _plain_key), opt
    grads = {k: p.grad for k, p in _named_params(model).items() if p.grad is not None}
    opt = learn.opt.state_dict() if learn.opt is not None else None
    return _model_state(model), grads, opt


def _ranks(mine: dict[str, Any]) -> dict[str, Any]:
    """Every rank's `mine` gathered on rank 0 (a collective under torch.distributed)."""
    if not is_distributed():
        return {"world_size": 1, "states": []}
    gathered: list[Any] | None = [None] * world_size() if is_main_process() else None
    cpu = map_tensors(mine, lambda t: t.detach().cpu())  # never another rank's GPU on rank 0
    torch.distributed.gather_object(cpu, gathered, dst=0)
    return {"world_size": world_size(), "states": (gathered or [None])[1:]}


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


def _len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:  # no len: an iterable loader, an IterableDataset, None
        return None


def _int(*values: Any) -> int | None:
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), None)


def loader_shape(dl: Any) -> dict[str, int | None]:
    """What a training loader tells of its batches: what a position inside an epoch depends on.

    `{"bs": batch size, "n": number of samples, "batches": number of batches}`, each None where
    the loader does not tell: a `TensorLoader` has `.bs` and `.n`, a torch `DataLoader`
    `.batch_size` and `len(.dataset)`, and any loader with a length its number of batches. A
    loader sharded over processes (`DistributedCB`: a `TensorLoaderShard` or a `DataLoader` with a
    `DistributedSampler`) is described by the data it shards, with `batches` None, since its
    number of batches depends on the number of processes.

    Examples:
        >>> loader_shape(TensorLoader(torch.zeros(30, 4), bs=8))
        {'bs': 8, 'n': 30, 'batches': 4}
    """
    inner = getattr(dl, "loader", None)  # a TensorLoaderShard shards the loader it holds
    base = dl if inner is None else inner
    sharded = inner is not None or hasattr(getattr(dl, "sampler", None), "num_replicas")
    return {
        "bs": _int(getattr(base, "bs", None), getattr(base, "batch_size", None)),
        "n": _int(getattr(base, "n", None), _len(getattr(base, "dataset", None))),
        "batches": None if sharded else _len(dl),
    }


def _le_bytes(t: torch.Tensor) -> Any:
    # A contiguous CPU tensor's bytes, little-endian (as torch.save writes them) on any host.
    if t.is_complex():
        t = torch.view_as_real(t)
    data = t.reshape(-1).view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:
        data = data.view(-1, t.element_size()).flip(1).reshape(-1)
    return data.numpy()


def _numbers(obj: list[Any] | tuple[Any, ...]) -> bytes | None:
    # A list of floats (or of ints) in one piece: a long run's recorded losses sum 40 times
    # faster than one value at a time. None: anything else.
    kinds = set(map(type, obj))
    if len(kinds) != 1 or not kinds <= {float, int}:
        return None
    try:
        data = array("d" if float in kinds else "q", obj)
    except OverflowError:  # ints beyond 64 bits
        return None
    if sys.byteorder == "big":
        data.byteswap()
    return (b"f" if float in kinds else b"q") + data.tobytes()


def _feed(h: Any, obj: Any) -> None:
    # Every tensor's dtype, shape and bytes and every plain value, tagged by type, in order: the
    # same for the object written and the one torch.load returns, on any host, and for nothing
    # else.
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_quantized:
            t = t.int_repr()
        t = t.resolve_conj().resolve_neg().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(_le_bytes(t))
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        numbers = _numbers(obj)
        if numbers is not None:
            h.update(numbers)
            return
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)};".encode() + data)
    elif obj is None or isinstance(obj, bool):
        h.update(f"{obj};".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"F{float(obj).hex()};".encode())
    else:  # nothing else is written (_check_plain), but read files are checked whatever they hold
        h.update(f"O{type(obj).__qualname__}:{obj!r};".encode())


def _digest(obj: Any, algorithm: str) -> str:
    h = _CHECKSUMS[algorithm]()
    _feed(h, obj)
    return str(h.hexdigest())


def _contents(
    learn: BaseLearner,
    progress: Mapping[str, int] | None = None,
    epoch_rng: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of `learn` without its checksum: every state gathered (collectives under
    torch.distributed, complete on rank 0) and checked to be plain."""
    if progress is None:
        progress = {"epoch": learn.epoch + 1 if learn.n_epochs else 0, "iter": 0}
    if learn.opt is not None and not callable(getattr(learn.opt, "state_dict", None)):
        raise TypeError(
            f"A checkpoint holds the optimizer's state_dict(), and {type(learn.opt).__name__} "
            "has none (a hand-written optimizer?): give it state_dict() and load_state_dict(), "
            "or save the weights alone: torch.save(learn.model.state_dict(), path)."
        )
    position: dict[str, Any] = {**progress, "n_epochs": learn.n_epochs}
    position["global_step"] = learn.global_step
    if learn.n_steps is not None:
        position.update(step=learn.fit_step, n_steps=learn.n_steps, valid_every=learn.valid_every)
        if learn.train_stream is not None:
            position["stream"] = learn.train_stream.state_dict()
    if mid_pass(position):
        position["train_loader"] = loader_shape(getattr(learn.dls, "train", None))
    model, grads, opt = _weights(learn)
    own = {
        "callbacks": _callback_states(learn),
        "rng": rng_state(learn.dls),
        "epoch_rng": dict(epoch_rng) if epoch_rng is not None else None,
    }
    ranks = _ranks(own)
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "grads": grads,
        "opt": opt,
        "opt_class": type(unwrap_optimizer(learn.opt)).__name__ if learn.opt is not None else None,
        "callbacks": own["callbacks"],
        "progress": position,
        "rng": own["rng"],
        "epoch_rng": own["epoch_rng"],
        "ranks": ranks,
    }
    _check_plain(ckpt, "")
    return ckpt


def checkpoint(
    learn: BaseLearner,
    progress: Mapping[str, int] | None = None,
    epoch_rng: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of `learn` as a dict (see the module docstring); `save` writes it.

    Under torch.distributed every rank must call it; the dict is complete on rank 0.

    Args:
        learn: the learner.
        progress: `{"epoch": e, "iter": k}`, the position; default: the end of the last fit's
            last epoch run (the start before any fit).
        epoch_rng: the random states the current epoch's shuffle was drawn from; needed to
            resume mid-epoch (`k > 0`), as `CheckpointCB` keeps them.

    Examples:
        >>> ckpt = checkpoint(learn)
        >>> ckpt["progress"], ckpt["opt_class"]
        ({'epoch': 1, 'iter': 0, 'n_epochs': 1}, 'AdamW')
    """
    return _sealed(_contents(learn, progress, epoch_rng))


def _sealed(ckpt: dict[str, Any]) -> dict[str, Any]:
    """`ckpt` with the checksum of each section, the one pass over all the bytes."""
    sections = {name: _digest(value, _CHECKSUM) for name, value in ckpt.items()}
    return {**ckpt, "checksum": {"algorithm": _CHECKSUM, "sections": sections}}


def save(learn: BaseLearner, path: StrPath, **kwargs: Any) -> Path:
    """Write `checkpoint(learn, **kwargs)` to `path` atomically (see `learner.io.atomic_save`).

    Under torch.distributed every rank calls it (a script under torchrun does), and rank 0
    writes the file.

    Examples:
        >>> learn.save("models/run.pt")
        PosixPath('models/run.pt')
    """
    ckpt = _contents(learn, **kwargs)  # every rank: the gathers are collectives
    return atomic_save(_sealed(ckpt), path) if is_main_process() else Path(path)


# -- reading and checking the file --------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _tensors_by_name(x: Any) -> bool:
    return isinstance(x, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in x.items()
    )


def _rng_problem(state: Any) -> str | None:
    # The random states as rng_state writes them, tried on throwaway generators: what
    # set_rng_state would do to the real ones, so that it cannot fail half-way later.
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict of random states"
    missing = [k for k in ("python", "numpy", "torch", "generators") if k not in state]
    if missing:
        return f"lacks the random states of {', '.join(missing)}"
    try:
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.RandomState().set_state(
            (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
        )
        torch.Generator().set_state(state["torch"])
        if not isinstance(state["generators"], list):
            raise TypeError("generators is not a list")
        for g in state["generators"]:
            torch.Generator().set_state(g)
        for key in ("cuda", "mps"):
            value = state.get(key, [])
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in values):
                raise TypeError(f"{key} is not a (list of) byte tensor(s)")
    except Exception as e:  # the file's contents are the input here: any failure is a problem
        return f"does not hold valid random states ({_first_line(e)})"
    return None


_POSITION = ("epoch", "iter", "n_epochs")


def _section_problem(name: str, value: Any) -> str | None:
    if name in ("model", "grads"):
        return None if _tensors_by_name(value) else "not a dict of tensors by name"
    if name == "opt":  # its layout is checked when it is loaded (check_optimizer)
        return None if value is None or isinstance(value, dict) else "not a state_dict (a dict)"
    if name == "opt_class":
        return None if value is None or isinstance(value, str) else "not a class name"
    if name == "callbacks":
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, dict) for k, v in value.items()
        )
        return None if ok else "not a dict of callback states (dicts) by callback name"
    if name == "progress":
        if not (isinstance(value, dict) and all(_is_int(value.get(k)) for k in _POSITION)):
            return f"not a dict of {', '.join(_POSITION)} (integers >= 0)"
        shape = value.get("train_loader", {})
        ok = isinstance(shape, dict) and all(v is None or _is_int(v) for v in shape.values())
        if not ok:
            return "train_loader is not a dict of integers"
        counts = [value.get(k) for k in ("global_step", "step", "n_steps", "valid_every")]
        if not all(v is None or _is_int(v) for v in counts):
            return "global_step, step, n_steps or valid_every is not an integer >= 0"
        stream = value.get("stream")
        ok = stream is None or (
            isinstance(stream, dict) and _is_int(stream.get("passes"))
            and _is_int(stream.get("pass_iter")) and "step" in value
        )  # fmt: skip
        return None if ok else "stream is not a dict of passes and pass_iter (integers >= 0)"
    if name == "rng":
        return _rng_problem(value)
    if name == "epoch_rng":
        return None if value is None else _rng_problem(value)
    if name == "checksum":
        return None if _checksum_layout(value) else "not {algorithm, sections: {name: digest}}"
    if name == "ranks":
        return _ranks_problem(value)
    return None


def _ranks_problem(value: Any) -> str | None:
    if not (isinstance(value, dict) and _is_int(value.get("world_size"), 1)):
        return "not {world_size, states}"
    states = value.get("states")
    if not (isinstance(states, list) and len(states) == value["world_size"] - 1):
        return "not a state for each rank but 0"
    for r, state in enumerate(states, 1):
        if not (isinstance(state, dict) and set(state) == set(_PER_RANK)):
            return f"rank {r}: not {{{', '.join(_PER_RANK)}}}"
        for name in _PER_RANK:
            if problem := _section_problem(name, state[name]):
                return f"rank {r}: {name}: {problem}"
    return None


def _checksum_layout(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("algorithm") in _CHECKSUMS
        and isinstance(value.get("sections"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value["sections"].items())
    )


def _verify_checksum(ckpt: Mapping[str, Any], path: Path) -> None:
    check = ckpt.get("checksum")
    if check is None or not _checksum_layout(check):
        return  # reported with the other problems of the layout
    algorithm, sections = check["algorithm"], check["sections"]
    # A section that is not there at all is reported as missing, with the layout's problems.
    bad = [
        name
        for name, digest in sections.items()
        if name in ckpt and _digest(ckpt[name], algorithm) != digest
    ]
    if bad:
        raise ValueError(
            f"{path} is corrupt: the {algorithm} checksum of its section(s) {', '.join(bad)} "
            "does not match their contents (bytes changed on disk or in a copy); nothing was "
            "loaded. Use another copy, or an earlier checkpoint (CheckpointCB(keep_last=...))."
        )


def read_checkpoint(path: StrPath) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` and check all of it; a clear error if it is not
    a complete, intact learner checkpoint.

    The checks, before anything is returned (so before anything is assigned): the file exists
    (`FileNotFoundError`), is a readable torch file holding only tensors, containers, numbers and
    strings, is a learner checkpoint of a version this learner reads, its checksum matches every
    section (version 2), and every section is there with the type and layout it must have (the
    random states are set on throwaway generators). Each failure is a `ValueError` saying what
    is wrong. A version 1 file, which has no checksum, is read with a warning.

    Args:
        path: the checkpoint file (`learn.save`, `CheckpointCB`).

    Returns:
        The checkpoint, a dict (see the module docstring); its tensors on the CPU.

    Examples:
        >>> ckpt = read_checkpoint("models/run.pt")
        >>> ckpt["progress"]
        {'epoch': 3, 'iter': 0, 'n_epochs': 3}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.stat().st_size == 0:
        raise ValueError(
            f"{path} is empty (0 bytes): a write that never finished (the process was killed?) "
            "or a file that was only created. Use another checkpoint."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects other than tensors, containers, numbers and strings, so it is "
            "not a learner checkpoint, and loading it could run code: refused (weights_only). "
            f"{_first_line(e)}"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... by format
        raise ValueError(
            f"{path} is not a readable torch file: it may be truncated (a copy that did not "
            f"finish) or of another format. ({_first_line(e)})"
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
    version = ckpt.get("version")
    if version not in _SECTIONS:
        raise ValueError(
            f"{path} is a checkpoint of version {version!r}; this learner reads versions "
            f"{', '.join(map(str, _SECTIONS))} (it writes version {VERSION}): read it with the "
            "learner that wrote it."
        )
    _verify_checksum(ckpt, path)
    missing = [name for name in _SECTIONS[version] if name not in ckpt]
    problems = [f"missing sections: {', '.join(missing)}"] if missing else []
    for name in _SECTIONS[version]:
        problem = _section_problem(name, ckpt[name]) if name in ckpt else None
        if problem:
            problems.append(f"{name}: {problem}")
    if problems:
        raise ValueError(
            f"{path} is not a complete learner checkpoint (damaged, or not written by "
            "learn.save); nothing was loaded.\n  " + "\n  ".join(problems)
        )
    if version == 1:
        warnings.warn(
            f"{path} is a version 1 checkpoint: it has no checksum, so damage to it cannot be "
            "detected, nor records of the optimizer's class and the training loader, so those "
            f"are not checked. Checkpoints written from now on are version {VERSION}.",
            stacklevel=3,
        )
    return ckpt


# -- checking it against the learner ------------------------------------------------------------


def _list(keys: list[str], n: int = 8) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_model(model: nn.Module, state: Mapping[str, torch.Tensor], path: StrPath) -> None:
    """A ValueError naming the missing and unexpected keys and the shape mismatches, if any.

    Examples:
        >>> check_model(learn.model, read_checkpoint(path)["model"], path)
    """
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


def _check_grads(model: nn.Module, grads: Mapping[str, torch.Tensor], path: StrPath) -> None:
    params = _named_params(model)
    bad = [
        f"{k}: gradient {tuple(g.shape)}, parameter "
        + (f"{tuple(params[k].shape)}" if k in params else "none")
        for k, g in grads.items()
        if k not in params or g.shape != params[k].shape
    ]
    if bad:
        raise ValueError(
            f"The gradients held in {path} do not fit this model's parameters; nothing was "
            f"loaded: {_list(bad)}"
        )


def _optimizer_layout(state: Any) -> bool:
    groups = state.get("param_groups")
    return (
        isinstance(state.get("state"), dict)
        and all(isinstance(s, dict) for s in state["state"].values())
        and isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    )


def _is_flag(value: Any) -> bool:
    # foreach, fused, maximize, ...: a newer torch adds such flags, and fills them in itself when
    # it loads a state_dict that lacks them.
    return value is None or isinstance(value, bool)


def check_optimizer(
    opt: Any, state: Mapping[str, Any], path: StrPath, saved_class: str | None = None
) -> None:
    """A ValueError if the optimizer state `state` does not fit the optimizer `opt`.

    Checked: that `opt` can take a state (`load_state_dict`, `param_groups`), that `state` is a
    torch optimizer state_dict, its class (`saved_class`, the checkpoint's `opt_class`, against
    that of `opt`, or of the optimizer it wraps: `unwrap_optimizer`), the number of param groups
    and of parameters in each, that each of the checkpoint's param groups has every
    hyper-parameter of `opt`'s (`betas`, `momentum`...; flags such as `foreach` excepted, which
    torch fills in), and that, for a parameter both hold state for, the two share a state key
    (`exp_avg`, `momentum_buffer`...). The error says how to load the weights only.

    Args:
        opt: the optimizer to load into.
        state: the checkpoint's `opt`, an optimizer `state_dict()`.
        path: the checkpoint's path, for the message.
        saved_class: the class name of the optimizer that wrote `state`; None: not checked.

    Examples:
        >>> ckpt = read_checkpoint(path)
        >>> check_optimizer(learn.opt, ckpt["opt"], path, ckpt["opt_class"])
    """
    fix = (
        "Build the learner with the saved run's optimizer (opt_func), or load the weights only: "
        "learn.load(path, with_opt=False)."
    )
    ours = type(unwrap_optimizer(opt)).__name__
    if isinstance(opt, Optimizers) or saved_class == Optimizers.__name__:
        _check_optimizers(opt, state, path, saved_class, fix)
        return
    if not (callable(getattr(opt, "load_state_dict", None)) and hasattr(opt, "param_groups")):
        raise ValueError(
            f"The learner's optimizer, a {ours}, cannot take the optimizer state in {path} (it "
            f"has no load_state_dict or param_groups); nothing was loaded. {fix}"
        )
    if not _optimizer_layout(state):
        raise ValueError(
            f"The optimizer state in {path} is not a torch optimizer state_dict (state, "
            f"param_groups); nothing was loaded. {fix}"
        )
    if saved_class is not None and saved_class != ours:
        raise ValueError(
            f"The optimizer state in {path} is a {saved_class}'s, and the learner's optimizer "
            f"is a {ours}; nothing was loaded. {fix}"
        )
    own = opt.state_dict()
    sizes = [len(g["params"]) for g in own["param_groups"]]
    theirs = [len(g["params"]) for g in state["param_groups"]]
    if sizes != theirs:
        raise ValueError(
            f"The optimizer state in {path} has param groups of {theirs} parameters, the "
            f"learner's optimizer {sizes}; nothing was loaded. {fix}"
        )
    for i, (group, saved) in enumerate(zip(own["param_groups"], state["param_groups"])):
        missing = [k for k, v in group.items() if k not in saved and not _is_flag(v)]
        if missing:
            raise ValueError(
                f"The optimizer state in {path} lacks hyper-parameters the learner's {ours} "
                f"needs (param group {i}: {', '.join(missing)}): it was written by another kind "
                f"of optimizer{f' (a {saved_class})' if saved_class else ''}; nothing was "
                f"loaded. {fix}"
            )
    for key, s in own["state"].items():
        saved_keys = set(state["state"].get(key, {}))
        if s and saved_keys and not saved_keys & set(s):
            raise ValueError(
                f"The optimizer state in {path} holds {', '.join(sorted(saved_keys))} for a "
                f"parameter the learner's {ours} keeps {', '.join(sorted(s))} for: it was "
                f"written by another kind of optimizer; nothing was loaded. {fix}"
            )


def _check_optimizers(
    opt: Any, state: Mapping[str, Any], path: StrPath, saved_class: str | None, fix: str
) -> None:
    """`check_optimizer` for several optimizers (`Optimizers`): the same names, each checked."""
    ours, saved = type(opt).__name__, state.get("optimizers")
    if not isinstance(opt, Optimizers) or not isinstance(saved, dict):
        theirs = (
            f"several optimizers' ({', '.join(saved)})"
            if isinstance(saved, dict)
            else (f"one {saved_class}'s" if saved_class else "one optimizer's")
        )
        kind = f"several ({', '.join(opt)})" if isinstance(opt, Optimizers) else f"one {ours}"
        raise ValueError(
            f"The optimizer state in {path} is {theirs}, and the learner's optimizers are "
            f"{kind}; nothing was loaded. {fix}"
        )
    if set(saved) != set(opt):
        raise ValueError(
            f"The optimizer state in {path} is for the optimizers {sorted(saved)}, and the "
            f"learner's are {sorted(opt)}; nothing was loaded. {fix}"
        )
    classes = state.get("classes") or {}
    for name in opt:
        check_optimizer(opt[name], saved[name], f"{path} (optimizer {name!r})", classes.get(name))


def check_fits(
    learn: BaseLearner, ckpt: Mapping[str, Any], path: StrPath, with_opt: bool = True
) -> Any:
    """Every check of a checkpoint (from `read_checkpoint`) against `learn` that `load` and a
    resume make before they assign anything: `check_model`, the gradients' names and shapes,
    and with `with_opt` `check_optimizer`. A ValueError saying what does not fit.

    Returns:
        The optimizer to load the state into: the learner's, or a new one (`learn.opt_func`)
        if it has none yet, not assigned; None if the checkpoint holds none or not `with_opt`.

    Examples:
        >>> check_fits(learn, read_checkpoint(path), path)  # raises if it does not fit
    """
    check_model(learn.model, ckpt["model"], path)
    _check_grads(learn.model, ckpt["grads"], path)
    if not with_opt or ckpt["opt"] is None:
        return None
    opt = learn.opt
    if opt is None:  # its lr is the saved one once loaded
        lr = learn.lr if learn.lr is not None else _saved_lr(ckpt["opt"])
        opt = as_optimizer(learn.opt_func(learn.model.parameters(), lr=lr))
    check_optimizer(opt, ckpt["opt"], path, ckpt.get("opt_class"))
    return opt


def _saved_lr(state: Mapping[str, Any]) -> Any:
    several = state.get("optimizers")
    if isinstance(several, dict) and several:  # Optimizers: the first one's
        return _saved_lr(next(iter(several.values())))
    groups = state.get("param_groups") or [{}]
    return groups[0].get("lr", 1e-3) if isinstance(groups[0], dict) else 1e-3


def mid_pass(progress: Mapping[str, Any]) -> int:
    """The training batches of the current pass over the loader that a checkpoint's position
    `progress` has done: of its epoch (`iter`), or in a fit budgeted in steps of the pass over
    the loader under way (`stream["pass_iter"]`). 0 at a boundary, where a resume may start
    with other batches."""
    stream = progress.get("stream")
    return int(stream["pass_iter"]) if isinstance(stream, Mapping) else int(progress["iter"])


def _where(progress: Mapping[str, Any]) -> str:
    if isinstance(progress.get("stream"), Mapping):
        stream = progress["stream"]
        return (
            f"at step {progress.get('step')}, after batch {stream['pass_iter']} of pass "
            f"{stream['passes']} over the training loader"
        )
    return f"after training batch {progress['iter']} of epoch {progress['epoch']}"


def check_position(dls: Any, progress: Mapping[str, Any], path: StrPath) -> None:
    """A ValueError if the training loader of `dls` differs from the saved run's in what a
    mid-epoch position depends on: its batch size, number of samples or of batches, as far as
    both loaders tell them (`loader_shape`). Nothing to check at an epoch boundary, where a
    resume may use other batches.

    Examples:
        >>> ckpt = read_checkpoint(path)
        >>> check_position(learn.dls, ckpt["progress"], path)
    """
    saved = progress.get("train_loader")
    if not mid_pass(progress) or not saved:
        return
    now = loader_shape(getattr(dls, "train", None))
    labels = {"bs": "batch size", "n": "samples", "batches": "batches"}
    diffs = [
        f"{label}: {saved[k]} in the saved run, {now[k]} now"
        for k, label in labels.items()
        if saved.get(k) is not None and now[k] is not None and saved[k] != now[k]
    ]
    if diffs:
        raise ValueError(
            f"{path} was written {_where(progress)}, and the training loader is not the "
            f"saved run's ({'; '.join(diffs)}), so the rest of that pass would not be the saved "
            "run's; "
            "nothing was changed. Resume with the saved run's data and batch size, or from a "
            "checkpoint written at the end of an epoch, which allows other batches."
        )


# -- loading ------------------------------------------------------------------------------------


def _load_model(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    inner = unwrap_model(model)
    real = {_plain_key(k): k for k in inner.state_dict()}
    named = {real[k]: v for k, v in state.items()}
    if is_sharded(inner):  # each rank keeps its shard of the full tensors
        load_model_state(inner, named)
    else:
        inner.load_state_dict(named)


def _load_opt(model: nn.Module, opt: Any, state: Mapping[str, Any]) -> None:
    inner = unwrap_model(model)
    if is_sharded(inner):
        load_optimizer_state(inner, opt, state)
    else:
        opt.load_state_dict(state)


def _load_grads(model: nn.Module, grads: Mapping[str, torch.Tensor]) -> None:
    inner = unwrap_model(model)
    if is_sharded(inner):
        load_grads(inner, {k: grads[_plain_key(k)] for k, _ in inner.named_parameters()
                           if _plain_key(k) in grads})  # fmt: skip
        return
    for name, p in _named_params(inner).items():
        grad = grads.get(name)
        p.grad = None if grad is None else grad.to(p.device)


def saved_world_size(ckpt: Mapping[str, Any]) -> int | None:
    """The number of processes that wrote checkpoint `ckpt`; None if it does not say (version
    1 and 2 files)."""
    ranks = ckpt.get("ranks")
    return int(ranks["world_size"]) if ranks else None


def for_this_rank(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """`ckpt` with this process' own callbacks' and random states, as it saved them, where the
    checkpoint was written by as many processes as run now; otherwise rank 0's, for every rank.

    Examples:
        >>> ckpt = for_this_rank(read_checkpoint(path))  # under torchrun: rank r's states
    """
    r, saved = rank(), saved_world_size(ckpt)
    if r == 0 or saved != world_size():
        return dict(ckpt)
    return {**ckpt, **ckpt["ranks"]["states"][r - 1]}


def check_world_size(ckpt: Mapping[str, Any], path: StrPath) -> None:
    """A ValueError if `ckpt` was written mid-epoch by another number of processes than run now:
    each rank's share of the rest of that epoch, and its metrics' accumulators, would differ
    from the saved run's. At an epoch boundary any number of processes may resume.

    Examples:
        >>> check_world_size(read_checkpoint(path), path)
    """
    saved, now = saved_world_size(ckpt), world_size()
    if mid_pass(ckpt["progress"]) and saved is not None and saved != now:
        raise ValueError(
            f"{path} was written {_where(ckpt['progress'])} by {saved} process(es), and this "
            f"run has {now}: the "
            "rest of that epoch cannot be resumed exactly with another number of processes (its "
            "batches are shared out among them); nothing was changed. Resume with "
            f"{saved} process(es), or from a checkpoint written at the end of an epoch "
            "(CheckpointCB(every_n_epochs=1)), which any number of processes can resume."
        )


def load(learn: BaseLearner, path: StrPath, with_opt: bool = True) -> dict[str, Any]:
    """Load the weights (and with `with_opt` the optimizer state) of the checkpoint at `path`.

    Everything is checked before anything is assigned (`read_checkpoint`: the file, its
    checksum and its layout; `check_fits`: the model and the optimizer), so a bad file leaves
    `learn` unchanged. An optimizer is created first if the learner has none yet. Returns the
    checkpoint.

    Args:
        learn: the learner to load into.
        path: the checkpoint (`learn.save`, `CheckpointCB`).
        with_opt: load the optimizer state too. Default True; False loads the weights only,
            e.g. into a learner with another optimizer.

    Examples:
        >>> learn.save("model.pt")
        >>> learn.load("model.pt")  # the weights and the optimizer of that moment
        >>> learn.load("model.pt", with_opt=False)  # the weights only
    """
    ckpt = read_checkpoint(path)
    opt = check_fits(learn, ckpt, path, with_opt)
    _load_model(learn.model, ckpt["model"])
    if opt is not None:
        _load_opt(learn.model, opt, ckpt["opt"])
        learn.opt = opt
        learn.global_step = int(ckpt["progress"].get("global_step", learn.global_step))
    return ckpt


def _load_callback_states(learn: BaseLearner, states: Mapping[str, Any], path: StrPath) -> None:
    # The one part of a restore that can refuse its input (a callback's own format): loaded
    # first, and on a failure the callbacks loaded so far get their states back.
    loaded: list[tuple[Any, dict[str, Any]]] = []
    for cb in learn.cbs:
        if cb.name not in states:
            continue
        loaded.append((cb, copy.deepcopy(cb.state_dict())))  # a load may change it in place
        try:
            cb.load_state_dict(states[cb.name])
        except Exception as e:
            for done, before in reversed(loaded):
                if before:
                    with contextlib.suppress(Exception):  # best effort; the error says what failed
                        done.load_state_dict(before)
            raise ValueError(
                f"The state of callback {cb.name!r} in {path} does not load into it "
                f"({_first_line(e)}); nothing was loaded. Resume with the callbacks of the "
                "saved run."
            ) from e


def restore(learn: BaseLearner, ckpt: Mapping[str, Any], path: StrPath) -> None:
    """Put the whole run of a checkpoint back into `learn`: every callback's state
    (`load_state_dict`), the weights, the gradients held between steps, the optimizer and the
    random states.

    Checked first (`check_fits`), and the callbacks' states, the one part that can refuse its
    input, are loaded before the rest and put back if one fails, so a bad file changes nothing.
    Warns when the checkpoint holds the state of a callback the learner lacks.

    Args:
        learn: the learner, at the end of `before_fit` (`ResumeCB` calls this).
        ckpt: the checkpoint, from `read_checkpoint`.
        path: its path, for messages.
    """
    opt = check_fits(learn, ckpt, path)
    states = ckpt["callbacks"]
    unknown = [n for n in states if n not in {cb.name for cb in learn.cbs}]
    if unknown:
        warnings.warn(
            f"{path} holds the state of callbacks this learner lacks: {', '.join(unknown)}; "
            "the resumed run may differ from the saved one. Add them to the learner.",
            stacklevel=3,
        )
    _load_callback_states(learn, states, path)
    _load_model(learn.model, ckpt["model"])
    if opt is not None:
        _load_opt(learn.model, opt, ckpt["opt"])
        learn.opt = opt
    _load_grads(learn.model, ckpt["grads"])
    learn.global_step = int(ckpt["progress"].get("global_step", 0))
    set_rng_state(learn.dls, ckpt["rng"])
