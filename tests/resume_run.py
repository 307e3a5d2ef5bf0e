"""The runs of the resume tests (tests/test_save_load_resume.py).

Imported, it builds their learners. Run as a script, it resumes checkpoints in a new process:
`python resume_run.py OUT CONFIG=CHECKPOINT ...` trains each to the end with
`fit(N_EPOCHS, resume_from=CHECKPOINT)` and saves the results of all in OUT.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from learner import (
    Callback,
    CancelFitException,
    DataLoaders,
    GradAccumCB,
    Learner,
    ParamSchedulerCB,
    accuracy,
    combined_cos,
)

N_EPOCHS = 3

# Configurations: a loader shuffling with its own generator ("gen") or the global RNG ("global"),
# with or without validation (without it, metrics accumulate over the training phase, so a
# mid-epoch checkpoint holds them half-way), optionally accumulating gradients over 3 batches.
CONFIGS = {
    "gen": dict(global_rng=False, valid=True, accum=False),
    "global_noval": dict(global_rng=True, valid=False, accum=False),
    "gen_accum": dict(global_rng=False, valid=True, accum=True),
}


def make_learner(config: str) -> Learner:
    """30 training samples in batches of 8 (the last of 6), a model with dropout, SGD with
    momentum, accuracy and a torcheval metric."""
    from torcheval.metrics import MulticlassAccuracy

    opts = CONFIGS[config]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    shuffle_gen = None if opts["global_rng"] else torch.Generator().manual_seed(2)
    dls = DataLoaders.from_tensors(x[:30], y[:30], x[30:], y[30:], bs=8, generator=shuffle_gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    cbs = [GradAccumCB(3)] if opts["accum"] else []
    return Learner(
        model,
        dls,
        F.cross_entropy,
        lr=0.1,
        opt_func=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        metrics={"accuracy": accuracy, "acc2": MulticlassAccuracy()},
        cbs=cbs,
    )


def one_cycle() -> ParamSchedulerCB:
    return ParamSchedulerCB(
        {"lr": combined_cos(0.25, 0.004, 0.1, 1e-6), "mom": combined_cos(0.25, 0.95, 0.85, 0.95)}
    )


def fit(learn: Learner, config: str, cbs: list[Callback], resume_from: Any = None) -> None:
    valid = CONFIGS[config]["valid"]
    learn.fit(N_EPOCHS, cbs=[one_cycle(), *cbs], valid=valid, resume_from=resume_from)


def results(learn: Learner) -> dict[str, Any]:
    return {
        "losses": learn.recorder.losses,
        "lrs": learn.recorder.lrs,
        "history": learn.recorder.history,
        "weights": {k: v.clone() for k, v in learn.model.state_dict().items()},
    }


class StopAt(Callback):
    """Ends the fit (CancelFitException) before training batch `iter` of epoch `epoch`, or after
    epoch `epoch` when `iter` is None."""

    order = 70

    def __init__(self, epoch: int, iter: int | None = None) -> None:
        self.epoch, self.iter = epoch, iter

    def before_batch(self, learn: Learner) -> None:
        if learn.training and (learn.epoch, learn.iter) == (self.epoch, self.iter):
            raise CancelFitException()

    def after_epoch(self, learn: Learner) -> None:
        if self.iter is None and learn.epoch == self.epoch:
            raise CancelFitException()


def main(out: str, jobs: list[str]) -> None:
    done = {}
    for job in jobs:
        config, path = job.split("=", 1)
        learn = make_learner(config)
        fit(learn, config, cbs=[], resume_from=path)
        done[job] = results(learn)
    torch.save(done, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
