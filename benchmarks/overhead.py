"""How much does the Learner cost over a hand-written loop? One MNIST recipe, measured side by side.

The recipe: MLP 784-50-10 on flattened, normalised MNIST, batch 64 (validation 128), SGD lr 0.1,
2 epochs with validation. Each repetition runs every variant once, in turn, so machine drift hits
all of them alike; the table reports the median seconds and the ratio to the hand-written slicing
loop, with each variant's final validation accuracy (they train on the same batches from the same
initial weights, so the accuracies must agree; the DataLoader loop and the Learner see exactly the
same batches and agree exactly, the slicing loop draws its own order).

Variants:
- `slicing loop`: a hand-written loop over one permutation per epoch, indexing whole tensors.
- `DataLoader loop`: the same loop over `DataLoader(TensorDataset(...), shuffle=True)`.
- `Learner`: `Learner(...).fit(2)` on `DataLoaders.from_tensors`, default callbacks (metrics,
  recorder, progress) and `metrics=accuracy`.
- `Learner, no progress`: the same without `ProgressCB`.

- `Lightning`, `fastai` (with `--lightning`, `--fastai`, when installed): the recipe as their
  users write it, each with its default progress reporting and an accuracy metric.

Run: `LEARNER_DATA=../shared/data python benchmarks/overhead.py [--reps 5] [--epochs 2]
[--lightning] [--fastai]`
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learner import Learner, accuracy
from learner.data import DataLoaders, DataNotFoundError, mnist

BS, LR = 64, 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))


def evaluate(model: nn.Module, batches: object) -> float:
    """Validation loss and accuracy, weighted by batch size and read once, as a careful hand loop
    does (the Learner reports both too, so both sides do the same work)."""
    model.eval()
    loss_sum, correct, n = torch.zeros(()), torch.zeros((), dtype=torch.int64), 0
    with torch.no_grad():
        for xb, yb in batches:  # type: ignore[attr-defined]
            preds = model(xb)
            loss_sum += F.cross_entropy(preds, yb) * len(yb)
            correct += (preds.argmax(1) == yb).sum()
            n += len(yb)
    _, acc = (loss_sum / n).item(), correct.item() / n
    return acc


def slicing_loop(data: tuple[torch.Tensor, ...], epochs: int) -> float:
    x, y, xv, yv = data
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(1)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(BS):
            loss = F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
            loss.backward()
            opt.step()
            opt.zero_grad()
        valid = ((xv[i : i + 2 * BS], yv[i : i + 2 * BS]) for i in range(0, len(xv), 2 * BS))
        acc = evaluate(model, valid)
    return acc


def dataloader_loop(data: tuple[torch.Tensor, ...], epochs: int) -> float:
    x, y, xv, yv = data
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(1)
    train = DataLoader(TensorDataset(x, y), batch_size=BS, shuffle=True, generator=g)
    # Validation shares the generator, as `DataLoaders.from_datasets` does: DataLoader draws a
    # seed from it on every iteration, so sharing keeps the training order identical too.
    valid = DataLoader(TensorDataset(xv, yv), batch_size=2 * BS, generator=g)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for xb, yb in train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        acc = evaluate(model, valid)
    return acc


def learner_fit(data: tuple[torch.Tensor, ...], epochs: int, progress: bool) -> float:
    dls = DataLoaders.from_tensors(*data, bs=BS, generator=torch.Generator().manual_seed(1))
    learn = Learner(
        make_model(), dls, F.cross_entropy, lr=LR, opt_func=torch.optim.SGD, metrics=accuracy
    )
    if not progress:
        learn.remove_cb(learn.progress)
    learn.fit(epochs)
    return float(learn.recorder.history[-1]["accuracy"])


def lightning_fit(data: tuple[torch.Tensor, ...], epochs: int) -> float:
    """The recipe as a Lightning user writes it: a LightningModule, torch DataLoaders, Trainer."""
    import lightning as L

    x, y, xv, yv = data

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model()

        def training_step(self, batch: list[torch.Tensor], i: int) -> torch.Tensor:
            loss = F.cross_entropy(self.model(batch[0]), batch[1])
            self.log("train_loss", loss, on_epoch=True, prog_bar=True)
            return loss

        def validation_step(self, batch: list[torch.Tensor], i: int) -> None:
            preds = self.model(batch[0])
            self.log("valid_loss", F.cross_entropy(preds, batch[1]), on_epoch=True)
            self.log("accuracy", accuracy(preds, batch[1]), on_epoch=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    g = torch.Generator().manual_seed(1)
    train = DataLoader(TensorDataset(x, y), batch_size=BS, shuffle=True, generator=g)
    valid = DataLoader(TensorDataset(xv, yv), batch_size=2 * BS, generator=g)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    module = Module()
    trainer.fit(module, train, valid)
    return evaluate(module.model, valid)


def fastai_fit(data: tuple[torch.Tensor, ...], epochs: int) -> float:
    """The recipe as a fastai user writes it: `DataLoaders.from_dsets`, `Learner`, `fit`."""
    from fastai.data.core import DataLoaders as FastaiDataLoaders
    from fastai.learner import Learner as FastaiLearner
    from fastai.metrics import accuracy as fastai_accuracy
    from fastai.optimizer import SGD

    x, y, xv, yv = data
    dls = FastaiDataLoaders.from_dsets(
        TensorDataset(x, y), TensorDataset(xv, yv), bs=BS, device=torch.device("cpu")
    )
    learn = FastaiLearner(
        dls, make_model(), loss_func=F.cross_entropy, opt_func=SGD, metrics=fastai_accuracy
    )
    learn.fit(epochs, LR)
    return float(learn.recorder.values[-1][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--root", default=None, help="data root (default: $LEARNER_DATA)")
    parser.add_argument("--lightning", action="store_true", help="add Lightning (if installed)")
    parser.add_argument("--fastai", action="store_true", help="add fastai (if installed)")
    args = parser.parse_args()
    try:
        data = tuple(mnist(root=args.root, flatten=True, download=False))
    except DataNotFoundError as e:
        print(f"MNIST not found, nothing to measure: {e}".splitlines()[0])
        print("Set LEARNER_DATA to a folder holding MNIST/raw/ (or pass --root).")
        return
    variants: dict[str, Callable[[], float]] = {
        "slicing loop": lambda: slicing_loop(data, args.epochs),
        "DataLoader loop": lambda: dataloader_loop(data, args.epochs),
        "Learner": lambda: learner_fit(data, args.epochs, progress=True),
        "Learner, no progress": lambda: learner_fit(data, args.epochs, progress=False),
    }
    for flag, name, module, run in [
        (args.lightning, "Lightning", "lightning", lightning_fit),
        (args.fastai, "fastai", "fastai", fastai_fit),
    ]:
        if not flag:
            continue
        if importlib.util.find_spec(module) is None:
            print(f"{name} is not installed (pip install {module}): left out.")
        else:
            variants[name] = functools.partial(run, data, args.epochs)
    times: dict[str, list[float]] = {k: [] for k in variants}
    accs: dict[str, float] = {}
    for _ in range(args.reps):
        for name, run in variants.items():
            # The Learner's table goes to a buffer: printing is not what is measured here.
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                start = time.perf_counter()
                accs[name] = run()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["slicing loop"])
    print(
        f"MNIST MLP 784-50-10, bs {BS}, SGD, {args.epochs} epochs with validation; "
        f"median of {args.reps}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{sys.platform}"
    )
    print(f"{'variant':<24}{'seconds':>9}{'ratio':>8}{'accuracy':>10}")
    for name in variants:
        t = statistics.median(times[name])
        print(f"{name:<24}{t:>9.3f}{t / base:>7.3f}x{accs[name]:>10.4f}")


if __name__ == "__main__":
    main()
