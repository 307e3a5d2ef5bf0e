"""How much does the Learner cost over a hand-written loop? One MNIST recipe, measured side by side.

The recipe: MLP 784-50-10 on flattened, normalised MNIST (or, with `--model cnn`, a small CNN on
the images), batch 64 (validation 128), SGD lr 0.1, 2 epochs with validation, on one CPU thread
(`torch.set_num_threads(1)`: other processes on the cores stall torch's threads and blur the
figures). Each repetition runs every variant once, in turn, so machine drift hits all of them
alike. The table reports for each variant the median seconds; the ratio to the reference, the
fastest hand-written loop we know (`index_select`), as the median over repetitions of the ratio
within each, which cancels drift; the extra microseconds per batch (training and validation) that
ratio means; the ratio to the fancy-indexing loop, measured the same way; and the final validation
accuracy. The variants train from the same initial weights, so the accuracies must agree: the two
hand loops over a permutation draw the same batches and agree exactly, and so do the DataLoader
loop and the Learner, which draw theirs from another generator.

Variants:
- `index_select loop` (the reference): a hand-written loop over one `randperm` per epoch, split
  into batches of indices, each batch gathered with `x.index_select(0, idx)`.
- `fancy-indexing loop`: the same loop gathering with `x[idx]`.
- `DataLoader loop`: the same loop over `DataLoader(TensorDataset(...), shuffle=True)`.
- `Learner, default callbacks, metrics=accuracy`: `Learner(...).fit(2)` on
  `DataLoaders.from_tensors`, default callbacks (metrics, recorder, progress) and
  `metrics=accuracy`, with the progress bars drawn (as in a terminal; the output goes to a
  buffer), throttled as they are by default.
- `Learner, no bars`: the same with the default `ProgressCB` as it runs when output is not a
  terminal (a log file, CI): the table of results only.
- `Learner, no ProgressCB`: the same without `ProgressCB`.
- `Learner, fit(steps=, valid_every=)`: the default Learner on the same batches budgeted in
  optimizer steps, validated after as many steps as an epoch has: the cost of the step path.

- `Lightning`, `fastai` (with `--lightning`, `--fastai`, when installed): the recipe as their
  users write it, each with its default progress reporting and an accuracy metric.

Run: `LEARNER_DATA=../shared/data python benchmarks/overhead.py [--reps 11] [--epochs 2]
[--model mlp|cnn] [--lightning] [--fastai]`
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import itertools
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learner import Learner, accuracy
from learner.callbacks import ProgressCB
from learner.data import DataLoaders, DataNotFoundError, mnist

BS, LR = 64, 0.1


MODEL = "mlp"  # set by --model


def make_model() -> nn.Module:
    torch.manual_seed(0)
    if MODEL == "mlp":
        return nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
    # A small CNN, 28x28 -> 14 -> 7 -> 4 -> 2 -> 1: a batch costs a few times the MLP's.
    chans = [1, 8, 16, 32, 64]
    layers: list[nn.Module] = []
    for ni, nf in itertools.pairwise(chans):
        layers += [nn.Conv2d(ni, nf, kernel_size=3, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(64, 10, kernel_size=2), nn.Flatten())


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


def index_select_loop(data: tuple[torch.Tensor, ...], epochs: int) -> float:
    """The reference: the fastest hand-written loop we know."""
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


def fancy_indexing_loop(data: tuple[torch.Tensor, ...], epochs: int) -> float:
    """The same loop, gathering each batch with `x[idx]`: the same batches, slower."""
    x, y, xv, yv = data
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(1)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(BS):
            loss = F.cross_entropy(model(x[idx]), y[idx])
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


def learner_fit(
    data: tuple[torch.Tensor, ...], epochs: int, bars: bool | None, steps: bool = False
) -> float:
    """`bars`: True draws them, None leaves the default (no bars off a terminal), False removes
    `ProgressCB` altogether. `steps`: the same batches budgeted in steps, validated as often
    (`fit(steps=epochs * len(train), valid_every=len(train))`)."""
    dls = DataLoaders.from_tensors(*data, bs=BS, generator=torch.Generator().manual_seed(1))
    learn = Learner(
        make_model(), dls, F.cross_entropy, lr=LR, opt_func=torch.optim.SGD, metrics=accuracy
    )
    if bars is False:
        learn.remove_cb(learn.progress)
    elif bars:
        learn.add_cb(ProgressCB(bars=True))
    if steps:
        n = len(dls.train)
        learn.fit(steps=epochs * n, valid_every=n)
    else:
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
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--root", default=None, help="data root (default: $LEARNER_DATA)")
    parser.add_argument("--lightning", action="store_true", help="add Lightning (if installed)")
    parser.add_argument("--fastai", action="store_true", help="add fastai (if installed)")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    torch.set_num_threads(1)
    try:
        data = tuple(mnist(root=args.root, flatten=args.model == "mlp", download=False))
    except DataNotFoundError as e:
        print(f"MNIST not found, nothing to measure: {e}".splitlines()[0])
        print("Set LEARNER_DATA to a folder holding MNIST/raw/ (or pass --root).")
        return
    reference, fancy = "index_select loop", "fancy-indexing loop"
    variants: dict[str, Callable[[], float]] = {
        reference: lambda: index_select_loop(data, args.epochs),
        fancy: lambda: fancy_indexing_loop(data, args.epochs),
        "DataLoader loop": lambda: dataloader_loop(data, args.epochs),
        "Learner, default callbacks, metrics=accuracy": lambda: learner_fit(
            data, args.epochs, bars=True
        ),
        "Learner, no bars": lambda: learner_fit(data, args.epochs, bars=None),
        "Learner, no ProgressCB": lambda: learner_fit(data, args.epochs, bars=False),
        "Learner, fit(steps=, valid_every=)": lambda: learner_fit(
            data, args.epochs, bars=True, steps=True
        ),
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

    def ratio(name: str, to: str) -> float:
        """The median over repetitions of the ratio within each: drift cancels."""
        return statistics.median(t / b for t, b in zip(times[name], times[to]))

    base = statistics.median(times[reference])
    n_batches = args.epochs * (-(-len(data[0]) // BS) + -(-len(data[2]) // (2 * BS)))
    print(
        f"MNIST {'MLP 784-50-10' if MODEL == 'mlp' else 'CNN 1-8-16-32-64-10'}, bs {BS}, SGD, "
        f"{args.epochs} epochs with validation; "
        f"median of {args.reps}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{sys.platform}"
    )
    print(f"ratio: to the {reference}; us/batch: what that ratio costs per batch")
    width = max(map(len, variants)) + 2
    print(
        f"{'variant':<{width}}{'seconds':>9}{'ratio':>8}{'us/batch':>10}{'vs x[idx]':>11}"
        f"{'accuracy':>10}"
    )
    for name in variants:
        t, r = statistics.median(times[name]), ratio(name, reference)
        extra = (r - 1) * base / n_batches * 1e6
        print(
            f"{name:<{width}}{t:>9.3f}{r:>7.3f}x{extra:>+10.1f}{ratio(name, fancy):>10.3f}x"
            f"{accs[name]:>10.4f}"
        )


if __name__ == "__main__":
    main()
