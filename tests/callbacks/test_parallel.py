"""DistributedCB and learner.distributed: sharding in one process, then real 2-process runs
under torchrun (gloo, CPU) compared with single-process runs on the same global batches."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed_script as ds
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import make_data
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from learner import (
    Callback,
    CSVLoggerCB,
    DistributedCB,
    EarlyStoppingCB,
    Learner,
    ProgressCB,
    TensorLoader,
    TensorLoaderShard,
    TerminateOnNaNCB,
)
from learner.callbacks import default_callbacks
from learner.data import DataLoaders
from learner.distributed import (
    all_reduce_sum,
    is_main_process,
    rank,
    ranks_where,
    torchrun_env,
    unwrap_model,
    world_size,
)
from learner.sharding import shard_loader

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)
SCRIPT = Path(__file__).parent.parent / "distributed_script.py"
ROOT = Path(__file__).parent.parent.parent
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


# -- helpers without a process group -------------------------------------------------------------


def test_helpers_in_a_plain_process() -> None:
    assert (rank(), world_size(), is_main_process(), torchrun_env()) == (0, 1, True, False)
    t = torch.tensor([1.5, 2.0])
    assert all_reduce_sum(t) is t
    assert ranks_where(True) == [0] and ranks_where(False) == []


def test_helpers_read_torchrun_env_before_the_group_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (rank(), world_size(), is_main_process()) == (3, 4, False)
    assert not torchrun_env()  # no LOCAL_RANK
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not torchrun_env()


def test_default_callbacks_add_distributed_cb_under_torchrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not any(isinstance(cb, DistributedCB) for cb in default_callbacks())
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert isinstance(default_callbacks()[-1], DistributedCB)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to distribute
    assert not any(isinstance(cb, DistributedCB) for cb in default_callbacks())


def test_unwrap_model() -> None:
    model = nn.Linear(2, 2)
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(model)) is model
    assert unwrap_model(torch.compile(model)) is model


# -- sharding -------------------------------------------------------------------------------------


def _rows(batches: Any) -> list[list[int]]:
    return [sorted(yb.tolist()) for _, yb in batches]


@pytest.mark.parametrize("n", [35, 36, 37])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_tensor_shards_together_make_the_global_batches(
    n: int, drop_last: bool, world: int
) -> None:
    x, y = torch.zeros(n, 1), torch.arange(n)
    bs, g = 4, lambda: torch.Generator().manual_seed(5)
    whole = TensorLoader(x, y, bs=world * bs, shuffle=True, drop_last=drop_last, generator=g())
    shards = [
        TensorLoaderShard(
            TensorLoader(x, y, bs=bs, shuffle=True, drop_last=drop_last, generator=g()), r, world
        )
        for r in range(world)
    ]
    for _ in range(2):  # two epochs: the random streams stay in step
        per_rank = [_rows(s) for s in shards]
        assert all(len(rows) == len(s) for rows, s in zip(per_rank, shards))
        assert len({len(rows) for rows in per_rank}) == 1  # DDP needs as many batches on each
        pad = math.ceil(n / world) * world - n if not drop_last else 0
        expected = _rows(whole)
        for k, want in enumerate(expected):
            got = sorted(i for rows in per_rank for i in rows[k])
            if k < len(expected) - 1 or not pad:
                assert got == want
            else:  # the padding repeats samples from the start of the epoch, as DistributedSampler
                extra = list((Counter(got) - Counter(want)).elements())
                assert len(got) == len(want) + pad and len(extra) == pad
                assert set(extra) <= set(expected[0])


def test_shards_of_fewer_samples_than_ranks() -> None:
    x, y = torch.zeros(3, 1), torch.arange(3)
    padded = [_rows(TensorLoaderShard(TensorLoader(x, y, bs=4), r, 4)) for r in range(4)]
    assert padded == [[[0]], [[1]], [[2]], [[0]]]
    dropped = TensorLoaderShard(TensorLoader(x, y, bs=4, drop_last=True), 0, 4)
    assert len(dropped) == 0 and list(dropped) == []


@pytest.mark.parametrize("n", [13, 14, 1])
def test_validation_shards_hold_every_sample_once(n: int) -> None:
    x, y = torch.zeros(n, 1), torch.arange(n)
    tensors = [_rows(TensorLoaderShard(TensorLoader(x, y, bs=3), r, 2, pad=False)) for r in (0, 1)]
    loaders = [
        _rows(shard_loader(DataLoader(TensorDataset(x, y), 3), r, 2, pad=False)) for r in (0, 1)
    ]
    for per_rank in (tensors, loaders):
        assert sorted(i for rows in per_rank for row in rows for i in row) == list(range(n))


def test_dataloader_training_shards_use_distributed_sampler() -> None:
    x, y = make_data(10)
    dl = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True, num_workers=0)
    shards = [shard_loader(dl, r, 2, pad=True) for r in (0, 1)]
    assert all(isinstance(s.sampler, torch.utils.data.DistributedSampler) for s in shards)
    assert all(s.sampler.shuffle and s.batch_size == 2 for s in shards)
    assert shard_loader(shards[0], 0, 2, pad=True) is shards[0]  # already sharded: left alone


class _Stream(IterableDataset[Any]):
    def __iter__(self) -> Iterator[Any]:
        return iter([])


@pytest.mark.parametrize(
    "dl, match",
    [
        ([(torch.zeros(1), torch.zeros(1))], "shard=False"),
        (DataLoader(_Stream(), batch_size=2), "IterableDataset"),
        (DataLoader(TensorDataset(torch.zeros(4)), batch_size=None), "batch_size"),
    ],
)
def test_unshardable_loaders_are_a_clear_error(dl: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shard_loader(dl, 0, 2, pad=True)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="backend"):
        DistributedCB(backend=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timedelta"):
        DistributedCB(timeout=30)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        TensorLoaderShard(TensorLoader(torch.zeros(2)), 2, 2)


def test_no_process_group_and_no_torchrun_is_a_clear_error(tiny: dict[str, Any]) -> None:
    learn = Learner(**tiny, cbs=[DistributedCB(shard=False)])
    with pytest.raises(RuntimeError, match="torchrun"):
        learn.fit(1)
    assert learn.model is tiny["model"]


# -- one process with a real process group --------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_gloo
def test_group_made_by_the_learner_is_destroyed_a_users_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y, xv, yv = ds.problem()
    dls = DataLoaders.from_tensors(x, y, xv, yv, bs=4)
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    model = ds.model()
    seen: list[Any] = []
    learn = Learner(model, dls, F.cross_entropy, cbs=[DistributedCB()])
    learn.fit(1, cbs=[_ModelSpy(seen)])
    assert not dist.is_initialized()
    assert learn.model is model and learn.dls is dls
    # DDP only while training; validation and everything else see the user's model.
    assert seen == [("train", True), ("validate", False), ("epoch", False)]

    dist.init_process_group("gloo")
    try:
        learn.fit(1)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


class _ModelSpy(Callback):
    order = 0

    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    def after_train(self, learn: Learner) -> None:
        self.seen.append(("train", isinstance(learn.model, nn.parallel.DistributedDataParallel)))

    def after_validate(self, learn: Learner) -> None:
        self.seen.append(("validate", isinstance(learn.model, nn.parallel.DistributedDataParallel)))

    def after_epoch(self, learn: Learner) -> None:
        self.seen.append(("epoch", isinstance(learn.model, nn.parallel.DistributedDataParallel)))


# -- two processes under torchrun ---------------------------------------------------------------


def _torchrun(out: Path, case: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), str(out), case]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _launch(factory: pytest.TempPathFactory, case: str, prepare: Any = None) -> Path:
    """Run CASE of the script on two processes into a new folder (after `prepare(folder)`), and
    return the folder; skipped without torcheval or gloo."""
    pytest.importorskip("torcheval", reason="the two-process runs use a torcheval metric")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out = factory.mktemp(case)
    if prepare is not None:
        prepare(out)
    proc = _torchrun(out, case, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _per_rank(out: Path, *names: str) -> dict[str, list[dict[str, Any]]]:
    """What each rank saved as `<name>_rank<r>.pt`, by name."""
    return {
        n: [torch.load(out / f"{n}_rank{r}.pt", weights_only=False) for r in (0, 1)] for n in names
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return _per_rank(_launch(tmp_path_factory, "train"), "tensors", "dataloader", "nan", "signal")


def _oracle(dls: Any, epochs: tuple[int, ...] = (ds.EPOCHS,), **kw: Any) -> Learner:
    kw = {"loss_func": F.cross_entropy, "metrics": ds.metrics(), **kw}
    learn = Learner(ds.model(), dls, lr=ds.LR, opt_func=torch.optim.SGD, **kw)
    learn.remove_cb(learn.progress)
    for n in epochs:
        learn.fit(n)
    return learn


def _assert_matches(run: list[dict[str, Any]], oracle: Learner) -> None:
    r0, r1 = run
    for k in r0["state"]:  # DDP keeps the ranks bit-identical
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["history"] == r1["history"]  # every rank has the same (summed) history
    for k, v in oracle.model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=0, atol=1e-6)
    assert len(r0["history"]) == len(oracle.recorder.history)
    for got, want in zip(r0["history"], oracle.recorder.history):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # Per-batch losses are each rank's own; with equal shards their mean is the global batch's.
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean == pytest.approx(oracle.recorder.losses, abs=1e-6)


def test_tensor_loaders_match_one_process_on_the_global_batches(runs: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(ds.SEED)
    dls = DataLoaders.from_tensors(*ds.problem(), bs=2 * ds.BS, generator=g)
    oracle = _oracle(dls, epochs=(ds.EPOCHS - 1, 1))  # as the script: two fits
    _assert_matches(runs["tensors"], oracle)
    # The validation set has an odd size, so the ranks hold 7 and 6 samples: the accuracy is
    # still a whole number of the 13, as on one process.
    assert ds.N_VALID % 2 == 1
    acc = runs["tensors"][0]["history"][-1]["accuracy"]
    assert acc * ds.N_VALID == pytest.approx(round(acc * ds.N_VALID), abs=1e-6)


class _DistributedSamplerOrder:
    """The global batches that DistributedSampler(seed=0) shards, epoch after epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int) -> None:
        self.x, self.y, self.bs, self.epoch = x, y, bs, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        self.epoch += 1
        for idx in perm.split(self.bs):
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.bs)


