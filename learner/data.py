"""Data for the Learner: `DataLoaders`, a fast in-memory `TensorLoader`, and small dataset helpers.

A `Learner` only needs `dls.train` and `dls.valid`, each an iterable of `(x, y)` batches. For
data that fits in memory, `DataLoaders.from_tensors` is the fast path: the tensors are converted
once, and every batch is a single index of whole tensors, with no per-item `__getitem__` and no
collate. It yields exactly the batches a torch `DataLoader` would for the same seed.

Hugging Face datasets (the fastai course's data source) go through `DataLoaders.from_dd`, with
the course's `collate_dict` and `inplace`. This module does not import `datasets`: anything with
the same shape works, and the package is only needed to make the data (`pip install
"learner[hf]"`).

Examples:
    >>> from learner.data import DataLoaders, mnist
    >>> dls = DataLoaders.from_tensors(*mnist(), bs=64)  # doctest: +SKIP
    >>> xb, yb = next(iter(dls.train))  # doctest: +SKIP
    >>> xb.shape, yb.shape  # doctest: +SKIP
    (torch.Size([64, 1, 28, 28]), torch.Size([64]))
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

__all__ = [
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "DataLoaders",
    "DataNotFoundError",
    "TensorData",
    "TensorLoader",
    "collate_dict",
    "data_root",
    "digits",
    "fashion_mnist",
    "inplace",
    "mnist",
    "mnist_available",
]

StrPath = str | os.PathLike[str]
_B = TypeVar("_B")


def _check_bs(bs: int) -> None:
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"bs must be a positive integer, got bs={bs!r}; pass e.g. bs=64.")


def _check_tensors(named: dict[str, Any]) -> int:
    """Check that every value is a tensor with the same first dimension; return that length."""
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor, got {type(t).__name__}; "
                f"convert it first, e.g. torch.as_tensor({name})."
            )
        if t.dim() == 0:
            raise ValueError(f"{name} is a 0-d tensor; batches are taken along dimension 0.")
    lengths = {name: len(t) for name, t in named.items()}
    if len(set(lengths.values())) > 1:
        sizes = ", ".join(f"len({name})={n}" for name, n in lengths.items())
        raise ValueError(f"Inputs must have the same number of samples, got {sizes}.")
    return next(iter(lengths.values()))


def _check_classes(classes: Sequence[str] | None) -> tuple[str, ...] | None:
    """`classes` as a tuple of names, or None."""
    if classes is None:
        return None
    if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
        raise TypeError(
            f"classes must be a sequence of names (strings), one per label, got {classes!r}; "
            'e.g. classes=["cat", "dog"].'
        )
    return tuple(classes)


class TensorLoader:
    """Batches of in-memory tensors, indexed whole: a fast stand-in for a torch `DataLoader`.

    The tensors are moved to `device` once, at construction, so with a CUDA device the data stays
    on the GPU. Each epoch draws one permutation (when `shuffle`) and yields
    `tuple(t[idx] for t in tensors)` for each chunk of it; without shuffling it yields plain
    slices, which are views. The batches, and the random numbers consumed, are exactly those of
    `DataLoader(TensorDataset(*tensors), batch_size=bs, shuffle=shuffle, drop_last=drop_last,
    generator=generator)`, so swapping one for the other does not change a seeded run.

    Args:
        *tensors: tensors with the same length along dimension 0, e.g. `x, y`.
        bs: batch size. Default 64.
        shuffle: draw a new order every epoch. Default False.
        drop_last: drop the last batch if it is smaller than `bs`. Default False.
        device: where to put the tensors (e.g. "cuda"); None leaves them where they are.
        generator: a CPU `torch.Generator` for the shuffle; None follows `torch.manual_seed`.

    Examples:
        >>> x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
        >>> dl = TensorLoader(x, y, bs=4)
        >>> [yb.tolist() for _, yb in dl]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """

    def __init__(
        self,
        *tensors: Tensor,
        bs: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not tensors:
            raise ValueError("TensorLoader needs at least one tensor, e.g. TensorLoader(x, y).")
        _check_bs(bs)
        self.n = _check_tensors({f"tensors[{i}]": t for i, t in enumerate(tensors)})
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU torch.Generator (got one on {generator.device}); the "
                "permutation is drawn on the CPU, like DataLoader's, and then moved to `device`."
            )
        self.tensors = tuple(t.to(device) for t in tensors) if device is not None else tensors
        self.device = self.tensors[0].device
        self.bs, self.shuffle, self.drop_last, self.generator = bs, shuffle, drop_last, generator

    def __len__(self) -> int:
        return self.n // self.bs if self.drop_last else math.ceil(self.n / self.bs)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # DataLoader draws a worker base seed from its generator (or the global RNG) every time
        # it is iterated, shuffled or not. Drawing it too keeps the random stream, and so dropout
        # and initialisation later in a seeded run, identical to DataLoader's.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return self._batches()

    def _batches(self) -> Iterator[tuple[Tensor, ...]]:
        n, bs, ts = self.n, self.bs, self.tensors
        stop = n - n % bs if self.drop_last else n
        if not self.shuffle:
            for i in range(0, stop, bs):
                yield tuple([t[i : i + bs] for t in ts])
            return
        generator = self.generator
        if generator is None:
            # As RandomSampler does: a fresh generator per epoch, seeded from the global RNG.
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=generator).to(self.device)
        # index_select is about twice as fast as t[idx] on the CPU, for the same result.
        # split() of an empty tensor yields one empty chunk: drop_last with n < bs has no batch.
        chunks = perm[:stop].split(bs) if stop else ()
        if len(ts) == 2:  # the usual (x, y): no list to build per batch
            x, y = ts
            for idx in chunks:
                yield x.index_select(0, idx), y.index_select(0, idx)
        else:
            for idx in chunks:
                yield tuple([t.index_select(0, idx) for t in ts])
        if self.generator is not None:
            # RandomSampler draws one more, unused permutation when its epoch runs out. Drawing it
            # too keeps the next epoch's order, and any other user of the generator, in step.
            torch.randperm(n, generator=generator)

    def __repr__(self) -> str:
        return (
            f"TensorLoader(n={self.n}, bs={self.bs}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, device={self.device})"
        )


# --- Hugging Face datasets --------------------------------------------------------------------


def inplace(f: Callable[[_B], object]) -> Callable[[_B], _B]:
    """Make a transform that changes a batch in place return the batch, as the course does.

    `datasets.Dataset.with_transform` uses what the transform returns; the course writes
    transforms that assign into the batch dict and decorates them with `@inplace`. The wrapper
    takes `f`'s name (`functools.wraps`), so a decorated module-level function still pickles, as
    `DataLoader` workers started by spawn or forkserver need.

    Args:
        f: a function that modifies its argument, e.g. a dict of lists of a batch of samples.

    Examples:
        >>> import torchvision.transforms.functional as TF
        >>> @inplace
        ... def transformi(b):
        ...     b["image"] = [TF.to_tensor(o) for o in b["image"]]
        >>> tds = dsd.with_transform(transformi)  # doctest: +SKIP
    """

    @functools.wraps(f)
    def _f(b: _B) -> _B:
        f(b)
        return b

    return _f


def _collate_features(keys: Sequence[str], samples: list[Mapping[str, Any]]) -> tuple[Any, ...]:
    """The `collate_fn` that `collate_dict` returns: one collated batch per key, in order."""
    if samples and (missing := [k for k in keys if k not in samples[0]]):
        raise KeyError(
            f"collate_dict: the samples have no {missing} (they have {list(samples[0])}). The "
            f"dataset's features are {list(keys)}; a transform that renames or drops features "
            "needs its own collate_fn=."
        )
    batch = []
    for k in keys:
        try:
            batch.append(default_collate([s[k] for s in samples]))
        except TypeError as e:
            kind = type(samples[0][k]).__name__
            e.add_note(
                f"collate_dict: feature {k!r} holds {kind}, which does not collate; convert it "
                "to tensors first with a transform, e.g. dd.with_transform(transformi) where "
                f"transformi sets b[{k!r}] = [TF.to_tensor(o) for o in b[{k!r}]]."
            )
            raise
    return tuple(batch)


def collate_dict(ds: Any) -> Callable[[list[Mapping[str, Any]]], tuple[Any, ...]]:
    """A `collate_fn` that turns dict samples into a tuple of batches in the order of `ds.features`.

    Hugging Face datasets yield one dict per sample, e.g. `{"image": ..., "label": ...}`; the
    `Learner` wants `(x, y)` batches. The returned function collates each feature with torch's
    `default_collate` and returns them as a tuple, in the order of `ds.features`, so a dataset
    with features `image` and `label` gives `(xb, yb)`. The result is always a tuple, even of one
    feature (the course's `itemgetter` gives the bare batch then). The function pickles, so it
    works with `DataLoader` workers under any start method.

    Args:
        ds: a dataset with `features`, the feature names in order: a `datasets.Dataset`
            (transformed or not: its features are those of the data it holds).

    Examples:
        >>> ds = tds["train"]  # doctest: +SKIP
        >>> dl = DataLoader(ds, batch_size=64, collate_fn=collate_dict(ds))  # doctest: +SKIP
        >>> xb, yb = next(iter(dl))  # doctest: +SKIP
    """
    features = getattr(ds, "features", None)
    if features is None:
        raise TypeError(
            f"collate_dict needs a dataset with `.features` (a datasets.Dataset), got "
            f"{type(ds).__name__}; pass your own collate_fn= for other datasets."
        )
    return functools.partial(_collate_features, tuple(features))


# Which split validates, when a mapping of splits has one of these names (in this preference).
_VALID_SPLITS = ("validation", "valid", "test")


def _pick_splits(dd: Mapping[str, Any]) -> tuple[str, str | None]:
    """The names of the training and validation splits of `dd` (see `DataLoaders.from_dd`)."""
    names = list(dd)
    if not names:
        raise ValueError("from_dd got no splits; pass e.g. a DatasetDict with a 'train' split.")
    train = "train" if "train" in dd else names[0]
    rest = [n for n in names if n != train]
    valid = next((n for n in _VALID_SPLITS if n in rest), rest[0] if rest else None)
    return train, valid


class DataLoaders:
    """A training and an optional validation loader, as the `Learner` reads them.

    Each loader may be a torch `DataLoader`, a `TensorLoader`, or any iterable of `(x, y)`
    batches that can be iterated once per epoch. `classes`, when known, names the labels:
    `classes[i]` is the name of label `i`, which `show_batch`, `show_results` and `interpret`
    print instead of the number.

    Args:
        train: batches for training.
        valid: batches for validation, or None to skip validation.
        classes: the name of each label, in label order, or None.

    Examples:
        >>> x, y = torch.randn(100, 3), torch.randint(0, 2, (100,))
        >>> dls = DataLoaders.from_tensors(x[:80], y[:80], x[80:], y[80:], bs=16)
        >>> len(dls.train), len(dls.valid)
        (5, 1)
    """

    def __init__(
        self,
        train: Iterable[Any],
        valid: Iterable[Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.train = train
        self.valid = valid
        self.classes: tuple[str, ...] | None = _check_classes(classes)

    def __repr__(self) -> str:
        return f"DataLoaders(train={self.train!r}, valid={self.valid!r})"

    @classmethod
    def from_datasets(
        cls,
        train_ds: Dataset[Any],
        valid_ds: Dataset[Any] | None = None,
        bs: int = 64,
        classes: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> DataLoaders:
        """Wrap datasets in torch `DataLoader`s: training shuffled, validation in order at `2*bs`.

        Validation needs no gradients, so it fits twice the batch size in the same memory.

        Args:
            train_ds: training dataset.
            valid_ds: validation dataset, or None.
            bs: training batch size. Default 64.
            classes: the name of each label, or None (`DataLoaders.classes`).
            **kwargs: passed to both `DataLoader`s, e.g. `num_workers`, `pin_memory`,
                `generator`, `collate_fn`.

        Examples:
            >>> from torch.utils.data import TensorDataset
            >>> ds = TensorDataset(torch.randn(100, 3), torch.randint(0, 2, (100,)))
            >>> dls = DataLoaders.from_datasets(ds, ds, bs=32)
            >>> dls.train.batch_size, dls.valid.batch_size
            (32, 64)
        """
        _check_bs(bs)
        for key in ("batch_size", "shuffle"):
            if key in kwargs:
                raise ValueError(
                    f"from_datasets sets {key} itself (bs for training, 2*bs for validation; "
                    "training shuffled); pass bs= or build DataLoaders(train_dl, valid_dl)."
                )
        train = DataLoader(train_ds, batch_size=bs, shuffle=True, **kwargs)
        valid = None
        if valid_ds is not None:
            valid = DataLoader(valid_ds, batch_size=2 * bs, shuffle=False, **kwargs)
        return cls(train, valid, classes)

    @classmethod
    def from_dd(
        cls,
        dd: Mapping[str, Any],
        bs: int = 64,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shuffle: bool = True,
        classes: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> DataLoaders:
        """Torch `DataLoader`s over a Hugging Face `DatasetDict`, as the course's miniai builds.

        The training split is `"train"` if there is one, else the first; the validation split is
        the first of `"validation"`, `"valid"` and `"test"` that is there, else the next split in
        order, else none (with one split, `valid` is None). Other splits are not used. So
        `load_dataset("fashion_mnist")` (splits `train` and `test`) trains on `train` and
        validates on `test`, whatever the order of the splits.

        As in `from_datasets`, training follows `shuffle` and validation is in order with batch
        size `2*bs`; `kwargs` go to both `DataLoader`s, so a `generator=` seeds the training
        shuffle. Each batch is a tuple in the order of the dataset's features (`collate_dict`):
        `(xb, yb)` for features `image` and `label`, which the `Learner` trains on directly.

        `dd` may be any mapping of split names to map-style datasets; the default `collate_fn`
        reads their `.features`. This method does not import `datasets`.

        Args:
            dd: a `datasets.DatasetDict`, usually transformed with `with_transform`.
            bs: training batch size. Default 64.
            collate_fn: turns a list of samples into a batch. Default None: `collate_dict` of
                each split.
            shuffle: reshuffle the training split every epoch. Default True.
            classes: the name of each label, or None (`DataLoaders.classes`); a Hugging Face
                dataset has them as `dd["train"].features["label"].names`.
            **kwargs: passed to both `DataLoader`s, e.g. `num_workers`, `pin_memory`,
                `generator`, `drop_last`.

        Examples:
            >>> import torchvision.transforms.functional as TF
            >>> from datasets import load_dataset  # doctest: +SKIP
            >>> dsd = load_dataset("fashion_mnist")  # doctest: +SKIP
            >>> @inplace
            ... def transformi(b):
            ...     b["image"] = [TF.to_tensor(o) for o in b["image"]]
            >>> dls = DataLoaders.from_dd(dsd.with_transform(transformi), 256)  # doctest: +SKIP
            >>> xb, yb = next(iter(dls.train))  # doctest: +SKIP
            >>> xb.shape, yb.shape  # doctest: +SKIP
            (torch.Size([256, 1, 28, 28]), torch.Size([256]))
        """
        _check_bs(bs)
        if "batch_size" in kwargs:
            raise ValueError(
                "from_dd sets batch_size itself (bs for training, 2*bs for validation); pass "
                "bs= or build DataLoaders(train_dl, valid_dl)."
            )
        train_name, valid_name = _pick_splits(dd)
        collate = collate_dict if collate_fn is None else lambda ds: collate_fn
        train_ds = dd[train_name]
        train = DataLoader(
            train_ds, batch_size=bs, shuffle=shuffle, collate_fn=collate(train_ds), **kwargs
        )
        valid = None
        if valid_name is not None:
            valid_ds = dd[valid_name]
            valid = DataLoader(
                valid_ds, batch_size=2 * bs, shuffle=False, collate_fn=collate(valid_ds), **kwargs
            )
        return cls(train, valid, classes)

    @classmethod
    def from_tensors(
        cls,
        x_train: Tensor,
        y_train: Tensor,
        x_valid: Tensor | None = None,
        y_valid: Tensor | None = None,
        bs: int = 64,
        shuffle: bool = True,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        classes: Sequence[str] | None = None,
    ) -> DataLoaders:
        """Build `TensorLoader`s over in-memory tensors: the fastest path for small datasets.

        Training follows `shuffle` and `drop_last`; validation is never shuffled, keeps its last
        batch, and uses batch size `2*bs`. Both share `generator`, as `from_datasets` would.

        Args:
            x_train, y_train: training inputs and targets, same length.
            x_valid, y_valid: validation inputs and targets, both or neither.
            bs: training batch size. Default 64.
            shuffle: reshuffle the training set every epoch. Default True.
            drop_last: drop a smaller last training batch. Default False.
            device: move all tensors there once (e.g. "cuda"). Default None: leave them.
            generator: CPU `torch.Generator` for the shuffle. Default None: global RNG.
            classes: the name of each label, or None (`DataLoaders.classes`). The dataset
                helpers' `TensorData` carries them: pass `classes=data.classes`.

        Examples:
            >>> from learner.data import digits
            >>> data = digits()  # doctest: +SKIP
            >>> dls = DataLoaders.from_tensors(*data, bs=64, classes=data.classes)  # doctest: +SKIP
            >>> xb, yb = next(iter(dls.train))  # doctest: +SKIP
        """
        _check_bs(bs)
        if (x_valid is None) != (y_valid is None):
            given, missing = ("x_valid", "y_valid") if y_valid is None else ("y_valid", "x_valid")
            raise ValueError(f"{given} was given without {missing}; pass both or neither.")
        _check_tensors({"x_train": x_train, "y_train": y_train})
        if x_valid is not None:
            _check_tensors({"x_valid": x_valid, "y_valid": y_valid})
        train = TensorLoader(
            x_train,
            y_train,
            bs=bs,
            shuffle=shuffle,
            drop_last=drop_last,
            device=device,
            generator=generator,
        )
        valid = None
        if x_valid is not None and y_valid is not None:
            valid = TensorLoader(x_valid, y_valid, bs=2 * bs, device=device, generator=generator)
        return cls(train, valid, classes)


# --- Datasets -------------------------------------------------------------------------------


class _Tensors(NamedTuple):
    x_train: Tensor
    y_train: Tensor
    x_valid: Tensor
    y_valid: Tensor


class TensorData(_Tensors):
    """Train and validation tensors, in the order `DataLoaders.from_tensors` takes them, and the
    names of the labels when known.

    A named tuple of the four tensors (`x_train, y_train, x_valid, y_valid = data` and
    `from_tensors(*data)` see those four), with `classes` beside them: `classes[i]` names label
    `i`, or None. `mnist()` and `digits()` name the digits "0" to "9"; `fashion_mnist()` its ten
    kinds of clothing. Pass them on with `from_tensors(*data, classes=data.classes)`.

    Examples:
        >>> data = TensorData(torch.zeros(4, 2), torch.zeros(4), torch.zeros(2, 2), torch.zeros(2),
        ...                   classes=["no", "yes"])
        >>> dls = DataLoaders.from_tensors(*data, bs=2, classes=data.classes)
        >>> dls.classes
        ('no', 'yes')
    """

    classes: tuple[str, ...] | None = None  # the instance's own, set by __new__

    def __new__(
        cls,
        x_train: Tensor,
        y_train: Tensor,
        x_valid: Tensor,
        y_valid: Tensor,
        classes: Sequence[str] | None = None,
    ) -> TensorData:
        data = super().__new__(cls, x_train, y_train, x_valid, y_valid)
        data.classes = _check_classes(classes)
        return data

    def _replace(self, **changes: Any) -> TensorData:
        """A copy with the fields in `changes` replaced (`classes` too); the rest kept."""
        return type(self)(**{**self._asdict(), "classes": self.classes, **changes})


DIGIT_CLASSES = tuple(str(i) for i in range(10))
"""The names of the labels of `mnist()` and `digits()`: "0" to "9"."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
"""The names of Fashion-MNIST's labels 0 to 9."""


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing and could not be downloaded.

    Examples:
        >>> try:
        ...     mnist(root="/nonexistent", download=False)
        ... except DataNotFoundError as e:
        ...     print("set LEARNER_DATA" in str(e))
        True
    """


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def data_root(root: StrPath | None = None) -> Path:
    """Where datasets live: `root` if given, else `$LEARNER_DATA`, else a per-user cache folder.

    The cache folder is `$XDG_CACHE_HOME/learner`, or `~/.cache/learner`. Nothing is created.

    Examples:
        >>> data_root("/data")
        PosixPath('/data')
    """
    if root is not None:
        return Path(root).expanduser()
    if env := os.environ.get("LEARNER_DATA"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "learner"


def mnist_available(root: StrPath | None = None) -> bool:
    """Whether the uncompressed MNIST files are under `data_root(root)/MNIST/raw/`. No download.

    Examples:
        >>> from learner.data import mnist, mnist_available, digits
        >>> data = mnist() if mnist_available() else digits()  # doctest: +SKIP
    """
    raw = data_root(root) / "MNIST" / "raw"
    return all((raw / name).is_file() for name in _MNIST_FILES)


def _load_mnist_like(
    name: str,
    root: StrPath | None,
    flatten: bool,
    normalize: bool,
    download: bool,
    classes: Sequence[str],
) -> TensorData:
    """Load an MNIST-format torchvision dataset as tensors, converting all images at once."""
    from torchvision import datasets  # Lazy: importing torchvision costs about a second.

    mean, std = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530)}[name]
    cls = getattr(datasets, name)
    path = data_root(root)
    failure = "download=False was passed"
    try:
        train, valid = cls(path, train=True), cls(path, train=False)
    except RuntimeError:
        if not download:
            train = valid = None
        else:
            # torchvision extracts local .gz archives without the network, else downloads.
            try:
                train = cls(path, train=True, download=True)
                valid = cls(path, train=False, download=True)
            except (RuntimeError, OSError) as e:
                train = valid = None
                detail = (str(e).strip().splitlines() or [""])[0]
                failure = f"the download failed ({type(e).__name__}: {detail})"
    if train is None or valid is None:
        raw = path / name / "raw"
        files = "\n".join(f"  {raw / f}(.gz)" for f in _MNIST_FILES)
        raise DataNotFoundError(
            f"{name} files not found; expected:\n{files}\n"
            f"They were not downloaded: {failure}. To provide them, put the files in a folder "
            f"<dir>/{name}/raw/ and set LEARNER_DATA=<dir> (or pass root=<dir>); with only the "
            f".gz archives there, call with download=True to extract them."
        )

    def convert(ds: Any) -> tuple[Tensor, Tensor]:
        # One pass over the whole uint8 array instead of ToTensor+Normalize per image.
        x = ds.data.to(torch.float32).div_(255)
        if normalize:
            x.sub_(mean).div_(std)
        x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
        return x, ds.targets.to(torch.int64)

    return TensorData(*convert(train), *convert(valid), classes=classes)


def mnist(
    root: StrPath | None = None,
    flatten: bool = False,
    normalize: bool = True,
    download: bool = True,
) -> TensorData:
    """MNIST as tensors: 60,000 training and 10,000 validation digits, converted once.

    Images are float32 in `(N, 1, 28, 28)`, or `(N, 784)` with `flatten`, scaled to [0, 1] and,
    with `normalize`, standardised with the training set's mean 0.1307 and std 0.3081. Targets
    are int64 in 0..9, named "0" to "9" in `classes`. Files are read from
    `data_root(root)/MNIST/raw/`.

    Args:
        root: folder holding `MNIST/raw/`. Default None: `$LEARNER_DATA` or the user cache.
        flatten: return `(N, 784)` images. Default False.
        normalize: standardise the pixels. Default True.
        download: try to download missing files. Default True.

    Raises:
        DataNotFoundError: the files are missing and were not downloaded.

    Examples:
        >>> data = mnist()  # doctest: +SKIP
        >>> dls = DataLoaders.from_tensors(*data, bs=64, classes=data.classes)  # doctest: +SKIP
    """
    return _load_mnist_like("MNIST", root, flatten, normalize, download, DIGIT_CLASSES)


def fashion_mnist(
    root: StrPath | None = None,
    flatten: bool = False,
    normalize: bool = True,
    download: bool = True,
) -> TensorData:
    """Fashion-MNIST as tensors, like `mnist`, standardised with mean 0.2860 and std 0.3530.

    Files are read from `data_root(root)/FashionMNIST/raw/`. `classes` names the labels 0..9
    (`FASHION_MNIST_CLASSES`): T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
    Sneaker, Bag, Ankle boot.

    Examples:
        >>> data = fashion_mnist()  # doctest: +SKIP
        >>> dls = DataLoaders.from_tensors(*data, bs=64, classes=data.classes)  # doctest: +SKIP
    """
    return _load_mnist_like(
        "FashionMNIST", root, flatten, normalize, download, FASHION_MNIST_CLASSES
    )


def digits(
    flatten: bool = False, normalize: bool = True, valid_pct: float = 0.2, seed: int = 42
) -> TensorData:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download) as a seeded train/valid split.

    Pixels (0..16) are scaled to [0, 1] and, with `normalize`, standardised with the training
    split's mean and std. Images are float32 `(N, 1, 8, 8)`, or `(N, 64)` with `flatten`;
    targets are int64 in 0..9, named "0" to "9" in `classes`.

    Args:
        flatten: return `(N, 64)` images. Default False.
        normalize: standardise with the training split's statistics. Default True.
        valid_pct: fraction held out for validation, in (0, 1). Default 0.2.
        seed: seed of the split. Default 42.

    Examples:
        >>> data = digits()  # doctest: +SKIP
        >>> data.x_train.shape, data.x_valid.shape  # doctest: +SKIP
        (torch.Size([1438, 1, 8, 8]), torch.Size([359, 1, 8, 8]))
    """
    if not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct must be between 0 and 1 (exclusive), got {valid_pct}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "digits() needs scikit-learn: pip install scikit-learn "
            "(or pip install 'learner[examples]')."
        ) from e
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_valid = round(len(x) * valid_pct)
    valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
    x_train, x_valid = x[train_idx], x[valid_idx]
    if normalize:
        # Training statistics only, so nothing about the validation split leaks into the inputs.
        mean, std = x_train.mean(), x_train.std()
        x_train, x_valid = (x_train - mean) / std, (x_valid - mean) / std
    return TensorData(x_train, y[train_idx], x_valid, y[valid_idx], classes=DIGIT_CLASSES)
