"""Budgets in optimizer steps: `fit(steps=N, valid_every=V)` on loaders with and without a
length, its schedules, trackers, progress bar and checkpoints, and resuming at a step."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_data, make_model, same
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from learner import (
    Callback,
    CheckpointCB,
    DataLoaders,
    EarlyStoppingCB,
    GradAccumCB,
    Learner,
    ParamSchedulerCB,
    ProgressCB,
    SaveBestCB,
    accuracy,
    combined_cos,
    sched_lin,
    set_seed,
)
from learner.steps import TrainStream, budget_epochs, resumable, segment

LR = 0.1


class Stream(IterableDataset):  # type: ignore[type-arg]
    """Samples without a length: `n` per pass (None: endless), the same ones each pass."""

    def __init__(self, n: int | None = 40, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n) if self.n is not None else itertools.count():
            x = torch.randn(4, generator=g)
            yield x, (x[0] > 0).long() + (x[1] > 1).long()


def _valid() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data(12, seed=1)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def _learner(train: Any, *cbs: Any, metrics: Any = None) -> Learner:
    learn = Learner(make_model(), DataLoaders(train, _valid()), F.cross_entropy, lr=LR,
                    opt_func=torch.optim.SGD, cbs=list(cbs), metrics=metrics)  # fmt: skip
    learn.remove_cb(learn.progress)
    return learn


def _by_hand(batches: Any, n_batches: int, accum: int = 1) -> torch.nn.Module:
    """The oracle: a plain loop over the first `n_batches` of `batches`, stepping every `accum`."""
    model, it = make_model(), iter(batches)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for i in range(n_batches):
        x, y = next(it)
        (F.cross_entropy(model(x), y) / accum).backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad()
    return model


def _passes(dl: Any) -> Iterator[Any]:
    while True:
        yield from dl


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=atol, msg=k)


# -- the budget -----------------------------------------------------------------------------------


def test_budget_epochs_and_segments() -> None:
    assert budget_epochs(None, None, None) == 1 and budget_epochs(4, None, None) == 4
    assert budget_epochs(None, 300, 100) == 3 and budget_epochs(None, 301, 100) == 4
    assert budget_epochs(None, 7, None) == 1
    assert [segment(e, 250, 100) for e in range(3)] == [(0, 100), (100, 200), (200, 250)]
    with pytest.raises(ValueError, match="valid_every= counts optimizer steps"):
        budget_epochs(None, None, 10)
    with pytest.raises(ValueError, match="both n_epochs=2 and steps=5"):
        budget_epochs(2, 5, None)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            budget_epochs(None, bad, None)
    with pytest.raises(ValueError, match="valid_every must be an int >= 1"):
        budget_epochs(None, 5, 0)


def test_bad_budgets_fail_before_anything_runs() -> None:
    learn = _learner(DataLoader(Stream(), batch_size=8))
    with pytest.raises(ValueError, match="valid_every= counts optimizer steps"):
        learn.fit(valid_every=5)
    with pytest.raises(ValueError, match="steps= is a training budget"):
        learn.fit(steps=5, train=False)
    assert learn.opt is None and learn.global_step == 0


def test_a_budget_of_whole_epochs_trains_exactly_as_the_epochs() -> None:
    x, y = make_data(24)
    runs = []
    for kw in ({"n_epochs": 3}, {"steps": 9, "valid_every": 3}):
        set_seed(0)  # the loader shuffles with the global generator: each pass a new order
        dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
        learn = _learner(dl, metrics=accuracy)
        learn.fit(**kw)
        runs.append(learn)
    epochs, steps = runs
    _weights_equal(epochs.model, steps.model)
    assert epochs.recorder.losses == steps.recorder.losses
    assert [row.pop("step") for row in steps.recorder.history] == [3, 6, 9]
    assert steps.recorder.history == epochs.recorder.history
    assert epochs.global_step == steps.global_step == 9
    assert "step" not in epochs.recorder.history[0]  # a fit in epochs: today's rows


def test_a_stream_without_length_trains_for_its_budget_over_several_passes() -> None:
    dl = DataLoader(Stream(n=40), batch_size=8)  # 5 batches a pass, no len()
    with pytest.raises(TypeError):
        len(dl)
    learn = _learner(dl, metrics=accuracy)
    learn.fit(steps=12, valid_every=5)
    assert learn.global_step == learn.fit_step == 12
    assert len(learn.recorder.losses) == 12
    history = learn.recorder.history
    assert [(row["epoch"], row["step"]) for row in history] == [(0, 5), (1, 10), (2, 12)]
    assert all(row["valid_loss"] is not None and row["accuracy"] is not None for row in history)
    _weights_equal(learn.model, _by_hand(_passes(dl), 12))
    learn.fit(steps=3)  # a second fit: the global count goes on, the fit's own starts again
    assert (learn.global_step, learn.fit_step, learn.recorder.history[-1]["step"]) == (15, 3, 15)


def test_a_stream_trains_one_pass_an_epoch_without_a_budget_in_steps() -> None:
    # A DataLoader over an IterableDataset has no len(): fit(n) no longer fails on it.
    dl = DataLoader(Stream(n=24), batch_size=8)
    learn = _learner(dl)
    learn.fit(2)
    assert len(learn.recorder.losses) == 6 and learn.global_step == 6


def test_a_one_shot_iterator_that_runs_out_ends_training_and_validates() -> None:
    x, y = make_data(56)
    batches = ((x[i : i + 8], y[i : i + 8]) for i in range(0, 56, 8))  # 7 batches, once
    learn = _learner(batches)
    with pytest.warns(UserWarning, match="ran out before the step budget was spent"):
        learn.fit(steps=10, valid_every=4)
    assert learn.global_step == 7
    assert [row["step"] for row in learn.recorder.history] == [4, 7]
    assert learn.recorder.history[-1]["valid_loss"] is not None
    one_shot = _learner(iter([(x[:8], y[:8])]))
    with pytest.raises(ValueError, match=r"one-shot iterator .* budget of steps"):
        one_shot.fit(1)


def test_an_empty_pass_is_a_clear_error() -> None:
    class Empty:
        def __iter__(self) -> Iterator[Any]:
            return iter(())

    with pytest.raises(ValueError, match="yielded no batches"):
        _learner(Empty()).fit(steps=3)


def test_the_stream_restarts_a_pass_and_sets_the_samplers_epoch() -> None:
    class Sampler:
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def set_epoch(self, n: int) -> None:
            self.epochs.append(n)

    class Loader:
        sampler = Sampler()

        def __iter__(self) -> Iterator[int]:
            return iter(range(3))

    loader = Loader()
    stream = TrainStream(loader, dls=None)
    got = list(itertools.islice(stream.until(lambda: False), 8))
    assert got == [0, 1, 2, 0, 1, 2, 0, 1] and loader.sampler.epochs == [0, 1, 2]
    assert (stream.passes, stream.pass_iter) == (3, 2)


# -- accumulation, schedules, trackers ------------------------------------------------------------


def test_with_accumulation_steps_are_optimizer_steps() -> None:
    dl = DataLoader(Stream(n=40), batch_size=8)  # no len(): GradAccumCB needs none here
    learn = _learner(dl, GradAccumCB(3))
    learn.fit(steps=4, valid_every=2)
    assert learn.global_step == 4 and len(learn.recorder.losses) == 12
    assert [row["step"] for row in learn.recorder.history] == [2, 4]
    _weights_equal(learn.model, _by_hand(_passes(dl), 12, accum=3), atol=1e-6)
    with pytest.raises(TypeError, match="budget of steps"):
        _learner(dl, GradAccumCB(3)).fit(1)  # by epochs it needs len() for the last group


def test_a_schedule_runs_over_the_step_budget() -> None:
    learn = _learner(DataLoader(Stream(n=40), batch_size=8), GradAccumCB(2))
    learn.fit(steps=5, valid_every=2, cbs=[ParamSchedulerCB({"lr": sched_lin(0.5, 0.0)})])
    # Each batch trains at the lr of the steps done, both batches of a step at the same one.
    want = [0.5 * (1 - (i // 2) / 5) for i in range(10)]
    assert learn.recorder.lrs == pytest.approx(want)


def test_fit_one_cycle_over_steps() -> None:
    learn = _learner(DataLoader(Stream(n=None), batch_size=8))
    learn.fit_one_cycle(steps=20, valid_every=10, lr_max=0.2, pct_start=0.25)
    lrs = learn.recorder.lrs
    assert len(lrs) == 20 and lrs[0] == pytest.approx(0.2 / 25)
    assert max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 5
    cycle = combined_cos(0.25, 0.2 / 25, 0.2, 0.2 / 1e5)
    assert lrs == pytest.approx([cycle(i / 20) for i in range(20)])
    assert [row["step"] for row in learn.recorder.history] == [10, 20]
    with pytest.raises(ValueError, match="both n_epochs=2 and steps=5"):
        learn.fit_one_cycle(2, steps=5)


class Worsening:
    """A metric that gets worse at every validation after the second."""

    def __init__(self) -> None:
        self.calls = 0

    def reset(self) -> None:
        pass

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        pass

    def compute(self) -> float:
        self.calls += 1
        return [3.0, 1.0, 2.0, 4.0, 5.0, 6.0][min(self.calls - 1, 5)]


def test_early_stopping_and_save_best_on_step_validations(tmp_path: Path) -> None:
    best = SaveBestCB(tmp_path / "best.pt", monitor="bad")
    learn = _learner(DataLoader(Stream(n=None), batch_size=8), metrics={"bad": Worsening()})
    stop = EarlyStoppingCB("bad", patience=2)
    learn.fit(steps=30, valid_every=3, cbs=[stop, best])
    # Best at the 2nd validation (step 6); the 3rd and 4th are worse: it stops after the 4th,
    # and the history holds a row for every validation, the stopping one too.
    assert [row["step"] for row in learn.recorder.history] == [3, 6, 9, 12]
    assert [row["bad"] for row in learn.recorder.history] == [3.0, 1.0, 2.0, 4.0]
    assert learn.global_step == 12 and best.best_epoch == 1 and (tmp_path / "best.pt").exists()
    assert str(stop.reason).startswith("EarlyStoppingCB: stopped after epoch 3 (step 12)")


# -- what a user sees ------------------------------------------------------------------------------


class Totals(Callback):
    order = 55  # after ProgressCB started its bar

    def __init__(self) -> None:
        self.totals: list[Any] = []

    def before_train(self, learn: Any) -> None:
        self.totals.append(learn.progress.pbar.total)


def test_the_bar_counts_the_steps_to_the_next_validation(capsys: Any) -> None:
    learn = Learner(make_model(), DataLoaders(DataLoader(Stream(), batch_size=8), _valid()),
                    F.cross_entropy, lr=LR, metrics=accuracy,
                    cbs=[ProgressCB(bars=True, update_every=0)])  # fmt: skip
    totals = Totals()
    learn.fit(steps=12, valid_every=5, cbs=[totals, GradAccumCB(2)])
    assert totals.totals == [5, 5, 2]  # known, though the stream has no length
    out = capsys.readouterr().out
    assert "Epoch 3/3" in out
    lines = [line.split() for line in out.replace("\r", "\n").splitlines()]
    header = ["epoch", "step", "train_loss", "valid_loss", "accuracy", "samples/s", "time"]
    assert header in lines
    rows = [cells for cells in lines if len(cells) == 7 and cells[0].isdigit()]
    assert [cells[:2] for cells in rows] == [["0", "5"], ["1", "10"], ["2", "12"]]
    assert all(int(cells[5]) > 0 for cells in rows)  # samples/s


def test_lr_find_on_a_stream() -> None:
    learn = _learner(DataLoader(Stream(n=16), batch_size=8))  # 2 batches a pass
    before = copy.deepcopy(learn.model.state_dict())
    result = learn.lr_find(num_it=12, stop_factor=None)
    assert len(result.lrs) == 12 and learn.global_step == 0 and learn.opt is None
    assert same(before, learn.model.state_dict())
    with pytest.raises(ValueError, match=r"lr_find would use up dls\.train"):
        _learner(iter([])).lr_find()


def test_global_step_is_saved_and_loaded(tmp_path: Path) -> None:
    learn = _learner(DataLoader(Stream(), batch_size=8))
    learn.fit(steps=7)
    learn.save(tmp_path / "m.pt")
    other = _learner(DataLoader(Stream(), batch_size=8))
    other.load(tmp_path / "m.pt")
    assert other.global_step == 7
    other.load(tmp_path / "m.pt", with_opt=False)  # the weights alone: the count is the optimizer's
    assert other.global_step == 7


# -- checkpoints every N steps, and resuming at a step ---------------------------------------------


class FailAt(Callback):
    """Fails the run at the batch after optimizer step `step` (a crash mid-run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def before_batch(self, learn: Any) -> None:
        if learn.training and learn.fit_step == self.step:
            raise RuntimeError("crash")


def _loader(kind: str) -> Any:
    x, y = make_data(40)
    ds = TensorDataset(x, y)
    if kind == "map":  # shuffled with the global generator, reshuffled each pass
        return DataLoader(ds, batch_size=8, shuffle=True)
    if kind == "stateful":
        stateful = pytest.importorskip(
            "torchdata.stateful_dataloader", reason="torchdata's StatefulDataLoader"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchdata's own deprecation of set_vital
            return stateful.StatefulDataLoader(ds, batch_size=8, shuffle=True)
    return DataLoader(Stream(n=None), batch_size=8)


def _run(kind: str, *cbs: Any, accum: bool = False, **fit: Any) -> Learner:
    set_seed(0)
    learn = _learner(_loader(kind), *([GradAccumCB(2)] if accum else []), metrics=accuracy)
    sched = ParamSchedulerCB({"lr": sched_lin(LR, LR / 10)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital")
        learn.fit(steps=13, valid_every=5, cbs=[sched, *cbs], **fit)
    return learn


@pytest.mark.parametrize(("kind", "accum"), [("map", True), ("stateful", False)])
def test_a_step_budget_resumes_exactly_mid_pass(tmp_path: Path, kind: str, accum: bool) -> None:
    full = _run(kind, accum=accum)
    ckpt = CheckpointCB(tmp_path / "ck.pt", every_n_steps=3)
    with pytest.raises(RuntimeError, match="crash"):
        _run(kind, ckpt, FailAt(7), accum=accum)
    # Written at steps 3, 5 (a validation), 6: the last one mid-pass (5 batches a pass, 8 bytes
    # a batch: step 6 is batch 2 of pass 2 without accumulation, batch 2 of pass 3 with it).
    assert ckpt.written[-1] == (1, 1 + accum)
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)["progress"]
    assert (saved["step"], saved["global_step"], saved["n_steps"]) == (6, 6, 13)
    assert saved["stream"]["pass_iter"] == (2 if accum else 1)
    resumed = _run(kind, accum=accum, resume_from=tmp_path / "ck.pt")
    _weights_equal(resumed.model, full.model)
    assert resumed.recorder.losses == full.recorder.losses
    assert resumed.recorder.history == full.recorder.history
    assert resumed.global_step == 13


def test_a_stream_resumes_where_it_now_is_with_one_warning(tmp_path: Path) -> None:
    ckpt = CheckpointCB(tmp_path / "ck.pt", every_n_steps=4)
    with pytest.raises(RuntimeError, match="crash"):
        _run("stream", ckpt, FailAt(9))
    with pytest.warns(UserWarning, match="Resuming mid-stream") as record:
        resumed = _run("stream", resume_from=tmp_path / "ck.pt")
    assert sum("mid-stream" in str(w.message) for w in record) == 1
    assert resumed.global_step == 13 and len(resumed.recorder.losses) == 13
    assert [row["step"] for row in resumed.recorder.history] == [5, 10, 13]


def test_a_resume_must_keep_the_saved_budgets_kind(tmp_path: Path) -> None:
    _run("map", CheckpointCB(tmp_path / "ck.pt"))
    learn = _learner(_loader("map"))
    with pytest.raises(ValueError, match="budgeted in steps"):
        learn.fit(3, resume_from=tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="validated every 5 steps"):
        learn.fit(steps=13, valid_every=4, resume_from=tmp_path / "ck.pt")
    assert learn.opt is None or learn.global_step == 0


def test_resumable_kinds() -> None:
    x, y = make_data(8)
    assert resumable(DataLoader(TensorDataset(x, y), batch_size=4)) == "replay"
    assert resumable([(x, y)]) == "replay"
    assert resumable(DataLoader(Stream(), batch_size=4)) == "none"
    assert resumable(iter([(x, y)])) == "none"
    assert resumable(_loader("stateful")) == "state"
