"""The batch protocol (learner.batches): batches of any shape, outputs of any structure, batches
without targets, the model's own loss, values logged besides the loss, each against a hand loop."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, make_data, make_dls, make_model
from torch import nn

from learner import (
    BatchFormat,
    Callback,
    GradAccumCB,
    Learner,
    MetricsCB,
    accuracy,
)

# -- BatchFormat on its own ----------------------------------------------------------------------


def test_split_takes_tuples_dicts_tensors_and_a_function() -> None:
    x, x2, y, w = torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(2)
    fmt = BatchFormat()
    assert fmt.split((x, y)) == ((x,), (y,))
    assert fmt.split([x, y, w]) == ((x,), (y, w))  # a list, and extra items go to the loss
    assert fmt.split((x,)) == ((x,), ())
    assert fmt.split(x)[0][0] is x and fmt.split(x)[1] == ()
    assert BatchFormat(n_inp=2).split((x, x2, y)) == ((x, x2), (y,))
    # The model computing its own loss gets the whole batch.
    assert fmt.split((x, y), to_model=True) == ((x, y), ())
    hf = {"input_ids": x, "attention_mask": x2, "labels": y}
    assert fmt.split(hf) == ({"input_ids": x, "attention_mask": x2}, (y,))
    assert fmt.split(hf, to_model=True) == (hf, (y,))
    assert fmt.split({"input_ids": x}) == ({"input_ids": x}, ())  # no labels: no targets
    named = BatchFormat(inputs="image", targets="label")
    assert named.split({"image": x, "label": y, "id": w}) == ((x,), (y,))
    assert named.split({"image": x, "label": y}, to_model=True) == ({"image": x, "label": y}, (y,))
    keys = BatchFormat(inputs=["a", "b"], targets=["y", "w"])
    assert keys.split({"a": x, "b": x2, "y": y, "w": w}) == ({"a": x, "b": x2}, (y, w))
    custom = BatchFormat(split=lambda b: ((b.x,), (b.y,)))
    assert custom.split(SimpleNamespace(x=x, y=y)) == ((x,), (y,))


def test_preds_and_loss_of_outputs() -> None:
    fmt, t = BatchFormat(), torch.ones(2, 3)

    class Out:  # an output object, as Hugging Face's ModelOutput
        def __init__(self) -> None:
            self.logits, self.loss = t, torch.tensor(0.5)

    assert fmt.preds(t) is t
    assert fmt.preds((t, t)) == (t, t)
    assert fmt.preds({"logits": t, "aux": t}) == {"logits": t, "aux": t}  # a plain dict: whole
    assert fmt.preds(Out()) is t
    assert fmt.loss(Out()) == 0.5 and fmt.loss({"loss": torch.tensor(2.0)}) == 2.0
    assert BatchFormat(preds=lambda out: out[0]).preds((t, 3)) is t
    assert BatchFormat(loss=lambda out: out[1]).loss((t, torch.tensor(3.0))) == 3.0
    with pytest.raises(ValueError, match=r"loss_func=None .* returned Tensor.* with no loss"):
        fmt.loss(t)


def test_bad_formats_are_refused_with_the_fix() -> None:
    for bad in (0, 1.0, True):
        with pytest.raises(ValueError, match="n_inp must be an int >= 1"):
            BatchFormat(n_inp=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"BatchFormat\(split=\.\.\.\) takes a function"):
        BatchFormat(split=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"f\(batch\) must return \(inputs, targets\)"):
        BatchFormat(split=lambda b: (b, b)).split([1])
    with pytest.raises(KeyError, match=r"no key 'image'; its keys are \['img'\]"):
        BatchFormat(inputs="image").split({"img": torch.ones(1)})
    with pytest.raises(TypeError, match="batch_format must be a BatchFormat"):
        Learner(make_model(), make_dls(), F.cross_entropy, batch_format=lambda b: b)  # type: ignore[arg-type]


# -- several inputs, dict batches, against hand loops --------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x2)


def _hand_sgd(model: nn.Module, data: list[Any], step: Any, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for batch in data:
        step(model, batch).backward()
        opt.step()
        opt.zero_grad()


def test_several_inputs_train_as_a_hand_loop() -> None:
    x, y = make_data(16)
    x2 = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    train = [(x[i : i + 8], x2[i : i + 8], y[i : i + 8]) for i in (0, 8)]
    dls = SimpleNamespace(train=train, valid=train)
    learn = Learner(
        TwoInputs(), dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD,
        metrics=accuracy, batch_format=BatchFormat(n_inp=2),
    )  # fmt: skip
    learn.fit(2)
    hand = TwoInputs()
    for _ in range(2):
        _hand_sgd(hand, train, lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2]))
    for p, q in zip(learn.model.parameters(), hand.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():
        out = hand(x, x2)
    assert learn.recorder.history[-1]["valid_loss"] == pytest.approx(
        F.cross_entropy(out, y).item(), abs=1e-6
    )
    assert torch.equal(learn.get_preds()[0], torch.cat([learn.model(b[0], b[1]) for b in train]))
    assert torch.equal(learn.infer((x[0], x2[0])), learn.model(x[:1], x2[:1])[0])


class ImageModel(nn.Module):
    """Takes its input by the name the dataset gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def test_dict_batches_with_keys_named_train_as_a_hand_loop() -> None:
    x, y = make_data(16)
    train = [{"image": x[i : i + 8], "label": y[i : i + 8]} for i in (0, 8)]
    fmt = BatchFormat(targets="label")  # the other keys, by name: model(image=...)
    learn = Learner(
        ImageModel(), SimpleNamespace(train=train, valid=train), F.cross_entropy, lr=0.1,
        opt_func=torch.optim.SGD, batch_format=fmt, metrics=accuracy,
    )  # fmt: skip
    learn.fit(1)
    hand = ImageModel()
    _hand_sgd(hand, train, lambda m, b: F.cross_entropy(m(b["image"]), b["label"]))
    for p, q in zip(learn.model.parameters(), hand.parameters()):
        assert torch.equal(p, q)
    preds, targets = learn.get_preds()
    assert torch.equal(targets, y) and torch.equal(preds, hand(image=x).detach())
    assert torch.equal(learn.infer({"image": x[3]}), hand(image=x[3:4])[0].detach())
    # A plain nn.Sequential takes the image positionally: BatchFormat(inputs="image").
    seq = Learner(
        make_model(), SimpleNamespace(train=train, valid=None), F.cross_entropy, lr=0.1,
        opt_func=torch.optim.SGD, batch_format=BatchFormat(inputs="image", targets="label"),
    )  # fmt: skip
    seq.fit(1)
    for p, q in zip(seq.model.parameters(), hand.net.parameters()):
        assert torch.equal(p, q)


