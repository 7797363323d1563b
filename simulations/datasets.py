"""Datasets for the simulations: a frozen ``Dataset`` value and loaders registered by name.

Names
-----
``digits``
    scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes), scaled to
    ``[0, 1]``, split into train and test by ``seed``, stratified by class.
``synthetic``
    Gaussian blobs (10 classes, 32 features, 3000 samples) drawn from ``seed``; a fast,
    dependency-free task for tests.
``npz:PATH``
    A Keras-style ``.npz`` file holding ``x_train, y_train, x_test, y_test``.
``mnist``, ``fashion_mnist``, ``cifar10``
    Read from ``<data_dir or $FEDSHIELD_DATA>/<name>.npz`` when present, else downloaded
    from the Hugging Face Hub (``ylecun/mnist``, ``zalando-datasets/fashion_mnist``,
    ``uoft-cs/cifar10``) with the ``datasets`` library (the one ``flwr_datasets`` wraps).

Datasets shipped with a fixed train/test split (``npz``, ``mnist``, ``fashion_mnist``,
``cifar10``) keep it: ``seed`` and ``test_fraction`` only shape the split of ``digits`` and
``synthetic``. ``DATASETS.get(name).fixed_split`` says which is which.

Images are ``(N, C, H, W)`` float32 in ``[0, 1]``; flat features ``(N, F)``; labels
``(N,)`` int64 in ``[0, num_classes)``.
"""

from __future__ import annotations

import importlib
import os
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from aggregation.registry import Registry, derive_seed

__all__ = [
    "DATASETS",
    "DATA_ENV",
    "HUB_IDS",
    "Dataset",
    "DatasetLoader",
    "arrays_to_dataset",
    "load_dataset",
    "load_npz",
]

DATA_ENV = "FEDSHIELD_DATA"
"""Environment variable naming a folder of ``<name>.npz`` files used before the Hub."""

HUB_IDS: dict[str, str] = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
}
"""Hugging Face Hub repository of each downloadable dataset."""

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_HUB_PROBE_TIMEOUT_S = 5.0

NDArray = npt.NDArray[Any]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into train and test, as torch tensors.

    Attributes
    ----------
    name
        The name it was loaded under (``"digits"``, ``"npz:/path/file.npz"``, ...).
    x_train, x_test
        ``(N, *input_shape)`` and ``(M, *input_shape)`` float32, finite.
    y_train, y_test
        ``(N,)`` and ``(M,)`` int64 in ``[0, num_classes)``.
    num_classes
        Number of classes, at least 2.
    input_shape
        Shape of one sample: ``(C, H, W)`` for images, ``(F,)`` for flat features.

    Raises
    ------
    TypeError
        If an array is not a tensor or ``num_classes`` not an int.
    ValueError
        If a dtype, shape or label is inconsistent with the rest, a split is empty or an
        input is not finite.

    Examples
    --------
    >>> ds = Dataset("toy", torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]),
    ...              torch.ones(2, 3), torch.tensor([1, 0]), 2, (3,))
    >>> ds.num_train, ds.num_test
    (4, 2)
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise TypeError(f"num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 2:
            raise ValueError(
                f"dataset {self.name!r}: classification needs num_classes >= 2, "
                f"got {self.num_classes}"
            )
        shape = tuple(self.input_shape)
        if not shape or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
        ):
            raise ValueError(
                f"dataset {self.name!r}: input_shape must be a non-empty tuple of positive "
                f"ints, got {self.input_shape!r}"
            )
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TypeError(
                    f"dataset {self.name!r}: x_{split} and y_{split} must be torch tensors"
                )
            if x.dtype != torch.float32:
                raise ValueError(
                    f"dataset {self.name!r}: x_{split} must be float32, got {x.dtype}"
                )
            if y.dtype != torch.int64:
                raise ValueError(
                    f"dataset {self.name!r}: y_{split} must be int64, got {y.dtype}"
                )
            if tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"dataset {self.name!r}: x_{split} has shape {tuple(x.shape)}, expected "
                    f"(N, *input_shape) = (N, {', '.join(map(str, shape))})"
                )
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"dataset {self.name!r}: y_{split} must be (N,) with N = "
                    f"{x.shape[0]} samples of x_{split}, got shape {tuple(y.shape)}"
                )
            if x.shape[0] == 0:
                raise ValueError(f"dataset {self.name!r}: the {split} split is empty")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"dataset {self.name!r}: x_{split} holds NaN or Inf values")
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"dataset {self.name!r}: y_{split} must lie in [0, {self.num_classes}), "
                    f"got labels from {lo} to {hi}"
                )

    @property
    def num_train(self) -> int:
        """Number of training samples ``N``."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples ``M``."""
        return int(self.x_test.shape[0])