def test_dataloaders_match_one_process_on_the_global_batches(runs: dict[str, Any]) -> None:
    x, y, xv, yv = ds.problem()
    assert ds.N_TRAIN % 2 == 0  # no padding, so one process sees exactly the same samples
    dls = DataLoaders(
        _DistributedSamplerOrder(x, y, 2 * ds.BS), [(xv[:5], yv[:5]), (xv[5:], yv[5:])]
    )
    _assert_matches(runs["dataloader"], _oracle(dls))


def test_a_nan_on_one_rank_stops_both_at_that_batch(runs: dict[str, Any]) -> None:
    def nan_at(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(preds, targets)
        bad = learn.training and learn.epoch == 1 and learn.iter == 2
        return loss * torch.nan if bad else loss

    g = torch.Generator().manual_seed(ds.SEED)
    dls = DataLoaders.from_tensors(*ds.problem(), bs=2 * ds.BS, generator=g)
    learn = Learner(ds.model(), dls, nan_at, lr=ds.LR, opt_func=torch.optim.SGD)
    learn.fit(ds.EPOCHS, cbs=[TerminateOnNaNCB(), ProgressCB()])
    r0, r1 = runs["nan"]
    assert (r0["epoch"], r0["batch"]) == (r1["epoch"], r1["batch"]) == (1, 2)
    assert "rank 1" in r0["reason"] and r0["reason"] == r1["reason"]
    for k, v in learn.model.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k])
        torch.testing.assert_close(r0["state"][k], v, rtol=0, atol=1e-6)
    # Both ranks stopped before the step of that batch: 5 batches of epoch 0, 2 of epoch 1.
    assert len(r0["losses"]) == len(r1["losses"]) == len(learn.recorder.losses) == 7


