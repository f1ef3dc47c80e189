"""Tests of nfpi.data: loading and validation (docs/method.md §9), (de)quantisation and bits/dim
(§4.7), subsets and stratified splits, the flow dataset and loaders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nfpi import data as D
from nfpi.data import checksums

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

fast = settings(max_examples=40, deadline=None)
bits_st = st.integers(1, 8)


def pixels(seed: int, shape: tuple[int, ...] = (4, 3, 5, 6)) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def mnist_like(n: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
        "y": np.arange(n, dtype=np.int64) % 10,
        "classes": np.array([str(k) for k in range(10)]),
    }


# --------------------------------------------------------------------------- quantisation


@fast
@given(bits=bits_st, seed=st.integers(0, 2**31 - 1))
def test_eval_round_trip_is_identity_on_the_bit_grid(bits: int, seed: int) -> None:
    x = pixels(seed)
    q = D.quantize(x, bits)
    assert q.dtype == torch.uint8 and int(q.max()) < 2**bits
    back = D.to_uint8(D.dequantize(q, bits, noise=False), bits)
    assert back.dtype == torch.uint8
    assert torch.equal(D.quantize(back, bits), q)
    # Lower bin edge in 8-bit units: the discarded low bits are zero.
    assert torch.equal(back, x & ~((1 << (8 - bits)) - 1) & 0xFF)


def test_eight_bit_round_trip_recovers_every_pixel_value() -> None:
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(D.to_uint8(D.dequantize(D.quantize(x, 8), 8, noise=False), 8), x)


def test_quantize_keeps_top_bits() -> None:
    x = torch.tensor([0, 7, 8, 128, 255], dtype=torch.uint8)
    assert D.quantize(x, 5).tolist() == [0, 0, 1, 16, 31]
    assert D.quantize(x, 1).tolist() == [0, 0, 0, 1, 1]
    # Every level receives the same number of 8-bit values.
    counts = torch.bincount(D.quantize(torch.arange(256, dtype=torch.uint8), 3).long())
    assert counts.tolist() == [32] * 8


def test_dequantize_eval_values_are_bin_centres() -> None:
    assert D.dequantize(torch.tensor([0, 1]), 1, noise=False).tolist() == [-0.5, 0.5]
    x = D.dequantize(torch.tensor([0, 255]), 8, noise=False)
    assert x.tolist() == pytest.approx([-1 + 1 / 256, 1 - 1 / 256])
    assert x.dtype == torch.float32


@fast
@given(bits=bits_st, seed=st.integers(0, 2**31 - 1))
def test_train_noise_stays_within_the_bin(bits: int, seed: int) -> None:
    q = D.quantize(pixels(seed, (2000,)), bits)
    x = D.dequantize(q, bits, noise=True, generator=torch.Generator().manual_seed(seed))
    assert x.min() >= -1 and x.max() <= 1
    frac = (x.double() + 1) / 2 * 2**bits - q.double()
    assert frac.min() >= -1e-4 and frac.max() <= 1 + 1e-4
    # The noise fills the bin uniformly, not only its centre.
    assert frac.min() < 0.05 and frac.max() > 0.95
    assert abs(frac.mean().item() - 0.5) < 0.05


def test_eval_is_deterministic_and_train_noise_follows_the_generator() -> None:
    q = D.quantize(pixels(1), 5)
    assert torch.equal(D.dequantize(q, 5, noise=False), D.dequantize(q, 5, noise=False))

    def noisy(seed: int) -> torch.Tensor:
        return D.dequantize(q, 5, noise=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(noisy(3), noisy(3))
    assert not torch.equal(noisy(3), noisy(4))


def test_to_uint8_clamps_and_rejects_nan() -> None:
    x = torch.tensor([-5.0, -1.0, 0.999999, 1.0, 7.0])
    assert D.to_uint8(x, 8).tolist() == [0, 0, 255, 255, 255]
    assert D.to_uint8(x, 5).tolist() == [0, 0, 248, 248, 248]
    with pytest.raises(ValueError, match="NaN"):
        D.to_uint8(torch.tensor([0.0, float("nan")]), 8)


@pytest.mark.parametrize("bits", [0, 9, -1, 5.0, True, "8", None])
def test_bad_bits_are_rejected_everywhere(bits: object) -> None:
    x = pixels(0)
    for call in (
        lambda: D.quantize(x, bits),
        lambda: D.dequantize(x, bits, noise=False),
        lambda: D.to_uint8(x.float(), bits),
        lambda: D.bits_per_dim(torch.zeros(2), 4, bits),
        lambda: D.FlowDataset(D.ImageArrays(x, torch.zeros(4, dtype=torch.long), ("a",)), bits),
    ):
        with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
            call()


def test_numpy_integer_bits_are_accepted() -> None:
    assert torch.equal(D.quantize(pixels(0), np.int64(5)), D.quantize(pixels(0), 5))


def test_wrong_input_types_are_explained() -> None:
    with pytest.raises(TypeError, match="uint8"):
        D.quantize(torch.zeros(3), 8)
    with pytest.raises(TypeError, match="integer levels"):
        D.dequantize(torch.zeros(3), 8, noise=False)
    with pytest.raises(ValueError, match=r"quantize\(x, 5\)"):
        D.dequantize(torch.tensor([0, 200], dtype=torch.uint8), 5, noise=False)


# --------------------------------------------------------------------------- bits per dimension


@fast
@given(bits=bits_st, dim=st.integers(1, 5000))
def test_bits_per_dim_of_the_uniform_density_is_the_bit_depth(bits: int, dim: int) -> None:
    # Uniform density on [-1, 1]^D makes every one of the 2^(b D) images equally likely.
    nll = torch.full((3,), dim * math.log(2.0), dtype=torch.float64)
    assert torch.allclose(D.bits_per_dim(nll, dim, bits), torch.full((3,), float(bits), dtype=torch.float64))


def test_bits_per_dim_matches_exact_bin_probabilities_of_a_gaussian() -> None:
    bits, mean, std = 8, torch.tensor([0.1, -0.3, 0.4]), torch.tensor([0.3, 0.25, 0.5])
    dim = mean.numel()
    rng = np.random.default_rng(0)
    q = torch.tensor(rng.integers(90, 160, (50, dim)), dtype=torch.float64)
    lo, hi = q / 2**bits * 2 - 1, (q + 1) / 2**bits * 2 - 1

    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 + torch.erf((v - mean) / (std * math.sqrt(2))))

    exact_bits = -torch.log2(cdf(hi) - cdf(lo)).sum(1) / dim
    centre = D.dequantize(q.long(), bits, noise=False).double()
    nll = (0.5 * ((centre - mean) / std) ** 2 + torch.log(std) + 0.5 * math.log(2 * math.pi)).sum(1)
    assert torch.allclose(D.bits_per_dim(nll, dim, bits), exact_bits, rtol=1e-4)


def test_bits_per_dim_rejects_bad_dim() -> None:
    with pytest.raises(ValueError, match="dim"):
        D.bits_per_dim(torch.zeros(2), 0, 8)


# --------------------------------------------------------------------------- ImageArrays


def arrays(
    n: int = 12, classes: int = 3, name: str = "", shape: tuple[int, int, int] = (1, 4, 4)
) -> D.ImageArrays:
    return D.ImageArrays(
        pixels(n, (n, *shape)), torch.arange(n) % classes, tuple(f"c{k}" for k in range(classes)), name
    )


def test_image_arrays_properties_and_subset() -> None:
    a = arrays()
    assert (len(a), a.num_classes, a.shape) == (12, 3, (1, 4, 4))
    s = a.subset([5, 0, 5])
    assert torch.equal(s.x, a.x[[5, 0, 5]]) and s.y.tolist() == [2, 0, 2]
    assert s.classes == a.classes and s.name == a.name
    assert len(a.subset(np.array([1, 2]))) == 2
    with pytest.raises(TypeError, match="nonzero"):
        a.subset(a.y == 1)
    with pytest.raises(TypeError, match="integer"):
        a.subset(torch.tensor([0.0, 1.0]))


def test_image_arrays_validate() -> None:
    x = pixels(0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        D.ImageArrays(x, torch.tensor([0, 1, 2, 1]), ("a", "b"))
    with pytest.raises(ValueError, match=r"labels must lie"):
        D.ImageArrays(x, torch.tensor([0, -1, 0, 1]), ("a", "b"))
    with pytest.raises(ValueError, match="uint8"):
        D.ImageArrays(x.float(), torch.zeros(4, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="int64"):
        D.ImageArrays(x, torch.zeros(3, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="at least one class"):
        D.ImageArrays(x, torch.zeros(4, dtype=torch.long), ())


# --------------------------------------------------------------------------- subsets and splits

labels_st = st.lists(st.integers(0, 5), min_size=1, max_size=300).map(lambda v: torch.tensor(v))


@fast
@given(y=labels_st, fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31 - 1))
def test_stratified_split_preserves_class_proportions(y: torch.Tensor, fraction: float, seed: int) -> None:
    a, b = D.stratified_split(y, fraction, seed)
    assert a.dtype == b.dtype == torch.int64
    assert torch.equal(torch.cat([a, b]).sort().values, torch.arange(len(y)))
    assert torch.equal(a, a.sort().values) and torch.equal(b, b.sort().values)
    for k in y.unique().tolist():
        n_k = int((y == k).sum())
        assert int((y[a] == k).sum()) == math.floor(fraction * n_k + 0.5)
    again = D.stratified_split(y, fraction, seed)
    assert torch.equal(again[0], a) and torch.equal(again[1], b)


def test_stratified_split_depends_on_seed_and_checks_fraction() -> None:
    y = torch.arange(1000) % 10
    assert not torch.equal(D.stratified_split(y, 0.9, 0)[0], D.stratified_split(y, 0.9, 1)[0])
    assert len(D.stratified_split(y, 0.9, 0)[1]) == 100
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            D.stratified_split(y, bad, 0)
    with pytest.raises(ValueError, match="1-D integer"):
        D.stratified_split(torch.zeros(4), 0.5, 0)


@fast
@given(
    counts=st.lists(st.integers(3, 40), min_size=1, max_size=8),
    per_class=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_class_balanced_indices_exact_counts_and_nesting(
    counts: list[int], per_class: int, seed: int
) -> None:
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
    idx = D.class_balanced_indices(y, per_class, seed)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.unique())
    assert torch.bincount(y[idx], minlength=len(counts)).tolist() == [per_class] * len(counts)
    assert torch.equal(D.class_balanced_indices(y, per_class, seed), idx)
    smaller = D.class_balanced_indices(y, 1, seed)
    assert set(smaller.tolist()) <= set(idx.tolist())


def test_class_balanced_indices_rejects_short_classes() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="class 1 has 2 examples, fewer than per_class=3"):
        D.class_balanced_indices(y, 3, 0)
    # A class absent between others counts as having no examples.
    with pytest.raises(ValueError, match="class 1 has 0 examples"):
        D.class_balanced_indices(torch.tensor([0, 0, 2, 2]), 1, 0)
    with pytest.raises(ValueError, match="per_class"):
        D.class_balanced_indices(y, 0, 0)


# --------------------------------------------------------------------------- loading


def test_digits_loads_without_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_digits

    monkeypatch.setenv("NFPI_DATA", str(tmp_path / "nowhere"))
    train, test = D.load("digits", "train"), D.load("digits", "test")
    full = load_digits()
    assert len(train) + len(test) == len(full.target) == 1797
    assert abs(len(test) / 1797 - 0.2) < 0.01
    for part in (train, test):
        assert part.shape == (1, 8, 8) and part.num_classes == 10 and part.name == "digits"
        assert part.x.dtype == torch.uint8 and part.y.dtype == torch.int64
        assert part.classes == tuple(str(k) for k in range(10))
    # Stratified: every class keeps its share in the test split.
    per_class = np.bincount(full.target)
    assert np.all(np.abs(np.bincount(test.y.numpy()) - 0.2 * per_class) <= 0.5)
    assert np.array_equal(np.bincount(train.y.numpy()) + np.bincount(test.y.numpy()), per_class)
    # round(v * 255 / 16) half up, on the full pixel multiset.
    table = np.array([int(v * 255 / 16 + 0.5) for v in range(17)])
    expected = np.sort(table[full.images.astype(int)].ravel())
    got = np.sort(torch.cat([train.x, test.x]).numpy().ravel())
    assert np.array_equal(got, expected) and got.max() == 255 and got.min() == 0
    again = D.load("digits", "test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    assert list(tmp_path.iterdir()) == []


def test_unknown_dataset_and_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError, match=r"unknown dataset 'svhm': neither a known dataset \(cifar10, .*svhn"
    ):
        D.load("svhm")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        D.load("digits", "val")


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[1]
    assert D.REPO_ROOT == repo
    monkeypatch.chdir(tmp_path)  # e.g. a kernel running in notebooks/
    monkeypatch.delenv("NFPI_DATA", raising=False)
    assert D.data_dir() == repo / "data"
    monkeypatch.setenv("NFPI_DATA", "../elsewhere/data")  # relative: against the repository root
    assert D.data_dir() == repo / "../elsewhere/data"
    monkeypatch.setenv("NFPI_DATA", str(tmp_path))
    assert D.data_dir() == tmp_path
    assert D.data_dir("elsewhere") == Path("elsewhere")  # an explicit path is the caller's


def test_torchvision_spellings_name_the_registry_entry() -> None:
    assert [
        D.registered(n) for n in ("CIFAR-100", "FashionMNIST", "fashion_mnist", "STL10", "my/folder")
    ] == ["cifar100", "fashionmnist", "fashionmnist", "stl10", None]


def test_missing_file_offline_explains_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NFPI_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        D.load("cifar100", "test")
    message = str(info.value)
    for part in (str(tmp_path / "cifar100_test.npz"), "NFPI_DATA", "download=True", "CIFAR100"):
        assert part in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, hwc", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_valid_npz_is_loaded_channel_first(tmp_path: Path, name: str, hwc: tuple[int, int, int]) -> None:
    raw = mnist_like()
    raw["x"] = np.random.default_rng(1).integers(0, 256, (20, *hwc), dtype=np.uint8)
    write_npz(tmp_path / f"{name}_train.npz", **raw)
    a = D.load(name, data_dir=tmp_path)
    assert a.shape == (hwc[2], hwc[0], hwc[1]) and a.name == name
    assert a.classes == tuple(raw["classes"])
    for c in range(hwc[2]):
        assert np.array_equal(a.x[:, c].numpy(), raw["x"][..., c])
    assert torch.equal(a.y, torch.from_numpy(raw["y"]))


def test_corrupt_npz_is_reported(tmp_path: Path) -> None:
    (tmp_path / "mnist_test.npz").write_bytes(b"not an archive at all")
    with pytest.raises(D.DatasetFormatError, match="not a readable npz archive"):
        D.load("mnist", "test", data_dir=tmp_path)
    good = write_npz(tmp_path / "mnist_train.npz", **mnist_like(200))
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(D.DatasetFormatError, match="download=True"):
        D.load("mnist", "train", data_dir=tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("classes"), r"lacks array\(s\) \['classes'\]"),
        (lambda a: a.update(y=a["y"] + 1), r"labels must lie in \[0, 10\)"),
        (lambda a: a.update(y=a["y"] - 1), r"labels must lie in \[0, 10\)"),
        (lambda a: a.update(y=a["y"][:-1]), r"y must be an int64 tensor of shape \(20,\)"),
        (lambda a: a.update(y=a["y"].astype(np.float32)), "integer labels"),
        (lambda a: a.update(x=a["x"][:, :27]), r"x must be uint8 of shape \(N, 28, 28, 1\)"),
        (lambda a: a.update(x=a["x"].astype(np.float32)), "x must be uint8"),
        (lambda a: a.update(classes=a["classes"][:5]), "classes must be 10 strings"),
        (lambda a: a.update(classes=np.array(list(a["classes"]), dtype=object)), "not a readable npz"),
    ],
)
def test_foreign_npz_is_reported(tmp_path: Path, change, message: str) -> None:
    raw = mnist_like()
    change(raw)
    write_npz(tmp_path / "mnist_test.npz", **raw)
    with pytest.raises(D.DatasetFormatError, match=message) as info:
        D.load("mnist", "test", data_dir=tmp_path)
    assert "mnist_test.npz" in str(info.value)


class FakeMNIST:
    """Stands in for torchvision.datasets.MNIST: same attributes, no network."""

    calls: list[dict] = []

    def __init__(self, root: str, train: bool, download: bool) -> None:
        FakeMNIST.calls.append({"root": root, "train": train, "download": download})
        n = 30 if train else 10
        self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        self.targets = torch.arange(n) % 10
        self.classes = [
            "0 - zero",
            "1 - one",
            "2 - two",
            "3 - three",
            "4 - four",
            "5 - five",
            "6 - six",
            "7 - seven",
            "8 - eight",
            "9 - nine",
        ]


def test_download_converts_to_npz_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    monkeypatch.setattr(checksums, "CHECKSUMS", {})  # the fake images have no committed sum
    FakeMNIST.calls = []
    root = tmp_path / "fresh"
    a = D.load("mnist", "test", data_dir=root, download=True)
    assert FakeMNIST.calls == [{"root": str(root / "raw"), "train": False, "download": True}]
    assert (len(a), a.shape, a.classes) == (10, (1, 28, 28), tuple(str(k) for k in range(10)))
    assert sorted(p.name for p in root.iterdir()) == ["mnist_test.npz"]
    b = D.load("mnist", "test", data_dir=root)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert len(FakeMNIST.calls) == 1

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken_save)
    with pytest.raises(OSError, match="disk full"):
        D.load("mnist", "train", data_dir=root, download=True)
    assert sorted(p.name for p in root.iterdir()) == ["mnist_test.npz"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real datasets not present at {SHARED_DATA}")
@pytest.mark.parametrize("name, shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_real_test_split(name: str, shape: tuple[int, int, int]) -> None:
    a = D.load(name, "test", data_dir=SHARED_DATA)
    assert (len(a), a.shape, a.num_classes) == (10000, shape, 10)
    assert a.x.dtype == torch.uint8 and a.y.dtype == torch.int64
    counts = torch.bincount(a.y, minlength=10)
    assert counts.min() >= 800 and counts.sum() == 10000
    if name == "cifar10":
        assert a.classes[:3] == ("airplane", "automobile", "bird") and counts.tolist() == [1000] * 10
        assert a.y[:3].tolist() == [3, 8, 8]  # canonical order
    else:
        assert a.classes == tuple(str(k) for k in range(10)) and a.y[:3].tolist() == [7, 2, 1]


# --------------------------------------------------------------------------- FlowDataset / loaders


def ramp_arrays(name: str, n: int = 16) -> D.ImageArrays:
    """Images whose columns increase left to right, so a horizontal flip is detectable."""
    ramp = torch.arange(8, dtype=torch.uint8).mul(32).expand(n, 3, 8, 8).contiguous()
    return D.ImageArrays(ramp, torch.arange(n) % 10, tuple(str(k) for k in range(10)), name)


def flipped(x: torch.Tensor, q: torch.Tensor, bits: int) -> torch.Tensor:
    """Per item: True if x (B, C, H, W) dequantises the mirror image of q (C, H, W)."""
    levels = torch.floor((x.double() + 1) / 2 * 2**bits).clamp(0, 2**bits - 1)
    plain = (levels == q.double()).flatten(1).all(1)
    mirror = (levels == q.flip(-1).double()).flatten(1).all(1)
    assert torch.all(plain ^ mirror)
    return mirror


def test_flow_dataset_items(tmp_path: Path) -> None:
    a = ramp_arrays("digits")
    ds = D.FlowDataset(a, bits=5, train=False)
    x, y = ds[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int) and y == 3
    assert torch.equal(x, D.dequantize(D.quantize(a.x[3], 5), 5, noise=False))
    assert len(ds) == 16


def test_flips_only_for_natural_images() -> None:
    bits = 8
    q = D.quantize(ramp_arrays("cifar10").x[0], bits)
    loader = D.make_loader(ramp_arrays("cifar10", 200), bits, train=True, batch_size=200)
    share = flipped(next(iter(loader))[0], q, bits).float().mean().item()
    assert 0.35 < share < 0.65
    for name in ("digits", "mnist", "custom"):
        x = next(iter(D.make_loader(ramp_arrays(name, 200), bits, train=True, batch_size=200)))[0]
        assert not flipped(x, q, bits).any()
    # Evaluation never flips by default, even for CIFAR.
    x = next(iter(D.make_loader(ramp_arrays("cifar10", 200), bits, train=False, batch_size=200)))[0]
    assert not flipped(x, q, bits).any()
    for name in ("digits", "mnist"):
        with pytest.raises(ValueError, match="horizontal flips change the class"):
            D.FlowDataset(ramp_arrays(name), bits, augment=True)
    assert D.FlowDataset(ramp_arrays("custom"), bits, augment=True).augment


def test_eval_loader_is_ordered_and_deterministic() -> None:
    a = arrays(30, name="digits", shape=(1, 8, 8))
    first = [(x, y) for x, y in D.make_loader(a, 5, train=False, batch_size=7, seed=0)]
    second = [(x, y) for x, y in D.make_loader(a, 5, train=False, batch_size=7, seed=9)]
    assert torch.equal(torch.cat([y for _, y in first]), a.y)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, second))
    assert first[0][0].shape == (7, 1, 8, 8) and first[0][1].dtype == torch.int64


def test_train_loader_is_reproducible_per_seed() -> None:
    a = arrays(40, name="cifar10", shape=(3, 4, 4))

    def epoch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(D.make_loader(a, 8, train=True, batch_size=16, seed=seed))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    (x0, y0), (x1, y1), (x2, _) = epoch(0), epoch(0), epoch(1)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(x0, x2)
    assert not torch.equal(y0, a.y)  # shuffled
    assert sorted(y0.tolist()) == sorted(a.y.tolist())


def test_workers_draw_different_reproducible_noise() -> None:
    zeros = D.ImageArrays(
        torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), ("0",), "mnist"
    )

    def run() -> list[torch.Tensor]:
        return [x for x, _ in D.make_loader(zeros, 8, train=True, batch_size=4, seed=5, num_workers=2)]

    first, second = run(), run()
    assert len(first) == 2 and not torch.equal(first[0], first[1])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --------------------------------------------------------------------------- any dataset
class FakeSTL10:
    """Stands in for torchvision.datasets.STL10: split=..., channel-first data, labels."""

    def __init__(self, root: str, split: str, download: bool) -> None:
        gen = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.data = torch.randint(0, 256, (12, 3, 96, 96), dtype=torch.uint8, generator=gen).numpy()
        self.labels = np.arange(12) % 10
        self.classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class FakeSVHN:
    """torchvision.datasets.SVHN has no ``classes``: the labels are the digits."""

    def __init__(self, root: str, split: str, download: bool) -> None:
        self.data = np.zeros((10, 3, 32, 32), dtype=np.uint8)
        self.labels = np.arange(10)


def test_torchvision_datasets_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "STL10", FakeSTL10)
    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    a = D.load("STL10", "test", data_dir=tmp_path, download=True)
    source = FakeSTL10("", "test", False)
    assert (a.name, a.shape, a.num_classes, a.classes[0]) == ("stl10", (3, 96, 96), 10, "airplane")
    assert np.array_equal(a.x.numpy(), source.data) and np.array_equal(a.y.numpy(), source.labels)
    assert (tmp_path / "stl10_test.npz").is_file()
    b = D.load("svhn", "train", data_dir=tmp_path, download=True)
    assert b.classes == tuple(str(k) for k in range(10)) and b.shape == (3, 32, 32)


def test_offline_download_names_the_file_to_provide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "KMNIST", offline)
    with pytest.raises(ConnectionError) as info:
        D.load("kmnist", "train", data_dir=tmp_path, download=True)
    message = str(info.value)
    assert "\n" not in message and "offline" in message and str(tmp_path / "kmnist_train.npz") in message
    assert not list(tmp_path.glob("*.npz"))


def test_folder_of_npz_files_any_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "mine"
    folder.mkdir()
    for split, n in (("train", 30), ("test", 9)):
        write_npz(
            folder / f"{split}.npz",
            x=rng.integers(0, 256, (n, 12, 20, 3), dtype=np.uint8),
            y=np.arange(n) % 3,
            classes=np.array(["cat", "dog", "fox"]),
        )
    a = D.load(str(folder), "train")
    assert (a.shape, a.classes, len(a), a.name) == ((3, 12, 20), ("cat", "dog", "fox"), 30, str(folder))
    # A bare folder name is also looked for under the data directory.
    monkeypatch.setenv("NFPI_DATA", str(tmp_path))
    monkeypatch.chdir(folder)
    assert torch.equal(D.load("mine", "test").x, D.load(str(folder), "test").x)
    assert D.info("mine").shape == (3, 12, 20) and D.info("mine").num_classes == 3
    write_npz(
        folder / "test.npz", x=np.zeros((4, 12, 20), dtype=np.uint8), y=np.zeros(4), classes=np.array(["a"])
    )
    with pytest.raises(D.DatasetFormatError, match=r"test.npz: x must be uint8 of shape \(N, H, W, C\)"):
        D.load("mine", "test")
    (folder / "test.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"has neither test.npz nor test/: provide .*test.npz"):
        D.load("mine", "test")


def test_image_folder_tree(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    expected = {}
    for name in ["b_circle", "a_square"]:
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 256, (8, 16), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "train" / name / f"{i}.png")
            expected[(name, i)] = img
    (tmp_path / "train" / "a_square" / "notes.txt").write_text("not an image")
    a = D.load(str(tmp_path), "train")
    assert a.classes == ("a_square", "b_circle") and a.shape == (1, 8, 16) and len(a) == 6
    assert a.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(a.x[4, 0].numpy(), expected[("b_circle", 1)])
    # One colour image makes the set RGB; a different size is an error naming the file.
    Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)).save(
        tmp_path / "train" / "a_square" / "9.png"
    )
    assert D.load(str(tmp_path), "train").shape == (3, 8, 16)
    Image.fromarray(np.zeros((9, 16), dtype=np.uint8)).save(tmp_path / "train" / "b_circle" / "odd.png")
    with pytest.raises(D.DatasetFormatError, match=r"odd.png is 9x16 pixels .* resize them"):
        D.load(str(tmp_path), "train")


@settings(max_examples=15, deadline=None)
@given(
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    c=st.sampled_from([1, 3]),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_folder_npz_shape_and_classes_come_from_the_data(tmp_path_factory, h, w, c, k, seed) -> None:
    folder = tmp_path_factory.mktemp("any")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2 * k, h, w, c), dtype=np.uint8)
    classes = np.array([f"class {i}" for i in range(k)])
    write_npz(folder / "train.npz", x=x, y=np.arange(2 * k) % k, classes=classes)
    a = D.load(str(folder), "train")
    assert (a.shape, a.num_classes, a.classes) == ((c, h, w), k, tuple(classes))
    assert np.array_equal(a.x.permute(0, 2, 3, 1).numpy(), x)