class _LoadFn(Protocol):
    def __call__(
        self, arg: str, *, seed: int, test_fraction: float, data_dir: str | None
    ) -> Dataset: ...


@dataclass(frozen=True)
class DatasetLoader:
    """A registered loader: ``loader(arg, seed=..., test_fraction=..., data_dir=...)``.

    Attributes
    ----------
    load
        The function; ``arg`` is what follows the colon in the name (``"PATH"`` in
        ``"npz:PATH"``), empty for plain names.
    fixed_split
        Whether the dataset ships its own train/test split (then ``seed`` and
        ``test_fraction`` are not used).
    """

    load: _LoadFn
    fixed_split: bool

    def __call__(
        self, arg: str, *, seed: int, test_fraction: float, data_dir: str | None
    ) -> Dataset:
        return self.load(arg, seed=seed, test_fraction=test_fraction, data_dir=data_dir)


DATASETS: Registry[DatasetLoader] = Registry("dataset")
"""``DATASETS.build(key, arg=..., seed=..., test_fraction=..., data_dir=...)`` loads one."""


def register_dataset(name: str, *, fixed_split: bool) -> Callable[[_LoadFn], _LoadFn]:
    """Register the decorated loader ``load(arg, *, seed, test_fraction, data_dir)`` as the
    dataset ``name``; the function is returned unchanged."""
    def decorator(load: _LoadFn) -> _LoadFn:
        DATASETS.register(name)(DatasetLoader(load, fixed_split=fixed_split))
        return load
    return decorator


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    data_dir: str | None = None,
) -> Dataset:
    """Load the dataset registered as ``name`` (``"npz:PATH"`` for a local file).

    Parameters
    ----------
    name
        ``digits``, ``synthetic``, ``mnist``, ``fashion_mnist``, ``cifar10`` or
        ``npz:PATH``; ``DATASETS.names()`` lists them.
    seed
        Seed of the train/test split (``digits``) or of the generated data
        (``synthetic``); datasets with a fixed split do not use it.
    test_fraction
        Fraction of each class held out for testing, in ``(0, 1)``, for the datasets
        without a fixed split.
    data_dir
        Folder searched for ``<name>.npz`` before ``$FEDSHIELD_DATA`` and the Hub.

    Returns
    -------
    Dataset
        ``x_train (N, *input_shape)`` float32, ``y_train (N,)`` int64, likewise for test.

    Raises
    ------
    KeyError
        Unknown name (the message lists the valid ones).
    TypeError
        ``seed`` is not an int.
    ValueError
        Bad ``test_fraction``, a malformed file, or an argument given to a name that takes
        none.
    FileNotFoundError
        ``npz:PATH`` names a missing file.
    RuntimeError
        A Hub dataset is neither cached locally nor downloadable.

    Examples
    --------
    >>> ds = load_dataset("digits", seed=0)
    >>> ds.input_shape, ds.num_classes, ds.num_train + ds.num_test
    ((1, 8, 8), 10, 1797)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(
            f"test_fraction must lie in (0, 1), got {test_fraction}: try 0.2"
        )
    key, _, arg = name.partition(":")
    dataset: Dataset = DATASETS.build(key, arg=arg, seed=seed, test_fraction=float(test_fraction),
                                      data_dir=data_dir)
    return dataset


def _no_arg(key: str, arg: str) -> None:
    if arg:
        raise ValueError(f"dataset {key!r} takes no argument, got {key}:{arg}: use {key!r}")


# ---------------------------------------------------------------------------------------
# Array conversion shared by npz files and the Hub


def _images_to_float(x: NDArray, key: str, source: str) -> NDArray:
    """uint8 pixels -> float32 in [0, 1]; floating inputs -> float32 as they are."""
    if x.dtype == np.uint8:
        scaled: NDArray = x.astype(np.float32) / np.float32(255.0)
        return scaled
    if np.issubdtype(x.dtype, np.floating):
        out = x.astype(np.float32)
        if not np.isfinite(out).all():
            raise ValueError(
                f"{source}: {key} holds NaN or Inf values (or values beyond float32): "
                "clean or rescale the inputs"
            )
        return out
    raise ValueError(
        f"{source}: {key} has dtype {x.dtype}; expected uint8 pixels in [0, 255] or "
        f"floats: convert with x.astype(np.uint8) or x.astype(np.float32)"
    )


def _to_channels_first(x: NDArray, key: str, source: str) -> NDArray:
    """(N, F) kept; (N, H, W) -> (N, 1, H, W); (N, H, W, C) with C in {1, 3} -> (N, C, H, W).

    A 4-d array whose last axis is not 1 or 3 but whose second is, is taken as already
    channels-first.
    """
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        if x.shape[-1] in (1, 3):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if x.shape[1] in (1, 3):
            return x
        raise ValueError(
            f"{source}: {key} has shape {x.shape}; 4-d images must be (N, H, W, C) or "
            "(N, C, H, W) with C = 1 or 3 channels"
        )
    raise ValueError(
        f"{source}: {key} has shape {x.shape}; expected (N, F) features, (N, H, W) gray "
        "images or (N, H, W, C) images"
    )


def _labels(y: NDArray, key: str, source: str, n: int) -> NDArray:
    if y.ndim == 2 and y.shape[1] == 1:  # Keras ships CIFAR labels as (N, 1)
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"{source}: {key} has shape {y.shape}; labels must be (N,) or (N, 1) class "
            "indices (not one-hot: use y.argmax(1))"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{source}: {key} has dtype {y.dtype}; labels must be integer class indices: "
            "convert with y.astype(np.int64)"
        )
    if y.shape[0] != n:
        raise ValueError(
            f"{source}: {key} has {y.shape[0]} labels but the matching x has {n} samples: "
            "the two arrays must have the same length"
        )
    if y.size and int(y.min()) < 0:
        raise ValueError(
            f"{source}: {key} holds negative labels (min {int(y.min())}); labels must be "
            "class indices 0..K-1"
        )
    return y.astype(np.int64)


def arrays_to_dataset(name: str, arrays: Mapping[str, NDArray]) -> Dataset:
    """Build a ``Dataset`` from Keras-layout numpy arrays.

    ``x_*`` uint8 are scaled by 1/255; floats are kept (and must be finite). ``(N, H, W)``
    gets a channel axis, ``(N, H, W, C)`` is transposed to ``(N, C, H, W)``, ``(N, F)`` is
    kept. ``num_classes = max label + 1`` over both splits.

    Parameters
    ----------
    name
        Name for the dataset and the error messages.
    arrays
        Holds ``x_train, y_train, x_test, y_test``.

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        Missing keys, mismatched lengths or sample shapes, non-integer or negative labels,
        unsupported dtypes or ranks, non-finite inputs.

    Examples
    --------
    >>> x = np.zeros((4, 5, 5), np.uint8); y = np.array([0, 1, 2, 0])
    >>> ds = arrays_to_dataset("toy", dict(x_train=x, y_train=y, x_test=x, y_test=y))
    >>> ds.input_shape, ds.num_classes
    ((1, 5, 5), 3)
    """
    missing = [k for k in _NPZ_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"{name}: missing key(s) {', '.join(missing)} (found: "
            f"{', '.join(sorted(arrays)) or 'none'}); save the file with "
            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    xs: dict[str, NDArray] = {}
    ys: dict[str, NDArray] = {}
    for split in ("train", "test"):
        x = np.asarray(arrays[f"x_{split}"])
        x = _to_channels_first(_images_to_float(x, f"x_{split}", name), f"x_{split}", name)
        xs[split] = x
        ys[split] = _labels(np.asarray(arrays[f"y_{split}"]), f"y_{split}", name, x.shape[0])
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise ValueError(
            f"{name}: x_train samples have shape {xs['train'].shape[1:]} but x_test samples "
            f"have {xs['test'].shape[1:]} (after layout conversion): both splits must share "
            "one sample shape"
        )
    for split in ("train", "test"):
        if xs[split].shape[0] == 0:
            raise ValueError(f"{name}: x_{split} is empty; both splits need samples")
    num_classes = _num_classes(name, ys["train"], ys["test"])
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(xs["train"])),
        y_train=torch.from_numpy(ys["train"]),
        x_test=torch.from_numpy(np.ascontiguousarray(xs["test"])),
        y_test=torch.from_numpy(ys["test"]),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in xs["train"].shape[1:]),
    )


def load_npz(path: str | os.PathLike[str], *, name: str | None = None) -> Dataset:
    """Load a Keras-style ``.npz`` (``x_train, y_train, x_test, y_test``) as a ``Dataset``.

    See ``arrays_to_dataset`` for the conversions.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a readable npz archive or its arrays are malformed.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "toy.npz"
    >>> x, y = np.zeros((4, 6, 6, 3), np.uint8), np.array([0, 1, 1, 0])
    >>> np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    >>> load_npz(path).input_shape
    (3, 6, 6)
    """
    p = Path(path).expanduser()
    label = name if name is not None else f"npz:{path}"
    if not p.is_file():
        raise FileNotFoundError(
            f"{label}: no such file {str(p)!r}; give the path of a .npz file holding "
            "x_train, y_train, x_test, y_test"
        )
    with p.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":  # every npz is a zip archive
        raise ValueError(
            f"{label}: {str(p)!r} is not an npz archive; save the arrays with "
            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    try:
        with np.load(p, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{label}: cannot read {str(p)!r} as an npz archive ({exc})") from exc
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(
                f"{label}: {str(p)!r} stores object arrays, which are refused for safety "
                "(loading them could run code); save plain numeric arrays"
            ) from exc
        raise
    return arrays_to_dataset(label, arrays)


# ---------------------------------------------------------------------------------------
# Seeded stratified split


def _stratified_split(
    labels: NDArray, test_fraction: float, rng: np.random.Generator, name: str
) -> tuple[NDArray, NDArray]:
    """Per class ``c`` with ``n_c`` samples, ``round(test_fraction * n_c)`` go to test.

    Returns shuffled train and test index arrays. Raises ``ValueError`` if a class would
    be absent from either split.
    """
    train: list[NDArray] = []
    test: list[NDArray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round(test_fraction * idx.size)
        if k == 0 or k == idx.size:
            raise ValueError(
                f"{name}: test_fraction={test_fraction} leaves class {int(c)} "
                f"({idx.size} samples) with {k} test and {idx.size - k} train samples; "
                "every class needs both: pick a test_fraction nearer 0.5"
            )
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _split_dataset(
    name: str, x: NDArray, y: NDArray, *, seed: int, test_fraction: float
) -> Dataset:
    rng = np.random.default_rng(derive_seed(seed, "dataset-split", name))
    tr, te = _stratified_split(y, test_fraction, rng, name)
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x[tr], dtype=np.float32)),
        y_train=torch.from_numpy(y[tr].astype(np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x[te], dtype=np.float32)),
        y_test=torch.from_numpy(y[te].astype(np.int64)),
        num_classes=_num_classes(name, y),
        input_shape=tuple(int(s) for s in x.shape[1:]),
    )


# ---------------------------------------------------------------------------------------
# Loaders


@register_dataset("digits", fixed_split=False)
def _digits(arg: str, *, seed: int, test_fraction: float, data_dir: str | None) -> Dataset:
    """scikit-learn's bundled digits [Alpaydin & Kaynak, 1998]: 1797 8x8 images, 10 classes.

    ``x = pixel / 16`` in ``[0, 1]``, shape ``(1, 8, 8)``; split by ``seed``, stratified.
    """
    _no_arg("digits", arg)
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    return _split_dataset("digits", x, y, seed=seed, test_fraction=test_fraction)


_SYN_CLASSES, _SYN_FEATURES, _SYN_PER_CLASS, _SYN_SEPARATION = 10, 32, 300, 0.5


@register_dataset("synthetic", fixed_split=False)
def _synthetic(arg: str, *, seed: int, test_fraction: float, data_dir: str | None) -> Dataset:
    """Gaussian blobs: ``mu_c ~ N(0, 0.25 I_32)``, ``x | c ~ N(mu_c, I_32)``, 10 classes.

    Class means sit ~4 noise standard deviations apart, so the classes overlap: logistic
    regression reaches ~86 % test accuracy, which leaves room for attacks to show. 300
    samples per class, split by ``test_fraction``, stratified, all drawn from ``seed``.
    """
    _no_arg("synthetic", arg)
    rng = np.random.default_rng(derive_seed(seed, "dataset", "synthetic"))
    means = rng.normal(0.0, _SYN_SEPARATION, size=(_SYN_CLASSES, _SYN_FEATURES))
    y = np.repeat(np.arange(_SYN_CLASSES, dtype=np.int64), _SYN_PER_CLASS)
    x = (means[y] + rng.normal(size=(y.size, _SYN_FEATURES))).astype(np.float32)
    return _split_dataset("synthetic", x, y, seed=seed, test_fraction=test_fraction)


@register_dataset("npz", fixed_split=True)
def _npz(arg: str, *, seed: int, test_fraction: float, data_dir: str | None) -> Dataset:
    if not arg:
        raise ValueError("dataset 'npz' needs a path: use 'npz:/path/to/file.npz'")
    return load_npz(arg)


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _probe_hub(hub_id: str) -> None:
    """Raise ``ConnectionError`` unless the Hub answers within a few seconds.

    ``datasets`` retries an unreachable Hub for ~25 s before giving up; this probe makes an
    offline machine fail at once. Any HTTP answer (even an error status) counts as reachable;
    proxies from the environment are honoured.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/datasets/{urllib.parse.quote(hub_id)}"
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=_HUB_PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"cannot reach {endpoint}: {exc}") from exc


