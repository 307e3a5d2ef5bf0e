"""Checkpoints: what a file holds, atomic writes, weights_only loading, clear errors that change
nothing, unwrapped keys, and exact resume in a new process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_model
from resume_run import StopAt, fit, make_learner, results
from torch import nn

import learner.io
from learner import Callback, CheckpointCB, Learner

ROOT = Path(__file__).parent.parent


def _equal_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trained(tiny: dict[str, Any], epochs: int = 1) -> Learner:
    learn = Learner(**tiny)
    learn.fit(epochs)
    return learn


# -- save and load ------------------------------------------------------------------------------


def test_save_then_load_restores_weights_and_optimizer(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    tiny["opt_func"] = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)
    learn = _trained(tiny)
    learn.save(tmp_path / "ck.pt")
    other = Learner(**{**tiny, "model": make_model(seed=1)})
    other.load(tmp_path / "ck.pt")
    assert _equal_weights(other.model, learn.model)
    assert other.opt is not None and learn.opt is not None
    a, b = other.opt.state_dict(), learn.opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"])
               for i in b["state"])  # fmt: skip
    # Both go on identically.
    other.fit(1)
    learn.fit(1)
    assert _equal_weights(other.model, learn.model)


def test_load_without_opt_loads_weights_only(tiny: dict[str, Any], tmp_path: Path) -> None:
    learn = _trained(tiny)
    learn.save(tmp_path / "ck.pt")
    other = Learner(**{**tiny, "model": make_model(seed=1)})
    other.load(tmp_path / "ck.pt", with_opt=False)
    assert _equal_weights(other.model, learn.model)
    assert other.opt is None


def test_checkpoint_holds_everything_and_loads_with_weights_only(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = _trained(tiny, epochs=2)
    learn.save(tmp_path / "ck.pt")
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ckpt["format"] == "learner.checkpoint"
    assert ckpt["progress"] == {"epoch": 2, "iter": 0, "n_epochs": 2}
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch", "generators"}
    assert ckpt["callbacks"]["recorder"]["losses"] == learn.recorder.losses
    assert ckpt["callbacks"]["recorder"]["history"] == learn.recorder.history
    assert "metrics" in ckpt["callbacks"]
    assert ckpt["opt"]["param_groups"][0]["lr"] == 0.1


def test_a_failed_write_leaves_the_previous_checkpoint_intact(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    learn = _trained(tiny)
    path = tmp_path / "ck.pt"
    learn.save(path)
    saved = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1)
    real_save = torch.save

    def failing_save(obj: Any, f: Any) -> None:
        real_save(obj, f)
        f.truncate(100)  # half-written when the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(learner.io.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        learn.save(path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left
    other = Learner(**{**tiny, "model": make_model(seed=1)})
    other.load(path)
    assert all(torch.equal(other.model.state_dict()[k], v) for k, v in saved.items())


class Evil:
    def __reduce__(self) -> Any:
        return (print, ("this ran while loading",))


def test_a_pickle_with_a_custom_class_is_refused(tiny: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "learner.checkpoint", "model": Evil()}, path)
    learn = Learner(**tiny)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match="weights_only"):
        learn.load(path)
    assert all(torch.equal(learn.model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("kind", ["state_dict", "truncated", "text"])
def test_files_that_are_not_checkpoints_give_clear_errors(
    tiny: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    learn = _trained(tiny)
    path = tmp_path / "f.pt"
    if kind == "state_dict":
        torch.save(learn.model.state_dict(), path)
        match = "not a learner checkpoint.*load_state_dict"
    elif kind == "truncated":
        learn.save(path)
        path.write_bytes(path.read_bytes()[:300])
        match = "truncated"
    else:
        path.write_text("hello")
        match = "not a readable torch file|not a learner checkpoint"
    with pytest.raises(ValueError, match=match):
        learn.load(path)


def test_a_mismatched_model_is_refused_and_nothing_changes(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = _trained(tiny)
    learn.save(tmp_path / "ck.pt")
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3))
    other = Learner(**{**tiny, "model": wider})
    other.fit(1)
    assert other.opt is not None
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    opt_before = other.opt.state_dict()
    with pytest.raises(ValueError) as info:
        other.load(tmp_path / "ck.pt")
    msg = str(info.value)
    assert "missing keys" in msg and "3.weight" in msg
    assert "shape mismatches" in msg and "0.weight: checkpoint (8, 4), model (16, 4)" in msg
    assert all(torch.equal(wider.state_dict()[k], v) for k, v in before.items())
    assert other.opt.state_dict() == opt_before
    with pytest.raises(ValueError, match="does not fit this model"):
        other.fit(2, resume_from=tmp_path / "ck.pt")


def test_a_mismatched_optimizer_is_refused_before_the_weights_change(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = _trained(tiny)
    learn.save(tmp_path / "ck.pt")
    model = make_model(seed=1)
    other = Learner(**{**tiny, "model": model})
    other.opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="param groups"):
        other.load(tmp_path / "ck.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    other.load(tmp_path / "ck.pt", with_opt=False)
    assert _equal_weights(model, learn.model)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrapped_models_save_plain_keys_and_load_either_way(
    tiny: dict[str, Any], tmp_path: Path, wrap: str
) -> None:
    def wrapped(m: nn.Module) -> nn.Module:
        return torch.compile(m) if wrap == "compile" else nn.DataParallel(m)

    learn = _trained(tiny)
    plain_keys = set(learn.model.state_dict())
    learn.model = wrapped(learn.model)
    assert set(learn.model.state_dict()) != plain_keys  # prefixed
    learn.save(tmp_path / "ck.pt")
    assert set(torch.load(tmp_path / "ck.pt", weights_only=True)["model"]) == plain_keys
    # Into a plain model, and into a wrapped one.
    plain = Learner(**{**tiny, "model": make_model(seed=1)})
    plain.load(tmp_path / "ck.pt")
    assert _equal_weights(
        plain.model, learn.model.module if wrap != "compile" else learn.model._orig_mod
    )
    other = Learner(**{**tiny, "model": wrapped(make_model(seed=1))})
    other.load(tmp_path / "ck.pt")
    assert _equal_weights(other.model, learn.model)


def test_a_compiled_submodule_saves_plain_keys(tiny: dict[str, Any], tmp_path: Path) -> None:
    learn = _trained(tiny)
    plain_keys = set(learn.model.state_dict())
    learn.model[0] = torch.compile(learn.model[0])
    learn.save(tmp_path / "ck.pt")
    assert set(torch.load(tmp_path / "ck.pt", weights_only=True)["model"]) == plain_keys


def test_state_that_would_not_load_safely_is_refused_when_writing(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    class OddCB(Callback):
        def state_dict(self) -> dict[str, Any]:
            return {"fn": len}

        def load_state_dict(self, state: dict[str, Any]) -> None: ...

    learn = Learner(**tiny, cbs=[OddCB()])
    with pytest.raises(TypeError, match=r"\['odd'\]\['fn'\] is a builtin_function"):
        learn.save(tmp_path / "ck.pt")
    assert not (tmp_path / "ck.pt").exists()


# -- resume -------------------------------------------------------------------------------------

# name: (config, CheckpointCB arguments, StopAt arguments or "ctrl_c", position of the checkpoint)
SCENARIOS = {
    "epoch_boundary": ("gen", {}, (0,), (1, 0)),
    "mid_epoch": ("gen", {"every_n_batches": 1, "every_n_epochs": None}, (1, 2), (1, 2)),
    "mid_epoch_global_rng_metric_on_train": (
        "global_noval",
        {"every_n_batches": 3},
        (1, 3),
        (1, 2),
    ),
    "mid_epoch_mid_accumulation": ("gen_accum", {"every_n_batches": 1}, (1, 2), (1, 2)),
    "ctrl_c": ("gen", {}, "ctrl_c", (1, 2)),
}


class CtrlCAt(Callback):
    """Sends this process SIGINT (a Ctrl-C) during training batch `iter` of epoch `epoch`."""

    def __init__(self, epoch: int, iter: int) -> None:
        self.epoch, self.iter = epoch, iter

    def after_loss(self, learn: Learner) -> None:
        if learn.training and (learn.epoch, learn.iter) == (self.epoch, self.iter):
            signal.raise_signal(signal.SIGINT)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each scenario's first half here; all second halves in one new process."""
    tmp = tmp_path_factory.mktemp("resume")
    out: dict[str, Any] = {"whole": {}, "first": {}, "written": {}}
    for config in {c for c, *_ in SCENARIOS.values()}:
        learn = make_learner(config)
        fit(learn, config, cbs=[])
        out["whole"][config] = results(learn)
    jobs = []
    for name, (config, ckpt_args, stop, _) in SCENARIOS.items():
        path = tmp / f"{name}.pt"
        learn = make_learner(config)
        ckpt_cb = CheckpointCB(path, **ckpt_args)
        if stop == "ctrl_c":
            with pytest.raises(KeyboardInterrupt):
                fit(learn, config, cbs=[ckpt_cb, CtrlCAt(1, 1)])
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        else:
            fit(learn, config, cbs=[ckpt_cb, StopAt(*stop)])
        out["written"][name] = ckpt_cb.written[-1]
        out["first"][name] = results(learn)
        jobs.append(f"{config}={path}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [sys.executable, str(Path(__file__).parent / "resume_run.py"), str(tmp / "out.pt"), *jobs],
        check=True,
        env=env,
        capture_output=True,
    )
    second = torch.load(tmp / "out.pt", weights_only=True)
    out["second"] = {name: second[job] for name, job in zip(SCENARIOS, jobs)}
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resume_in_a_new_process_is_bitwise_identical(resumed: dict[str, Any], name: str) -> None:
    config, _, _, position = SCENARIOS[name]
    whole, second = resumed["whole"][config], resumed["second"][name]
    assert resumed["written"][name] == position
    assert len(resumed["first"][name]["losses"]) < len(whole["losses"])  # it did stop
    assert second["losses"] == whole["losses"]  # every batch, bit for bit
    assert second["lrs"] == whole["lrs"]
    assert second["history"] == whole["history"]  # losses and metrics, to the last bit
    assert second["weights"].keys() == whole["weights"].keys()
    for k, v in whole["weights"].items():
        assert torch.equal(second["weights"][k], v), k


def test_resuming_at_the_end_trains_nothing_and_says_so(
    tiny: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    learn = _trained(tiny, epochs=2)
    learn.save(tmp_path / "ck.pt")
    other = Learner(**{**tiny, "model": make_model(seed=1)})
    other.fit(2, resume_from=tmp_path / "ck.pt")
    assert "nothing to train" in capsys.readouterr().out
    assert _equal_weights(other.model, learn.model)
    assert other.recorder.losses == learn.recorder.losses  # none added


def test_resume_from_rejects_lr(tiny: dict[str, Any], tmp_path: Path) -> None:
    learn = _trained(tiny)
    learn.save(tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="leave out lr"):
        learn.fit(2, lr=0.5, resume_from=tmp_path / "ck.pt")


def test_a_missing_checkpoint_is_a_clear_error(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        Learner(**tiny).fit(1, resume_from=tmp_path / "nope.pt")
