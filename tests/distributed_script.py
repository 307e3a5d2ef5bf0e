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
CASE "fsdp": `DistributedCB(strategy="fsdp")` (see `fsdp()`); CASE "gaps": what DDP lacked
before (see `gaps()`); CASE "steps": a budget in steps on ranks of unequal loaders (`steps()`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from learner import Callback

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


def save_run(out: Path, name: str, learn: Any, **extra: Any) -> None:
    """What the tests compare, as OUT/<name>_rank<r>.pt: the weights (of a sharded model
    gathered whole, on rank 0), the history, the per-batch losses, and `extra`."""
    from learner.distributed import rank
    from learner.fsdp import full_model_state, is_sharded

    if is_sharded(learn.model):
        state = full_model_state(learn.model)  # not DTensors
    else:
        state = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    record = {"history": learn.recorder.history, "losses": learn.recorder.losses}
    torch.save({"state": state, **record, **extra}, out / f"{name}_rank{rank()}.pt")


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

    save = functools.partial(save_run, out)

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


FSDP_LR, CLIP = 0.02, 0.5


def fsdp_learner(dls: Any, *cbs: Any) -> Any:
    """The FSDP runs' learner (and, without a DistributedCB, their one-process oracle's):
    AdamW, a cosine schedule, clipping; the model as `model()`, sharded in two blocks."""
    from learner import GradClipCB, Learner, ParamSchedulerCB
    from learner.callbacks.schedule import sched_cos

    lr = ParamSchedulerCB({"lr": sched_cos(FSDP_LR, FSDP_LR / 10)})
    return Learner(model(), dls, F.cross_entropy, lr=FSDP_LR, metrics=metrics(),
                   cbs=[lr, GradClipCB(CLIP), NormsCB(), *cbs])  # fmt: skip


class NormsCB(Callback):
    """The total gradient norm GradClipCB saw at each step."""

    order = 20

    def __init__(self) -> None:
        self.norms: list[float] = []

    def before_fit(self, learn: Any) -> None:
        self.norms = []

    def before_step(self, learn: Any) -> None:
        self.norms.append(float(learn.grad_clip.total_norm))


def fsdp(out: Path) -> None:
    """2 ranks, the model sharded (FSDP2), on the same global batches as one process with
    `bs=2 * BS`: an uninterrupted run writing checkpoints at and between epoch ends, then a new
    learner resuming mid-epoch from one of them; the shards' sizes, `get_preds` after fit."""
    import torch.distributed as dist

    from learner import CheckpointCB, DistributedCB, SaveBestCB
    from learner.data import DataLoaders
    from learner.distributed import rank

    r = rank()

    def dls() -> Any:
        g = torch.Generator().manual_seed(SEED)
        return DataLoaders.from_tensors(*problem(), bs=BS, generator=g)

    ckpt = CheckpointCB(out / "fsdp_ck.pt", every_n_batches=7, keep_last=5)
    best = SaveBestCB(out / "fsdp_best.pt", "accuracy", mode="max")
    learn = fsdp_learner(dls(), DistributedCB(strategy="fsdp"), ckpt, best)
    model_before = learn.model
    learn.fit(EPOCHS)
    assert learn.model is model_before and dist.is_initialized()  # sharded in place; group kept
    local = {n: p.to_local().numel() for n, p in learn.model.named_parameters()}
    preds, targets = learn.get_preds()  # every rank, the whole validation set
    learn.save(out / "fsdp_end.pt")
    torch.save({"history": learn.recorder.history, "losses": learn.recorder.losses,
                "norms": learn.norms.norms, "local": local, "written": ckpt.written,
                "preds": preds, "targets": targets, "best_epoch": best.best_epoch},
               out / f"fsdp_rank{r}.pt")  # fmt: skip

    # Resumed mid-epoch (after batch 7: epoch 1, batch 2) by a new learner, in this process.
    best = SaveBestCB(out / "fsdp_best.pt", "accuracy", mode="max")
    again = fsdp_learner(dls(), DistributedCB(strategy="fsdp"), best)
    again.fit(EPOCHS, resume_from=out / "fsdp_ck.3.pt")
    again.save(out / "fsdp_resumed.pt")
    torch.save({"history": again.recorder.history, "losses": again.recorder.losses},
               out / f"fsdp_resumed_rank{r}.pt")  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


N_UNEVEN = 17  # validation samples in gaps(): in batches of 8, ranks hold 9 (2 batches) and 8 (1)


def dropout_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


class CountAllReducesCB(Callback):
    """Counts DDP's gradient all-reduces (one per bucket per synchronised backward)."""

    order = -14  # after DistributedCB wrapped the model

    def __init__(self) -> None:
        self.count = 0

    def before_fit(self, learn: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP refuses other annotations
            self.count += 1
            return allreduce_hook(state, bucket)

        learn.distributed.ddp.register_comm_hook(None, hook)


class AlwaysSyncCB(Callback):
    """Undoes GradAccumCB's no_sync: every batch all-reduces (the behaviour before it)."""

    order = 6

    def before_batch(self, learn: Any) -> None:
        learn.grad_sync = True


def gaps_dls(bs: int, uneven: bool = False) -> Any:
    """gaps()' loaders; `uneven`: the validation set is the first N_UNEVEN training samples."""
    from learner.data import DataLoaders

    x, y, xv, yv = problem()
    if uneven:
        xv, yv = x[:N_UNEVEN], y[:N_UNEVEN]
    g = torch.Generator().manual_seed(SEED)
    return DataLoaders.from_tensors(x, y, xv, yv, bs=bs, generator=g)


class ShardsCB(Callback):
    """The number of batches in this rank's validation shard."""

    def __init__(self) -> None:
        self.valid_batches = -1

    def before_validate(self, learn: Any) -> None:
        self.valid_batches = len(learn.dl)


def save_inf_check(out: Path, r: int) -> None:
    """An inf in rank 0's shard of one gradient only: does the GradScaler skip the step on both
    ranks, and lower the scale alike? (DTensor reduces its inf check over the shards.)"""
    from learner.fsdp import shard_model

    net = shard_model(model(), torch.device("cpu"))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y, _, _ = problem()
    scaler.scale(F.cross_entropy(net(x[:8]), y[:8])).backward()
    weight = net[0].weight
    if r == 0:
        weight.grad.to_local()[0, 0] = torch.inf  # type: ignore[union-attr]
    before = weight.to_local().clone()  # type: ignore[operator]
    scaler.step(opt)
    scaler.update()
    stepped = not torch.equal(before, weight.to_local())  # type: ignore[operator]
    torch.save({"stepped": stepped, "scale": scaler.get_scale()}, out / f"inf_rank{r}.pt")


def gaps(out: Path) -> None:
    """The DDP gaps, and FSDP with accumulation and uneven validation shards:

    - "accum_nosync"/"accum_sync": GradAccumCB(2) under DDP, all-reduces counted, with and
      without no_sync; "fsdp_accum": the same under FSDP;
    - "fsdp_uneven": FSDP with validation shards of 2 batches and 1 (a forward more, uncounted);
    - "lr_find": a sharded lr_find under DDP; "fsdp_lr_find": under FSDP, then fit(1);
    - "fsdp_autocast", "fsdp_fp16", "fsdp_mp_policy": FSDP with MixedPrecisionCB (bfloat16;
      float16 with a GradScaler), and with FSDP's own MixedPrecisionPolicy (bfloat16 parameters,
      float32 reductions); "inf": a GradScaler step with an inf in one rank's shard only;
    - "best": SaveBestCB(load_best=True) under DDP, its writes counted on each rank;
    - "dropout"/"dropout_resumed": DDP with dropout and each rank's own random state, checkpointed
      mid-epoch, and resumed from there by a new learner;
    - "from_single": one process' checkpoints (single.pt after epoch 0, single_mid.pt after
      batch 2, written by the test) resumed by two processes: the first goes on, the second is
      refused.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import learner.callbacks.tracker as tracker
    from learner import (
        CheckpointCB,
        DistributedCB,
        GradAccumCB,
        Learner,
        MixedPrecisionCB,
        SaveBestCB,
    )
    from learner.distributed import rank

    r = rank()
    dist.init_process_group("gloo")

    def dls(uneven: bool = False) -> Any:
        return gaps_dls(BS, uneven)

    save = functools.partial(save_run, out)

    def sgd_learner(data: Any, *cbs: Any, net: nn.Module | None = None) -> Any:
        return Learner(net or model(), data, F.cross_entropy, lr=LR, opt_func=torch.optim.SGD,
                       metrics=metrics(), cbs=list(cbs))  # fmt: skip

    for name, extra in (("accum_nosync", []), ("accum_sync", [AlwaysSyncCB()])):
        learn = sgd_learner(dls(), GradAccumCB(2), count := CountAllReducesCB(), *extra)
        learn.fit(EPOCHS)
        save(name, learn, all_reduces=count.count)

    learn = sgd_learner(dls(), GradAccumCB(2), DistributedCB(strategy="fsdp"))
    learn.fit(EPOCHS)
    save("fsdp_accum", learn)
    learn = sgd_learner(dls(uneven=True), DistributedCB(strategy="fsdp"), shards := ShardsCB())
    learn.fit(2)
    save("fsdp_uneven", learn, valid_batches=shards.valid_batches)

    learn = sgd_learner(dls())
    result = learn.lr_find(num_it=12, stop_factor=None)
    save("lr_find", learn, lrs=result.lrs, lr_losses=result.losses, suggestion=result.suggestion)
    # FSDP: lr_find shards the model in its side run, and puts the values back into the shards
    learn = sgd_learner(dls(), DistributedCB(strategy="fsdp"))
    result = learn.lr_find(num_it=12, stop_factor=None)
    learn.fit(1)
    save("fsdp_lr_find", learn, lrs=result.lrs, lr_losses=result.losses)

    learn = sgd_learner(dls(), DistributedCB(strategy="fsdp"), MixedPrecisionCB())
    learn.fit(2)
    save("fsdp_autocast", learn)
    learn = sgd_learner(dls(), DistributedCB(strategy="fsdp"),
                        MixedPrecisionCB(torch.float16, scaler=True))  # fmt: skip
    learn.fit(2)
    save("fsdp_fp16", learn, n_skipped=learn.mixed_precision.n_skipped,
         scale=learn.mixed_precision.scaler.get_scale())  # fmt: skip
    save_inf_check(out, r)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  output_dtype=torch.float32)  # fmt: skip
    learn = sgd_learner(dls(), DistributedCB(strategy="fsdp", fsdp_kwargs={"mp_policy": policy}))
    learn.fit(2)
    save("fsdp_mp_policy", learn)

    writes: list[Path] = []
    atomic_save = tracker.atomic_save
    tracker.atomic_save = lambda obj, path: writes.append(path) or atomic_save(obj, path)  # type: ignore[assignment]
    best = SaveBestCB(out / "best.pt", "valid_loss", load_best=True)
    learn = sgd_learner(dls(), best)
    learn.fit(EPOCHS)
    save("best", learn, writes=len(writes), best_epoch=best.best_epoch)

    ckpt = CheckpointCB(out / "dropout_ck.pt", every_n_batches=7, keep_last=2)
    learn = sgd_learner(dls(), ckpt, net=dropout_model())
    torch.manual_seed(100 + r)  # each rank its own dropout masks
    learn.fit(EPOCHS)
    save("dropout", learn, written=ckpt.written)
    torch.manual_seed(0)  # the resumed run takes each rank's saved states back
    learn = sgd_learner(dls(), net=dropout_model())
    learn.fit(EPOCHS, resume_from=out / "dropout_ck.1.pt")
    save("dropout_resumed", learn)

    # One process' checkpoints (written by the test): at an epoch boundary, two processes go on
    # with it; mid-epoch they refuse it.
    learn = sgd_learner(dls())
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    try:
        learn.fit(EPOCHS, resume_from=out / "single_mid.pt")
        refused = ""
    except ValueError as e:
        refused = str(e)
    unchanged = all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())
    learn.fit(EPOCHS, resume_from=out / "single.pt")
    save("from_single", learn, refused=refused, unchanged=unchanged)
    dist.barrier()
    dist.destroy_process_group()


STEPS, VALID_EVERY = 11, 4


def steps_batches(r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank `r`'s own training batches, a pass of unequal length on each rank: 3 on rank 0,
    5 on rank 1 (samples 0-11 and 12-31)."""
    x, y, _, _ = problem()
    first, n = (0, 3) if r == 0 else (12, 5)
    return [(x[first + i * BS : first + (i + 1) * BS], y[first + i * BS : first + (i + 1) * BS])
            for i in range(n)]  # fmt: skip


def steps(out: Path) -> None:
    """A budget in steps on 2 ranks whose loaders are their own, of unequal length
    (`DistributedCB(shard=False)`), with DDP then FSDP: `fit(steps=11, valid_every=4)` must stop,
    and validate, on the same steps on both, each rank starting its passes when its own end."""
    import torch.distributed as dist

    from learner import DistributedCB, Learner
    from learner.data import DataLoaders
    from learner.distributed import rank

    _, _, xv, yv = problem()
    for strategy in ("ddp", "fsdp"):
        seen = ValidatedAtCB()
        dls = DataLoaders(steps_batches(rank()), [(xv, yv)])
        learn = Learner(model(), dls, F.cross_entropy, lr=LR, opt_func=torch.optim.SGD,
                        cbs=[DistributedCB(shard=False, strategy=strategy), seen])  # fmt: skip
        learn.fit(steps=STEPS, valid_every=VALID_EVERY)
        save_run(out, f"steps_{strategy}", learn, global_step=learn.global_step,
                 validated=seen.steps, batches=seen.batches)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


class ValidatedAtCB(Callback):
    """The global step at each validation, and the training batches run."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.batches = 0

    def after_batch(self, learn: Any) -> None:
        self.batches += learn.training

    def after_validate(self, learn: Any) -> None:
        self.steps.append(learn.global_step)


if __name__ == "__main__":
    cases = {"fsdp": fsdp, "gaps": gaps, "steps": steps}
    if sys.argv[2] in cases:
        cases[sys.argv[2]](Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), sys.argv[2])