def test_one_ranks_signal_stops_both(runs: dict[str, Any]) -> None:
    r0, r1 = runs["signal"]
    assert len(r0["history"]) == len(r1["history"]) == 2  # of 5 epochs: stopped after epoch 1
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k])
    # The ranks' random states differ (seeded 100 + rank), yet each epoch they share out one
    # permutation: every training sample once, none on both ranks, a new order each epoch.
    everything = sorted(ds.problem()[0][:, 0].tolist())
    for seen0, seen1 in zip(r0["seen"], r1["seen"]):
        assert sorted(seen0 + seen1) == everything
    assert r0["seen"][0] != r0["seen"][1]


def test_only_rank_zero_prints_and_logs(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it; read while there is no process group
    stop = EarlyStoppingCB(patience=0, min_delta=10.0)  # stops, and says so, after epoch 1
    learn = Learner(**tiny, cbs=[CSVLoggerCB(tmp_path / "h.csv"), stop])
    learn.fit(3)
    assert capsys.readouterr().out == "" and not (tmp_path / "h.csv").exists()
    monkeypatch.setenv("RANK", "0")
    learn.fit(3)
    assert "EarlyStoppingCB" in capsys.readouterr().out and (tmp_path / "h.csv").exists()


@needs_gloo
def test_a_failing_rank_does_not_hang_the_other(tmp_path: Path) -> None:
    proc = _torchrun(tmp_path, "raise", timeout=120)  # a hang would raise TimeoutExpired
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stdout + proc.stderr


# -- FSDP2: the model sharded over two processes -------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = _launch(tmp_path_factory, "fsdp")
    saved = _per_rank(out, "fsdp", "fsdp_resumed")
    return {"out": out, "ranks": saved["fsdp"], "resumed": saved["fsdp_resumed"]}


def _fsdp_oracle(tmp_path: Path, epochs: int = ds.EPOCHS) -> Learner:
    from learner import SaveBestCB

    g = torch.Generator().manual_seed(ds.SEED)
    dls = DataLoaders.from_tensors(*ds.problem(), bs=2 * ds.BS, generator=g)
    best = SaveBestCB(tmp_path / "best.pt", "accuracy", mode="max")
    learn = ds.fsdp_learner(dls, best)
    learn.remove_cb(learn.progress)
    learn.fit(epochs)
    return learn


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_fsdp_matches_one_process_on_the_global_batches(
    fsdp_run: dict[str, Any], tmp_path: Path
) -> None:
    oracle = _fsdp_oracle(tmp_path)
    saved = _weights(fsdp_run["out"] / "fsdp_end.pt")  # gathered whole from the shards
    assert saved.keys() == oracle.model.state_dict().keys()
    for k, v in oracle.model.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-6)
    r0, r1 = fsdp_run["ranks"]
    assert r0["history"] == r1["history"]
    for got, want in zip(r0["history"], oracle.recorder.history, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean == pytest.approx(oracle.recorder.losses, abs=1e-6)
    # GradClipCB clips by the sharded total norm, which is the whole model's
    assert r0["norms"] == r1["norms"] == pytest.approx(oracle.norms.norms, abs=1e-6)
    assert max(oracle.norms.norms) > ds.CLIP  # so clipping changed the steps
    # get_preds after fit, on every rank: the whole validation set
    preds, targets = oracle.get_preds()
    for r in (r0, r1):
        torch.testing.assert_close(r["preds"], preds, rtol=0, atol=1e-6)
        assert torch.equal(r["targets"], targets)


def test_fsdp_ranks_hold_half_of_each_parameter(fsdp_run: dict[str, Any]) -> None:
    r0, r1 = fsdp_run["ranks"]
    full = {k: v.numel() for k, v in ds.model().named_parameters()}
    assert sum(full.values()) == 67
    for name, n in full.items():  # sharded on dim 0: rank 0 takes the larger half
        rows = ds.model().get_parameter(name).shape[0]
        assert r0["local"][name] + r1["local"][name] == n
        assert r0["local"][name] == math.ceil(rows / 2) * n // rows
    assert (sum(r0["local"].values()), sum(r1["local"].values())) == (38, 29)


def test_an_fsdp_checkpoint_loads_into_a_plain_model_with_its_optimizer(
    fsdp_run: dict[str, Any], tmp_path: Path
) -> None:
    oracle = _fsdp_oracle(tmp_path)
    path = fsdp_run["out"] / "fsdp_end.pt"
    plain = ds.model()
    plain.load_state_dict(_weights(path))  # a plain state_dict: no DTensor, no prefix
    learn = ds.fsdp_learner(DataLoaders.from_tensors(*ds.problem(), bs=8))
    learn.load(path)
    for k, v in oracle.model.state_dict().items():
        torch.testing.assert_close(learn.model.state_dict()[k], v, rtol=0, atol=1e-6)
    mine, theirs = learn.opt.state_dict(), oracle.opt.state_dict()
    for got, want in zip(mine["param_groups"], theirs["param_groups"], strict=True):
        assert got["lr"] == pytest.approx(want["lr"])  # where the schedule left it
        assert {**got, "lr": 0} == {**want, "lr": 0}
    for i, state in theirs["state"].items():  # AdamW's moments, whole, numbered as a plain run's
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(mine["state"][i][key], state[key], rtol=1e-5, atol=1e-7)


def test_save_best_under_fsdp_writes_the_whole_best_weights_once(
    fsdp_run: dict[str, Any], tmp_path: Path
) -> None:
    oracle = _fsdp_oracle(tmp_path)
    r0, r1 = fsdp_run["ranks"]
    assert r0["best_epoch"] == r1["best_epoch"] == oracle.save_best.best_epoch
    saved = torch.load(fsdp_run["out"] / "fsdp_best.pt", weights_only=True)
    want = torch.load(tmp_path / "best.pt", weights_only=True)
    for k, v in want.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-6)


