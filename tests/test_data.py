"""Tests for learner.data: TensorLoader against torch's DataLoader as an exact oracle, and datasets.

The MNIST tests need the raw files: set LEARNER_DATA to a folder holding MNIST/raw/. The Hugging
Face tests need the `datasets` package (`pip install "learner[hf]"`) and skip without it.
"""

import os
import pickle
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

from learner import Learner, accuracy
from learner.data import (
    DataLoaders,
    DataNotFoundError,
    TensorData,
    TensorLoader,
    collate_dict,
    data_root,
    digits,
    fashion_mnist,
    inplace,
    mnist,
    mnist_available,
)

N, BS = 103, 10  # 103 = 10 full batches and a ragged one of 3.


def batches(dl: Iterable[Any], epochs: int = 1) -> list[tuple[Tensor, ...]]:
    return [tuple(b) for _ in range(epochs) for b in dl]


def assert_same_batches(got: list[tuple[Tensor, ...]], want: list[tuple[Tensor, ...]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        for gt, wt in zip(g, w, strict=True):
            assert gt.dtype == wt.dtype
            assert torch.equal(gt, wt)


@pytest.fixture
def xy() -> tuple[Tensor, Tensor]:
    x = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)
    return x, torch.arange(N) % 7


# --- TensorLoader against DataLoader ---------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_tensor_loader_matches_dataloader_with_generator(xy, shuffle, drop_last):
    x, y = xy
    ours = TensorLoader(
        x,
        y,
        bs=BS,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(3),
    )
    ref = DataLoader(
        TensorDataset(x, y),
        batch_size=BS,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(3),
    )
    # Three epochs: the generator must advance exactly as DataLoader's does between epochs.
    got, want = batches(ours, epochs=3), batches(ref, epochs=3)
    assert_same_batches(got, want)
    assert len(ours) == len(ref) == (10 if drop_last else 11)
    assert got[len(ours) - 1][0].shape[0] == (BS if drop_last else 3)
    assert torch.equal(ours.generator.get_state(), ref.generator.get_state())


@pytest.mark.parametrize("n_tensors", [1, 3])
def test_tensor_loader_matches_dataloader_with_any_number_of_tensors(xy, n_tensors):
    x, y = xy
    ts = [x, y, torch.rand(N)][:n_tensors]
    ours = TensorLoader(*ts, bs=BS, shuffle=True, generator=torch.Generator().manual_seed(4))
    ref = DataLoader(
        TensorDataset(*ts), batch_size=BS, shuffle=True, generator=torch.Generator().manual_seed(4)
    )
    assert_same_batches(batches(ours, epochs=2), batches(ref, epochs=2))


@pytest.mark.parametrize("shuffle", [True, False])
def test_tensor_loader_follows_manual_seed_like_dataloader(xy, shuffle):
    x, y = xy
    torch.manual_seed(11)
    got = batches(TensorLoader(x, y, bs=BS, shuffle=shuffle), epochs=2)
    after_ours = torch.rand(3)
    torch.manual_seed(11)
    want = batches(DataLoader(TensorDataset(x, y), batch_size=BS, shuffle=shuffle), epochs=2)
    after_ref = torch.rand(3)
    assert_same_batches(got, want)
    # The global RNG is left in the same state, so a seeded run is unchanged by the swap.
    assert torch.equal(after_ours, after_ref)


def test_tensor_loader_reshuffles_each_epoch_and_covers_all_samples(xy):
    x, y = xy
    dl = TensorLoader(x, y, bs=BS, shuffle=True, generator=torch.Generator().manual_seed(0))
    epoch1, epoch2 = torch.cat([b[1] for b in dl]), torch.cat([b[1] for b in dl])
    assert not torch.equal(epoch1, epoch2)
    for epoch in (epoch1, epoch2):
        assert torch.equal(epoch.sort().values, y.sort().values)


def test_tensor_loader_pairs_stay_aligned(xy):
    x, y = xy
    dl = TensorLoader(x, y, bs=BS, shuffle=True, generator=torch.Generator().manual_seed(0))
    for xb, yb in dl:
        rows = (xb[:, 0] / 3).long()  # x row i starts at 3*i
        assert torch.equal(yb, rows % 7)


def test_tensor_loader_same_seed_same_sequence(xy):
    x, y = xy

    def run(seed: int) -> list[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(seed)
        return batches(TensorLoader(x, y, bs=BS, shuffle=True, generator=g), epochs=2)

    assert_same_batches(run(5), run(5))
    assert not torch.equal(run(5)[0][1], run(6)[0][1])


def test_tensor_loader_unshuffled_batches_are_views(xy):
    x, y = xy
    dl = TensorLoader(x, y, bs=BS)
    xb, yb = next(iter(dl))
    assert xb.data_ptr() == x.data_ptr() and yb.data_ptr() == y.data_ptr()
    assert torch.equal(xb, x[:BS])


def test_tensor_loader_attributes_and_any_number_of_tensors(xy):
    x, y = xy
    w = torch.rand(N)
    g = torch.Generator().manual_seed(0)
    dl = TensorLoader(x, y, w, bs=BS, shuffle=True, drop_last=True, device="cpu", generator=g)
    assert (dl.bs, dl.shuffle, dl.drop_last, dl.generator, dl.n) == (BS, True, True, g, N)
    assert dl.device == torch.device("cpu") and len(dl.tensors) == 3
    assert all(len(b) == 3 for b in dl)
    assert "n=103" in repr(dl) and "bs=10" in repr(dl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_loader_keeps_data_on_cuda(xy):
    x, y = xy
    g = torch.Generator().manual_seed(1)
    dl = TensorLoader(x, y, bs=BS, shuffle=True, device="cuda", generator=g)
    assert dl.device.type == "cuda" and all(t.is_cuda for t in dl.tensors)
    got = [(xb.cpu(), yb.cpu()) for xb, yb in dl]
    ref = DataLoader(
        TensorDataset(x, y), batch_size=BS, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    assert_same_batches(got, batches(ref))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {}, "at least one tensor"),
        ((torch.zeros(3), torch.zeros(4)), {}, "same number of samples"),
        ((torch.zeros(3), [0, 1, 2]), {}, "must be a torch.Tensor"),
        ((torch.zeros(3),), {"bs": 0}, "bs must be a positive integer"),
        ((torch.tensor(1.0),), {}, "0-d tensor"),
    ],
)
def test_tensor_loader_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TensorLoader(*args, **kwargs)


# --- DataLoaders ----------------------------------------------------------------------------


def test_from_tensors_train_and_valid_match_dataloaders(xy):
    x, y = xy
    xv, yv = x[:25] + 1000, y[:25]
    dls = DataLoaders.from_tensors(x, y, xv, yv, bs=BS, generator=torch.Generator().manual_seed(2))
    ref = DataLoaders.from_datasets(
        TensorDataset(x, y),
        TensorDataset(xv, yv),
        bs=BS,
        generator=torch.Generator().manual_seed(2),
    )
    # Interleave epochs as a Learner does; the shared generator must advance identically.
    for _ in range(2):
        assert_same_batches(batches(dls.train), batches(ref.train))
        assert_same_batches(batches(dls.valid), batches(ref.valid))
    valid = batches(dls.valid)
    assert [len(b[0]) for b in valid] == [2 * BS, 5]
    assert torch.equal(torch.cat([b[0] for b in valid]), xv)  # in order
    assert isinstance(dls.train, TensorLoader) and dls.train.shuffle
    assert isinstance(dls.valid, TensorLoader) and not dls.valid.shuffle
    assert not dls.valid.drop_last and dls.valid.bs == 2 * BS


def test_from_tensors_options_and_no_valid(xy):
    x, y = xy
    dls = DataLoaders.from_tensors(x, y, bs=BS, shuffle=False, drop_last=True)
    assert dls.valid is None
    assert isinstance(dls.train, TensorLoader)
    assert len(dls.train) == 10
    assert torch.equal(torch.cat([b[0] for b in dls.train]), x[:100])
    assert "TensorLoader" in repr(dls) and "valid=None" in repr(dls)


def test_from_tensors_takes_tensor_data():
    data = TensorData(torch.rand(8, 2), torch.arange(8), torch.rand(4, 2), torch.arange(4))
    dls = DataLoaders.from_tensors(*data, bs=4)
    assert len(dls.train) == 2 and len(dls.valid) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y_train": torch.zeros(9)}, r"len\(x_train\)=10, len\(y_train\)=9"),
        ({"bs": 0}, "bs must be a positive integer"),
        ({"bs": 2.5}, "bs must be a positive integer"),
        ({"x_valid": torch.zeros(4)}, "x_valid was given without y_valid"),
        ({"y_valid": torch.zeros(4)}, "y_valid was given without x_valid"),
        ({"x_valid": torch.zeros(4), "y_valid": torch.zeros(3)}, r"len\(x_valid\)=4"),
        ({"x_train": [[0.0]] * 10}, "x_train must be a torch.Tensor"),
        ({"x_valid": torch.zeros(2), "y_valid": (1, 2)}, "y_valid must be a torch.Tensor"),
    ],
)
def test_from_tensors_rejects_bad_input(kwargs, match):
    args = {"x_train": torch.zeros(10), "y_train": torch.zeros(10)} | kwargs
    with pytest.raises(ValueError, match=match):
        DataLoaders.from_tensors(**args)