def _hf_datasets() -> Any:
    """The Hugging Face ``datasets`` module, imported on first use (it takes ~1 s)."""
    return importlib.import_module("datasets")


def _split_to_numpy(split: Any, hub_id: str) -> tuple[NDArray, NDArray]:
    """A Hugging Face ``Dataset`` split -> (images (N, H, W[, C]) uint8, labels (N,))."""
    hf = _hf_datasets()
    features = split.features
    image_cols = [k for k, v in features.items() if isinstance(v, hf.Image)]
    label_cols = ["label"] if "label" in features else [
        k for k, v in features.items() if isinstance(v, hf.ClassLabel)
    ]
    if len(image_cols) != 1 or len(label_cols) != 1:
        raise ValueError(
            f"{hub_id}: expected one image column and one label column, found features "
            f"{dict(features)}"
        )
    cols = split.with_format("numpy")[:]
    return np.asarray(cols[image_cols[0]]), np.asarray(cols[label_cols[0]])


def _download_hub(hub_id: str) -> dict[str, NDArray]:
    """Download ``hub_id`` from the Hugging Face Hub as Keras-layout arrays.

    Honours ``HF_HUB_OFFLINE=1`` (then only the local Hugging Face cache is read).

    Raises
    ------
    ConnectionError
        If the Hub cannot be reached (or, offline, the cache lacks the dataset).
    """
    if not (_env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")):
        _probe_hub(hub_id)
    dd = _hf_datasets().load_dataset(hub_id)
    x_train, y_train = _split_to_numpy(dd["train"], hub_id)
    x_test, y_test = _split_to_numpy(dd["test"], hub_id)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types a failed download raises: ``OSError`` (``ConnectionError``,
    ``TimeoutError``, the Hub's ``LocalEntryNotFoundError``) and httpx's transport errors."""
    errors: list[type[BaseException]] = [OSError]
    try:
        errors.append(importlib.import_module("httpx").TransportError)
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def _local_cache(name: str, data_dir: str | None) -> Path | None:
    for folder in (data_dir, os.environ.get(DATA_ENV)):
        if folder:
            candidate = Path(folder).expanduser() / f"{name}.npz"
            if candidate.is_file():
                return candidate
    return None


def _hub_loader(name: str) -> DatasetLoader:
    hub_id = HUB_IDS[name]

    def load(arg: str, *, seed: int, test_fraction: float, data_dir: str | None) -> Dataset:
        _no_arg(name, arg)
        cached = _local_cache(name, data_dir)
        if cached is not None:
            return load_npz(cached, name=name)
        try:
            arrays = _download_hub(hub_id)
        except _network_errors() as exc:
            raise RuntimeError(
                f"dataset {name!r} could not be downloaded from the Hugging Face Hub "
                f"({hub_id}): {exc}. To use it offline, either pass 'npz:PATH' with a "
                "Keras-style .npz (x_train, y_train, x_test, y_test), or put "
                f"'{name}.npz' in the folder named by ${DATA_ENV} (or by data_dir)"
            ) from exc
        return arrays_to_dataset(name, arrays)

    load.__doc__ = (
        f"``{name}`` from ``<data_dir or ${DATA_ENV}>/{name}.npz``, else the Hub's "
        f"``{hub_id}``."
    )
    return DatasetLoader(load, fixed_split=True)


for _name in HUB_IDS:
    DATASETS.register(_name)(_hub_loader(_name))


# a labels file sizes the model's output layer: more classes than this is not a class count
MAX_CLASSES = 100_000


def _num_classes(name: str, *labels: NDArray) -> int:
    """``max label + 1``, refused when the labels cannot mean that many classes.

    Raises
    ------
    ValueError
        If the largest label exceeds :data:`MAX_CLASSES`, or it exceeds 1023 while fewer
        than half of the classes ``0 .. max`` appear (sparse labels such as
        ``{0, 7, 90000}`` would size the model by their largest value; a small output layer
        with classes absent from a small file is harmless).
    """
    top = int(max(int(y.max()) for y in labels))
    distinct = len(np.unique(np.concatenate([np.asarray(y).reshape(-1) for y in labels])))
    if top + 1 > MAX_CLASSES or (top + 1 > 1024 and 2 * distinct < top + 1):
        raise ValueError(
            f"{name}: labels run up to {top} but only {distinct} distinct values appear; the "
            f"model would get {top + 1} outputs. Relabel the classes to 0..K-1 "
            f"(at most {MAX_CLASSES} classes)"
        )
    return top + 1

