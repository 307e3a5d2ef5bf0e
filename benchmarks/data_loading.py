"""How long one shuffled epoch of MNIST batches takes, four ways.

(a) torchvision MNIST with per-image ToTensor+Normalize, through a torch DataLoader
(b) a DataLoader over a TensorDataset of tensors converted once
(c) learner's `DataLoaders.from_tensors(...).train`
(d) a hand-written loop indexing whole tensors with a random permutation: the floor

The methods run interleaved, one epoch each per repetition, so drift in the machine's speed
hits all of them alike; the table shows the median of each.

    LEARNER_DATA=<folder holding MNIST/raw/> python benchmarks/data_loading.py --reps 5

Run it on a quiet machine: when other processes keep the cores busy, torch's multi-threaded
indexing stalls and the in-memory paths slow down many times over (try --threads 1).
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from learner.data import DataLoaders, data_root, mnist, mnist_available


def epoch_time(batches: Callable[[], Iterable[Any]], expected: int) -> float:
    """Seconds to draw every batch of one epoch, touching each so nothing is skipped."""
    start = time.perf_counter()
    seen = 0
    for xb, _ in batches():
        seen += xb.shape[0]
    elapsed = time.perf_counter() - start
    if seen != expected:
        raise RuntimeError(f"saw {seen} samples, expected {expected}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder holding MNIST/raw/ (or LEARNER_DATA)")
    parser.add_argument("--reps", type=int, default=5, help="epochs timed per method")
    parser.add_argument("--bs", type=int, default=64, help="batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if not mnist_available(args.root):
        print(
            f"MNIST not found under {data_root(args.root) / 'MNIST' / 'raw'}; nothing to time.\n"
            "Set LEARNER_DATA (or pass --root) to a folder holding MNIST/raw/."
        )
        return 0

    from torchvision import datasets, transforms

    tfm = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    arena_ds = datasets.MNIST(data_root(args.root), train=True, transform=tfm)
    x, y, _, _ = mnist(args.root, download=False)
    n, bs = len(x), args.bs

    arena_dl = DataLoader(arena_ds, batch_size=bs, shuffle=True)
    tensor_dl = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)
    ours = DataLoaders.from_tensors(x, y, bs=bs).train

    def by_hand() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            yield x[idx], y[idx]

    methods: dict[str, tuple[str, Callable[[], Iterable[Any]]]] = {
        "a": ("torchvision MNIST + transforms + DataLoader", lambda: arena_dl),
        "b": ("DataLoader(TensorDataset)", lambda: tensor_dl),
        "c": ("DataLoaders.from_tensors(...).train", lambda: ours),
        "d": ("randperm + tensor indexing by hand", by_hand),
    }
    print(
        f"MNIST train: {n} images, bs={bs}, {args.reps} reps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    times: dict[str, list[float]] = {key: [] for key in methods}
    for rep in range(args.reps):
        for key, (_, batches) in methods.items():
            times[key].append(epoch_time(batches, n))
        done = ", ".join(f"({key}) {ts[-1]:.3f}" for key, ts in times.items())
        print(f"  rep {rep + 1}/{args.reps}: {done} s", file=sys.stderr)

    med = {key: statistics.median(ts) for key, ts in times.items()}
    width = max(len(desc) for desc, _ in methods.values()) + 4
    print(f"\n{'method':<{width}}  {'median s':>9}  {'min s':>9}  {'vs (d)':>7}")
    for key, (desc, _) in methods.items():
        label, ratio = f"({key}) {desc}", med[key] / med["d"]
        print(f"{label:<{width}}  {med[key]:9.4f}  {min(times[key]):9.4f}  {ratio:6.2f}x")
    speedup, rel = med["a"] / med["c"], med["c"] / med["d"]
    print(f"\n(c) is {speedup:.0f}x faster than (a) and takes {rel:.2f}x the time of (d)")
    if any(max(ts) > 3 * min(ts) for ts in times.values()):
        # Other processes on the cores stall torch's multi-threaded indexing badly: with every
        # core busy, an epoch of (c) or (d) can take 100x longer. --threads 1 is immune.
        print("warning: some epochs took over 3x the fastest, so the machine was busy: rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