# -- several outputs -----------------------------------------------------------------------------


class TupleModel(nn.Module):
    """Returns (logits, an auxiliary regression output)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()
        self.aux = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.body(x), self.aux(x).squeeze(-1)


def tuple_loss(preds: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    logits, aux = preds
    return F.cross_entropy(logits, y) + F.mse_loss(aux, y.float())


def test_a_model_with_several_outputs_flows_everywhere() -> None:
    dls = make_dls(n_train=16, n_valid=12, bs=8)  # a ragged last validation batch of 4
    x = torch.cat([b[0] for b in dls.valid])
    y = torch.cat([b[1] for b in dls.valid])

    def first_acc(preds: Any, y: torch.Tensor) -> torch.Tensor:
        return accuracy(preds[0], y)

    # No metric: nothing reads the tuple; with one, it gets the tuple as the model returned it.
    Learner(TupleModel(), dls, tuple_loss, lr=0.1).fit(1)
    learn = Learner(TupleModel(), dls, tuple_loss, lr=0.1, metrics=first_acc)
    learn.fit(1)
    with torch.no_grad():
        logits, aux = learn.model(x)
    row = learn.recorder.history[-1]
    assert row["valid_loss"] == pytest.approx(
        (F.cross_entropy(logits[:8], y[:8]) + F.mse_loss(aux[:8], y[:8].float())).item() * 8 / 12
        + (F.cross_entropy(logits[8:], y[8:]) + F.mse_loss(aux[8:], y[8:].float())).item() * 4 / 12,
        abs=1e-6,
    )
    assert row["first_acc"] == pytest.approx(accuracy(logits, y).item(), abs=1e-7)
    preds, targets = learn.get_preds()  # concatenated per field
    assert isinstance(preds, tuple) and torch.equal(preds[0], logits)
    assert torch.equal(preds[1], aux) and torch.equal(targets, y)
    one = learn.infer(x[2])  # one item in: that item's outputs out, per field
    assert torch.allclose(one[0], logits[2], atol=1e-6) and one[1].shape == ()
    assert torch.allclose(one[1], aux[2], atol=1e-6)
    cp_preds, cp_targs = learn.capture_preds()
    assert torch.equal(cp_preds[0], logits) and torch.equal(cp_targs, y)


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(x)
        return {"logits": out, "energy": out.logsumexp(-1)}


def test_a_model_returning_a_dict() -> None:
    dls = make_dls()
    fmt = BatchFormat(preds=lambda out: out["logits"])  # the loss and metrics see the logits
    learn = Learner(DictModel(), dls, F.cross_entropy, lr=0.1, metrics=accuracy, batch_format=fmt)
    learn.fit(1)
    x = torch.cat([b[0] for b in dls.valid])
    assert torch.equal(learn.get_preds()[0], learn.model(x)["logits"].detach())
    # Without the preds function the whole dict flows: to a loss that takes it, to get_preds.
    whole = Learner(DictModel(), dls, lambda out, y: F.cross_entropy(out["logits"], y), lr=0.1)
    whole.fit(1)
    preds = whole.get_preds(with_targets=False)
    assert set(preds) == {"logits", "energy"} and preds["energy"].shape == (8,)
    item = whole.infer(x[0])
    assert item["logits"].shape == (3,) and item["energy"].shape == ()


# -- batches without targets, the model's own loss -----------------------------------------------


class AutoEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(4, 2), nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class SelfLossModel(AutoEncoder):
    """Computes its own loss, as a Hugging Face model given labels does."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        recon = super().forward(x)
        return {"recon": recon, "loss": F.mse_loss(recon, x)}