def test_an_fsdp_run_resumes_mid_epoch_exactly(fsdp_run: dict[str, Any]) -> None:
    # A new learner resumed from the checkpoint after batch 7 (epoch 1, batch 2): the same
    # weights bit for bit, and the same history (epoch 1's training metrics accumulated on both
    # sides of the checkpoint, on each rank: every rank's accumulators were saved).
    out = fsdp_run["out"]
    assert fsdp_run["ranks"][0]["written"] == [(1, 0), (1, 2), (2, 0), (2, 4), (3, 0)]
    assert torch.load(out / "fsdp_ck.3.pt", weights_only=True)["progress"]["iter"] == 2
    end, resumed = _weights(out / "fsdp_end.pt"), _weights(out / "fsdp_resumed.pt")
    for k in end:
        assert torch.equal(end[k], resumed[k]), k
    for r in (0, 1):
        assert fsdp_run["resumed"][r]["history"] == fsdp_run["ranks"][r]["history"]
        assert fsdp_run["resumed"][r]["losses"] == fsdp_run["ranks"][r]["losses"]


def test_resuming_with_another_number_of_processes(
    fsdp_run: dict[str, Any], tmp_path: Path
) -> None:
    out = fsdp_run["out"]
    g = torch.Generator().manual_seed(ds.SEED)
    learn = ds.fsdp_learner(DataLoaders.from_tensors(*ds.problem(), bs=2 * ds.BS, generator=g))
    learn.remove_cb(learn.progress)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    # Mid-epoch: refused before anything changes, saying how to resume.
    with pytest.raises(ValueError, match=r"by 2 process\(es\), and this run has 1.*epoch"):
        learn.fit(ds.EPOCHS, resume_from=out / "fsdp_ck.3.pt")
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())
    assert learn.opt is None
    # At an epoch boundary (the end of epoch 1): the weights, AdamW's moments, the schedule's
    # position, the epoch and the data order go on, in one process, as in the two.
    # DistributedCB's state (the shuffle's epoch count for DistributedSamplers) is the one
    # thing a single process has no use for: said, not hidden.
    with pytest.warns(UserWarning, match="callbacks this learner lacks: distributed, save_best"):
        learn.fit(ds.EPOCHS, resume_from=out / "fsdp_ck.2.pt")
    end = _weights(out / "fsdp_end.pt")
    for k, v in learn.model.state_dict().items():
        torch.testing.assert_close(v, end[k], rtol=0, atol=1e-6)
    assert learn.recorder.history[-1] == pytest.approx(fsdp_run["ranks"][0]["history"][-1])
    assert len(learn.recorder.history) == ds.EPOCHS


