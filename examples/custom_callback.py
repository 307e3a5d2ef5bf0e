"""Writing your own callbacks: log gradient norms, and stop training after N batches.

A callback is a class with methods named after events (`after_backward`, `after_batch`, ...,
the full list is `learner.EVENTS`); each receives the `Learner`, whose attributes hold the state
of the loop: `model`, `opt`, `epoch`, `iter`, `batch`, `preds`, `loss`, `training`. Two here:

- `GradNormCB` reads the gradients at `after_backward` (after `loss.backward()`, before
  `opt.step()`) and prints their global norm every few batches;
- `StopAfterCB` counts training batches at `after_batch` and ends `fit` by raising
  `CancelFitException`: the loop stops quietly, `after_fit` is skipped, `cleanup_fit` still runs.

Trains on scikit-learn's bundled 8x8 digits: no download, a few seconds.

Run from the repository root:
    python examples/custom_callback.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from learner import EVENTS, Callback, CancelFitException, Learner, accuracy
from learner.data import DataLoaders, digits


class GradNormCB(Callback):
    """Prints the global L2 norm of the gradients every `every` training batches.

    Events: `after_backward`. Order: 0.
    """

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.norms: list[float] = []

    def after_backward(self, learn: Learner) -> None:
        grads = [p.grad for p in learn.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        self.norms.append(norm)
        if learn.iter % self.every == 0:
            print(f"  epoch {learn.epoch} batch {learn.iter:2d}: loss {learn.loss.item():.4f}, "
                  f"gradient norm {norm:.4f}")  # fmt: skip


class StopAfterCB(Callback):
    """Ends `fit` after `n_batches` training batches by raising `CancelFitException`.

    Events: `before_fit`, `after_batch`, `after_fit`, `cleanup_fit`. Order: 100 (after the
    default callbacks, so the last batch is recorded before the loop stops).
    """

    order = 100

    def __init__(self, n_batches: int) -> None:
        self.n_batches = n_batches

    def before_fit(self, learn: Learner) -> None:
        self.count = 0

    def after_batch(self, learn: Learner) -> None:
        if not learn.training:
            return
        self.count += 1
        if self.count == self.n_batches:
            print(f"stopping after {self.count} batches: epoch {learn.epoch}, batch {learn.iter}")
            raise CancelFitException()

    def after_fit(self, learn: Learner) -> None:
        print("after_fit: not reached when fit is cancelled")

    def cleanup_fit(self, learn: Learner) -> None:
        print("cleanup_fit: runs however fit ends")


print("events, in the order they first fire:", ", ".join(EVENTS))
torch.manual_seed(0)
dls = DataLoaders.from_tensors(*digits(flatten=True), bs=64)  # 1,438 images: 23 batches an epoch
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
learn = Learner(model, dls, F.cross_entropy, lr=3e-3, metrics=accuracy,
                cbs=[GradNormCB(every=10), StopAfterCB(n_batches=30)])  # fmt: skip
learn.fit(5)

# Callbacks are reachable by name: the class name in snake case, without `CB`.
print(f"learn.grad_norm.norms: {len(learn.grad_norm.norms)} values, "
      f"first {learn.grad_norm.norms[0]:.3f}, last {learn.grad_norm.norms[-1]:.3f}")  # fmt: skip
print(f"learn.recorder.losses: {len(learn.recorder.losses)} batches; "
      f"epochs completed: {len(learn.recorder.history)}")  # fmt: skip