def test_from_datasets_shuffles_train_and_keeps_valid_in_order(xy):
    x, y = xy
    ds = TensorDataset(x, y)
    dls = DataLoaders.from_datasets(ds, ds, bs=BS, num_workers=0, drop_last=False)
    assert isinstance(dls.train, DataLoader) and isinstance(dls.valid, DataLoader)
    assert isinstance(dls.train.sampler, RandomSampler) and dls.train.batch_size == BS
    assert isinstance(dls.valid.sampler, SequentialSampler) and dls.valid.batch_size == 2 * BS
    assert torch.equal(torch.cat([b[0] for b in dls.valid]), x)
    # The generator reaches the training DataLoader: same seed, same order as a plain one.
    seeded = DataLoaders.from_datasets(ds, bs=BS, generator=torch.Generator().manual_seed(4))
    ref = DataLoader(ds, batch_size=BS, shuffle=True, generator=torch.Generator().manual_seed(4))
    assert_same_batches(batches(seeded.train), batches(ref))
    assert seeded.valid is None


def test_from_datasets_rejects_batch_size_and_shuffle(xy):
    ds = TensorDataset(*xy)
    with pytest.raises(ValueError, match="pass bs="):
        DataLoaders.from_datasets(ds, batch_size=8)
    with pytest.raises(ValueError, match="sets shuffle itself"):
        DataLoaders.from_datasets(ds, shuffle=False)
    with pytest.raises(ValueError, match="bs must be a positive integer"):
        DataLoaders.from_datasets(ds, bs=-1)


