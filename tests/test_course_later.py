"""The course's later notebooks (fastai course22p2, 15-30: diffusion, super-resolution, the VAE,
W&B) run as written: each test copies the course's own student code, with only the imports
changed, on tiny data on the CPU, and checks the numbers."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_dls, make_model
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from learner import (
    BatchTransformCB,
    Callback,
    DataLoaders,
    Learner,
    LRFinderCB,
    MetricsCB,
    get_grid,
    set_seed,
    show_image,
    show_images,
    subplots,
    to_cpu,
)


@pytest.fixture(autouse=True)
def _random_states() -> Iterator[None]:
    """These tests seed the global generators: put them back for the tests that follow."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    plt.close("all")


# -- notebooks 26 and 28: sampling right after fit, with a BatchNorm1d in the timestep MLP -----


def abar(t):  # type: ignore[no-untyped-def]
    return (t * math.pi / 2).cos() ** 2


def noisify(x0):  # type: ignore[no-untyped-def]
    device = x0.device
    n = len(x0)
    t = torch.rand(n).to(x0).clamp(0, 0.999)
    ε = torch.randn(x0.shape, device=device)
    abar_t = abar(t).reshape(-1, 1, 1, 1).to(device)
    xt = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * ε
    return (xt, t.to(device)), ε


def collate_ddpm(b):  # type: ignore[no-untyped-def]
    return noisify(default_collate(b)[0])