# -- the DDP gaps, and FSDP with accumulation and uneven validation shards ---------------------


@pytest.fixture(scope="module")
def gaps_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from learner import CheckpointCB

    def single_process_checkpoints(out: Path) -> None:
        # One process' checkpoints, at the end of epoch 0 and after batch 2, for the two
        # processes to resume.
        for cb in (
            CheckpointCB(out / "single.pt"),
            CheckpointCB(out / "single_mid.pt", every_n_batches=2, every_n_epochs=None),
        ):
            _sgd_oracle(ds.gaps_dls(2 * ds.BS), cb, epochs=1)

    out = _launch(tmp_path_factory, "gaps", single_process_checkpoints)
    names = ("accum_nosync", "accum_sync", "fsdp_accum", "fsdp_uneven", "lr_find", "best",
             "dropout", "dropout_resumed", "fsdp_lr_find", "fsdp_autocast", "fsdp_fp16",
             "fsdp_mp_policy", "inf", "from_single")  # fmt: skip
    return {"out": out, **_per_rank(out, *names)}


def _sgd_oracle(dls: Any, *cbs: Any, epochs: int = ds.EPOCHS, net: Any = None) -> Learner:
    learn = Learner(net or ds.model(), dls, F.cross_entropy, lr=ds.LR,
                    opt_func=torch.optim.SGD, metrics=ds.metrics(), cbs=list(cbs))  # fmt: skip
    learn.remove_cb(learn.progress)
    learn.fit(epochs)
    return learn


