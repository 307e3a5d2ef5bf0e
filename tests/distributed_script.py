"""Training runs for tests/callbacks/test_distributed.py, launched there with
`python -m torch.distributed.run --nproc_per_node=2 tests/distributed_script.py OUT_DIR CASE`.

Each rank saves what it saw to OUT_DIR/<run>_rank<r>.pt; the test compares the ranks with each
other and with single-process runs of the same problem (`problem()`, shared with the test).

CASE "train": the Learner creates (and destroys) the process group itself:
  - "tensors": from_tensors loaders, fit(2) then fit(1) (the group is made afresh);
then with a process group the script made (it must survive the fits):
  - "dataloader": torch DataLoaders, sharded with DistributedSampler;
  - "nan": rank 1's loss turns NaN at one batch, TerminateOnNaNCB stops both ranks there;
  - "signal": a callback on rank 1 alone asks to stop, `ranks_where` stops both; the ranks'
    global RNGs differ, yet they share out one permutation per epoch.
CASE "raise": rank 1 raises in the middle of an epoch; the launch must end, with an error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

N_TRAIN, N_VALID, BS, EPOCHS, LR, SEED = 36, 13, 4, 3, 0.1, 0


def problem() -> tuple[torch.Tensor, ...]:
    """36 training and 13 (odd) validation samples of a 3-class problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VALID, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def metrics() -> dict[str, Any]:
    from torcheval.metrics import MulticlassAccuracy

    from learner import accuracy

    return {"accuracy": accuracy, "top1": MulticlassAccuracy()}


def main(out: Path, case: str) -> None:
    import torch.distributed as dist

    from learner import Callback, CancelFitException, DistributedCB, Learner, TerminateOnNaNCB
    from learner.data import DataLoaders
    from learner.distributed import rank, ranks_where

    r = rank()

    def learner(dls: Any) -> Learner:
        learn = Learner(model(), dls, F.cross_entropy, lr=LR, opt_func=torch.optim.SGD,
                        metrics=metrics())  # fmt: skip
        assert isinstance(learn.distributed, DistributedCB)  # added for torchrun by itself
        return learn

    def save(name: str, learn: Learner, **extra: Any) -> None:
        state = {k: v.clone() for k, v in learn.model.state_dict().items()}
        record = {"history": learn.recorder.history, "losses": learn.recorder.losses}
        torch.save({"state": state, **record, **extra}, out / f"{name}_rank{r}.pt")

    if case == "raise":

        class FailCB(Callback):
            def after_batch(self, learn: Learner) -> None:
                if r == 1 and learn.training and learn.iter == 2:
                    raise RuntimeError("rank 1 failed on purpose")

        dls = DataLoaders.from_tensors(*problem(), bs=BS)
        learner(dls).fit(EPOCHS, cbs=[FailCB()])
        return

    # -- tensors: the Learner makes the process group, and destroys it after each fit ---------
    dls = DataLoaders.from_tensors(*problem(), bs=BS, generator=torch.Generator().manual_seed(SEED))
    learn = learner(dls)
    user_model = learn.model
    learn.fit(EPOCHS - 1)
    assert not dist.is_initialized(), "the Learner made the process group: it must destroy it"
    learn.fit(1)
    assert learn.model is user_model and learn.dls is dls
    save("tensors", learn)

    # -- a process group made by the script: the fits must leave it alone ---------------------
    dist.init_process_group("gloo")
    x, y, xv, yv = problem()
    ds = torch.utils.data.TensorDataset
    learn = learner(DataLoaders.from_datasets(ds(x, y), ds(xv, yv), bs=BS))
    learn.fit(EPOCHS)
    assert dist.is_initialized()
    save("dataloader", learn)

    def nan_on_rank_1(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(preds, targets)
        bad = r == 1 and nan_learn.epoch == 1 and nan_learn.iter == 2
        return loss * torch.nan if bad and nan_learn.training else loss

    dls = DataLoaders.from_tensors(*problem(), bs=BS, generator=torch.Generator().manual_seed(SEED))
    nan_learn = Learner(model(), dls, nan_on_rank_1, lr=LR, opt_func=torch.optim.SGD)
    nan_learn.fit(EPOCHS, cbs=[terminate := TerminateOnNaNCB()])
    save("nan", nan_learn, epoch=terminate.stopped_epoch, batch=terminate.stopped_batch,
         reason=terminate.reason)  # fmt: skip

    class StopOnRank1CB(Callback):
        order = 70

        def after_epoch(self, learn: Learner) -> None:
            if ranks_where(r == 1 and learn.epoch == 1):
                raise CancelFitException()

    class SeenCB(Callback):  # the training samples of each epoch, by their first feature
        def __init__(self) -> None:
            self.seen: list[list[float]] = []

        def before_epoch(self, learn: Learner) -> None:
            self.seen.append([])

        def after_batch(self, learn: Learner) -> None:
            if learn.training:
                self.seen[-1] += learn.batch[0][:, 0].tolist()

    # No generator: the loaders shuffle from the global RNG, seeded differently on each rank
    # (as for per-rank augmentation); the ranks must still agree on each epoch's permutation.
    learn = learner(DataLoaders.from_tensors(*problem(), bs=BS))
    torch.manual_seed(100 + r)
    learn.fit(EPOCHS + 2, cbs=[StopOnRank1CB(), seen := SeenCB()])
    save("signal", learn, seen=seen.seen)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
