"""CheckpointCB: when it writes, what it keeps, its arguments, its check of the path and its
Ctrl-C handler (tests compare with the handler they found or installed, never assume one: a
parent may have set SIGINT to SIG_IGN, as nohup and background jobs do)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from learner import Callback, CheckpointCB, Learner


def _progress(path: Path) -> tuple[int, int]:
    p = torch.load(path, weights_only=True)["progress"]
    return p["epoch"], p["iter"]


def test_writes_every_n_epochs_and_batches(tiny: dict[str, Any], tmp_path: Path) -> None:
    cb = CheckpointCB(tmp_path / "ck.pt", every_n_epochs=2, every_n_batches=3)
    Learner(**tiny).fit(4, cbs=[cb])
    # 2 batches an epoch: batch 3 of the fit is epoch 1's first, batch 6 epoch 2's second.
    assert cb.written == [(1, 1), (2, 0), (2, 2), (4, 0)]
    assert _progress(tmp_path / "ck.pt") == (4, 0)


def test_keep_last_keeps_the_previous_ones_beside_the_newest(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    Learner(**tiny).fit(4, cbs=[CheckpointCB(tmp_path / "ck.pt", keep_last=3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.1.pt", "ck.2.pt", "ck.pt"]
    assert [_progress(tmp_path / n) for n in ("ck.pt", "ck.1.pt", "ck.2.pt")] == [
        (4, 0),
        (3, 0),
        (2, 0),
    ]


def test_mid_epoch_checkpoints_keep_the_epochs_random_states(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    cb = CheckpointCB(tmp_path / "ck.pt", every_n_epochs=None, every_n_batches=1)
    Learner(**tiny).fit(1, cbs=[cb])
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ckpt["progress"]["iter"] == 2 and ckpt["epoch_rng"] is not None
    assert cb.written == [(0, 1), (0, 2)]


def test_rotation_goes_through_unique_temporary_names_and_removes_leftovers(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rotation killed half-way (SIGKILL) left its temporary file: the next one removes it.
    leftover = tmp_path / f".ck.1.pt.{'0' * 32}.tmp"
    leftover.write_bytes(b"half a copy")
    os.utime(leftover, (time.time() - 3600,) * 2)
    someone_elses = tmp_path / ".ck.1.pt.tmp"  # the fixed name of old: not this one's to touch
    someone_elses.write_bytes(b"not ours")
    links: list[str] = []
    real_link = os.link

    def recording_link(src: Any, dst: Any) -> None:
        links.append(Path(dst).name)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", recording_link)
    Learner(**tiny).fit(3, cbs=[CheckpointCB(tmp_path / "ck.pt", keep_last=2)])
    assert len(links) == 2 and len(set(links)) == 2
    assert all(re.fullmatch(r"\.ck\.1\.pt\.[0-9a-f]{32}\.tmp", n) for n in links)
    assert not leftover.exists() and someone_elses.read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.1.pt.tmp", "ck.1.pt", "ck.pt"]
    assert _progress(tmp_path / "ck.1.pt") == (2, 0)


@pytest.mark.parametrize("where", ["under_a_file", "a_folder", "read_only"])
def test_an_unwritable_path_fails_at_before_fit_naming_it(
    tiny: dict[str, Any], tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    path = {
        "under_a_file": tmp_path / "file" / "run" / "ck.pt",
        "a_folder": tmp_path,
        "read_only": tmp_path / "ro" / "run" / "ck.pt",
    }[where]
    if where == "read_only":
        if os.name != "posix" or os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; POSIX permissions")
        (tmp_path / "ro").mkdir(mode=0o500)
    learn = Learner(**tiny)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(OSError, match=f"Cannot save to {re.escape(str(path))}"):
        learn.fit(2, cbs=[CheckpointCB(path)])
    assert learn.recorder.losses == []  # failed before the first batch
    assert all(torch.equal(learn.model.state_dict()[k], v) for k, v in before.items())


# -- Ctrl-C ---------------------------------------------------------------------------------------


def _custom_handler(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@pytest.fixture
def sigint() -> Iterator[Callable[[Any], None]]:
    """`sigint(handler)` installs a SIGINT handler for the test; the one found, whatever it was
    (SIG_IGN under nohup or in a background job), is put back afterwards."""
    found = signal.getsignal(signal.SIGINT)

    def install(handler: Any) -> None:
        signal.signal(signal.SIGINT, handler)

    yield install
    signal.signal(signal.SIGINT, found)


@pytest.mark.parametrize(
    "handler",
    [signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN, _custom_handler],
    ids=["default_int_handler", "SIG_DFL", "SIG_IGN", "custom"],
)
def test_the_sigint_handler_is_put_back(
    tiny: dict[str, Any], tmp_path: Path, sigint: Callable[[Any], None], handler: Any
) -> None:
    sigint(handler)
    Learner(**tiny).fit(1, cbs=[CheckpointCB(tmp_path / "ck.pt")])
    assert signal.getsignal(signal.SIGINT) is handler


def test_an_ignored_sigint_stays_ignored(
    tiny: dict[str, Any], tmp_path: Path, sigint: Callable[[Any], None]
) -> None:
    # A process that ignores SIGINT asked not to be interrupted by it: the fit runs to its end.
    sigint(signal.SIG_IGN)
    cb = CheckpointCB(tmp_path / "ck.pt", every_n_epochs=None, every_n_batches=2)
    learn = Learner(**tiny)
    learn.fit(2, cbs=[cb, CtrlC(0, 0, True)])
    assert cb.written == [(0, 2), (1, 2)] and not cb.interrupted
    assert len(learn.recorder.losses) == 4
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.parametrize(
    "kwargs",
    [{"every_n_epochs": 0}, {"every_n_batches": 1.5}, {"keep_last": 0}, {"every_n_epochs": True}],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CheckpointCB("ck.pt", **kwargs)


class CtrlC(Callback):
    """Sends this process SIGINT `times` times at `after_loss` of the given batch and phase."""

    def __init__(self, epoch: int, iter: int, training: bool, times: int = 1) -> None:
        self.at, self.times = (epoch, iter, training), times

    def after_loss(self, learn: Learner) -> None:
        if (learn.epoch, learn.iter, learn.training) == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize(
    ("training", "times", "written", "n_losses"),
    [(True, 1, [(0, 2)], 2), (False, 1, [(1, 0)], 2), (True, 2, [], 1)],
)
def test_ctrl_c_finishes_the_step_writes_then_stops(
    tiny: dict[str, Any],
    tmp_path: Path,
    sigint: Callable[[Any], None],
    training: bool,
    times: int,
    written: list[Any],
    n_losses: int,
) -> None:
    # During training: after the batch; during validation: after the epoch; twice: at once.
    sigint(signal.default_int_handler)  # Ctrl-C as in an interactive session
    learn = Learner(**tiny)
    cb = CheckpointCB(tmp_path / "ck.pt", every_n_epochs=None)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, cbs=[cb, CtrlC(0, 1 if training else 0, training, times)])
    assert cb.written == written
    assert len(learn.recorder.losses) == n_losses
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    learn.fit(1)  # still usable
    assert len(learn.recorder.losses) == n_losses + 2