def test_batches_without_targets_and_the_models_own_loss() -> None:
    x, _ = make_data(16)
    train = [(x[:8],), (x[8:],)]
    dls = SimpleNamespace(train=train, valid=train)
    hand = AutoEncoder()
    _hand_sgd(hand, train, lambda m, b: F.mse_loss(m(b[0]), b[0]))
    # A loss of the predictions alone (the batch (x,) has no targets), and the model's own.
    small = Learner(AutoEncoder(), dls, lambda p: p.pow(2).mean(), lr=0.1, opt_func=torch.optim.SGD)
    small.fit(1)
    hand_small = AutoEncoder()
    _hand_sgd(hand_small, train, lambda m, b: m(b[0]).pow(2).mean())
    for p, q in zip(small.model.parameters(), hand_small.parameters()):
        assert torch.equal(p, q)
    own = Learner(SelfLossModel(), dls, None, lr=0.1, opt_func=torch.optim.SGD)
    own.fit(1)
    for p, q in zip(own.model.parameters(), hand.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():
        want = F.mse_loss(hand(x), x).item()
    assert own.recorder.history[-1]["valid_loss"] == pytest.approx(want, abs=1e-6)
    preds = own.get_preds(with_targets=False)
    assert torch.equal(preds["recon"], hand(x).detach())
    with pytest.raises(ValueError, match=r"the batches have no targets .*with_targets=False"):
        own.get_preds()
    # Per-item losses of the model's own loss: each item alone through the model.
    learn = Learner(SelfLossModel(), SimpleNamespace(train=batches(x, x, 8), valid=None), None)
    _, losses = learn.get_preds(train, with_targets=False, with_loss=True)
    with torch.no_grad():
        per_item = F.mse_loss(learn.model(x)["recon"], x, reduction="none").mean(1)
    assert torch.allclose(losses, per_item, atol=1e-7)


def test_loss_func_none_with_a_model_without_a_loss_says_what_to_do() -> None:
    learn = Learner(make_model(), make_dls(), None)
    before = copy.deepcopy(learn.model.state_dict())
    with pytest.raises(TypeError) as info:  # (x, y) to a model taking x alone
        learn.fit(1)
    assert "loss_func=None: the model computes its own loss" in " ".join(info.value.__notes__)

    class TakesTargets(nn.Module):  # takes them, returns no loss
        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    learn = Learner(TakesTargets(learn.model), make_dls(), None)
    with pytest.raises(ValueError, match=r"loss_func=None trains on the model's own loss"):
        learn.fit(1)
    assert all(torch.equal(v, learn.model.body.state_dict()[k]) for k, v in before.items())


# -- values logged besides the loss ----------------------------------------------------------------


class LogNormCB(Callback):
    """Logs each batch's mean prediction norm, on training and validation batches."""

    def after_loss(self, learn: Any) -> None:
        learn.log(norm=learn.preds.detach().norm(dim=1).mean(), half=0.5)


def test_logged_values_are_averaged_by_batch_size_into_the_table() -> None:
    dls = make_dls(n_train=20, n_valid=12, bs=8)  # ragged batches: 8, 8, 4 and 8, 4
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.1, cbs=LogNormCB())
    learn.fit(2)
    row = learn.recorder.history[-1]
    norms = learn.recorder.logged["norm"]
    assert len(norms) == 6 and learn.recorder.logged["half"] == [0.5] * 6
    sizes = [8, 8, 4]
    want = sum(n * s for n, s in zip(norms[3:], sizes)) / 20
    assert row["train_norm"] == pytest.approx(want, rel=1e-12) and row["train_half"] == 0.5
    x = torch.cat([b[0] for b in dls.valid])
    with torch.no_grad():
        valid_norm = learn.model(x).norm(dim=1).mean().item()
    assert row["valid_norm"] == pytest.approx(valid_norm, abs=1e-6)
    assert list(row)[:3] == ["epoch", "train_loss", "valid_loss"]
    with pytest.raises(ValueError, match="'loss' is the name of the loss or a metric"):

        class Clash(Callback):
            def after_loss(self, learn: Any) -> None:
                learn.log(loss=1.0)

        Learner(make_model(), dls, F.cross_entropy, cbs=Clash()).fit(1)


