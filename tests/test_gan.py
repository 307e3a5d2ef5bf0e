"""Several optimizers and a training step that steps them by name: a tiny GAN on 2-D points,
against a hand-written loop, saved, loaded and resumed mid-epoch bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import same
from resume_run import StopAt
from torch import nn

from learner import (
    Callback,
    CheckpointCB,
    DataLoaders,
    Learner,
    Optimizers,
    TensorLoader,
)

N_EPOCHS = 3


class GAN(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.g = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
        self.d = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))


def gan_losses(gan: GAN, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fake points (from noise drawn here: the global RNG), the discriminator's loss on real
    and fake, and the generator's loss."""
    fake = gan.g(torch.randn(len(real), 2))
    ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
    bce = F.binary_cross_entropy_with_logits
    d_loss = bce(gan.d(real), ones) + bce(gan.d(fake.detach()), zeros)
    g_loss = bce(gan.d(fake), ones)
    return fake, d_loss, g_loss


class GANStepCB(Callback):
    """The training steps of a GAN: both losses from one batch of real points, each network's
    gradients from its own loss, each optimizer stepped by name."""

    def predict(self, learn: Any) -> None:
        learn.preds, self.d_loss, self.g_loss = gan_losses(learn.model, learn.xb[0])

    def get_loss(self, learn: Any) -> None:
        learn.log(g_loss=self.g_loss, d_loss=self.d_loss)
        learn.loss = self.g_loss + self.d_loss

    def backward(self, learn: Any) -> None:
        self.d_loss.backward(inputs=list(learn.model.d.parameters()))
        self.g_loss.backward(inputs=list(learn.model.g.parameters()))

    def step(self, learn: Any) -> None:
        learn.opt["d"].step()
        learn.opt["g"].step()