def _rows_close(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-6)


def _close_to(state: dict[str, torch.Tensor], model: nn.Module, atol: float = 1e-6) -> None:
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=atol)


def test_grad_accum_under_ddp_all_reduces_once_per_step(gaps_run: dict[str, Any]) -> None:
    from learner import GradAccumCB

    # 5 batches an epoch in groups of 2, 2, 1: 3 steps, so 3 all-reduces (one bucket) an epoch
    # instead of 5, and the same gradients: as each other and as one process on global batches.
    assert [r["all_reduces"] for r in gaps_run["accum_nosync"]] == [3 * ds.EPOCHS] * 2
    assert [r["all_reduces"] for r in gaps_run["accum_sync"]] == [5 * ds.EPOCHS] * 2
    oracle = _sgd_oracle(ds.gaps_dls(2 * ds.BS), GradAccumCB(2))
    for run in ("accum_nosync", "accum_sync"):
        r0, r1 = gaps_run[run]
        assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
        _close_to(r0["state"], oracle.model)
        _rows_close(r0["history"], oracle.recorder.history)


def test_grad_accum_under_fsdp_matches_one_process(gaps_run: dict[str, Any]) -> None:
    from learner import GradAccumCB

    oracle = _sgd_oracle(ds.gaps_dls(2 * ds.BS), GradAccumCB(2))
    _close_to(gaps_run["fsdp_accum"][0]["state"], oracle.model)
    _rows_close(gaps_run["fsdp_accum"][0]["history"], oracle.recorder.history)


def test_fsdp_validation_shards_of_unequal_batches_count_every_sample_once(
    gaps_run: dict[str, Any],
) -> None:
    r0, r1 = gaps_run["fsdp_uneven"]
    assert (r0["valid_batches"], r1["valid_batches"]) == (2, 1)  # and yet no rank waited forever
    oracle = _sgd_oracle(ds.gaps_dls(2 * ds.BS, uneven=True), epochs=2)
    _close_to(r0["state"], oracle.model)
    assert r0["history"] == r1["history"]
    _rows_close(r0["history"], oracle.recorder.history)
    assert r0["history"][-1]["accuracy"] * ds.N_UNEVEN == pytest.approx(
        round(r0["history"][-1]["accuracy"] * ds.N_UNEVEN), abs=1e-5
    )


def test_lr_find_under_ddp_is_sharded_and_agrees_on_every_rank(gaps_run: dict[str, Any]) -> None:
    r0, r1 = gaps_run["lr_find"]
    assert r0["lr_losses"] == r1["lr_losses"] and r0["suggestion"] == r1["suggestion"]
    g = torch.Generator().manual_seed(ds.SEED)
    dls = DataLoaders.from_tensors(*ds.problem(), bs=2 * ds.BS, generator=g)
    learn = Learner(ds.model(), dls, F.cross_entropy, lr=ds.LR, opt_func=torch.optim.SGD)
    result = learn.lr_find(num_it=12, stop_factor=None)
    assert r0["lrs"] == result.lrs
    assert r0["lr_losses"] == pytest.approx(result.losses, abs=1e-6)  # the global batches' losses
    assert r0["suggestion"] == pytest.approx(result.suggestion)
    # and it left no trace: the fit after it is the plain run's
    assert r0["history"] == []


def test_save_best_under_ddp_writes_on_rank_zero_only(
    gaps_run: dict[str, Any], tmp_path: Path
) -> None:
    from learner import SaveBestCB

    r0, r1 = gaps_run["best"]
    assert r0["writes"] > 0 and r1["writes"] == 0
    best = SaveBestCB(tmp_path / "best.pt", "valid_loss", load_best=True)
    oracle = _sgd_oracle(ds.gaps_dls(2 * ds.BS), best)
    assert r0["best_epoch"] == r1["best_epoch"] == best.best_epoch
    for r in (r0, r1):  # load_best: rank 0 read the file, and handed the weights on
        _close_to(r["state"], oracle.model)
    saved = torch.load(gaps_run["out"] / "best.pt", weights_only=True)
    _close_to(saved, oracle.model)


