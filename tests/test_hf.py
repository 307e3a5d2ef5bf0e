"""A Hugging Face model trained as it comes: a tiny BERT from a config, a tokenizer trained here,
`DataCollatorWithPadding`'s dicts, `Learner(model, dls, loss_func=None, metrics=accuracy)`.

Checked against hand loops over the same batches (the validation loss and accuracy, `get_preds`
and its per-item losses, `infer`), saved and loaded, and resumed mid-epoch in a new process bit
for bit, dropout included. Nothing is downloaded: the hub is offline and any connection fails.
The runs are tests/hf_run.py's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[text]'")
pytest.importorskip("tokenizers", reason="needs tokenizers: pip install -e '.[text]'")

import torch
import torch.nn.functional as F
from hf_run import (
    CONFIGS,
    N_EPOCHS,
    N_VALID,
    Task,
    make_dls,
    make_learner,
    make_model,
    results,
    task,
)
from resume_run import StopAt
from torch import nn

from learner import CheckpointCB, Learner, accuracy

ROOT = Path(__file__).resolve().parents[1]


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise OSError("test_hf: no network connections (a download was attempted)")


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """The hub offline, and any socket connection an error: proof that nothing downloads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _refuse)
        yield


@pytest.fixture(scope="module")
def data() -> Task:
    return task()


@pytest.fixture(scope="module")
def trained(data: Task) -> tuple[Learner, dict[str, Any]]:
    """The learner after the uninterrupted run ("gen"), and its results at the end of it."""
    learn = make_learner("gen")
    learn.fit(N_EPOCHS)
    return learn, results(learn)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients; the model's mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _hand_valid(model: nn.Module, dl: Any) -> dict[str, Any]:
    """A plain loop over `dl`: each batch's logits and labels, and the model's loss weighted by
    batch size, in eval mode without gradients."""
    logits, labels, total, n = [], [], 0.0, 0
    with _evaluating(model):
        for batch in dl:
            out = model(**batch)
            bs = len(batch["labels"])
            total += out.loss.item() * bs
            n += bs
            logits.append(out.logits)
            labels.append(batch["labels"])
    return {"logits": torch.cat(logits), "labels": torch.cat(labels), "loss": total / n}


def test_the_batches_are_padded_dicts_of_varying_length(data: Task) -> None:
    batch = next(iter(make_dls().valid))
    assert {"input_ids", "attention_mask", "labels"} <= set(batch)  # token_type_ids too in 4.x
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() == batch["input_ids"].shape[1]  # padding matters


def test_it_learns(trained: tuple[Learner, dict[str, Any]]) -> None:
    learn, _ = trained
    losses = learn.recorder.losses
    assert len(losses) == N_EPOCHS * len(learn.dls.train)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 0.65 and last < 0.1, (first, last)  # from chance (ln 2 = 0.69) to near 0
    assert learn.recorder.history[-1]["accuracy"] > 0.9  # chance: 0.5


def test_validation_loss_and_accuracy_are_a_hand_loops(
    trained: tuple[Learner, dict[str, Any]],
) -> None:
    learn, _ = trained
    hand = _hand_valid(learn.model, learn.dls.valid)
    row = learn.recorder.history[-1]
    assert row["valid_loss"] == pytest.approx(hand["loss"], abs=1e-6)
    hand_acc = (hand["logits"].argmax(-1) == hand["labels"]).float().mean().item()
    assert row["accuracy"] == pytest.approx(hand_acc, abs=1e-6)


def test_get_preds_are_a_hand_loops_logits_and_labels(
    trained: tuple[Learner, dict[str, Any]],
) -> None:
    learn, _ = trained
    hand = _hand_valid(learn.model, learn.dls.valid)
    preds, targets = learn.get_preds()
    assert preds.shape == (N_VALID, 2)
    assert torch.equal(preds, hand["logits"])
    assert torch.equal(targets, hand["labels"])


