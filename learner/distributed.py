"""Helpers for running under `torch.distributed` (e.g. launched with `torchrun`).

They work the same with or without a process group: without one (a plain `python script.py`)
the process is rank 0 of 1, reductions return their input, and `is_main_process()` is True. So
a callback that writes files can guard them with `if is_main_process():` and stay correct in
both settings. Before the process group is initialised, the rank and world size come from the
environment variables that `torchrun` sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`).

Examples:
    >>> from learner.distributed import is_main_process, rank, world_size
    >>> if is_main_process():
    ...     torch.save(learn.model.state_dict(), "model.pt")  # doctest: +SKIP
    >>> rank(), world_size()  # a plain process
    (0, 1)
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from learner.utils import unwrap_model

__all__ = [
    "all_reduce_sum",
    "broadcast_module",
    "broadcast_tensors",
    "collective_device",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "rank",
    "ranks_where",
    "torchrun_env",
    "unwrap_model",
    "world_size",
]


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def rank() -> int:
    """This process' global rank: from the process group, else `$RANK`, else 0."""
    return torch.distributed.get_rank() if _initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """The number of processes: from the process group, else `$WORLD_SIZE`, else 1."""
    return torch.distributed.get_world_size() if _initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process' rank on its machine (`$LOCAL_RANK`, set by torchrun), else 0: its GPU index."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """Whether this is global rank 0, the process that prints, plots and writes files."""
    return rank() == 0


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised (collectives needed)."""
    return _initialized() and torch.distributed.get_world_size() > 1


def torchrun_env() -> bool:
    """Whether this process was launched by torchrun (or alike) with more than one process:
    `RANK`, `WORLD_SIZE` and `LOCAL_RANK` are set and `WORLD_SIZE > 1`."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    return all(os.environ.get(n, "").strip() for n in names) and _env_int("WORLD_SIZE", 1) > 1


def collective_device(like: torch.Tensor | None = None) -> torch.device:
    """Where a tensor must be for a collective: this rank's GPU under nccl (which reduces CUDA
    tensors only), else where `like` is (gloo takes CPU tensors, and CUDA ones through the host).
    """
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if like is not None else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over all processes (a new tensor); `t` itself without a
    process group of more than one process. Every process must call it, in the same order.

    Examples:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))  # one process
        tensor([1., 2.])
    """
    if not is_distributed():
        return t
    device = collective_device(t)
    out = t.detach().to(device, copy=True)
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.to(t.device)


def ranks_where(flag: bool) -> list[int]:
    """The ranks on which `flag` is True, the same list on every process: how callbacks make a
    decision (stop, skip) that all ranks follow, so none waits forever for the others. One
    collective per call; every process must call it, in the same order.

    Examples:
        >>> if ranks_where(not torch.isfinite(learn.loss)):  # doctest: +SKIP
        ...     raise CancelFitException()  # on every rank together
    """
    if not is_distributed():
        return [rank()] if flag else []
    flags = torch.zeros(world_size(), dtype=torch.int32, device=collective_device())
    flags[rank()] = int(bool(flag))
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
    return [i for i, f in enumerate(flags.tolist()) if f]


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s `tensors` into every process' own, in place (nothing without a process
    group of more than one process). Every process must call it, with tensors of the same
    shapes in the same order.

    Examples:
        >>> broadcast_tensors(model.buffers())  # BatchNorm statistics of rank 0  # doctest: +SKIP
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            out = t.data.to(collective_device(t))
            torch.distributed.broadcast(out, src=src)
            if out is not t.data:
                t.data.copy_(out)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every process' `module`, in place
    (`broadcast_tensors`). Every process must call it.

    Examples:
        >>> broadcast_module(model)  # every rank now holds rank 0's weights  # doctest: +SKIP
    """
    broadcast_tensors([*module.parameters(), *module.buffers()], src)