def timestep_embedding(tsteps, emb_dim, max_period=10000):  # type: ignore[no-untyped-def]
    exponent = -math.log(max_period) * torch.linspace(0, 1, emb_dim // 2, device=tsteps.device)
    emb = tsteps[:, None].float() * exponent.exp()[None, :]
    return torch.cat([emb.sin(), emb.cos()], dim=-1)


def lin(ni, nf, act=nn.SiLU, norm=None, bias=True):  # type: ignore[no-untyped-def]
    layers = nn.Sequential()
    if norm:
        layers.append(norm(ni))
    if act:
        layers.append(act())
    layers.append(nn.Linear(ni, nf, bias=bias))
    return layers


class EmbModel(nn.Module):
    """A tiny noise predictor with the course's timestep MLP (`lin(..., norm=nn.BatchNorm1d)`)."""

    def __init__(self, n_temb: int = 16, nf: int = 8) -> None:
        super().__init__()
        self.n_temb = n_temb
        self.emb_mlp = nn.Sequential(lin(n_temb, nf, norm=nn.BatchNorm1d), lin(nf, nf))
        self.conv_in = nn.Conv2d(1, nf, 3, padding=1)
        self.conv_out = nn.Conv2d(nf, 1, 3, padding=1)

    def forward(self, inp):  # type: ignore[no-untyped-def]
        x, t = inp
        emb = self.emb_mlp(timestep_embedding(t, self.n_temb))
        h = F.silu(self.conv_in(x) + emb[:, :, None, None])
        return self.conv_out(h)


def ddim_step(x_t, noise, abar_t, abar_t1, bbar_t, bbar_t1, eta, sig, clamp=True):  # type: ignore[no-untyped-def]
    sig = ((bbar_t1 / bbar_t).sqrt() * (1 - abar_t / abar_t1).sqrt()) * eta
    x_0_hat = (x_t - (1 - abar_t).sqrt() * noise) / abar_t.sqrt()
    if clamp:
        x_0_hat = x_0_hat.clamp(-1, 1)
    if bbar_t1 <= sig**2 + 0.01:
        sig = 0.0  # set to zero if very small or NaN
    x_t = abar_t1.sqrt() * x_0_hat + (bbar_t1 - sig**2).sqrt() * noise
    x_t += sig * torch.randn(x_t.shape).to(x_t)
    return x_0_hat, x_t


@torch.no_grad()
def sample(f, model, sz, steps, eta=1.0, clamp=True):  # type: ignore[no-untyped-def]
    ts = torch.linspace(1 - 1 / steps, 0, steps)
    x_t = torch.randn(sz)
    preds = []
    for i, t in enumerate(ts):
        t = t[None]  # one timestep for the whole batch: a batch of 1 for the BatchNorm1d
        abar_t = abar(t)
        noise = model((x_t, t))
        abar_t1 = abar(t - 1 / steps) if t >= 1 / steps else torch.tensor(1)
        x_0_hat, x_t = f(
            x_t,
            noise,
            abar_t,
            abar_t1,
            1 - abar_t,
            1 - abar_t1,
            eta,
            1 - ((i + 1) / 100),
            clamp=clamp,
        )
        preds.append(x_0_hat.float().cpu())
    return preds


def _images(n: int, seed: int) -> torch.Tensor:
    """Blobs in [-0.5, 0.5], 8x8, as the course's images are after `TF.to_tensor(o) - 0.5`."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) - 0.5


def _ddpm_dls() -> DataLoaders:
    train = TensorDataset(_images(64, 0), torch.zeros(64))
    valid = TensorDataset(_images(32, 1), torch.zeros(32))
    return DataLoaders(
        DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate_ddpm),
        DataLoader(valid, batch_size=16, collate_fn=collate_ddpm),
    )


def test_a_sampler_runs_right_after_fit_the_model_in_eval_mode() -> None:
    set_seed(42)
    model = EmbModel()
    learn = Learner(model, _ddpm_dls(), F.mse_loss, lr=1e-2)
    learn.fit(2)
    assert not any(m.training for m in model.modules())  # the fit ended with validation
    samples = sample(ddim_step, model, (16, 1, 8, 8), steps=10)
    assert len(samples) == 10 and samples[-1].shape == (16, 1, 8, 8)
    assert samples[-1].min() >= -1 and samples[-1].max() <= 1  # x_0_hat clamped to [-1, 1]
    assert torch.isfinite(samples[-1]).all() and samples[-1].std() > 0
    # A fit without validation leaves the model training: the course's sampler then fails.
    learn.fit(1, valid=False)
    assert model.training
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        sample(ddim_step, model, (16, 1, 8, 8), steps=2)


# -- notebook 29: a VAE, whose model returns (x_hat, mu, logvar) ---------------------------------


def vae_lin(ni, nf, act=nn.SiLU, norm=nn.BatchNorm1d, bias=True):  # type: ignore[no-untyped-def]
    layers = nn.Sequential(nn.Linear(ni, nf, bias=bias))
    if act:
        layers.append(act())
    if norm:
        layers.append(norm(nf))
    return layers


class VAE(nn.Module):
    def __init__(self, ni: int = 16, nh: int = 12, nl: int = 4) -> None:
        super().__init__()
        self.enc = nn.Sequential(vae_lin(ni, nh), vae_lin(nh, nh))
        self.mu, self.lv = vae_lin(nh, nl, act=None), vae_lin(nh, nl, act=None)
        self.dec = nn.Sequential(vae_lin(nl, nh), vae_lin(nh, nh), vae_lin(nh, ni, act=None))

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.enc(x)
        mu, lv = self.mu(x), self.lv(x)
        z = mu + (0.5 * lv).exp() * torch.randn_like(lv)
        return self.dec(z), mu, lv


def kld_loss(inp, x):  # type: ignore[no-untyped-def]
    x_hat, mu, lv = inp  # noqa: RUF059 (the course's code as written)
    return -0.5 * (1 + lv - mu.pow(2) - lv.exp()).mean()


def bce_loss(inp, x):  # type: ignore[no-untyped-def]
    return F.binary_cross_entropy_with_logits(inp[0], x)


def vae_loss(inp, x):  # type: ignore[no-untyped-def]
    return kld_loss(inp, x) + bce_loss(inp, x)


class SeenPredsCB(Callback):
    order = 100

    def before_fit(self, learn: Learner) -> None:
        self.seen: list[tuple[object, torch.Tensor]] = []

    def after_batch(self, learn: Learner) -> None:
        if not learn.training:
            self.seen.append((to_cpu(learn.preds), to_cpu(learn.batch[1])))


def test_the_vae_recipe_with_func_metrics_over_the_tuple() -> None:
    mean = pytest.importorskip("torcheval.metrics", reason="the course's FuncMetric is torcheval's")

    class FuncMetric(mean.Mean):
        def __init__(self, fn, device=None):  # type: ignore[no-untyped-def]
            super().__init__(device=device)
            self.fn = fn

        def update(self, inp, targets):  # type: ignore[no-untyped-def]
            self.weighted_sum += self.fn(inp, targets)
            self.weights += 1

    set_seed(0)
    x = torch.rand(48, 16)  # pixels in [0, 1]; the batch is (x, x)
    dls = DataLoaders.from_tensors(x[:32], x[:32], x[32:], x[32:], bs=4)  # 2 validation batches
    metrics = MetricsCB(kld=FuncMetric(kld_loss), bce=FuncMetric(bce_loss))
    seen = SeenPredsCB()
    learn = Learner(VAE(), dls, vae_loss, lr=1e-2, cbs=[metrics, seen])
    learn.fit(2)
    row = learn.recorder.history[-1]
    # The metrics are the mean over the validation batches (FuncMetric counts batches), of the
    # very tuples the model returned.
    last = seen.seen[-len(dls.valid) :]  # the last epoch's validation batches
    kld = torch.stack([kld_loss(p, y) for p, y in last]).mean().item()
    bce = torch.stack([bce_loss(p, y) for p, y in last]).mean().item()
    assert row["kld"] == pytest.approx(kld, rel=1e-6) and row["bce"] == pytest.approx(bce, rel=1e-6)
    assert row["valid_loss"] == pytest.approx(kld + bce, rel=1e-5)  # equal batches: same mean


# -- notebook 21: subclassing MetricsCB to log each phase (W&B) ----------------------------------


class WandBCB(MetricsCB):
    """The course's WandBCB, logging into a list instead of to W&B (`wandb.log` -> `logged`)."""

    order = 100

    def __init__(self, config, *ms, project="ddpm_cifar10", **metrics):  # type: ignore[no-untyped-def]
        self.config, self.project = config, project  # fc.store_attr()
        self.sent: list[dict[str, float]] = []
        super().__init__(*ms, **metrics)

    def before_fit(self, learn):  # type: ignore[no-untyped-def]
        self.sent.append({"init": 1.0})  # wandb.init(project=self.project, config=self.config)

    def after_fit(self, learn):  # type: ignore[no-untyped-def]
        self.sent.append({"finish": 1.0})  # wandb.finish()

    def _log(self, d):  # type: ignore[no-untyped-def]
        if self.train:
            self.sent.append({"train_" + m: float(d[m]) for m in self.all_metrics})
        else:
            self.sent.append({"val_" + m: float(d[m]) for m in self.all_metrics})

    def after_batch(self, learn):  # type: ignore[no-untyped-def]
        super().after_batch(learn)
        self.sent.append({"loss": float(learn.loss)})

    def after_epoch(self, learn):  # type: ignore[no-untyped-def]
        self.train = learn.training
        super().after_epoch(learn)


def _accuracy(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (preds.argmax(1) == targets).float().mean()


def test_the_courses_wandb_callback_gets_each_phases_results() -> None:
    set_seed(0)
    cb = WandBCB({"lr": 0.1}, accuracy=_accuracy)
    learn = Learner(make_model(), make_dls(24, 12, bs=8), F.cross_entropy, lr=0.1, cbs=cb)
    learn.fit(2)
    assert [c for c in learn.cbs if isinstance(c, MetricsCB)] == [cb]  # it replaced the default
    phases = [d for d in cb.sent if "train_loss" in d or "val_loss" in d]
    assert [next(iter(d)).split("_")[0] for d in phases] == ["train", "val"] * 2
    for epoch, row in enumerate(learn.recorder.history):  # the same numbers as the table's
        train, val = phases[2 * epoch], phases[2 * epoch + 1]
        assert train["train_loss"] == row["train_loss"] and math.isnan(train["train_accuracy"])
        assert val["val_loss"] == row["valid_loss"] and val["val_accuracy"] == row["accuracy"]
    assert cb.sent[0] == {"init": 1.0} and cb.sent[-1] == {"finish": 1.0}
    assert sum("loss" in d for d in cb.sent) == 2 * (3 + 2)  # every batch of both phases


def test_the_log_hook_gets_epoch_train_and_logged_values() -> None:
    got: list[dict[str, object]] = []

    class HookCB(MetricsCB):
        def _log(self, d):  # type: ignore[no-untyped-def]
            got.append(d)

    class LogCB(Callback):
        def after_loss(self, learn: Learner) -> None:
            learn.log(double=2 * learn.loss.detach())

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[HookCB(_accuracy), LogCB()])
    learn.fit(1)
    train, valid = got
    row = learn.recorder.history[0]
    assert list(train) == ["_accuracy", "loss", "double", "epoch", "train"]
    assert train["train"] == "train" and valid["train"] == "eval" and valid["epoch"] == 0
    assert valid["double"] == pytest.approx(2 * row["valid_loss"])
    assert row["valid_double"] == valid["double"]


# -- notebook 05 onwards: the course's image helpers ---------------------------------------------


def test_the_courses_image_helpers() -> None:
    xb = torch.rand(10, 1, 8, 8)
    fig, axs = subplots(2, 3, imsize=1.5, suptitle="six")
    assert axs.shape == (2, 3) and tuple(fig.get_size_inches()) == (4.5, 3.0)
    assert fig._suptitle is not None and fig._suptitle.get_text() == "six"
    fig, axs = subplots()
    assert isinstance(axs, np.ndarray) and axs.shape == (1,)
    # get_grid: int(sqrt(n)) rows, as many columns as they need; the spare axes switched off
    fig, axs = get_grid(10, title="ten", weight="bold", size=12)
    assert axs.shape == (3, 4) and sum(ax.axison for ax in axs.flat) == 10
    assert fig._suptitle.get_text() == "ten" and fig._suptitle.get_fontweight() == "bold"
    ax = show_image(xb[0], ax=axs.flat[0], title="first", cmap="gray")
    assert ax is axs.flat[0] and ax.get_title() == "first"
    assert ax.images[0].get_array().shape == (8, 8)  # (1, H, W) shown as (H, W)
    rgb = show_image(torch.rand(3, 5, 7))  # channels first, a new figure
    assert rgb.images[0].get_array().shape == (5, 7, 3) and not rgb.axison
    # show_images with the course's arguments
    fig = show_images(xb, imsize=1, suptitle="batch", titles=[str(i) for i in range(10)])
    assert isinstance(fig, Figure) and len(fig.axes) == 10
    assert tuple(fig.get_size_inches()) == (4.0, 3.0) and fig._suptitle.get_text() == "batch"
    with pytest.raises(ValueError, match="imsize must be a positive number"):
        show_images(xb, imsize=0)


def test_show_image_batch_with_the_courses_arguments() -> None:
    x = torch.rand(20, 1, 6, 6)
    y = torch.zeros(20, dtype=torch.long)
    dls = DataLoaders.from_tensors(x[:16], y[:16], x[16:], y[16:], bs=8, shuffle=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    learn = Learner(model, dls, F.cross_entropy)
    flip = BatchTransformCB(lambda b: (b[0].flip(-1), *b[1:]))
    before = [p.clone() for p in model.parameters()]
    fig = learn.show_image_batch(max_n=4, imsize=1.5, cbs=flip)
    assert len(fig.axes) == 4 and tuple(fig.get_size_inches()) == (3.0, 3.0)
    shown = np.stack([ax.images[0].get_array() for ax in fig.axes])
    np.testing.assert_allclose(shown, x[:4, 0].flip(-1).numpy(), rtol=1e-6)  # transformed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert learn.opt is None and learn.recorder.losses == []


# -- notebook 25: capture_preds(inps=True) --------------------------------------------------------


def test_capture_preds_with_inputs_equals_a_hand_loop() -> None:
    learn = Learner(make_model(), make_dls(16, 12, bs=8), F.cross_entropy)
    learn.fit(1)
    preds, targs, inps = learn.capture_preds(inps=True)
    want_p, want_t, want_x = [], [], []
    with torch.no_grad():
        for xb, yb in learn.dls.valid:
            want_p.append(learn.model(xb))
            want_t.append(yb)
            want_x.append(xb)
    assert torch.equal(preds, torch.cat(want_p)) and torch.equal(targs, torch.cat(want_t))
    assert torch.equal(inps, torch.cat(want_x))
    assert len(learn.capture_preds()) == 2  # without inps: (preds, targs), as before


# -- notebooks 09, 11 and 25: lr_find the course's way -------------------------------------------


def test_lr_find_the_courses_way_records_start_lr_times_gamma_to_the_k() -> None:
    set_seed(0)
    learn = Learner(make_model(), make_dls(64, 8, bs=8), F.cross_entropy, opt_func=torch.optim.SGD)
    result = learn.lr_find(gamma=1.3, max_mult=3, start_lr=1e-5, max_epochs=10)
    lrs, losses = result.lrs, result.losses
    assert lrs == [1e-5 * 1.3**k for k in range(len(lrs))]
    # It stopped at the first loss above 3x the minimum so far (or NaN), else after 10 epochs of
    # 8 batches; the rate grows by 1.3 a batch, so it diverges well before.
    best, stop = math.inf, None
    for k, loss in enumerate(losses):
        best = min(best, loss)
        if math.isnan(loss) or loss > 3 * best:
            stop = k
            break
    assert stop is not None and len(lrs) == stop + 1 < 80
    # The course's callback, in a fit of the student's own
    lrf = LRFinderCB(gamma=1.3, max_mult=3)
    learn.fit(3, lr=1e-4, cbs=lrf)
    assert lrf.lrs[:3] == [1e-4, 1e-4 * 1.3, 1e-4 * 1.3**2]
    with pytest.raises(ValueError, match="two ways to run it"):
        learn.lr_find(gamma=1.3, num_it=50)


def test_lr_find_draws_on_the_current_figure_where_figures_show() -> None:
    pytest.importorskip("matplotlib_inline", reason="the notebook's inline backend")
    formatters = pytest.importorskip("IPython.core.formatters", reason="needs IPython")
    backend = matplotlib.get_backend()
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD)
    try:
        plt.switch_backend("module://matplotlib_inline.backend_inline")
        plt.figure()
        result = learn.lr_find(num_it=20, stop_factor=None)
        ax = plt.gca()
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "learning rate"
        np.testing.assert_allclose(ax.lines[0].get_xdata(), result.lrs)
        # Drawn already, the result shows as one line of text, not the plot a second time.
        data, _ = formatters.DisplayFormatter().format(result)
        assert "image/png" not in data and data["text/plain"].startswith("LRFindResult(")
        plt.switch_backend("agg")  # a backend that shows nothing: the result shows its plot
        data, _ = formatters.DisplayFormatter().format(result)
        assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close("all")
        plt.switch_backend(backend)