def opt_func(gan: GAN) -> Any:
    def make(params: Any, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {
            "g": torch.optim.Adam(gan.g.parameters(), lr=lr, betas=(0.5, 0.999)),
            "d": torch.optim.SGD(gan.d.parameters(), lr=lr, momentum=0.9),
        }

    return make


def points(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 6.2832
    return torch.stack([angle.cos(), angle.sin()], 1) * 2 + 0.05 * torch.randn(n, 2, generator=g)


def make_learner(seed: int = 0) -> Learner:
    real, valid = points(60, 1), points(20, 2)
    shuffle = torch.Generator().manual_seed(3)
    dls = DataLoaders(
        TensorLoader(real, bs=16, shuffle=True, generator=shuffle), TensorLoader(valid, bs=32)
    )
    gan = GAN(seed)
    return Learner(gan, dls, None, lr=0.01, opt_func=opt_func(gan), cbs=GANStepCB())


def _state(learn: Learner) -> dict[str, Any]:
    return {
        "weights": {k: v.clone() for k, v in learn.model.state_dict().items()},
        "opt": learn.opt.state_dict(),
        "losses": learn.recorder.losses,
        "logged": learn.recorder.logged,
        "history": learn.recorder.history,
    }


@pytest.fixture(scope="module")
def whole() -> dict[str, Any]:
    torch.manual_seed(10)
    learn = make_learner()
    learn.fit(N_EPOCHS)
    return _state(learn)


def test_the_gan_trains_as_a_hand_loop(whole: dict[str, Any]) -> None:
    torch.manual_seed(10)
    ref = make_learner()  # for its loaders: the same shuffles
    gan = GAN(0)
    opts = opt_func(gan)(None, 0.01)
    sizes: dict[str, list[int]] = {"train": [], "valid": []}
    logged: dict[str, list[float]] = {"g_loss": [], "d_loss": []}
    for _ in range(N_EPOCHS):
        for (real,) in ref.dls.train:
            _, d_loss, g_loss = gan_losses(gan, real)
            d_loss.backward(inputs=list(gan.d.parameters()))
            g_loss.backward(inputs=list(gan.g.parameters()))
            opts["d"].step()
            opts["g"].step()
            for opt in opts.values():
                opt.zero_grad()
            logged["g_loss"].append(g_loss.item())
            logged["d_loss"].append(d_loss.item())
            sizes["train"].append(len(real))
        valid = []
        with torch.no_grad():
            for (real,) in ref.dls.valid:
                _, d_loss, g_loss = gan_losses(gan, real)
                valid.append((len(real), g_loss.item(), d_loss.item()))
    for k, v in gan.state_dict().items():
        assert torch.equal(whole["weights"][k], v), k
    assert whole["logged"]["g_loss"] == logged["g_loss"]
    assert whole["logged"]["d_loss"] == logged["d_loss"]
    row, n_train = whole["history"][-1], 60
    last = sizes["train"][-4:]
    for name in ("g_loss", "d_loss"):  # the table: batch-size-weighted means of each phase
        want = sum(v * s for v, s in zip(logged[name][-4:], last)) / n_train
        assert row[f"train_{name}"] == pytest.approx(want, rel=1e-12)
    i = {"g_loss": 1, "d_loss": 2}
    for name in ("g_loss", "d_loss"):
        want = sum(b[0] * b[i[name]] for b in valid) / 20
        assert row[f"valid_{name}"] == pytest.approx(want, rel=1e-6)
    assert row["train_loss"] == pytest.approx(row["train_g_loss"] + row["train_d_loss"], rel=1e-6)


def test_several_optimizers_are_one_learn_opt(whole: dict[str, Any]) -> None:
    learn = make_learner()
    learn.fit(1)
    assert isinstance(learn.opt, Optimizers) and list(learn.opt) == ["g", "d"]
    assert len(learn.opt.param_groups) == 2  # every optimizer's groups: set_lr sets them all
    learn.fit(1, lr=0.003)
    assert [g["lr"] for g in learn.opt.param_groups] == [0.003, 0.003]
    with pytest.raises(KeyError, match=r"no optimizer named 'x'; learn.opt holds \['g', 'd'\]"):
        learn.opt["x"]
    assert set(whole["opt"]["optimizers"]) == {"g", "d"}


def test_save_and_load_keep_every_optimizer_bitwise(tmp_path: Path) -> None:
    learn = make_learner()
    learn.fit(1)
    learn.save(tmp_path / "gan.pt")
    other = make_learner(seed=5)
    other.load(tmp_path / "gan.pt")
    assert same(other.model.state_dict(), learn.model.state_dict())
    assert same(other.opt.state_dict(), learn.opt.state_dict())

    # A learner with one optimizer cannot take two, and says so before changing anything.
    class OneOptimizerCB(GANStepCB):
        def step(self, learn: Any) -> None:
            learn.opt.step()

    single = Learner(GAN(5), learn.dls, None, cbs=OneOptimizerCB())
    single.fit(1)
    before = {k: v.clone() for k, v in single.model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"is several optimizers' \(g, d\), and the learner's optimizers are one AdamW",
    ):
        single.load(tmp_path / "gan.pt")
    assert same(single.model.state_dict(), before)
    single.save(tmp_path / "single.pt")
    with pytest.raises(ValueError, match=r"is one AdamW's, and the learner's optimizers are sev"):
        learn.load(tmp_path / "single.pt")
    single.load(tmp_path / "gan.pt", with_opt=False)  # the weights alone load
    assert same(single.model.state_dict(), learn.model.state_dict())


def test_a_mid_epoch_resume_equals_the_uninterrupted_run(
    whole: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "ckpt.pt"
    torch.manual_seed(10)
    first = make_learner()
    first.fit(N_EPOCHS, cbs=[CheckpointCB(path, every_n_batches=1), StopAt(1, 2)])
    assert len(first.recorder.losses) == 4 + 2  # stopped in the middle of epoch 1
    torch.manual_seed(1234)  # another global random state: the checkpoint's comes back
    second = make_learner(seed=7)
    second.fit(N_EPOCHS, resume_from=path)
    assert same(_state(second), whole)
