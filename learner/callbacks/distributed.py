"""Distributed data parallel training on torch.distributed, as launched by `torchrun`."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from learner.core import Callback, Learner
from learner.data import TensorLoader
from learner.distributed import rank, world_size

__all__ = ["DistributedCB", "TensorLoaderShard", "shard_loader"]


class TensorLoaderShard:
    """One process' share of a `TensorLoader`: the batches of rank `rank` out of `world_size`.

    Each epoch, every rank draws the permutation the whole loader would draw (consuming the same
    random numbers), rank 0's is broadcast so all ranks agree even when their random states
    differ (a `manual_seed(seed + rank)` is common), and rank `r` takes every `world_size`-th
    sample from position `r`. So batch `k` of all ranks together holds exactly batch `k` of
    `TensorLoader(..., bs=world_size * bs)` with the same seed: the global batch of one step.

    With `pad=True` (training) the permutation is extended with its first samples up to a
    multiple of `world_size`, as `DistributedSampler` does, so every rank runs the same number of
    batches (DDP waits for all ranks at every backward pass); with `drop_last` the tail that does
    not fill a global batch is dropped instead. With `pad=False` (validation) ranks may hold one
    sample, and so one batch, more than others: nothing synchronises inside a validation phase.

    Example:
        >>> x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
        >>> [yb.tolist() for _, yb in TensorLoaderShard(TensorLoader(x, y, bs=2), 1, 2)]
        [[1, 3], [5, 7], [9, 1]]
    """

    def __init__(self, loader: TensorLoader, rank: int, world_size: int, pad: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, {world_size=}.")
        self.loader, self.rank, self.world_size, self.pad = loader, rank, world_size, pad

    def _stop(self) -> int:
        n, global_bs = self.loader.n, self.loader.bs * self.world_size
        return n - n % global_bs if self.loader.drop_last else n

    def _n_samples(self) -> int:
        stop, ws = self._stop(), self.world_size
        if self.pad and not self.loader.drop_last:
            return math.ceil(stop / ws)
        return len(range(self.rank, stop, ws))

    def __len__(self) -> int:
        return math.ceil(self._n_samples() / self.loader.bs)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # The same draw as TensorLoader.__iter__ (a DataLoader's worker seed), to stay in step.
        torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)
        return self._batches()

    def _batches(self) -> Iterator[tuple[Tensor, ...]]:
        ld, ws = self.loader, self.world_size
        n, stop = ld.n, self._stop()
        generator = ld.generator
        if ld.shuffle:
            if generator is None:  # as TensorLoader: a fresh generator seeded from the global RNG
                seed = int(torch.empty((), dtype=torch.int64).random_().item())
                generator = torch.Generator().manual_seed(seed)
            perm = _broadcast(torch.randperm(n, generator=generator))
        else:
            perm = torch.arange(n)
        perm = perm[:stop]
        if self.pad and not ld.drop_last and stop % ws:
            total = math.ceil(stop / ws) * ws
            perm = torch.cat([perm, perm.repeat(math.ceil(total / stop))[: total - stop]])
        idx = perm[self.rank :: ws].to(ld.device)
        for i in range(0, len(idx), ld.bs):  # not idx.split: it yields one empty batch if empty
            chunk = idx[i : i + ld.bs]
            yield tuple([t.index_select(0, chunk) for t in ld.tensors])
        if ld.shuffle and ld.generator is not None:
            torch.randperm(n, generator=generator)  # TensorLoader's extra draw at epoch end

    def __repr__(self) -> str:
        return f"TensorLoaderShard({self.loader!r}, rank={self.rank}, world_size={self.world_size})"


def _broadcast(t: Tensor) -> Tensor:
    if world_size() == 1 or not dist.is_initialized():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else t.device
    out = t.to(device)
    dist.broadcast(out, src=0)
    return out.to(t.device)


_n_groups = 0  # process groups made by DistributedCB in this process (see _init_group)


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


class _StridedSampler(Sampler[int]):
    """Indices `rank, rank + world_size, ...` of `n`, in order and unpadded (for validation)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _shard_dataloader(dl: DataLoader[Any], rank: int, world_size: int, pad: bool) -> Any:
    if isinstance(dl.sampler, DistributedSampler):
        return dl  # already sharded by the user
    if isinstance(dl.dataset, IterableDataset):
        raise ValueError(
            "DistributedCB cannot shard a DataLoader over an IterableDataset: make the dataset "
            "yield each rank's own share (learner.distributed.rank(), world_size()) and pass "
            "DistributedCB(shard=False)."
        )
    if dl.batch_size is None or not isinstance(dl.sampler, (RandomSampler, SequentialSampler)):
        raise ValueError(
            "DistributedCB shards DataLoaders with a batch_size and the default sampler (shuffle "
            "True or False); for a custom sampler or batch_sampler, give each rank its own "
            "batches (e.g. with DistributedSampler) and pass DistributedCB(shard=False)."
        )
    shuffle = isinstance(dl.sampler, RandomSampler)
    sampler: Sampler[int]
    if pad:
        sampler = DistributedSampler(
            dl.dataset, world_size, rank, shuffle=shuffle, drop_last=dl.drop_last
        )
    else:
        sampler = _StridedSampler(len(dl.dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(
        dl.dataset,
        batch_size=dl.batch_size,
        sampler=sampler,
        num_workers=dl.num_workers,
        collate_fn=dl.collate_fn,
        pin_memory=dl.pin_memory,
        drop_last=dl.drop_last,
        timeout=dl.timeout,
        worker_init_fn=dl.worker_init_fn,
        multiprocessing_context=dl.multiprocessing_context,
        generator=dl.generator,
        prefetch_factor=dl.prefetch_factor,
        persistent_workers=dl.persistent_workers,
        pin_memory_device=dl.pin_memory_device,
    )


def shard_loader(dl: Any, rank: int, world_size: int, pad: bool) -> Any:
    """Rank `rank`'s share of loader `dl`, as `DistributedCB` shards it.

    A `TensorLoader` becomes a `TensorLoaderShard`; a torch `DataLoader` is rebuilt with a
    `DistributedSampler` (shuffled as the original; `pad=True`) or an in-order strided sampler
    (`pad=False`); a `DataLoader` that already has a `DistributedSampler` is returned as is.

    Args:
        dl: the loader to shard.
        rank, world_size: this process' rank and the number of processes.
        pad: pad to equal shards (training), or not (validation).
    """
    if isinstance(dl, TensorLoaderShard):
        return dl
    if isinstance(dl, TensorLoader):
        return TensorLoaderShard(dl, rank, world_size, pad)
    if isinstance(dl, DataLoader):
        return _shard_dataloader(dl, rank, world_size, pad)
    raise ValueError(
        f"DistributedCB can shard a torch DataLoader or a TensorLoader, not a "
        f"{type(dl).__name__}: give each rank its own batches (the same number of training "
        "batches on every rank) and pass DistributedCB(shard=False)."
    )


class DistributedCB(Callback):
    """Trains with `DistributedDataParallel` (DDP), one process per device, as `torchrun` runs it.

    `Learner` adds it by itself when torchrun's environment variables are set (`RANK`,
    `WORLD_SIZE`, `LOCAL_RANK`, with `WORLD_SIZE > 1`), so a script runs unchanged under
    `torchrun --nproc_per_node=N script.py`. At `before_fit`, after `DeviceCB` moved the model
    (to `cuda:LOCAL_RANK` under torchrun), it:

    - initialises the default process group, unless one is: `nccl` for a CUDA model, else `gloo`
      (and destroys it at the end of fit, only if it created it);
    - wraps the model in DDP, which starts every rank from rank 0's weights and averages the
      gradients over ranks at each backward pass. During a training phase `learn.model` is the
      DDP wrapper; at any other time (validation, `after_epoch`, after fit) it is your model;
    - shards the data (see `shard_loader`): training padded to equal shards (DDP needs the same
      number of batches on every rank), reshuffled each epoch; validation unpadded, so no sample
      is counted twice. `bs` is per process, as in torch: one step sees `world_size * bs`
      samples. The original loaders are put back at the end of fit.

    `MetricsCB` sums its values over ranks once per phase, so every rank's `recorder.history`
    holds the exact full-dataset values, and decisions taken from it (`EarlyStoppingCB`) agree.
    Before each validation phase the model's buffers (BatchNorm statistics) are broadcast from
    rank 0, so all ranks validate the same model.

    Events: `before_fit`, `before_train`, `cleanup_train`, `before_validate`, `cleanup_fit`.
    Order: -15 (after `DeviceCB` moved the model, before `MetricsCB` reads its device).

    Args:
        backend: process-group backend; None: "nccl" for a CUDA model, else "gloo".
        shard: shard `dls.train` and `dls.valid`; False if each rank's loaders already yield
            its own batches.
        timeout: how long a collective waits for the other ranks before failing; None:
            torch's default.
        ddp_kwargs: passed to `DistributedDataParallel`, e.g. `{"find_unused_parameters": True}`.

    Example:
        >>> # torchrun --nproc_per_node=2 train.py, with train.py containing:
        >>> learn = Learner(model, dls, F.cross_entropy, metrics=accuracy)  # DistributedCB added
        >>> learn.fit(3)
    """

    order = -15

    def __init__(
        self,
        backend: str | None = None,
        shard: bool = True,
        timeout: timedelta | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a str such as 'gloo' or 'nccl', got {backend!r}.")
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(f"timeout must be a datetime.timedelta, got {timeout!r}.")
        self.backend, self.shard, self.timeout = backend, shard, timeout
        self.ddp_kwargs = dict(ddp_kwargs or {})
        self.created_group = False
        self.module: nn.Module | None = None  # the user's model, during fit
        self.ddp: DistributedDataParallel | None = None
        self.dls: Any = None  # the user's loaders, during fit
        self.n_train_epochs = 0  # DistributedSampler.set_epoch: a new shuffle every epoch, all fits

    def before_fit(self, learn: Learner) -> None:
        if not dist.is_available():
            raise RuntimeError("DistributedCB needs torch.distributed, which this torch lacks.")
        if isinstance(learn.model, DistributedDataParallel):
            raise ValueError(
                "The model is already wrapped in DistributedDataParallel: pass the plain model; "
                "DistributedCB wraps it (pass options with DistributedCB(ddp_kwargs=...))."
            )
        param = next(learn.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if device.type == "mps":
            raise ValueError("DistributedCB does not support mps: train on cpu or cuda.")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl and bare "cuda" tensors use this rank's GPU
        if not dist.is_initialized():
            self._init_group(device)
        self.module = learn.model
        if learn.run_train and any(p.requires_grad for p in learn.model.parameters()):
            ids = [device] if device.type == "cuda" else None
            self.ddp = DistributedDataParallel(learn.model, device_ids=ids, **self.ddp_kwargs)
        if self.shard:
            self.dls, r, ws = learn.dls, rank(), world_size()
            dls = copy.copy(learn.dls)
            dls.train = shard_loader(learn.dls.train, r, ws, pad=True)
            if getattr(learn.dls, "valid", None) is not None:
                dls.valid = shard_loader(learn.dls.valid, r, ws, pad=False)
            learn.dls = dls

    def _init_group(self, device: torch.device) -> None:
        missing = [
            v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
        ]
        if missing:
            raise RuntimeError(
                f"DistributedCB found no process group and no torchrun environment (missing "
                f"{', '.join(missing)}): launch with `torchrun --nproc_per_node=N script.py`, or "
                "call torch.distributed.init_process_group(...) before fit."
            )
        backend = self.backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {} if self.timeout is None else {"timeout": self.timeout}
        # A group made again after destroy_process_group (a second fit) would read the first
        # one's connection keys from the launcher's store, and hang or fail to connect: each
        # group this process makes gets keys of its own. Every rank counts its groups alike.
        global _n_groups
        store, group_rank, size = next(dist.rendezvous("env://", **kwargs))
        store = dist.PrefixStore(f"learner_group_{_n_groups}", store)
        dist.init_process_group(backend, store=store, rank=group_rank, world_size=size, **kwargs)
        _n_groups += 1
        self.created_group = True

    def before_train(self, learn: Learner) -> None:
        sampler = getattr(learn.dl, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.n_train_epochs)
        self.n_train_epochs += 1
        if self.ddp is not None:
            self.ddp.training = (
                learn.model.training
            )  # the wrapper's own flag only (see TrainEvalCB)
            learn.model = self.ddp

    def cleanup_train(self, learn: Learner) -> None:
        # Validation and everything outside training see the plain model: it needs no gradient
        # sync, and DDP's buffer broadcast in forward would wait for ranks with fewer batches.
        if self.module is not None:
            learn.model = self.module

    def before_validate(self, learn: Learner) -> None:
        if self.module is None or world_size() == 1:
            return
        for buf in self.module.buffers():
            dist.broadcast(buf, src=0)

    def cleanup_fit(self, learn: Learner) -> None:
        if self.module is not None:
            learn.model = self.module
        if self.dls is not None:
            learn.dls = self.dls
        self.module, self.ddp, self.dls = None, None, None
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()
        self.created_group = False

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the shuffling: the number of training epochs run."""
        return {"n_train_epochs": self.n_train_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`."""
        self.n_train_epochs = int(state["n_train_epochs"])