def test_a_metrics_cb_without_metrics_never_reads_the_outputs() -> None:
    class Opaque:  # an output nothing but the loss can read
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    class OpaqueModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = make_model()

        def forward(self, x: torch.Tensor) -> Opaque:
            return Opaque(self.body(x))

    learn = Learner(
        OpaqueModel(), make_dls(), lambda o, y: F.cross_entropy(o.t, y), cbs=MetricsCB()
    )
    learn.fit(1)
    assert learn.recorder.history[-1]["valid_loss"] > 0


def test_mixed_precision_gives_metrics_full_precision_fields() -> None:
    from learner import MixedPrecisionCB

    seen: list[torch.dtype] = []

    class SeeCB(Callback):
        order = 20  # after MixedPrecisionCB's after_predict

        def after_predict(self, learn: Any) -> None:
            seen.extend(t.dtype for t in learn.preds)

    learn = Learner(TupleModel(), make_dls(), tuple_loss, cbs=[MixedPrecisionCB(), SeeCB()])
    learn.fit(1)
    assert seen and set(seen) == {torch.float32}


def test_a_batch_of_its_own_structure_is_weighted_by_its_split() -> None:
    # MetricsCB and GradAccumCB count a batch's samples from its split, whatever the batch is.
    x, y = make_data(20)
    items = [SimpleNamespace(x=x[i : i + 8], y=y[i : i + 8]) for i in (0, 8, 16)]  # 8, 8, 4
    fmt = BatchFormat(split=lambda b: ((b.x,), (b.y,)))
    learn = Learner(
        make_model(), SimpleNamespace(train=items, valid=items), F.cross_entropy, lr=0.1,
        batch_format=fmt, cbs=GradAccumCB(2),
    )  # fmt: skip
    learn.fit(1)
    with torch.no_grad():
        want = F.cross_entropy(learn.model(x), y).item()
    assert learn.recorder.history[-1]["valid_loss"] == pytest.approx(want, abs=1e-6)
