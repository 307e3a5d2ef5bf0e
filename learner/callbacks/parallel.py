"""Distributed data parallel training on torch.distributed, as launched by `torchrun`.

The loaders are sharded by `learner.sharding`; the helpers for code that runs under torchrun
(rank, world size, reductions) are in `learner.distributed`.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from learner.callbacks.order import ORDERS
from learner.core import BaseLearner, Callback
from learner.distributed import rank, world_size
from learner.sharding import shard_loader
from learner.utils import model_device

__all__ = ["DistributedCB"]


_n_groups = 0  # process groups made by DistributedCB in this process (see _init_group)


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


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

    Examples:
        >>> # torchrun --nproc_per_node=2 train.py, with train.py containing:
        >>> learn = Learner(model, dls, F.cross_entropy, metrics=accuracy)  # DistributedCB added
        >>> learn.fit(3)
    """

    order = ORDERS["DistributedCB"]

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

    def before_fit(self, learn: BaseLearner) -> None:
        if not dist.is_available():
            raise RuntimeError("DistributedCB needs torch.distributed, which this torch lacks.")
        if isinstance(learn.model, DistributedDataParallel):
            raise ValueError(
                "The model is already wrapped in DistributedDataParallel: pass the plain model; "
                "DistributedCB wraps it (pass options with DistributedCB(ddp_kwargs=...))."
            )
        device = model_device(learn.model)
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

    def before_train(self, learn: BaseLearner) -> None:
        sampler = getattr(learn.dl, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.n_train_epochs)
        self.n_train_epochs += 1
        if self.ddp is not None:
            self.ddp.training = (
                learn.model.training
            )  # the wrapper's own flag only (see TrainEvalCB)
            learn.model = self.ddp

    def cleanup_train(self, learn: BaseLearner) -> None:
        # Validation and everything outside training see the plain model: it needs no gradient
        # sync, and DDP's buffer broadcast in forward would wait for ranks with fewer batches.
        if self.module is not None:
            learn.model = self.module

    def before_validate(self, learn: BaseLearner) -> None:
        if self.module is None or world_size() == 1:
            return
        for buf in self.module.buffers():
            dist.broadcast(buf, src=0)

    def cleanup_fit(self, learn: BaseLearner) -> None:
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