def test_a_ddp_run_with_per_rank_randomness_resumes_mid_epoch_exactly(
    gaps_run: dict[str, Any],
) -> None:
    # Dropout draws each rank's own masks (seeded 100 + rank); the checkpoint after batch 7
    # holds each rank's random states and metric accumulators, so the resumed run is the same.
    for r in (0, 1):
        run, resumed = gaps_run["dropout"][r], gaps_run["dropout_resumed"][r]
        assert run["written"] == [(1, 0), (1, 2), (2, 0), (2, 4), (3, 0)]
        assert all(torch.equal(run["state"][k], resumed["state"][k]) for k in run["state"])
        assert resumed["history"] == run["history"] and resumed["losses"] == run["losses"]
    ckpt = torch.load(gaps_run["out"] / "dropout_ck.1.pt", weights_only=True)
    assert ckpt["progress"]["iter"] == 4 and ckpt["ranks"]["world_size"] == 2
    rng0, rng1 = ckpt["rng"]["torch"], ckpt["ranks"]["states"][0]["rng"]["torch"]
    assert not torch.equal(rng0, rng1)  # each rank's own


# -- FSDP and the gradient sync flag, in one process ----------------------------------------------


def test_fsdp_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match='"ddp" or "fsdp"'):
        DistributedCB(strategy="zero3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='for strategy="fsdp"'):
        DistributedCB(policy=nn.Linear)
    with pytest.raises(ValueError, match="fsdp_kwargs"):
        DistributedCB(strategy="fsdp", ddp_kwargs={"find_unused_parameters": True})
    from learner.fsdp import sharded_blocks

    with pytest.raises(TypeError, match="module type"):
        sharded_blocks(nn.Linear(2, 2), policy="Linear")  # type: ignore[arg-type]


def test_fsdp_refuses_a_wrapped_model(tiny: dict[str, Any]) -> None:
    learn = Learner(**{**tiny, "model": nn.DataParallel(tiny["model"])},
                    cbs=[DistributedCB(strategy="fsdp")])  # fmt: skip
    with pytest.raises(ValueError, match="shards the plain model"):
        learn.fit(1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        self.out = nn.Linear(2, 2)


def test_sharded_blocks_follow_the_policy() -> None:
    from learner.fsdp import is_sharded, sharded_blocks

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), _Block(), _Block(), nn.LayerNorm(2))
    # default: each child with parameters
    assert sharded_blocks(model) == [model[0], model[2], model[3], model[4]]
    assert sharded_blocks(model, _Block) == [model[2], model[3]]
    # inner blocks before the blocks holding them, as fully_shard needs
    linears = sharded_blocks(model, (nn.Linear, nn.Sequential))
    assert linears.index(model[2].inner[0]) < linears.index(model[2].inner)
    assert model not in linears  # the root is sharded last, by shard_model
    big = sharded_blocks(model, lambda m: sum(p.numel() for p in m.parameters()) > 6)
    assert big == [model[2], model[3]]
    assert not is_sharded(model)


def test_grad_accum_clears_grad_sync_for_the_batches_that_do_not_step(
    tiny: dict[str, Any],
) -> None:
    from learner import GradAccumCB

    seen: list[tuple[bool, bool]] = []

    class SpyCB(Callback):
        order = 6  # after GradAccumCB set it

        def before_batch(self, learn: Learner) -> None:
            if learn.training:
                seen.append((learn.iter, learn.grad_sync))

        def after_step(self, learn: Learner) -> None:
            assert learn.grad_sync  # only a synchronised batch steps

    dls = DataLoaders.from_tensors(*make_data(40), bs=4)  # 10 batches: groups of 3, 3, 3, 1
    learn = Learner(**{**tiny, "dls": dls}, cbs=[GradAccumCB(3), SpyCB()])
    n = len(learn.dls.train)
    assert n == 10
    learn.fit(1)
    steps = {i for i in range(n) if (i + 1) % 3 == 0 or i == n - 1}
    assert seen == [(i, i in steps) for i in range(n)]
    assert learn.grad_sync  # True again after the phase


def test_lr_find_under_fsdp_agrees_with_one_process_and_leaves_no_trace(
    gaps_run: dict[str, Any],
) -> None:
    r0, r1 = gaps_run["fsdp_lr_find"]
    assert r0["lr_losses"] == r1["lr_losses"]
    learn = Learner(ds.model(), ds.gaps_dls(2 * ds.BS), F.cross_entropy, lr=ds.LR,
                    opt_func=torch.optim.SGD, metrics=ds.metrics())  # fmt: skip
    learn.remove_cb(learn.progress)
    result = learn.lr_find(num_it=12, stop_factor=None)
    assert r0["lr_losses"] == pytest.approx(result.losses, abs=1e-6)
    learn.fit(1)  # the fit after the sweep is the plain fit's: the sweep put everything back
    _close_to(r0["state"], learn.model)
    _rows_close(r0["history"], learn.recorder.history)


