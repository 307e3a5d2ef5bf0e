"""torch.compile: a compiled model trains like the plain one, and stops compiling after epoch 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learner import Callback, Learner
from learner.data import DataLoaders

dynamo = pytest.importorskip("torch._dynamo")


def _dls() -> DataLoaders:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 8, generator=g), torch.randint(0, 3, (100,), generator=g)
    # 100 = 6 * 16 + 4: a ragged last training batch, and validation of 30 (one batch of 30).
    return DataLoaders.from_tensors(
        x, y, x[:30], y[:30], bs=16, generator=torch.Generator().manual_seed(1)
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


class GraphCount(Callback):
    def __init__(self) -> None:
        self.per_epoch: list[int] = []

    def after_epoch(self, learn: Learner) -> None:
        self.per_epoch.append(dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_trains_like_the_plain_one(backend: str) -> None:
    dynamo.reset()
    dynamo.utils.counters.clear()
    plain = _model()
    Learner(plain, _dls(), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD).fit(4)
    model = _model()
    count = GraphCount()
    learn = Learner(torch.compile(model, backend=backend), _dls(), F.cross_entropy, lr=0.1,
                    opt_func=torch.optim.SGD, cbs=[count])  # fmt: skip
    learn.fit(4)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q)
    # Full batches, the ragged last one (batch size then marked dynamic) and eval: compiled in
    # the first epoch, never again.
    assert count.per_epoch[0] >= 1
    assert count.per_epoch == [count.per_epoch[0]] * 4
