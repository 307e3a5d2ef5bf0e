"""Every random state a training run draws from, saved and restored as one.

Used wherever something must leave no trace (`lr_find`, `summary`, predictions) or continue
exactly (checkpoints): Python's, NumPy's and torch's global generators (CUDA and MPS too when in
use) and the data loaders' own generators. The saved form holds only tensors, numbers, strings and
containers, so a checkpoint loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "set_seed"]


def _generators(dls: Any) -> list[torch.Generator]:
    """The loaders' own generators (TensorLoader, DataLoader and its samplers), each once."""
    found: dict[int, torch.Generator] = {}
    for dl in (getattr(dls, "train", None), getattr(dls, "valid", None)):
        batch_sampler = getattr(dl, "batch_sampler", None)
        for obj in (dl, getattr(dl, "sampler", None), getattr(batch_sampler, "sampler", None)):
            g = getattr(obj, "generator", None)
            if isinstance(g, torch.Generator):
                found[id(g)] = g
    return list(found.values())


def rng_state(dls: Any) -> dict[str, Any]:
    """Every random state a run draws from, in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in _generators(dls)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(dls: Any, state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    for g, g_state in zip(_generators(dls), state["generators"]):
        g.set_state(g_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and torch's generators (CUDA's too) with `seed`, as the course's
    `set_seed` does; with `deterministic`, also make torch use deterministic algorithms only
    (`torch.use_deterministic_algorithms`, process-wide: on CUDA some operations then need
    `CUBLAS_WORKSPACE_CONFIG=:4096:8`, and those without a deterministic version raise).

    Examples:
        >>> set_seed(42)
        >>> a = torch.rand(2); set_seed(42); torch.equal(a, torch.rand(2))
        True
    """
    torch.use_deterministic_algorithms(deterministic)
    torch.manual_seed(seed)  # every device's generator
    random.seed(seed)
    np.random.seed(seed)