def test_dataloaders_accepts_any_iterables():
    train = [(torch.zeros(2), torch.zeros(2))]
    dls = DataLoaders(train)
    assert dls.train is train and dls.valid is None


# --- data_root and missing data -------------------------------------------------------------


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("LEARNER_DATA", raising=False)
    assert data_root() == tmp_path / "home" / ".cache" / "learner"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "learner"
    monkeypatch.setenv("LEARNER_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root(str(tmp_path / "arg")) == tmp_path / "arg"


@pytest.mark.parametrize(("loader", "folder"), [(mnist, "MNIST"), (fashion_mnist, "FashionMNIST")])
def test_missing_data_error_says_where_and_how(tmp_path, loader, folder):
    with pytest.raises(DataNotFoundError) as info:
        loader(root=tmp_path, download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / folder / "raw" / "train-images-idx3-ubyte") in msg
    assert "LEARNER_DATA" in msg and "download=False" in msg
    assert not mnist_available(tmp_path)


@pytest.fixture
def offline(monkeypatch):
    """Make every URL fail fast, as on a machine without network."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_failed_download_is_reported(tmp_path, offline):
    with pytest.raises(DataNotFoundError, match="the download failed") as info:
        mnist(root=tmp_path, download=True)
    assert "LEARNER_DATA" in str(info.value)


# --- MNIST (needs LEARNER_DATA) -------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_root() -> Path:
    root = os.environ.get("LEARNER_DATA")
    if not root:
        pytest.skip("LEARNER_DATA is unset: point it at a folder holding MNIST/raw/")
    if not mnist_available(root):
        pytest.skip(f"LEARNER_DATA={root} has no MNIST/raw/ files")
    return Path(root)


@pytest.fixture(scope="module")
def mnist_data(mnist_root: Path) -> TensorData:
    return mnist(download=False)  # root from LEARNER_DATA


def test_mnist_shapes_and_dtypes(mnist_data):
    x, y, xv, yv = mnist_data
    assert x.shape == (60_000, 1, 28, 28) and xv.shape == (10_000, 1, 28, 28)
    assert x.dtype == xv.dtype == torch.float32
    assert y.shape == (60_000,) and yv.shape == (10_000,)
    assert y.dtype == yv.dtype == torch.int64
    assert set(y.unique().tolist()) == set(range(10)) == set(yv.unique().tolist())


def test_mnist_is_normalised(mnist_data):
    x = mnist_data.x_train
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)
    assert x.std().item() == pytest.approx(1.0, abs=0.01)


def test_mnist_flatten_and_raw_scale(mnist_root, mnist_data):
    flat = mnist(mnist_root, flatten=True, download=False)
    assert flat.x_train.shape == (60_000, 784) and flat.x_valid.shape == (10_000, 784)
    assert torch.equal(flat.x_train, mnist_data.x_train.reshape(60_000, 784))
    raw = mnist(mnist_root, normalize=False, download=False)
    assert raw.x_train.min() == 0 and raw.x_train.max() == 1
    pixels = raw.x_train[:2000] * 255  # a sample keeps the test fast
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)


def test_mnist_loads_without_per_image_access(mnist_root, monkeypatch):
    from torchvision.datasets import MNIST

    def no_items(self, index):
        raise AssertionError("mnist() must convert ds.data at once, not index images")

    monkeypatch.setattr(MNIST, "__getitem__", no_items)
    data = mnist(mnist_root, download=False)
    ds = MNIST(mnist_root, train=False)
    want = ((ds.data.float() / 255 - 0.1307) / 0.3081).unsqueeze(1)
    assert torch.allclose(data.x_valid, want, atol=1e-6)
    assert torch.equal(data.y_valid, ds.targets)


def test_mnist_extracts_local_archives_without_network(mnist_root, tmp_path, offline):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (mnist_root / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(gz, raw)
    if len(list(raw.iterdir())) != 4:
        pytest.skip(f"{mnist_root / 'MNIST' / 'raw'} lacks the four .gz archives")
    with pytest.raises(DataNotFoundError, match="download=False"):
        mnist(tmp_path, download=False)
    data = mnist(tmp_path, download=True)  # the error message's advice
    assert data.x_valid.shape == (10_000, 1, 28, 28)
    assert mnist_available(tmp_path)


def test_mnist_feeds_from_tensors(mnist_data):
    dls = DataLoaders.from_tensors(*mnist_data, bs=64)
    xb, yb = next(iter(dls.train))
    assert xb.shape == (64, 1, 28, 28) and yb.shape == (64,)
    assert len(dls.train) == 938 and len(dls.valid) == 79


# --- digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_data() -> TensorData:
    pytest.importorskip("sklearn", reason="digits() needs scikit-learn")
    return digits()


def test_digits_shapes_split_and_stats(digits_data):
    x, y, xv, yv = digits_data
    assert x.shape == (1438, 1, 8, 8) and xv.shape == (359, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == yv.dtype == torch.int64
    assert len(y) == 1438 and len(yv) == 359
    assert set(y.tolist()) == set(range(10))
    # Normalised with the training split's own statistics.
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(xv.mean().item()) < 0.1


def test_digits_options_and_seeded_split(digits_data):
    flat = digits(flatten=True)
    assert flat.x_train.shape == (1438, 64)
    assert torch.equal(flat.x_train, digits_data.x_train.reshape(1438, 64))
    raw = digits(normalize=False, valid_pct=0.5)
    assert raw.x_train.min() == 0 and raw.x_train.max() == 1
    assert len(raw.x_train) + len(raw.x_valid) == 1797
    assert not torch.equal(digits(seed=0).y_valid, digits_data.y_valid)
    with pytest.raises(ValueError, match="valid_pct must be between 0 and 1"):
        digits(valid_pct=1.0)


def test_drop_last_with_fewer_samples_than_a_batch_yields_nothing() -> None:
    x, y = torch.arange(5.0).unsqueeze(1), torch.arange(5)
    for shuffle in (False, True):
        dl = TensorLoader(x, y, bs=8, shuffle=shuffle, drop_last=True, generator=torch.Generator())
        assert len(dl) == 0 and list(dl) == []


# --- Hugging Face datasets: from_dd, collate_dict, inplace -----------------------------------

N_TRAIN, N_VALID = 48, 25  # with BS=10: 5 training batches (the last of 8), 2 validation ones


@inplace
def transformi(b):
    """The course's transform: PIL images to float tensors, in place, for `with_transform`."""
    b["image"] = [TF.to_tensor(o) for o in b["image"]]


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    return pytest.importorskip("datasets", reason='needs Hugging Face datasets: "learner[hf]"')


def fake_fashion_mnist(hf: ModuleType, seed: int = 0) -> Any:
    """A DatasetDict shaped like the course's `load_dataset("fashion_mnist")`, built in memory.

    Splits `train` and `test` of 8x8 grayscale PIL images and class labels. Pixel (0, 0) of image
    `i` of a split is `i`, so a batch tells which samples it holds. The label is learnable: the
    bottom half of a "bright" image is brighter than any pixel of a "dark" one.
    """
    g = torch.Generator().manual_seed(seed)
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["dark", "bright"])})

    def split(n: int) -> Any:
        labels = torch.randint(0, 2, (n,), generator=g)
        px = torch.randint(0, 100, (n, 8, 8), generator=g, dtype=torch.uint8)
        px[labels == 1, 4:] += 150
        px[:, 0, 0] = torch.arange(n, dtype=torch.uint8)
        images = [Image.frombytes("L", (8, 8), bytes(a.flatten().tolist())) for a in px]
        return hf.Dataset.from_dict({"image": images, "label": labels.tolist()}, features)

    return hf.DatasetDict({"train": split(N_TRAIN), "test": split(N_VALID)})


