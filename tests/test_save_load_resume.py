"""Checkpoints: what a file holds, atomic writes, weights_only loading, clear errors that change
nothing (a damaged file, a missing section, another optimizer, another training loader
mid-epoch), unwrapped keys, and exact resume in a new process."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_data, make_model, same
from resume_run import StopAt, fit, make_learner, results
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import learner.io
from learner import Callback, CheckpointCB, DataLoaders, Learner, TensorLoader
from learner.saving import loader_shape
from learner.sharding import TensorLoaderShard

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
    assert ckpt["progress"] == {"epoch": 2, "iter": 0, "n_epochs": 2, "global_step": 4}
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
            # Ctrl-C as in an interactive session, whatever this process was started with
            # (SIG_IGN under nohup), and that handler back afterwards.
            found = signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                with pytest.raises(KeyboardInterrupt):
                    fit(learn, config, cbs=[ckpt_cb, CtrlCAt(1, 1)])
                assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            finally:
                signal.signal(signal.SIGINT, found)
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


# -- what is checked before anything is assigned --------------------------------------------------


def _rewrite(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


def _as_version_1(ckpt: dict[str, Any]) -> None:
    # A checkpoint as the learner wrote it before the checksum: no opt_class, no train_loader.
    ckpt["version"] = 1
    del ckpt["checksum"], ckpt["opt_class"]
    ckpt["progress"].pop("train_loader", None)


class Snapshot:
    """What must not change when a load or a resume is refused: weights, optimizer state,
    records, random states."""

    def __init__(self, learn: Learner) -> None:
        self.learn = learn
        self.weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
        self.opt = copy.deepcopy(learn.opt.state_dict()) if learn.opt is not None else None
        self.losses = list(learn.recorder.losses)
        self.rng = torch.get_rng_state()

    def unchanged(self) -> bool:
        learn = self.learn
        weights = learn.model.state_dict()
        opt = learn.opt.state_dict() if learn.opt is not None else None
        return (
            all(torch.equal(weights[k], v) for k, v in self.weights.items())
            and same(opt, self.opt)
            and learn.recorder.losses == self.losses
            and torch.equal(torch.get_rng_state(), self.rng)
        )


def _other(tiny: dict[str, Any], **kwargs: Any) -> Learner:
    """Another learner, trained a little, with a momentum optimizer: state everywhere."""
    sgd = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)
    other = Learner(**{**tiny, "model": make_model(seed=1), "opt_func": sgd, **kwargs})
    other.fit(1)
    return other


def _refused(learn: Learner, path: Path, match: str, load: bool = True) -> None:
    """Load (with `load`) and resume refuse `path` with a ValueError matching `match`, changing
    nothing (a resume: before any callback's before_fit)."""
    snap = Snapshot(learn)
    if load:
        with pytest.raises(ValueError, match=match):
            learn.load(path)
        assert snap.unchanged()
    seen: list[str] = []

    class SeeCB(Callback):
        def before_fit(self, learn: Learner) -> None:
            seen.append("before_fit")

    with pytest.raises(ValueError, match=match):
        learn.fit(2, cbs=[SeeCB()], resume_from=path)
    assert seen == [] and snap.unchanged()


def test_an_empty_file_is_a_clear_error(tiny: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "ck.pt").write_bytes(b"")
    _refused(_other(tiny), tmp_path / "ck.pt", "is empty")


SECTIONS = [
    "model", "grads", "opt", "opt_class", "callbacks", "progress", "rng", "epoch_rng", "ranks"
]  # fmt: skip


@pytest.mark.parametrize("section", SECTIONS)
def test_a_missing_section_is_a_clear_error_and_changes_nothing(
    tiny: dict[str, Any], tmp_path: Path, section: str
) -> None:
    _trained(tiny).save(tmp_path / "ck.pt")
    _rewrite(tmp_path / "ck.pt", lambda ckpt: ckpt.pop(section))
    _refused(_other(tiny), tmp_path / "ck.pt", f"missing sections: {section}")


# A section of the wrong type or layout (in a version 1 file, which has no checksum to refuse it
# first): what is wrong, with the message it gets.
BAD_SECTIONS = {
    "grads": ({"0.weight": [1.0]}, "grads: not a dict of tensors by name"),
    "opt": ([1, 2], "opt: not a state_dict"),
    "callbacks": ({"recorder": [1]}, "callbacks: not a dict of callback states"),
    "progress": ({"epoch": 1, "n_epochs": 1}, "progress: not a dict of epoch, iter, n_epochs"),
    "rng": ({"python": 1, "numpy": 2, "torch": 3, "generators": []}, "rng: does not hold valid"),
    "epoch_rng": ({"python": (3, (1, 2), None)}, "epoch_rng: lacks the random states of numpy"),
}


@pytest.mark.parametrize("section", list(BAD_SECTIONS))
def test_a_section_of_the_wrong_layout_is_a_clear_error(
    tiny: dict[str, Any], tmp_path: Path, section: str
) -> None:
    value, match = BAD_SECTIONS[section]
    _trained(tiny).save(tmp_path / "ck.pt")
    _rewrite(tmp_path / "ck.pt", lambda ckpt: (_as_version_1(ckpt), ckpt.update({section: value})))
    _refused(_other(tiny), tmp_path / "ck.pt", match)


def test_random_states_of_the_wrong_size_are_refused_before_anything_changes(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    _trained(tiny).save(tmp_path / "ck.pt")

    def truncate(ckpt: dict[str, Any]) -> None:
        _as_version_1(ckpt)
        ckpt["rng"]["torch"] = ckpt["rng"]["torch"][:100]

    _rewrite(tmp_path / "ck.pt", truncate)
    _refused(_other(tiny), tmp_path / "ck.pt", "rng: does not hold valid random states")


def test_another_kind_of_optimizer_is_refused_naming_both(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = _trained({**tiny, "opt_func": torch.optim.SGD})
    learn.save(tmp_path / "ck.pt")
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["opt_class"] == "SGD"
    adamw = _other(tiny, opt_func=torch.optim.AdamW)
    _refused(adamw, tmp_path / "ck.pt", r"an? SGD's.*is a AdamW.*with_opt=False")
    adamw.load(tmp_path / "ck.pt", with_opt=False)  # the weights only, as the message says
    assert _equal_weights(adamw.model, learn.model)
    adamw.fit(1)  # and it trains on


@pytest.mark.parametrize(
    ("saved", "loading", "match"),
    [
        (torch.optim.SGD, torch.optim.AdamW, "lacks hyper-parameters.*betas, eps"),
        (torch.optim.AdamW, "sgd_momentum", "lacks hyper-parameters.*momentum, dampening"),
    ],
)
def test_a_version_1_file_of_another_optimizer_is_refused_by_its_keys(
    tiny: dict[str, Any], tmp_path: Path, saved: Any, loading: Any, match: str
) -> None:
    _trained({**tiny, "opt_func": saved}).save(tmp_path / "ck.pt")
    _rewrite(tmp_path / "ck.pt", _as_version_1)
    other = _other(tiny) if loading == "sgd_momentum" else _other(tiny, opt_func=loading)
    with pytest.warns(UserWarning, match="version 1"):
        _refused(other, tmp_path / "ck.pt", match)


def test_optimizer_states_that_share_no_key_are_refused(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    # Same class name, same hyper-parameter keys, different state: another optimizer.
    class Odd(torch.optim.SGD):
        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            state["state"] = {i: {"odd_buffer": torch.zeros(1)} for i in state["state"]}
            return state

    Odd.__name__ = "SGD"
    sgd = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)
    odd = lambda params, lr: Odd(params, lr=lr, momentum=0.9)
    _trained({**tiny, "opt_func": odd}).save(tmp_path / "ck.pt")
    _refused(_other(tiny, opt_func=sgd), tmp_path / "ck.pt", "holds odd_buffer.*momentum_buffer")


def _flip_a_byte_of(path: Path, t: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(t.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused_as_corrupt_naming_the_section(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = _trained(tiny)
    learn.save(tmp_path / "ck.pt")
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=True)  # still a plain weights_only file
    assert ckpt["version"] == 3 and ckpt["checksum"]["algorithm"] == "crc32"
    assert set(ckpt["checksum"]["sections"]) == {"format", "version", *SECTIONS}
    _flip_a_byte_of(tmp_path / "ck.pt", learn.model.state_dict()["0.weight"])
    torch.load(tmp_path / "ck.pt", weights_only=True)  # torch sees nothing wrong
    _refused(_other(tiny), tmp_path / "ck.pt", r"is corrupt: .* section\(s\) model does not")


def test_a_flipped_byte_in_the_optimizer_state_names_it(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = _other(tiny)
    learn.save(tmp_path / "ck.pt")
    assert learn.opt is not None
    momentum = learn.opt.state_dict()["state"][0]["momentum_buffer"]
    _flip_a_byte_of(tmp_path / "ck.pt", momentum)
    _refused(_other(tiny), tmp_path / "ck.pt", r"section\(s\) opt does not")


def test_a_version_1_file_loads_and_resumes_with_a_warning(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = _trained(tiny)
    learn.save(tmp_path / "ck.pt")
    _rewrite(tmp_path / "ck.pt", _as_version_1)
    other = Learner(**{**tiny, "model": make_model(seed=1)})
    with pytest.warns(UserWarning, match="version 1 checkpoint: it has no checksum"):
        other.load(tmp_path / "ck.pt")
    assert _equal_weights(other.model, learn.model)
    with pytest.warns(UserWarning, match="version 1"):
        other.fit(2, resume_from=tmp_path / "ck.pt")
    learn.fit(1)
    assert _equal_weights(other.model, learn.model)


def test_an_unknown_version_is_refused(tiny: dict[str, Any], tmp_path: Path) -> None:
    _trained(tiny).save(tmp_path / "ck.pt")
    _rewrite(tmp_path / "ck.pt", lambda ckpt: ckpt.update(version=4))
    _refused(_other(tiny), tmp_path / "ck.pt", "version 4; this learner reads versions 1, 2, 3")


def _as_version_2(ckpt: dict[str, Any]) -> None:
    # A checkpoint as the learner wrote it before the per-rank states.
    from learner.saving import _digest

    ckpt["version"] = 2
    del ckpt["ranks"], ckpt["checksum"]["sections"]["ranks"]
    ckpt["checksum"]["sections"]["version"] = _digest(2, "crc32")


def test_a_version_2_file_loads_and_resumes_as_one_process_wrote_it(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    learn = _trained(tiny)
    learn.save(tmp_path / "ck.pt")
    _rewrite(tmp_path / "ck.pt", _as_version_2)
    other = Learner(**{**tiny, "model": make_model(seed=1)})
    other.fit(2, resume_from=tmp_path / "ck.pt")
    learn.fit(1)
    assert _equal_weights(other.model, learn.model)


@pytest.mark.parametrize(
    "ranks, match",
    [
        ({"world_size": 0, "states": []}, "ranks: not {world_size, states}"),
        ({"world_size": 2, "states": []}, "ranks: not a state for each rank but 0"),
        ({"world_size": 2, "states": [{"rng": None}]}, "ranks: rank 1: not {callbacks, rng"),
    ],
)
def test_a_bad_ranks_section_is_a_clear_error(
    tiny: dict[str, Any], tmp_path: Path, ranks: dict[str, Any], match: str
) -> None:
    from learner.saving import _digest

    def change(ckpt: dict[str, Any]) -> None:  # written so, not damaged: its checksum matches
        ckpt["ranks"] = ranks
        ckpt["checksum"]["sections"]["ranks"] = _digest(ranks, "crc32")

    _trained(tiny).save(tmp_path / "ck.pt")
    _rewrite(tmp_path / "ck.pt", change)
    _refused(_other(tiny), tmp_path / "ck.pt", match)


def _tensor_learner(n: int = 30, bs: int = 8, seed: int = 0) -> Learner:
    x, y = make_data(n + 8, seed=seed)
    dls = DataLoaders.from_tensors(x[:n], y[:n], x[n:], y[n:], bs=bs)
    return Learner(make_model(), dls, F.cross_entropy, lr=0.1)


@pytest.mark.parametrize(
    ("n", "bs", "match"),
    [
        (30, 4, "batch size: 8 in the saved run, 4 now; batches: 4 in the saved run, 8 now"),
        (32, 8, "samples: 30 in the saved run, 32 now"),
    ],
)
def test_mid_epoch_resume_with_another_loader_is_refused_saying_what_differs(
    tmp_path: Path, n: int, bs: int, match: str
) -> None:
    path = tmp_path / "ck.pt"
    learn = _tensor_learner()
    learn.fit(1, cbs=[CheckpointCB(path, every_n_epochs=None, every_n_batches=2)])
    progress = torch.load(path, weights_only=True)["progress"]
    assert progress["train_loader"] == {"bs": 8, "n": 30, "batches": 4}
    other = _tensor_learner(n, bs)
    other.fit(1)
    _refused(other, path, match, load=False)  # load loads no position: nothing to refuse
    other.load(path)
    _tensor_learner().fit(1, resume_from=path)  # the saved run's loader resumes


def test_epoch_boundary_resume_allows_another_batch_size(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    _tensor_learner().fit(1, cbs=[CheckpointCB(path)])
    assert "train_loader" not in torch.load(path, weights_only=True)["progress"]
    other = _tensor_learner(bs=4)
    other.fit(2, resume_from=path)
    assert other.recorder.epoch_iters[-1] - other.recorder.epoch_iters[-2] == 8


def test_loader_shape_tells_what_each_loader_tells() -> None:
    x = torch.zeros(30, 4)
    assert loader_shape(TensorLoader(x, bs=8)) == {"bs": 8, "n": 30, "batches": 4}
    assert loader_shape(DataLoader(TensorDataset(x), batch_size=8, drop_last=True)) == {
        "bs": 8,
        "n": 30,
        "batches": 3,
    }
    assert loader_shape([1, 2]) == {"bs": None, "n": None, "batches": 2}
    assert loader_shape(iter([1, 2])) == {"bs": None, "n": None, "batches": None}
    # A shard's number of batches depends on the number of processes: not recorded.
    shard = {"bs": 8, "n": 30, "batches": None}
    assert loader_shape(TensorLoaderShard(TensorLoader(x, bs=8), 0, 2)) == shard
    sampler = DistributedSampler(TensorDataset(x), num_replicas=2, rank=0)
    assert loader_shape(DataLoader(TensorDataset(x), batch_size=8, sampler=sampler)) == shard
