"""Fully sharded models (FSDP2, `torch.distributed.fsdp.fully_shard`): sharding, and full states.

`DistributedCB(strategy="fsdp")` shards a model with `shard_model`. From then on each rank holds
`1/world_size` of every parameter, gradient and optimizer state (as `DTensor`s), and the model's
forward gathers the parameters of one block at a time, so every rank must run every forward
(training, validation, `get_preds`) together. The model stays sharded after `fit`.

Checkpoints hold the *full* state (`full_model_state`, `full_optimizer_state`, `full_grads`),
gathered from the shards, in the layout of a plain model's and optimizer's `state_dict()`: a
checkpoint of a sharded run loads into a plain model on one process, and one of a plain run into
a sharded model (`load_model_state`, `load_optimizer_state`, `load_grads` cut each rank's shard
out of the full tensors).

Examples:
    >>> shard_model(model, torch.device("cpu"))  # under torchrun, in every process
    >>> full = full_model_state(model)  # every rank calls it; rank 0 gets the tensors
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from learner.distributed import broadcast_module

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

# torch.distributed.tensor, .fsdp and .checkpoint take most of a second to import: they are
# imported where a model is sharded or a sharded one saved, not by `import learner`.

__all__ = [
    "ShardPolicy",
    "full_grads",
    "full_model_state",
    "full_optimizer_state",
    "is_sharded",
    "load_grads",
    "load_model_state",
    "load_optimizer_state",
    "shard_model",
    "sharded_blocks",
]

ShardPolicy = type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[nn.Module], bool] | None
"""Which submodules `shard_model` makes blocks of: module types, a predicate, or None (each
child of the top module that holds parameters)."""


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded by `fully_shard` (its parameters are `DTensor`s)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: nothing is sharded
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters())


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def sharded_blocks(model: nn.Module, policy: ShardPolicy = None) -> list[nn.Module]:
    """The submodules `shard_model` shards one by one, before the root, children first.

    Args:
        model: the top module (the root, itself not in the list).
        policy: None: each direct child that holds parameters; a module type (or a tuple of
            them): every submodule of that type; a function: every submodule it returns True
            for. Blocks inside blocks come first, as `fully_shard` needs.

    Examples:
        >>> [type(b).__name__ for b in sharded_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))]
        ['Linear']
    """
    if policy is None:
        return [m for m in model.children() if _has_params(m)]
    if isinstance(policy, type) or (
        isinstance(policy, tuple) and all(isinstance(t, type) for t in policy)
    ):
        types = policy

        def matches(m: nn.Module) -> bool:
            return isinstance(m, types)
    elif callable(policy):
        matches = policy  # type: ignore[assignment]
    else:
        raise TypeError(
            f"The FSDP policy must be a module type, a tuple of them, a function "
            f"module -> bool, or None; got {policy!r}."
        )
    order: list[nn.Module] = []

    def visit(m: nn.Module) -> None:  # post-order: a block's inner blocks before it
        for child in m.children():
            visit(child)
            if matches(child) and _has_params(child):
                order.append(child)

    visit(model)
    return order


def shard_model(
    model: nn.Module, device: torch.device, policy: ShardPolicy = None, **fsdp_kwargs: Any
) -> nn.Module:
    """Shard `model` in place over all processes with `fully_shard`: each block of
    `sharded_blocks(model, policy)`, then the root. Rank 0's parameters and buffers are
    broadcast first, so every rank starts from the same model (as DDP does). Every rank must
    call it, with a process group initialised. Returns `model`.

    Args:
        model: the model, on `device`.
        device: where it trains (its mesh's device type: "cpu" with gloo, "cuda" with nccl).
        policy: see `sharded_blocks`.
        fsdp_kwargs: passed to `fully_shard`: `mp_policy=MixedPrecisionPolicy(...)`,
            `reshard_after_forward=False`, `offload_policy=...`.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (torchrun).")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    broadcast_module(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in sharded_blocks(model, policy):
        fully_shard(block, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


# -- full states: gathered on save, cut into shards on load --------------------------------------


def _options(**kwargs: bool) -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)  # type: ignore[arg-type]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full `state_dict()`, gathered from the shards: on CPU on rank 0, empty on the
    other ranks. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # cpu_offload: whole on rank 0, {} on the others
    state: dict[str, torch.Tensor] = get_model_state_dict(model, options=_options(cpu_offload=True))  # type: ignore[assignment]
    return state


def load_model_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], from_rank0: bool = False
) -> None:
    """Load a full (plain model's) `state` into sharded `model`: each rank keeps its shard. Every
    rank calls it, with the same `state`, or with `from_rank0` rank 0 with the state and the
    others with `{}`."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    options = _options(broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, dict(state), options=options)


def _fqns(opt: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The parameters' names in the order of `opt.state_dict()`'s numbered parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """`opt.state_dict()` as a plain model's optimizer would have it (parameters numbered,
    state tensors whole), gathered from the shards: on rank 0; `{}` on the other ranks. A
    collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    options = _options(cpu_offload=True)
    full: dict[str, Any] = get_optimizer_state_dict(model, opt, options=options)
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_fqns(opt, model))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load a full optimizer state (a plain optimizer's `state_dict()`, parameters numbered)
    into `opt`, the optimizer of sharded `model`. Every rank calls it, with the same `state`."""
    if not state["state"]:  # hyper-parameters only: nothing to cut into shards
        opt.load_state_dict(dict(state))
        return
    names = _fqns(opt, model)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    full = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, full, options=_options())  # type: ignore[arg-type]


def full_grads(model: nn.Module, names: Callable[[str], str] = str) -> dict[str, torch.Tensor]:
    """The gradients held between steps, whole, by `names(parameter name)`: on CPU on rank 0,
    empty elsewhere. A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        if dist.get_rank() == 0:
            out[names(name)] = grad.detach().cpu()
    return out


def load_grads(model: nn.Module, grads: Mapping[str, torch.Tensor]) -> None:
    """Set the gradients of sharded `model` from whole ones (by parameter name; None where a name
    is absent): each rank keeps its shard. Every rank calls it, with the same `grads`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        grad = grads.get(name)
        if grad is None:
            p.grad = None
        elif isinstance(p, DTensor):
            p.grad = distribute_tensor(grad.to(p.device), p.device_mesh, p.placements)
        else:
            p.grad = grad.to(p.device)