@pytest.fixture(scope="module")
def dsd(hf: ModuleType) -> Any:
    return fake_fashion_mnist(hf)


@pytest.fixture(scope="module")
def tds(dsd: Any) -> Any:
    return dsd.with_transform(transformi)


def ids(batches: Iterable[Any]) -> list[int]:
    """Which samples, in order: pixel (0, 0) of each image holds its index."""
    return [i for xb, _ in batches for i in (xb[:, 0, 0, 0] * 255).round().long().tolist()]


def test_from_dd_runs_the_course_code(dsd, tds):
    dls = DataLoaders.from_dd(tds, BS)
    batch = next(iter(dls.train))
    assert isinstance(batch, tuple) and len(batch) == 2
    xb, yb = batch
    assert xb.shape == (BS, 1, 8, 8) and xb.dtype == torch.float32
    assert yb.shape == (BS,) and yb.dtype == torch.int64
    assert xb.min() >= 0 and xb.max() <= 1
    # Each image is paired with its own label, and is the to_tensor of its own image.
    i = ids([batch])
    assert yb.tolist() == [dsd["train"][j]["label"] for j in i]
    assert torch.equal(xb[0], TF.to_tensor(dsd["train"][i[0]]["image"]))
    # The `test` split validates, in order, at twice the batch size.
    assert isinstance(dls.train.sampler, RandomSampler) and len(dls.train) == 5
    assert isinstance(dls.valid.sampler, SequentialSampler) and len(dls.valid) == 2
    assert dls.valid.dataset is tds["test"]
    xv, yv = next(iter(dls.valid))
    assert xv.shape == (2 * BS, 1, 8, 8) and yv.shape == (2 * BS,)


