"""Tests for simulations.datasets: bundled digits, Keras-style npz files, the Hub loaders."""

from __future__ import annotations

import socket
import types
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simulations import datasets as ds_mod
from simulations.datasets import DATASETS, HUB_IDS, Dataset, arrays_to_dataset, load_dataset

NPZ = dict[str, Any]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


def _rows(x: torch.Tensor, y: torch.Tensor) -> Counter[tuple[int, ...]]:
    """Multiset of (16 * pixels..., label) rows, exact for digits."""
    pix = torch.round(x.reshape(x.shape[0], -1) * 16).to(torch.int64)
    return Counter(tuple(r) for r in torch.cat([pix, y[:, None]], 1).tolist())


# --------------------------------------------------------------------------------- digits


def test_digits_shapes_and_range(digits: Dataset) -> None:
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.num_train + digits.num_test == 1797
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert tuple(digits.x_test.shape[1:]) == (1, 8, 8)
    both = torch.cat([digits.x_train, digits.x_test])
    assert float(both.min()) == 0.0 and float(both.max()) == 1.0
    # pixel / 16 of integer pixels 0..16
    assert torch.equal(both * 16, torch.round(both * 16))


def test_digits_is_a_partition_of_sklearn_digits(digits: Dataset) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ref = Counter(
        tuple(int(v) for v in row) + (int(t),)
        for row, t in zip(bunch.data, bunch.target, strict=True)
    )
    got = _rows(digits.x_train, digits.y_train) + _rows(digits.x_test, digits.y_test)
    assert got == ref


def test_digits_split_is_stratified(digits: Dataset) -> None:
    n_train = torch.bincount(digits.y_train, minlength=10)
    n_test = torch.bincount(digits.y_test, minlength=10)
    assert (n_train > 0).all() and (n_test > 0).all()
    for k in range(10):
        n_k = int(n_train[k] + n_test[k])
        assert int(n_test[k]) == round(0.2 * n_k)


def test_digits_split_deterministic_per_seed(digits: Dataset) -> None:
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.x_train, digits.x_train)
    assert torch.equal(again.y_test, digits.y_test)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.y_train, digits.y_train)
    assert _rows(other.x_test, other.y_test) != _rows(digits.x_test, digits.y_test)


def test_digits_test_fraction() -> None:
    d = load_dataset("digits", seed=3, test_fraction=0.5)
    n_test = torch.bincount(d.y_test, minlength=10)
    n_all = n_test + torch.bincount(d.y_train, minlength=10)
    assert n_test.tolist() == [round(0.5 * int(n)) for n in n_all]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_test_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=fraction)


def test_test_fraction_leaving_a_class_empty() -> None:
    with pytest.raises(ValueError, match="class .* 0 test"):
        load_dataset("digits", test_fraction=0.001)


def test_plain_name_rejects_argument() -> None:
    with pytest.raises(ValueError, match="takes no argument"):
        load_dataset("digits:foo")


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(KeyError, match="did you mean 'digits'"):
        load_dataset("digit")


def test_registry_names_and_fixed_split() -> None:
    assert {"digits", "synthetic", "npz", "mnist", "fashion_mnist", "cifar10"} <= set(
        DATASETS.names()
    )
    assert not DATASETS.get("digits").fixed_split
    assert all(DATASETS.get(n).fixed_split for n in ("npz", *HUB_IDS))


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_stratified() -> None:
    a = load_dataset("synthetic", seed=5)
    b = load_dataset("synthetic", seed=5)
    c = load_dataset("synthetic", seed=6)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.input_shape == (32,) and a.num_classes == 10
    assert torch.bincount(a.y_test).tolist() == [60] * 10
    assert torch.bincount(a.y_train).tolist() == [240] * 10


