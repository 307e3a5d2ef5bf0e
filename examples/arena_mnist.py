"""ARENA's first MNIST training loop (chapter 0, CNNs), run by the Learner.

The recipe as ARENA gives it: torchvision's `datasets.MNIST` with `ToTensor` and `Normalize`,
the first 10,000 training and 1,000 test images, batches of 64, a `SimpleMLP` (784-100-10) trained
with Adam at lr 1e-3 for 3 epochs, a progress bar showing the loss. The hand-written loop becomes
`Learner.fit`; afterwards, a plot of the loss of every batch against the number of examples seen,
with the test accuracy of each epoch on a second axis, is saved as a PNG. ARENA expects a test
accuracy above 0.8 after the first epoch.

MNIST must be in $LEARNER_DATA/MNIST/raw/ (default ~/.cache/learner/MNIST/raw/); running
`python examples/train_mnist.py` once downloads it there.

Run from the repository root:
    python examples/arena_mnist.py
    python examples/arena_mnist.py --epochs 1 --out-dir /tmp/runs
"""

import argparse
import dataclasses
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import Subset
from torchvision import datasets, transforms

from learner import Learner, accuracy
from learner.data import DataLoaders, data_root, mnist_available


@dataclass
class SimpleMLPTrainingArgs:
    batch_size: int = 64
    epochs: int = 3
    learning_rate: float = 1e-3
    trainset_size: int = 10_000
    testset_size: int = 1_000
    out_dir: str = "runs"
    seed: int = 42


def parse_args(cls: type[Any]) -> Any:
    """Command-line flags from a dataclass: `--batch-size 32` sets `batch_size`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                            default=f.default, help=f"default: {f.default}")  # fmt: skip
    return cls(**vars(parser.parse_args()))


args = parse_args(SimpleMLPTrainingArgs)
torch.manual_seed(args.seed)

# -- data: ARENA's get_mnist ----------------------------------------------------------------------
root = data_root()
if not mnist_available(root):
    sys.exit(f"MNIST not found in {root / 'MNIST' / 'raw'}. Put the MNIST files in "
             "<dir>/MNIST/raw/ and set LEARNER_DATA=<dir>, or run `python examples/train_mnist.py` "
             "once to download them.")  # fmt: skip
MNIST_TRANSFORM = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
)
mnist_trainset = datasets.MNIST(root, train=True, transform=MNIST_TRANSFORM)
mnist_testset = datasets.MNIST(root, train=False, transform=MNIST_TRANSFORM)
mnist_trainset = Subset(mnist_trainset, indices=range(args.trainset_size))
mnist_testset = Subset(mnist_testset, indices=range(args.testset_size))
dls = DataLoaders.from_datasets(mnist_trainset, mnist_testset, bs=args.batch_size)

# -- model: ARENA's SimpleMLP ---------------------------------------------------------------------
model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 100), nn.ReLU(), nn.Linear(100, 10))

# -- train: the progress bar shows the running loss, the table the test loss and accuracy ---------
learn = Learner(model, dls, F.cross_entropy, lr=args.learning_rate, opt_func=torch.optim.Adam,
                metrics=accuracy)  # fmt: skip
learn.fit(args.epochs)

# -- plot: loss per batch against examples seen, test accuracy per epoch on a second axis --------
n = len(mnist_trainset)
batch_sizes = [min(args.batch_size, n - i) for i in range(0, n, args.batch_size)]
examples_seen = list(itertools.accumulate(batch_sizes * args.epochs))
losses = learn.recorder.losses
accuracies = [h["accuracy"] for h in learn.recorder.history]

fig = Figure(figsize=(8, 4), layout="constrained")
ax = fig.subplots()
ax.plot(examples_seen[: len(losses)], losses, lw=1, label="training loss")
ax.set(xlabel="examples seen", ylabel="cross-entropy loss", ylim=(0, None), xlim=(0, None))
ax2 = ax.twinx()
epoch_ends = [n * (epoch + 1) for epoch in range(len(accuracies))]
ax2.plot(epoch_ends, accuracies, "o-", color="tab:orange", label="test accuracy")
ax2.set(ylabel="test accuracy", ylim=(0, 1))
ax.legend(handles=[*ax.get_lines(), *ax2.get_lines()], loc="center right")
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "arena_mnist.png", dpi=100)
print(f"saved {out / 'arena_mnist.png'}")

print(f"test accuracy after epoch 1: {accuracies[0]:.4f} (ARENA expects > 0.8)")
print(f"final test accuracy: {accuracies[-1]:.4f}")