def test_from_dd_shuffles_each_epoch_covering_every_sample_once_and_validates_in_order(tds):
    dls = DataLoaders.from_dd(tds, BS, generator=torch.Generator().manual_seed(0))
    epochs = [ids(dls.train) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(N_TRAIN)) and order != list(range(N_TRAIN))
    assert epochs[0] != epochs[1] != epochs[2]
    assert ids(dls.valid) == ids(dls.valid) == list(range(N_VALID))
    unshuffled = DataLoaders.from_dd(tds, BS, shuffle=False)
    assert ids(unshuffled.train) == list(range(N_TRAIN))


def test_from_dd_seeds_reproduce_the_shuffle(tds):
    def order(**kwargs: Any) -> list[int]:
        dls = DataLoaders.from_dd(tds, BS, **kwargs)
        return ids(dls.train) + ids(dls.train)

    seeded = lambda s: order(generator=torch.Generator().manual_seed(s))
    assert seeded(1) == seeded(1) != seeded(2)
    torch.manual_seed(3)
    first = order()
    torch.manual_seed(3)
    assert order() == first
    # The generator reaches the training DataLoader as in from_datasets: the same batches as a
    # plain DataLoader with the same seed.
    dls = DataLoaders.from_dd(tds, BS, generator=torch.Generator().manual_seed(4))
    ref = DataLoader(
        tds["train"],
        batch_size=BS,
        shuffle=True,
        collate_fn=collate_dict(tds["train"]),
        generator=torch.Generator().manual_seed(4),
    )
    assert_same_batches(batches(dls.train, epochs=2), batches(ref, epochs=2))