def test_synthetic_noise_has_unit_variance() -> None:
    # x | c ~ N(mu_c, I): within-class deviations from the class mean have variance ~1
    d = load_dataset("synthetic", seed=0)
    x, y = d.x_train.double(), d.y_train
    resid = torch.cat([x[y == k] - x[y == k].mean(0) for k in range(10)])
    var = float(resid.var())
    assert abs(var - 1.0) < 0.05  # 2400 * 32 draws: sd of the estimate ~ 0.006


# ------------------------------------------------------------------------------------ npz


def _save(tmp_path: Path, name: str = "data.npz", **arrays: Any) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _keras(x_shape: tuple[int, ...], dtype: Any = np.uint8, seed: int = 0) -> NPZ:
    rng = np.random.default_rng(seed)
    n_tr, n_te = x_shape[0], max(2, x_shape[0] // 2)
    if np.issubdtype(dtype, np.integer):
        x_tr = rng.integers(0, 256, size=x_shape).astype(dtype)
        x_te = rng.integers(0, 256, size=(n_te, *x_shape[1:])).astype(dtype)
    else:
        x_tr = rng.normal(size=x_shape).astype(dtype)
        x_te = rng.normal(size=(n_te, *x_shape[1:])).astype(dtype)
    y_tr = np.arange(n_tr) % 3
    y_te = np.arange(n_te) % 3
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


def test_npz_gray_images(tmp_path: Path) -> None:
    raw = _keras((6, 5, 4))
    d = load_dataset("npz:" + _save(tmp_path, **raw))
    assert d.input_shape == (1, 5, 4)
    assert d.num_classes == 3
    assert torch.equal(d.x_train[:, 0], torch.from_numpy(raw["x_train"].astype(np.float32) / 255))
    assert d.y_train.tolist() == raw["y_train"].tolist()
    assert d.name.startswith("npz:")


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_channels_last_is_transposed(tmp_path: Path, channels: int) -> None:
    raw = _keras((4, 5, 6, channels))
    d = load_dataset("npz:" + _save(tmp_path, **raw))
    assert d.input_shape == (channels, 5, 6)
    x = raw["x_test"].astype(np.float32) / np.float32(255)
    for i, c, h, w in [(0, 0, 0, 0), (1, channels - 1, 4, 5), (1, 0, 3, 1)]:
        assert float(d.x_test[i, c, h, w]) == float(x[i, h, w, c])
    assert torch.equal(d.x_test, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))


def test_npz_channels_first_kept(tmp_path: Path) -> None:
    raw = _keras((4, 3, 6, 7))
    d = load_dataset("npz:" + _save(tmp_path, **raw))
    assert d.input_shape == (3, 6, 7)
    assert torch.equal(d.x_train, torch.from_numpy(raw["x_train"].astype(np.float32) / 255))


def test_npz_flat_float_features_kept(tmp_path: Path) -> None:
    raw = _keras((8, 5), dtype=np.float64)
    d = load_dataset("npz:" + _save(tmp_path, **raw))
    assert d.input_shape == (5,)
    assert torch.equal(d.x_train, torch.from_numpy(raw["x_train"].astype(np.float32)))


def test_npz_keras_cifar_labels_column_and_num_classes(tmp_path: Path) -> None:
    raw = _keras((6, 4, 4, 3))
    raw["y_train"] = raw["y_train"][:, None].astype(np.uint8)  # Keras CIFAR: (N, 1) uint8
    raw["y_test"] = np.array([0, 7, 1])  # largest label only in test
    d = load_dataset("npz:" + _save(tmp_path, **raw))
    assert d.num_classes == 8
    assert d.y_train.dtype == torch.int64 and d.y_train.shape == (6,)


def test_npz_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset(f"npz:{path}")


def test_npz_needs_a_path() -> None:
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("npz")


