"""How fast does the Learner reach 98% MNIST test accuracy? The fastest recipe we have found.

The recipe: a small all-convolutional net with BatchNorm (stride-2 convolutions 28 -> 1, as in the
fastai course), MNIST as normalised tensors through `DataLoaders.from_tensors` (kept on the GPU
when there is one), the learning rate from `learn.lr_find()`'s suggestion, and
`learn.fit_one_cycle(n)`. It tries n = 1, 2, ... epochs, each from fresh weights, and reports the
first n whose final test accuracy reaches the target, with the seconds it took (training and
validation, not lr_find, which is timed on its own).

Run: `LEARNER_DATA=../shared/data python benchmarks/time_to_accuracy.py [--bs 128] [--target 0.98]`
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import torch
import torch.nn.functional as F
from torch import nn

from learner import Learner, accuracy, default_device
from learner.data import DataLoaders, DataNotFoundError, mnist


def conv(ni: int, nf: int, act: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(ni, nf, kernel_size=3, stride=2, padding=1, bias=not act)]
    if act:
        layers += [nn.BatchNorm2d(nf), nn.ReLU()]
    return nn.Sequential(*layers)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # 28 -> 14 -> 7 -> 4 -> 2 -> 1
    return nn.Sequential(
        conv(1, 16),
        conv(16, 32),
        conv(32, 64),
        conv(64, 128),
        conv(128, 10, act=False),
        nn.Flatten(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--root", default=None, help="data root (default: $LEARNER_DATA)")
    args = parser.parse_args()
    device = default_device()
    try:
        data = mnist(root=args.root, download=False)
    except DataNotFoundError as e:
        print(str(e).splitlines()[0])
        print("Set LEARNER_DATA to a folder holding MNIST/raw/ (or pass --root).")
        return

    def learner() -> Learner:
        dls = DataLoaders.from_tensors(*data, bs=args.bs, device=device)
        return Learner(make_model(args.seed), dls, F.cross_entropy, metrics=accuracy)

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        found = learner().lr_find()
    lr = found.suggestion or 1e-2
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"bs {args.bs}; lr_find suggests {lr:.2e} ({time.perf_counter() - start:.1f} s)"
    )
    for n in range(1, args.max_epochs + 1):
        learn = learner()
        learn.remove_cb(learn.progress)  # printing is not what is measured
        start = time.perf_counter()
        learn.fit_one_cycle(n, lr_max=lr)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        acc = learn.recorder.history[-1]["accuracy"]
        print(f"fit_one_cycle({n}): accuracy {acc:.4f} in {seconds:.1f} s")
        if acc >= args.target:
            print(f"reached {args.target:.0%} test accuracy in {n} epoch(s), {seconds:.1f} s")
            return
    print(f"did not reach {args.target:.0%} within {args.max_epochs} epochs")


if __name__ == "__main__":
    main()