def test_learner_trains_on_from_dd(tds):
    torch.manual_seed(0)
    dls = DataLoaders.from_dd(tds, 8, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    learn = Learner(model, dls, F.cross_entropy, lr=0.5, opt_func=torch.optim.SGD, metrics=accuracy)
    learn.fit(4)
    history = learn.recorder.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]
    assert history[-1]["accuracy"] >= 0.9  # chance is about 0.5


def test_from_dd_picks_train_and_validation_splits_by_name(hf):
    def dd(*names: str) -> Any:
        return hf.DatasetDict({n: hf.Dataset.from_dict({"x": [0.0], "y": [0]}) for n in names})

    cases = [
        (("test", "train"), "train", "test"),
        (("train", "test", "validation"), "train", "validation"),
        (("test", "valid", "train"), "train", "valid"),
        (("a", "b", "c"), "a", "b"),
    ]
    for names, train, valid in cases:
        d = dd(*names)
        dls = DataLoaders.from_dd(d, 2)
        assert dls.train.dataset is d[train] and dls.valid.dataset is d[valid], names
    assert DataLoaders.from_dd(dd("train"), 2).valid is None
    with pytest.raises(ValueError, match="no splits"):
        DataLoaders.from_dd(hf.DatasetDict(), 2)


def test_from_dd_takes_any_mapping_of_datasets_and_passes_options_to_both_loaders(xy):
    # No `datasets` needed: a plain dict of torch datasets, with a collate_fn of one's own.
    x, y = xy
    dd = {"train": TensorDataset(x, y), "valid": TensorDataset(x[:7], y[:7])}
    dls = DataLoaders.from_dd(dd, BS, collate_fn=default_collate, drop_last=True)
    assert dls.train.collate_fn is dls.valid.collate_fn is default_collate
    assert dls.train.drop_last and dls.valid.drop_last
    assert len(dls.train) == 10 and len(dls.valid) == 0
    with pytest.raises(TypeError, match=r"needs a dataset with `\.features`.*collate_fn="):
        DataLoaders.from_dd(dd, BS)
    with pytest.raises(ValueError, match="pass bs="):
        DataLoaders.from_dd(dd, batch_size=8, collate_fn=default_collate)
    with pytest.raises(ValueError, match="bs must be a positive integer"):
        DataLoaders.from_dd(dd, 0, collate_fn=default_collate)


def test_collate_dict_gives_a_tuple_in_the_order_of_the_features():
    ds = SimpleNamespace(features={"label": None, "image": None})
    samples = [{"image": torch.full((2,), float(i)), "label": i, "name": f"s{i}"} for i in range(3)]
    yb, xb = collate_dict(ds)(samples)  # features order; the extra key is not collated
    assert torch.equal(yb, torch.arange(3)) and xb.shape == (3, 2)
    (xb,) = collate_dict(SimpleNamespace(features=["image"]))(samples)  # one feature: a 1-tuple
    assert xb.shape == (3, 2)
    with pytest.raises(KeyError, match=r"no \['label'\].*own collate_fn="):
        collate_dict(ds)([{"image": torch.zeros(2)}])


def test_untransformed_images_fail_with_a_hint_to_transform(dsd):
    dls = DataLoaders.from_dd(dsd, BS)
    with pytest.raises(TypeError) as info:
        next(iter(dls.train))
    assert "feature 'image' holds" in str(info.value.__notes__) and "with_transform" in str(
        info.value.__notes__
    )


def test_inplace_returns_the_batch_keeps_the_name_and_pickles():
    b = {"image": [Image.new("L", (2, 2))]}
    assert transformi(b) is b and b["image"][0].shape == (1, 2, 2)
    assert transformi.__name__ == "transformi" and "PIL images" in transformi.__doc__
    # Workers started by spawn or forkserver unpickle the dataset's transform by reference.
    assert pickle.loads(pickle.dumps(transformi)) is transformi


def test_from_dd_loaders_pickle_for_spawned_workers(tds):
    dl = DataLoaders.from_dd(tds, BS, shuffle=False).train
    ds, collate = pickle.loads(pickle.dumps((dl.dataset, dl.collate_fn)))
    again = DataLoader(ds, batch_size=BS, collate_fn=collate)
    assert_same_batches(batches(again), batches(dl))


def test_importing_learner_does_not_import_datasets():
    code = "import sys, learner, learner.data; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