def _malformed() -> list[tuple[str, NPZ, str]]:
    base = _keras((6, 4, 4))
    cases: list[tuple[str, NPZ, str]] = []
    cases.append(("missing key", {k: v for k, v in base.items() if k != "y_test"},
                  "missing key.*y_test.*np.savez"))
    cases.append(("length mismatch", {**base, "y_train": base["y_train"][:-1]},
                  "y_train has 5 labels.*6 samples"))
    cases.append(("float labels", {**base, "y_train": base["y_train"].astype(np.float32)},
                  "y_train.*integer.*astype"))
    cases.append(("one-hot labels", {**base, "y_test": np.eye(3)[base["y_test"]]},
                  "y_test.*argmax"))
    cases.append(("negative labels", {**base, "y_test": -base["y_test"] - 1},
                  "y_test.*negative"))
    nan = base["x_train"].astype(np.float32)
    nan[0, 0, 0] = np.nan
    cases.append(("nan input", {**base, "x_train": nan}, "x_train.*NaN"))
    cases.append(("int32 pixels", {**base, "x_test": base["x_test"].astype(np.int32)},
                  "x_test.*dtype int32.*uint8"))
    cases.append(("5-d input", {**base, "x_train": base["x_train"][:, None, None]},
                  "x_train.*shape"))
    cases.append(("4 channels", {**base, "x_train": np.zeros((6, 4, 4, 4), np.uint8)},
                  "C = 1 or 3"))
    cases.append(("split shapes", {**base, "x_test": np.zeros((3, 5, 5), np.uint8)},
                  "share one sample shape"))
    cases.append(("empty test", {**base, "x_test": np.zeros((0, 4, 4), np.uint8),
                                 "y_test": np.zeros(0, np.int64)}, "x_test is empty"))
    cases.append(("one class", {**base, "y_train": np.zeros(6, np.int64),
                                "y_test": np.zeros(3, np.int64)}, "num_classes >= 2"))
    return cases


@pytest.mark.parametrize(("arrays", "message"), [c[1:] for c in _malformed()],
                         ids=[c[0] for c in _malformed()])
def test_npz_malformed(tmp_path: Path, arrays: NPZ, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset("npz:" + _save(tmp_path, **arrays))


def test_npz_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match="not an npz archive"):
        load_dataset(f"npz:{path}")


def test_npz_object_arrays_refused(tmp_path: Path) -> None:
    raw = _keras((6, 4, 4))
    raw["y_train"] = np.array([0, 1, 2, 0, 1, "x"], dtype=object)
    path = _save(tmp_path, **raw)
    with pytest.raises(ValueError, match="object arrays"):
        load_dataset("npz:" + path)


# -------------------------------------------------------------------------- Dataset checks


def test_dataset_rejects_inconsistent_values() -> None:
    x, y = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
    Dataset("ok", x, y, x, y, 2, (3,))
    with pytest.raises(ValueError, match="must lie in"):
        Dataset("bad", x, y, x, y + 1, 2, (3,))
    with pytest.raises(ValueError, match="float32"):
        Dataset("bad", x.double(), y, x, y, 2, (3,))
    with pytest.raises(ValueError, match="int64"):
        Dataset("bad", x, y.int(), x, y, 2, (3,))
    with pytest.raises(ValueError, match="expected"):
        Dataset("bad", x, y, x, y, 2, (4,))
    with pytest.raises(ValueError, match=r"y_test must be \(N,\)"):
        Dataset("bad", x, y, x, y[:3], 2, (3,))
    with pytest.raises(TypeError, match="torch tensors"):
        Dataset("bad", x.numpy(), y, x, y, 2, (3,))  # type: ignore[arg-type]


def test_arrays_to_dataset_matches_npz_path(tmp_path: Path) -> None:
    raw = _keras((6, 4, 4, 3))
    a = arrays_to_dataset("x", raw)
    b = load_dataset("npz:" + _save(tmp_path, **raw))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


# ------------------------------------------------------------------------- Hub datasets