def test_mixed_precision_under_fsdp(gaps_run: dict[str, Any]) -> None:
    from learner import MixedPrecisionCB

    # bfloat16 autocast on the CPU: the same rounding on each sample's rows, so close to one
    # process; FSDP's own policy (bfloat16 parameters) differs from float32 by bfloat16's 3 digits.
    amp = _sgd_oracle(ds.gaps_dls(2 * ds.BS), MixedPrecisionCB(), epochs=2)
    _close_to(gaps_run["fsdp_autocast"][0]["state"], amp.model, atol=1e-3)
    plain = _sgd_oracle(ds.gaps_dls(2 * ds.BS), epochs=2)
    _close_to(gaps_run["fsdp_mp_policy"][0]["state"], plain.model, atol=2e-2)
    for run in ("fsdp_autocast", "fsdp_mp_policy"):
        r0, r1 = gaps_run[run]
        assert r0["history"] == r1["history"]
        assert r0["history"][-1]["valid_loss"] == pytest.approx(
            plain.recorder.history[-1]["valid_loss"], abs=2e-2
        )


def test_float16_with_a_grad_scaler_under_fsdp(gaps_run: dict[str, Any]) -> None:
    from learner import MixedPrecisionCB

    oracle = _sgd_oracle(ds.gaps_dls(2 * ds.BS), MixedPrecisionCB(torch.float16, scaler=True),
                         epochs=2)  # fmt: skip
    r0, r1 = gaps_run["fsdp_fp16"]
    _close_to(r0["state"], oracle.model, atol=1e-3)
    assert r0["history"] == r1["history"] and r0["scale"] == r1["scale"]
    assert r0["n_skipped"] == r1["n_skipped"] == oracle.mixed_precision.n_skipped
    # An inf in rank 0's shard alone: both ranks skip the step and halve the scale together
    # (DTensor all-reduces the GradScaler's inf check over the shards).
    assert [r["stepped"] for r in gaps_run["inf"]] == [False, False]
    assert [r["scale"] for r in gaps_run["inf"]] == [2.0**7] * 2


def test_a_one_process_checkpoint_resumes_on_two_at_an_epoch_boundary(
    gaps_run: dict[str, Any],
) -> None:
    # Written by one process (bs 8) after epoch 0, resumed by two (bs 4 each): the same global
    # batches, so the same run as one process's, within float tolerance.
    oracle = _sgd_oracle(ds.gaps_dls(2 * ds.BS))
    for r in gaps_run["from_single"]:
        _close_to(r["state"], oracle.model)
        _rows_close(r["history"], oracle.recorder.history)
        # after batch 2 of epoch 0: refused on both ranks, before anything changed
        assert "by 1 process(es), and this run has 2" in r["refused"]
        assert "epoch" in r["refused"] and r["unchanged"]


# -- a budget in steps on ranks whose loaders differ in length --------------------------------


def test_a_step_budget_stops_and_validates_on_the_same_step_on_every_rank(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    out = _launch(tmp_path_factory, "steps")
    runs = _per_rank(out, "steps_ddp", "steps_fsdp")
    # One process on the global batches: step i sees rank 0's batch i % 3 and rank 1's i % 5.
    r0, r1 = ds.steps_batches(0), ds.steps_batches(1)
    glob = [tuple(torch.cat([a, b]) for a, b in zip(r0[i % 3], r1[i % 5])) for i in range(ds.STEPS)]
    _, _, xv, yv = ds.problem()
    oracle = Learner(ds.model(), DataLoaders(glob, [(xv, yv)]), F.cross_entropy, lr=ds.LR,
                     opt_func=torch.optim.SGD)  # fmt: skip
    oracle.remove_cb(oracle.progress)
    oracle.fit(steps=ds.STEPS, valid_every=ds.VALID_EVERY)
    for name in ("steps_ddp", "steps_fsdp"):
        for run in runs[name]:
            assert run["global_step"] == ds.STEPS and run["batches"] == ds.STEPS
            assert run["validated"] == [4, 8, 11]
            assert [row["step"] for row in run["history"]] == [4, 8, 11]
            _rows_close(run["history"], oracle.recorder.history)
        _close_to(runs[name][0]["state"], oracle.model)