def test_get_preds_with_loss_gives_each_items_loss(
    trained: tuple[Learner, dict[str, Any]],
) -> None:
    learn, _ = trained
    preds, targets, losses = learn.get_preds(with_loss=True)
    # Each item ran alone (the model's .loss is a batch mean), with its batch's padding.
    expected = F.cross_entropy(preds, targets, reduction="none")
    assert losses.shape == (N_VALID,)
    assert torch.allclose(losses, expected, rtol=0, atol=1e-5)
    assert losses.double().mean().item() == pytest.approx(
        learn.recorder.history[-1]["valid_loss"], abs=1e-5
    )


def test_infer_takes_a_tokenizers_output(
    trained: tuple[Learner, dict[str, Any]], data: Task
) -> None:
    learn, _ = trained
    text = "the cast was lovely and the music superb"
    enc = data.tokenizer(text, return_tensors="pt")
    with _evaluating(learn.model):
        expected = learn.model(**enc).logits
    got = learn.infer(enc)
    assert got.shape == (1, 2) and torch.equal(got, expected)
    item = {k: torch.tensor(v) for k, v in data.tokenizer(text).items()}  # 1-D: one item
    one = learn.infer(item)
    assert one.shape == (2,) and torch.equal(one, expected[0])
    assert one.argmax().item() == 1  # positive


def test_save_then_load_into_a_fresh_learner(
    trained: tuple[Learner, dict[str, Any]], tmp_path: Path
) -> None:
    learn, _ = trained
    learn.save(tmp_path / "bert.pt")
    other = Learner(make_model(seed=1), make_dls(), loss_func=None, metrics=accuracy, lr=3e-3)
    a, b = learn.model.state_dict(), other.model.state_dict()
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])
    other.load(tmp_path / "bert.pt")
    b = other.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (p1, t1), (p2, t2) = learn.get_preds(), other.get_preds()
    assert torch.equal(p1, p2) and torch.equal(t1, t2)


# -- resume mid-epoch in a new process ------------------------------------------------------------

# A checkpoint every 7 training batches of the fit; the fit stops before batch 8 of epoch 1, so
# after 28 batches (20 + 8), when the 4th checkpoint has just been written at (epoch 1, 8 done).
EVERY, STOP = 7, (1, 8)


@pytest.fixture(scope="module")
def resumed(
    trained: tuple[Learner, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Each configuration's uninterrupted run and its first half here; the second halves in one
    new process."""
    tmp = tmp_path_factory.mktemp("hf_resume")
    out: dict[str, Any] = {"whole": {"gen": trained[1]}, "first": {}, "written": {}}
    for config in CONFIGS:
        if config not in out["whole"]:
            learn = make_learner(config)
            learn.fit(N_EPOCHS)
            out["whole"][config] = results(learn)
    jobs = []
    for config in CONFIGS:
        path = tmp / f"{config}.pt"
        learn = make_learner(config)
        ckpt = CheckpointCB(path, every_n_batches=EVERY, every_n_epochs=None)
        learn.fit(N_EPOCHS, cbs=[ckpt, StopAt(*STOP)])
        out["written"][config] = ckpt.written[-1]
        out["first"][config] = results(learn)
        jobs.append(f"{config}={path}")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        # As many threads as here: a CPU matmul's sums may split (and round) by thread count.
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    script = Path(__file__).parent / "hf_run.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp / "out.pt"), *jobs],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second = torch.load(tmp / "out.pt", weights_only=True)
    out["second"] = {config: second[job] for config, job in zip(CONFIGS, jobs)}
    return out


def test_the_model_has_dropout_so_resuming_needs_the_random_states(data: Task) -> None:
    model = make_model().train()
    batch = next(iter(make_dls().valid))
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_mid_epoch_in_a_new_process_is_bitwise_identical(
    resumed: dict[str, Any], config: str
) -> None:
    whole, first, second = (resumed[k][config] for k in ("whole", "first", "second"))
    assert resumed["written"][config] == STOP
    n_batches = len(make_dls(config).train)
    assert len(first["losses"]) == n_batches * STOP[0] + STOP[1] < len(whole["losses"])  # stopped
    assert second["losses"] == whole["losses"]  # every batch, bit for bit
    assert second["history"] == whole["history"]
    assert second["weights"].keys() == whole["weights"].keys()
    for k, v in whole["weights"].items():
        assert torch.equal(second["weights"][k], v), k
