"""Sharding loaders over the processes of a distributed run: each rank's share of the data."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from learner.data import TensorLoader
from learner.distributed import collective_device, world_size

__all__ = ["TensorLoaderShard", "shard_loader"]


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

    Examples:
        >>> x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
        >>> [yb.tolist() for _, yb in TensorLoaderShard(TensorLoader(x, y, bs=2), 1, 2)]
        [[1, 3], [5, 7], [9, 1]]
    """

    def __init__(self, loader: TensorLoader, rank: int, world_size: int, pad: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, {world_size=}.")
        self.loader, self.rank, self.world_size, self.pad = loader, rank, world_size, pad

    @property
    def generator(self) -> torch.Generator | None:
        """The loader's generator, which the shards draw from: a checkpoint keeps its state."""
        return self.loader.generator

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
    out = t.to(collective_device(t))
    dist.broadcast(out, src=0)
    return out.to(t.device)


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
