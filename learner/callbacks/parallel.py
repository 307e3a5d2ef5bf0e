"""Data parallel training on torch.distributed, as launched by `torchrun`: DDP, or FSDP2.

The loaders are sharded by `learner.sharding`, a model by `learner.fsdp`; the helpers for code
that runs under torchrun (rank, world size, reductions) are in `learner.distributed`.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from learner.callbacks.order import ORDERS
from learner.core import BaseLearner
from learner.distributed import broadcast_tensors, collective_device, rank, world_size
from learner.events import Callback
from learner.fsdp import ShardPolicy, is_sharded, load_optimizer_state, shard_model
from learner.optimizers import Optimizers
from learner.sharding import shard_loader
from learner.utils import model_device, unwrap_model

__all__ = ["DistributedCB"]


_n_groups = 0  # process groups made by DistributedCB in this process (see _init_group)


class DistributedCB(Callback):
    """Trains on several processes, one per device, as `torchrun` runs them: with
    `DistributedDataParallel` (DDP, `strategy="ddp"`, the default), or with the model sharded over
    the processes (FSDP2, `strategy="fsdp"`), for models too large for one device.

    `Learner` adds it by itself when torchrun's environment variables are set (`RANK`,
    `WORLD_SIZE`, `LOCAL_RANK`, with `WORLD_SIZE > 1`), so a script runs unchanged under
    `torchrun --nproc_per_node=N script.py`; pass `cbs=[DistributedCB(strategy="fsdp")]` to
    shard. At `before_fit`, after `DeviceCB` moved the model (to `cuda:LOCAL_RANK` under
    torchrun), it:

    - initialises the default process group, unless one is: `nccl` for a CUDA model, else `gloo`
      (and, with DDP, destroys it at the end of fit, only if it created it);
    - DDP: wraps the model, which starts every rank from rank 0's weights and averages the
      gradients over ranks at each backward pass. During a training phase `learn.model` is the
      DDP wrapper; at any other time (validation, `after_epoch`, after fit) it is your model;
    - FSDP: shards the model in place (`learner.fsdp.shard_model`: rank 0's weights, then
      `fully_shard` on each block of `policy`, then on the root), and rebuilds the optimizer
      over the sharded parameters, keeping its state. Each rank then holds `1/world_size` of the
      parameters, gradients and optimizer state. The model stays sharded after fit (and so does
      the process group, which its forward needs): every rank must run every forward together,
      `get_preds` included. `learn.save`, `CheckpointCB` and `SaveBestCB` write the full
      weights, which load into a plain model (see `learner.fsdp`);
    - shards the data (see `shard_loader`): training padded to equal shards (every rank runs the
      same number of batches), reshuffled each epoch; validation unpadded, so no sample is
      counted twice (under FSDP a rank with one batch fewer runs one more forward, uncounted, to
      keep the others' parameter gathers company). `bs` is per process, as in torch: one step
      sees `world_size * bs` samples. The original loaders are put back at the end of fit.

    With DDP, batches with `learn.grad_sync` cleared (`GradAccumCB` between steps) skip the
    gradient all-reduce (DDP's `no_sync`). FSDP reduce-scatters every batch's gradients even
    between steps: skipping it would hold the whole unsharded gradients until the step, the
    memory FSDP is there to save (and a checkpoint mid-group could not hold them).

    `MetricsCB` sums its values over ranks once per phase, so every rank's `recorder.history`
    holds the exact full-dataset values, and decisions taken from it (`EarlyStoppingCB`) agree.
    Before each validation phase the model's buffers (BatchNorm statistics) are broadcast from
    rank 0, so all ranks validate the same model.

    Events: `before_fit`, `before_train`, `cleanup_train`, `before_validate`, `after_validate`,
    `cleanup_fit`. Order: -15 (after `DeviceCB` moved the model, before `MetricsCB` reads its
    device).

    Args:
        backend: process-group backend; None: "nccl" for a CUDA model, else "gloo".
        shard: shard `dls.train` and `dls.valid`; False if each rank's loaders already yield
            its own batches.
        timeout: how long a collective waits for the other ranks before failing; None:
            torch's default.
        ddp_kwargs: passed to `DistributedDataParallel`, e.g. `{"find_unused_parameters": True}`.
        strategy: "ddp" (every rank holds the whole model) or "fsdp" (sharded).
        policy: with FSDP, the blocks sharded one by one (`learner.fsdp.sharded_blocks`): a
            module type such as your transformer block, a tuple of them, a function
            `module -> bool`; None: each child of the model that holds parameters.
        fsdp_kwargs: passed to `fully_shard`, e.g. `{"mp_policy": MixedPrecisionPolicy(...)}`.

    Examples:
        >>> # torchrun --nproc_per_node=2 train.py, with train.py containing:
        >>> learn = Learner(model, dls, F.cross_entropy, metrics=accuracy)  # DistributedCB added
        >>> learn.fit(3)
        >>> # a model sharded block by block:
        >>> learn = Learner(model, dls, F.cross_entropy, cbs=DistributedCB(strategy="fsdp",
        ...                                                               policy=Block))
    """

    order = ORDERS["DistributedCB"]

    def __init__(
        self,
        backend: str | None = None,
        shard: bool = True,
        timeout: timedelta | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
        strategy: Literal["ddp", "fsdp"] = "ddp",
        policy: ShardPolicy = None,
        fsdp_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a str such as 'gloo' or 'nccl', got {backend!r}.")
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(f"timeout must be a datetime.timedelta, got {timeout!r}.")
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f'strategy must be "ddp" or "fsdp", got {strategy!r}.')
        if strategy == "ddp" and (policy is not None or fsdp_kwargs):
            raise ValueError('policy and fsdp_kwargs are for strategy="fsdp".')
        if strategy == "fsdp" and ddp_kwargs:
            raise ValueError('ddp_kwargs are for strategy="ddp"; FSDP takes fsdp_kwargs.')
        self.backend, self.shard, self.timeout = backend, shard, timeout
        self.strategy, self.policy = strategy, policy
        self.ddp_kwargs = dict(ddp_kwargs or {})
        self.fsdp_kwargs = dict(fsdp_kwargs or {})
        self.created_group = False
        self.module: nn.Module | None = None  # the user's model, during fit
        self.ddp: DistributedDataParallel | None = None
        self.dls: Any = None  # the user's loaders, during fit
        self.n_train_epochs = 0  # DistributedSampler.set_epoch: a new shuffle every epoch, all fits
        self.hook: Any = None  # the forward pre-hook that applies learn.grad_sync
        self.extra_forwards = 0  # FSDP: forwards this rank owes the others after validation

    def before_fit(self, learn: BaseLearner) -> None:
        if not dist.is_available():
            raise RuntimeError("DistributedCB needs torch.distributed, which this torch lacks.")
        if isinstance(learn.model, DistributedDataParallel):
            raise ValueError(
                "The model is already wrapped in DistributedDataParallel: pass the plain model; "
                "DistributedCB wraps it (pass options with DistributedCB(ddp_kwargs=...))."
            )
        if self.strategy == "fsdp" and unwrap_model(learn.model) is not learn.model:
            raise ValueError(
                f"DistributedCB(strategy='fsdp') shards the plain model, and this one is wrapped "
                f"({type(learn.model).__name__}): pass the model itself."
            )
        device = model_device(learn.model)
        if device.type == "mps":
            raise ValueError("DistributedCB does not support mps: train on cpu or cuda.")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl and bare "cuda" tensors use this rank's GPU
        if not dist.is_initialized():
            self._init_group(device)
        self.module = learn.model
        if self.strategy == "fsdp":
            self._shard_model(learn, device)
        elif learn.run_train and any(p.requires_grad for p in learn.model.parameters()):
            ids = [device] if device.type == "cuda" else None
            self.ddp = DistributedDataParallel(learn.model, device_ids=ids, **self.ddp_kwargs)

            def no_sync(ddp: nn.Module, args: Any) -> None:  # DDP reads it in its forward
                ddp.require_backward_grad_sync = learn.grad_sync  # type: ignore[assignment]

            self.hook = self.ddp.register_forward_pre_hook(no_sync)
        if self.shard:
            self.dls, r, ws = learn.dls, rank(), world_size()
            dls = copy.copy(learn.dls)
            dls.train = shard_loader(learn.dls.train, r, ws, pad=True)
            if getattr(learn.dls, "valid", None) is not None:
                dls.valid = shard_loader(learn.dls.valid, r, ws, pad=False)
            learn.dls = dls

    def _shard_model(self, learn: BaseLearner, device: torch.device) -> None:
        model = learn.model
        if not is_sharded(model):
            shard_model(model, device, self.policy, **self.fsdp_kwargs)
        if isinstance(learn.opt, Optimizers):
            raise NotImplementedError(
                "DistributedCB(strategy='fsdp') rebuilds the optimizer over the shards, and "
                "cannot yet for several optimizers (learn.opt is Optimizers). Use "
                "strategy='ddp', or one optimizer with a param group per part of the model."
            )
        if learn.opt is not None and _params(learn.opt) != {id(p) for p in model.parameters()}:
            # Made over the parameters the sharding replaced: one over the shards, same state.
            state = learn.opt.state_dict()
            lr = state["param_groups"][0].get("lr", learn.lr)
            opt = learn.opt_func(model.parameters(), lr=lr)
            load_optimizer_state(model, opt, state)
            learn.opt = opt

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
        # A fit in steps sets the epoch at each pass over the loader (learner.steps.TrainStream).
        if isinstance(sampler, DistributedSampler) and learn.n_steps is None:
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
        broadcast_tensors(self.module.buffers())
        if self.strategy == "fsdp":
            # Every forward gathers parameters with the other ranks: a rank with a batch fewer
            # (unpadded validation) runs one more after its last, so none waits forever.
            n = torch.tensor([len(learn.dl)], device=collective_device())
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            self.extra_forwards = int(n.item()) - len(learn.dl)

    def after_validate(self, learn: BaseLearner) -> None:
        if not self.extra_forwards:
            return
        if learn.batch is None:
            raise RuntimeError(
                "DistributedCB(strategy='fsdp'): this rank has no batch to keep the others' "
                "validation company with; give every rank at least one training batch."
            )
        preds, output = learn.preds, learn.output
        with torch.no_grad():
            for _ in range(self.extra_forwards):
                learn.predict()  # not counted: nothing is fired, preds are put back
        learn.preds, learn.output, self.extra_forwards = preds, output, 0

    def cleanup_fit(self, learn: BaseLearner) -> None:
        if self.hook is not None:
            self.hook.remove()
        if self.module is not None:
            learn.model = self.module
        if self.dls is not None:
            learn.dls = self.dls
        sharded = self.module is not None and is_sharded(self.module)
        self.module, self.ddp, self.dls, self.hook = None, None, None, None
        # A sharded model's forward (get_preds, the next fit) needs the group: it stays.
        if self.created_group and dist.is_initialized() and not sharded:
            dist.destroy_process_group()
        self.created_group = False

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the shuffling: the number of training epochs run."""
        return {"n_train_epochs": self.n_train_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`."""
        self.n_train_epochs = int(state["n_train_epochs"])


def _params(opt: Any) -> set[int]:
    return {id(p) for group in getattr(opt, "param_groups", []) for p in group["params"]}
