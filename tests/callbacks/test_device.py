"""DeviceCB and to_device: nested batches, model placement; CUDA checks skip without a GPU."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_data, make_dls, make_model
from torch.utils.data import TensorDataset

from learner import DeviceCB, Learner, to_device
from learner.callbacks import device as device_module
from learner.data import DataLoaders, TensorLoader

Pair = namedtuple("Pair", ["a", "b"])


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    label: str
    extra: list[Any]


def test_to_device_moves_nested_structures() -> None:
    t = torch.ones(2)
    batch = (
        {"x": t, "meta": "id-3", "pair": Pair(t, 7)},
        [t, (t, None)],
        Sample(t, "cat", [t, 1.5]),
    )
    moved = to_device(batch, "meta")  # a device every machine has, so the move is observable
    assert type(moved) is tuple and type(moved[0]["pair"]) is Pair
    assert moved[0]["x"].device.type == "meta" and moved[0]["pair"].a.device.type == "meta"
    assert moved[0]["meta"] == "id-3" and moved[0]["pair"].b == 7
    assert moved[1][0].device.type == "meta" and moved[1][1][0].device.type == "meta"
    assert moved[1][1][1] is None
    assert isinstance(moved[2], Sample) and moved[2].image.device.type == "meta"
    assert moved[2].label == "cat" and moved[2].extra[0].device.type == "meta"
    assert moved[2].extra[1] == 1.5
    assert t.device.type == "cpu"  # the original is untouched


def test_device_cb_moves_model_and_batch() -> None:
    cb = DeviceCB("meta")
    learn = SimpleNamespace(model=make_model(), batch=(torch.ones(2, 4), torch.zeros(2)))
    cb.before_fit(learn)  # type: ignore[arg-type]
    cb.before_batch(learn)  # type: ignore[arg-type]
    assert next(learn.model.parameters()).device.type == "meta"
    assert all(t.device.type == "meta" for t in learn.batch)


def test_default_device_on_this_machine() -> None:
    want = (
        "cuda"
        if torch.cuda.is_available()
        else "mps"
        if torch.backends.mps.is_available()
        else "cpu"
    )
    assert DeviceCB().device.type == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_cuda() -> None:
    seen = []

    class Spy(DeviceCB):
        def after_predict(self, learn: Learner) -> None:
            seen.append((learn.preds.device.type, learn.batch[1].device.type))

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[Spy("cuda")])
    learn.fit(1)
    assert set(seen) == {("cuda", "cuda")}
    assert learn.recorder.history[0]["valid_loss"] is not None


def test_batches_of_a_tensor_loader_on_the_device_are_not_looked_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moved: list[Any] = []
    real = device_module.move

    def counting(obj: Any, device: torch.device) -> Any:
        if isinstance(obj, (tuple, list)):  # a whole batch, not the tensors it recurses into
            moved.append(obj)
        return real(obj, device)

    monkeypatch.setattr(device_module, "move", counting)
    x, y = make_data(40)
    on_cpu = DataLoaders.from_tensors(x[:32], y[:32], x[32:], y[32:], bs=8, device="cpu")
    learn = Learner(make_model(), on_cpu, F.cross_entropy, cbs=[DeviceCB("cpu")])
    learn.fit(2)
    assert moved == []
    # Any other loader's batches are moved one by one, as before: 4 + 1 batches per epoch.
    datasets = TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
    learn.dls = DataLoaders.from_datasets(*datasets, bs=8)
    learn.fit(2)
    assert len(moved) == 10


def test_a_tensor_loader_elsewhere_is_moved() -> None:
    x, y = make_data(8)
    dl = TensorLoader(x, y, bs=4)
    assert device_module._yields_on(dl, torch.device("cpu"))
    assert not device_module._yields_on(dl, torch.device("meta"))
    assert not device_module._yields_on([(x, y)], torch.device("cpu"))
    cb = DeviceCB("meta")
    learn = SimpleNamespace(model=make_model(), dl=dl, batch=(x, y))
    cb.before_fit(learn)  # type: ignore[arg-type]
    cb.before_train(learn)  # type: ignore[arg-type]
    cb.before_batch(learn)  # type: ignore[arg-type]
    assert all(t.device.type == "meta" for t in learn.batch)


def test_device_without_index_is_resolved_once() -> None:
    assert device_module._resolve(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        got = device_module._resolve(torch.device("cuda"))
        assert got == torch.device("cuda", torch.cuda.current_device())
        assert torch.zeros(1, device="cuda").device == got  # so a batch there is not moved again