@pytest.fixture
def no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $FEDSHIELD_DATA, so no real local cache is picked up."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(ds_mod.DATA_ENV, str(empty))
    return empty


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_hub_download_failure_is_clear(
    name: str, no_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(hub_id: str) -> dict[str, np.ndarray]:
        assert hub_id == HUB_IDS[name]
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(ds_mod, "_download_hub", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded") as info:
        load_dataset(name)
    msg = str(info.value)
    assert "npz:PATH" in msg and f"{name}.npz" in msg and "FEDSHIELD_DATA" in msg


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_hub_fails_at_once(no_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real download path, pointed at a closed loopback port: the probe refuses at once
    # instead of letting `datasets` retry for ~25 s. Nothing leaves the machine.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "http_proxy", "https_proxy",
                "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")

    def no_import() -> Any:
        raise AssertionError("datasets must not be reached when the Hub is unreachable")

    monkeypatch.setattr(ds_mod, "_hf_datasets", no_import)
    with pytest.raises(RuntimeError, match="could not be downloaded.*cannot reach"):
        load_dataset("mnist")


def _tiny_npz(tmp_path: Path, name: str, shape: tuple[int, ...]) -> Path:
    raw = _keras(shape, seed=len(name))
    path = tmp_path / f"{name}.npz"
    np.savez(path, **raw)
    return path


@pytest.mark.parametrize(("name", "shape", "input_shape"), [
    ("mnist", (6, 28, 28), (1, 28, 28)),
    ("fashion_mnist", (6, 28, 28), (1, 28, 28)),
    ("cifar10", (6, 32, 32, 3), (3, 32, 32)),
])
def test_hub_dataset_from_local_cache(
    name: str, shape: tuple[int, ...], input_shape: tuple[int, ...], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    path = _tiny_npz(cache, name, shape)

    def never(hub_id: str) -> dict[str, np.ndarray]:
        raise AssertionError("the local cache must be used before the Hub")

    monkeypatch.setattr(ds_mod, "_download_hub", never)
    monkeypatch.setenv(ds_mod.DATA_ENV, str(cache))
    d = load_dataset(name)
    raw = np.load(path)
    assert d.name == name and d.input_shape == input_shape
    assert d.y_train.tolist() == raw["y_train"].tolist()
    assert d.num_train == shape[0]


def test_data_dir_takes_precedence_over_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _tiny_npz(tmp_path / "a", "mnist", (6, 28, 28))
    _tiny_npz(tmp_path / "b", "mnist", (8, 28, 28))
    monkeypatch.setenv(ds_mod.DATA_ENV, str(tmp_path / "b"))
    assert load_dataset("mnist", data_dir=str(tmp_path / "a")).num_train == 6
    assert load_dataset("mnist").num_train == 8


def test_hub_conversion_of_hf_splits(no_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub path end to end on in-memory Hugging Face datasets (no network)."""
    hf = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    labels = [0, 9, 3, 3, 1]
    features = hf.Features({"img": hf.Image(), "label": hf.ClassLabel(num_classes=10)})
    split = hf.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in rgb], "label": labels}, features=features
    )
    fake = types.SimpleNamespace(
        load_dataset=lambda hub_id: hf.DatasetDict({"train": split, "test": split}),
        Image=hf.Image,
        ClassLabel=hf.ClassLabel,
    )
    monkeypatch.setattr(ds_mod, "_hf_datasets", lambda: fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # skip the network probe
    d = load_dataset("cifar10")
    assert d.input_shape == (3, 6, 7)
    assert d.num_classes == 10
    assert d.y_train.tolist() == labels
    expected = torch.from_numpy(rgb.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert torch.equal(d.x_train, expected)


@pytest.mark.parametrize("labels", [[0, 1, 2, 10**6], [0, 7, 90_000, 1]])
def test_labels_cannot_size_the_model_beyond_what_they_mean(
    tmp_path: Path, labels: list[int]
) -> None:
    path = tmp_path / "bad.npz"
    x = np.zeros((4, 3), dtype=np.float32)
    np.savez(path, x_train=x, y_train=np.array(labels), x_test=x, y_test=np.array(labels))
    with pytest.raises(ValueError, match="Relabel the classes to 0..K-1"):
        load_dataset(f"npz:{path}")
