"""How training scales over processes: DDP and FSDP, 1 and 2 processes, an MLP and a small CNN.

For each model and strategy (`DistributedCB(strategy="ddp")` or `"fsdp"`) it reports the
training throughput (samples per second, every rank's samples counted) with 1 and with 2
processes launched by `torchrun`, each process single-threaded (`OMP_NUM_THREADS=1`), the batch
size per process fixed (so 2 processes step on global batches twice as large), and the bytes
each rank holds for its parameters and optimizer state (AdamW: two moments per parameter) after
training: the whole model under DDP, about `1/N` of it under FSDP.

The 1- and 2-process launches alternate, `--reps` times; each launch times every model and
strategy (the median of 3 timed epochs after a warm-up one), and the speed-up is the median of
the paired ratios. Each launch also times, beside the Learner, the fastest hand-written loop we
know on the same shards (`index_select` batches of this rank's share of one permutation, the
model wrapped in DDP or sharded with `fully_shard`, AdamW): the second table is the Learner's
time over the hand loop's, the median over launches of the ratio within each. The data are
random tensors of MNIST's shape: it measures the loop and the collectives, not a dataset. Run on
CPUs with gloo (as here), or on GPUs with nccl (`--device cuda`, one GPU per process).

Run: `python benchmarks/scaling.py [--reps 3] [--batches 40] [--bs 64]`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("mlp", "cnn")
STRATEGIES = ("ddp", "fsdp")


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":  # 0.67M parameters
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, 10),
        )  # fmt: skip

    def conv(ni: int, nf: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=2, padding=1), nn.ReLU())

    # 28 -> 14 -> 7 -> 4 -> 2, then a linear head: 0.1M parameters
    return nn.Sequential(conv(1, 16), conv(16, 32), conv(32, 64), conv(64, 128), nn.Flatten(),
                         nn.Linear(128 * 4, 10))  # fmt: skip


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
    return local.numel() * local.element_size()


def held_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state that this rank holds."""
    params = sum(_nbytes(p) for p in model.parameters())
    state = sum(
        _nbytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    return params + state


def hand_loop(name: str, strategy: str, x: torch.Tensor, y: torch.Tensor, bs: int,
              device: torch.device) -> list[float]:  # fmt: skip
    """Seconds of 3 timed epochs (after a warm-up one) of the hand-written loop on this rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(name).to(device)
    if strategy == "ddp":
        ids = [device] if device.type == "cuda" else None
        net: nn.Module = DistributedDataParallel(model, device_ids=ids)
    else:  # one mesh for all the blocks, as learner.fsdp.shard_model does
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in (m for m in model.children() if next(m.parameters(), None) is not None):
            fully_shard(block, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    r, n = dist.get_rank(), dist.get_world_size()
    times = []
    for epoch in range(4):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        idx = torch.randperm(len(x), generator=g)[r::n].to(device)
        for i in range(0, len(idx), bs):
            batch = idx[i : i + bs]
            loss = F.cross_entropy(net(x.index_select(0, batch)), y.index_select(0, batch))
            loss.backward()
            opt.step()
            opt.zero_grad()
        _sync(device)
        if epoch:
            times.append(time.perf_counter() - start)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: times every model and strategy, rank 0 prints JSON lines."""
    import torch.distributed as dist

    from learner import DistributedCB, Learner
    from learner.data import DataLoaders
    from learner.distributed import rank, world_size

    torch.set_num_threads(1)
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    n = world_size()
    g = torch.Generator().manual_seed(0)
    samples = args.batches * args.bs * n  # each rank runs `batches` batches an epoch
    x = torch.randn(samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    for name in MODELS:
        for strategy in STRATEGIES:
            dls = DataLoaders.from_tensors(x, y, bs=args.bs, device=device)
            cb = DistributedCB(strategy=strategy)  # type: ignore[arg-type]
            learn = Learner(make_model(name).to(device), dls, F.cross_entropy, lr=1e-3,
                            cbs=[cb], default_cbs=True)  # fmt: skip
            learn.remove_cb(learn.progress)
            times = []
            for i in range(4):  # a warm-up epoch, then 3 timed
                _sync(device)
                dist.barrier()
                start = time.perf_counter()
                learn.fit(1, valid=False)
                _sync(device)
                if i:
                    times.append(time.perf_counter() - start)
            held = held_bytes(learn.model, learn.opt)
            hand = hand_loop(name, strategy, x, y, args.bs, device)
            if rank() == 0:
                speed = samples / statistics.median(times)
                ratio = statistics.median(times) / statistics.median(hand)
                line = {"model": name, "strategy": strategy, "n": n, "samples_per_s": speed,
                        "bytes": held, "vs_hand": ratio}  # fmt: skip
                print("RESULT " + json.dumps(line), flush=True)
            del learn
    dist.barrier()
    dist.destroy_process_group()


def launch(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", __file__, "--worker", "--batches", str(args.batches),
           "--bs", str(args.bs), "--device", args.device]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        tail = proc.stdout[-2000:] + proc.stderr[-3000:]
        raise SystemExit(f"the {n}-process launch failed:\n{tail}")
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="paired 1- and 2-process launches")
    parser.add_argument("--batches", type=int, default=40, help="batches per rank per epoch")
    parser.add_argument("--bs", type=int, default=64, help="batch size per process")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[int, list[list[dict[str, Any]]]] = {1: [], 2: []}
    for _ in range(args.reps):
        for n in (1, 2):
            runs[n].append(launch(n, args))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, device {args.device}; "
          f"bs {args.bs} per process, {args.batches} batches per rank per epoch, "
          f"median of {args.reps} paired launches")  # fmt: skip
    header = ("model", "strategy", "1 proc samples/s", "2 procs samples/s", "speed-up",
              "bytes/rank 1 proc", "bytes/rank 2 procs", "share")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    overhead = []
    for i, (model, strategy) in enumerate((m, s) for m in MODELS for s in STRATEGIES):
        one = [run[i] for run in runs[1]]
        two = [run[i] for run in runs[2]]
        assert all(r["model"] == model and r["strategy"] == strategy for r in one + two)
        ratios = [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(one, two)]
        speedup = statistics.median(ratios)
        b1, b2 = one[0]["bytes"], two[0]["bytes"]
        cells = (model, strategy, f"{statistics.median(r['samples_per_s'] for r in one):,.0f}",
                 f"{statistics.median(r['samples_per_s'] for r in two):,.0f}", f"{speedup:.2f}x",
                 f"{b1:,}", f"{b2:,}", f"{b2 / b1:.2f}")  # fmt: skip
        print("| " + " | ".join(cells) + " |")
        vs_hand = [statistics.median(r["vs_hand"] for r in rs) for rs in (one, two)]
        overhead.append(f"| {model} | {strategy} | {vs_hand[0]:.3f}x | {vs_hand[1]:.3f}x |")
    print("\nThe Learner's time over the hand-written loop's (same shards, same collectives):\n")
    print("| model | strategy | 1 proc | 2 procs |\n|---|---|---|---|")
    print("\n".join(overhead))


if __name__ == "__main__":
    main()
