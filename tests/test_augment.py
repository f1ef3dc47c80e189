"""Tests of nfpi.augment (NF augmentation, docs/method.md §6.4): class-wise PCA, the in-subspace mix, the
augmenter on a tiny float64 Glow, the on-the-fly dataset, resumable offline generation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nfpi import data
from nfpi.augment import (
    AugmentConfig,
    ClassPCA,
    ClassSamples,
    LatentNoise,
    NFADataset,
    NFAugmenter,
    PixelMixup,
    SameClassBank,
    generate_dataset,
    load_generated,
    mix,
    sample_beta,
)
from nfpi.flows import CouplingNet, Glow
from nfpi.prior import ClassGaussians, ClassStats

K, SHAPE = 3, (1, 8, 8)
D = 64


def random_latents(n_per_class: int, dim: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anisotropic float64 latents, one random covariance per class."""
    g = torch.Generator().manual_seed(seed)
    zs, ys = [], []
    for c in range(k):
        spread = torch.linspace(2, 0.1, dim, dtype=torch.float64)
        scale = torch.randn(dim, dim, generator=g, dtype=torch.float64) * spread
        zs.append(torch.randn(n_per_class, dim, generator=g, dtype=torch.float64) @ scale + 3 * c)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(zs), torch.cat(ys)


def tiny_flow(dtype=torch.float64, seed: int = 0) -> Glow:
    """An untrained 2-level Glow made non-linear (random coupling outputs) with ActNorm initialised."""
    torch.manual_seed(seed)
    flow = Glow(SHAPE, levels=2, steps=2, hidden=8).to(dtype)
    for m in flow.modules():
        if isinstance(m, CouplingNet):
            torch.nn.init.normal_(m.conv_out.weight, std=0.05)
    with torch.no_grad():
        flow(torch.rand(128, *SHAPE, dtype=dtype) * 1.2 - 0.6)
    return flow.eval()


def tiny_images(n: int, seed: int = 0) -> data.ImageArrays:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, *SHAPE, generator=g) * 120 + 60).to(torch.uint8)  # mid-grey: little clamping
    return data.ImageArrays(x, torch.arange(n) % K, tuple("abc"), "toy")


def off_span(pca: ClassPCA, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The part of v (B, D) orthogonal to class y's axes, computed here from ``pca.axes``
    (independently of ClassPCA.project, which the library's mix uses)."""
    basis = pca.axes.to(v.dtype)[y]  # (B, k, D)
    return v - torch.einsum("bkd,bk->bd", basis, torch.einsum("bkd,bd->bk", basis, v))


@pytest.fixture(scope="module")
def setup():
    flow = tiny_flow()
    arrays = tiny_images(60)
    x = data.dequantize(data.quantize(arrays.x, 8), 8, noise=False).double()
    with torch.no_grad():
        z = flow(x)[0]
    pca = ClassPCA.fit(z, arrays.y, K, 4)
    return flow, arrays, x, z, pca


# ---------------------------------------------------------------------------------- PCA
def test_pca_axes_orthonormal_ordered_and_match_covariance_eigenvectors():
    z, y = random_latents(200, 12, K, seed=1)
    pca = ClassPCA.fit(z, y, K, 5)
    assert pca.axes.shape == (K, 5, 12) and pca.axes.dtype == torch.float64
    for c in range(K):
        gram = pca.axes[c] @ pca.axes[c].T
        torch.testing.assert_close(gram, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
        assert (pca.variances[c][:-1] >= pca.variances[c][1:]).all()
        zc = z[y == c]
        cov = torch.cov(zc.T, correction=0)
        evals, evecs = torch.linalg.eigh(cov)
        torch.testing.assert_close(pca.variances[c], evals.flip(0)[:5], rtol=1e-10, atol=1e-10)
        # Same subspace as the top eigenvectors (signs are arbitrary): equal projectors.
        top = evecs[:, -5:]
        torch.testing.assert_close(pca.axes[c].T @ pca.axes[c], top @ top.T, atol=1e-9, rtol=0)
        torch.testing.assert_close(pca.means[c], zc.mean(0))
        torch.testing.assert_close(pca.explained[c], evals[-5:].sum() / evals.sum())


def test_pca_errors():
    z, y = random_latents(10, 12, K, seed=2)
    with pytest.raises(ValueError, match="needs at least"):
        ClassPCA.fit(z, y, K, 10)  # 10 latents per class span only 9 directions
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, D=12\]"):
        ClassPCA.fit(z, y, K, 13)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ClassPCA.fit(z, torch.where(y == 2, 3, y), K, 2)
    with pytest.raises(ValueError, match="1-D tensor of 30"):
        ClassPCA.fit(z, y[:-1], K, 2)


# ---------------------------------------------------------------------------------- mix
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(3, 24),
    k=st.integers(1, 3),
    batch=st.integers(1, 9),
    beta=st.floats(0.0, 1.0),
)
def test_mix_moves_only_inside_the_class_subspace(seed, dim, k, batch, beta):
    z_all, y_all = random_latents(k + 6, dim, K, seed)
    pca = ClassPCA.fit(z_all, y_all, K, k)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=g, dtype=torch.float64) * 5
    partner = torch.randn(batch, dim, generator=g, dtype=torch.float64) * 5
    y = torch.randint(0, K, (batch,), generator=g)
    out = mix(z, y, partner, pca, beta)
    delta = out - z
    # The change lies in span(P_y): its orthogonal complement is zero to float64 rounding.
    torch.testing.assert_close(off_span(pca, delta, y), torch.zeros_like(delta), atol=1e-12, rtol=0)
    # In-span coordinates move by exactly beta times the difference.
    basis = pca.axes[y]

    def coords(v):
        return torch.einsum("bkd,bd->bk", basis, v)

    torch.testing.assert_close(
        coords(out), coords(z) + beta * (coords(partner) - coords(z)), atol=1e-10, rtol=1e-10
    )


def test_mix_beta_zero_is_identity_and_beta_one_takes_partner_coordinates():
    z_all, y_all = random_latents(30, 10, K, seed=3)
    pca = ClassPCA.fit(z_all, y_all, K, 3)
    z, partner, y = z_all[:20], z_all[40:60], y_all[:20]
    assert torch.equal(mix(z, y, partner, pca, 0.0), z)
    out = mix(z, y, partner, pca, 1.0)
    basis = pca.axes[y]
    torch.testing.assert_close(
        torch.einsum("bkd,bd->bk", basis, out), torch.einsum("bkd,bd->bk", basis, partner), atol=1e-12, rtol=0
    )
    # The orthogonal complement still belongs to z, not to the partner.
    torch.testing.assert_close(off_span(pca, out, y), off_span(pca, z, y), atol=1e-12, rtol=0)
    beta = torch.linspace(0, 1, 20, dtype=torch.float64)
    per_sample = mix(z, y, partner, pca, beta)
    for i in (0, 7, 19):
        torch.testing.assert_close(
            per_sample[i], mix(z[i : i + 1], y[i : i + 1], partner[i : i + 1], pca, float(beta[i]))[0]
        )


def test_mix_errors():
    z_all, y_all = random_latents(8, 5, K, seed=4)
    pca = ClassPCA.fit(z_all, y_all, K, 2)
    z = z_all[:4]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        mix(z, torch.tensor([0, 1, 2, 3]), z, pca, 0.5)
    with pytest.raises(ValueError, match="PCA was fitted on D=5"):
        mix(
            torch.zeros(4, 6, dtype=torch.float64),
            y_all[:4],
            torch.zeros(4, 6, dtype=torch.float64),
            pca,
            0.5,
        )
    with pytest.raises(ValueError, match="both be"):
        mix(z, y_all[:4], z[:3], pca, 0.5)
    with pytest.raises(ValueError, match="beta must be a scalar or one weight"):
        mix(z, y_all[:4], z, pca, torch.ones(3))


@pytest.mark.parametrize("law", ["uniform", "beta"])
def test_sample_beta_range_reproducibility_and_mean(law):
    cfg = AugmentConfig(law=law, beta_max=0.6, beta_a=0.5)
    a = sample_beta(cfg, 20000, torch.Generator().manual_seed(5))
    b = sample_beta(cfg, 20000, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 0.6
    assert abs(float(a.mean()) - 0.3) < 0.01  # both laws are symmetric on [0, beta_max]
    if law == "beta":  # Beta(0.5, 0.5) puts more mass near the ends than the uniform law
        assert float(((a < 0.06) | (a > 0.54)).double().mean()) > 0.3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k"),
        ({"law": "normal"}, "law"),
        ({"beta_max": 0.0}, "beta_max"),
        ({"beta_max": 1.5}, "beta_max"),
        ({"beta_a": 0}, "beta_a"),
        ({"copies": 0}, "copies"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)


# ----------------------------------------------------------------------------- augmenter
def test_augment_keeps_shape_dtype_range_and_changes_latents_only_in_span(setup):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, AugmentConfig(k=4, beta_max=1.0), bank=(z, arrays.y))
    out = aug.augment(x[:12], arrays.y[:12], torch.Generator().manual_seed(0))
    assert out.shape == x[:12].shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= -1 and out.max() <= 1
    assert (out - x[:12]).abs().max() > 1e-3  # it does change the images
    assert out.abs().max() < 1  # no clamping here, so f(out) is exactly the mixed latent
    with torch.no_grad():
        delta = flow(out)[0] - z[:12]
    y = arrays.y[:12]
    torch.testing.assert_close(off_span(pca, delta, y), torch.zeros_like(delta), atol=1e-9, rtol=0)
    float_out = aug.augment(x[:4].float(), y[:4], torch.Generator().manual_seed(0))
    assert float_out.dtype == torch.float32


def test_augment_is_reproducible_and_clamps(setup):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, AugmentConfig(k=4), bank=(z, arrays.y))
    a = aug.augment(x[:6], arrays.y[:6], torch.Generator().manual_seed(1))
    b = aug.augment(x[:6], arrays.y[:6], torch.Generator().manual_seed(1))
    c = aug.augment(x[:6], arrays.y[:6], torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    bank = (z * 50, arrays.y)  # partners far out: decoded pixels leave [-1, 1] and must be clamped
    wild = NFAugmenter(flow, None, pca, AugmentConfig(k=4, beta_max=1.0), bank=bank)
    out = wild.augment(x[:6], arrays.y[:6], torch.Generator().manual_seed(0))
    assert out.min() >= -1 and out.max() <= 1 and (out.abs() == 1).any()


def test_non_finite_variants_fall_back_to_the_original(setup):
    flow, arrays, x, z, pca = setup
    broken = torch.full_like(z, float("inf"))
    aug = NFAugmenter(flow, None, pca, bank=(broken, arrays.y))
    with pytest.warns(RuntimeWarning, match="not finite"):
        out = aug.augment(x[:3], arrays.y[:3], torch.Generator().manual_seed(0))
    assert torch.equal(out, x[:3])


def test_partners_come_from_the_same_class(setup):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, bank=(z, arrays.y))
    y = torch.randint(0, K, (200,), generator=torch.Generator().manual_seed(3))
    partners = aug.sample_partners(y, torch.Generator().manual_seed(4))
    # Each partner is a bank row of its class.
    match = (partners[:, None, :] == z[None]).all(-1)  # (200, N)
    assert match.any(1).all()
    rows = match.float().argmax(1)
    assert torch.equal(arrays.y[rows], y)
    assert len(set(rows.tolist())) > 30  # not always the same partner


def test_partners_from_the_prior_without_a_bank(setup):
    flow, arrays, x, z, pca = setup
    prior = ClassGaussians(torch.randn(K, D) * 3, torch.rand(K, D) + 0.5)
    aug = NFAugmenter(flow, prior, pca, AugmentConfig(k=4, temperature=0.5))
    y = torch.full((4000,), 1)
    partners = aug.sample_partners(y, torch.Generator().manual_seed(0)).float()
    torch.testing.assert_close(partners.mean(0), prior.means[1], atol=0.1, rtol=0)
    torch.testing.assert_close(partners.var(0), 0.25 * prior.variances[1], atol=0.05, rtol=0.1)
    out = aug.augment(x[:5], arrays.y[:5], torch.Generator().manual_seed(0))
    assert out.shape == x[:5].shape and out.min() >= -1 and out.max() <= 1


def test_augmenter_errors(setup):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, bank=(z, arrays.y))
    with pytest.raises(ValueError, match=r"must be \(B, 1, 8, 8\) to match the flow"):
        aug.augment(torch.zeros(2, 1, 16, 16, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        aug.augment(x[:2], torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="floats"):
        aug.augment(arrays.x[:2], arrays.y[:2])
    with pytest.raises(ValueError, match="bank=.* or the prior"):
        NFAugmenter(flow, None, pca)
    with pytest.raises(ValueError, match=r"no bank latents of class\(es\) \[2\]"):
        NFAugmenter(flow, None, pca, bank=(z[arrays.y != 2], arrays.y[arrays.y != 2]))
    other = ClassPCA.fit(torch.randn(30, 10, dtype=torch.float64), torch.arange(30) % K, K, 2)
    with pytest.raises(ValueError, match="fit ClassPCA on this flow"):
        NFAugmenter(flow, None, other, bank=(z, arrays.y))
    fresh = Glow(SHAPE, levels=2, steps=1, hidden=4).double()
    with pytest.raises(ValueError, match="uninitialised ActNorm"):
        NFAugmenter(fresh, None, pca, bank=(z, arrays.y))
    with pytest.raises(ValueError, match="flow expects"):
        NFAugmenter.from_arrays(
            tiny_flow(torch.float32),
            data.ImageArrays(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.arange(6) % K, tuple("abc")),
            bits=8,
        )


def test_from_arrays_fits_pca_and_bank_on_encoded_images():
    flow = tiny_flow(torch.float32)
    arrays = tiny_images(45, seed=1)
    aug = NFAugmenter.from_arrays(flow, arrays, bits=5, cfg=AugmentConfig(k=3))
    assert aug.pca.axes.shape == (K, 3, D)
    out = aug.augment(
        data.dequantize(data.quantize(arrays.x[:4], 5), 5, noise=False),
        arrays.y[:4],
        torch.Generator().manual_seed(0),
    )
    assert out.shape == (4, *SHAPE) and out.dtype == torch.float32


# ------------------------------------------------------------------------------ datasets
class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_nfa_dataset_probability(setup):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, bank=(z, arrays.y))
    base = _Pairs(x, arrays.y)
    never = NFADataset(base, aug, p=0.0)
    always = NFADataset(base, aug, p=1.0, seed=1)
    half = NFADataset(base, aug, p=0.5, seed=2)
    assert len(always) == len(base)
    for i in range(10):
        xi, yi = never[i]
        assert torch.equal(xi, x[i]) and yi == int(arrays.y[i])
        xa, ya = always[i]
        assert xa.shape == x[i].shape and ya == yi and not torch.equal(xa, x[i])
    changed = sum(not torch.equal(half[i][0], x[i]) for i in range(60))
    assert 15 < changed < 45
    with pytest.raises(ValueError, match="p"):
        NFADataset(base, aug, p=1.5)


def _generate(aug, arrays, path, **kw):
    return generate_dataset(
        aug, arrays, copies=2, out_path=path, bits=5, batch_size=16, progress=False, seed=7, **kw
    )


def test_generate_dataset_format(setup, tmp_path):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, bank=(z, arrays.y))
    path = _generate(aug, arrays, tmp_path / "nfa.npz")
    assert not (tmp_path / "nfa.npz.parts").exists()
    with np.load(path) as npz:
        assert npz["x"].shape == (120, 8, 8, 1) and npz["x"].dtype == np.uint8
        assert (npz["x"] % 8 == 0).all()  # 5-bit levels stored as 8-bit pixels
        np.testing.assert_array_equal(npz["source"], np.tile(np.arange(60), 2))
        np.testing.assert_array_equal(npz["y"], np.tile(arrays.y.numpy(), 2))
        assert list(npz["classes"]) == list(arrays.classes)
    loaded = load_generated(path)
    assert loaded.x.shape == (120, *SHAPE) and loaded.classes == arrays.classes
    # Variants differ from their (quantised) originals but stay close to them.
    original = data.quantize(arrays.x, 5).repeat(2, 1, 1, 1).int()
    diff = (data.quantize(loaded.x, 5).int() - original).abs().float()
    assert diff.mean() > 0.05 and diff.mean() < 8


def test_generate_dataset_resumes_after_interruption(setup, tmp_path, monkeypatch):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, bank=(z, arrays.y))
    reference = _generate(aug, arrays, tmp_path / "full.npz")

    calls = {"n": 0}
    original = aug.augment

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(aug, "augment", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _generate(aug, arrays, tmp_path / "resumed.npz")
    parts = tmp_path / "resumed.npz.parts"
    assert sorted(p.name for p in parts.glob("chunk_*")) == ["chunk_000000.npy"]
    assert not (tmp_path / "resumed.npz").exists()
    assert not list(tmp_path.glob(".*.tmp")) and not list(parts.glob(".*.tmp"))

    calls["n"] = -100  # no more interruptions
    _generate(aug, arrays, tmp_path / "resumed.npz")
    assert calls["n"] == -100 + 7  # 8 chunks (2 copies x 4 batches), the first one reused
    with np.load(reference) as a, np.load(tmp_path / "resumed.npz") as b:
        for key in ("x", "y", "classes", "source", "fingerprint"):
            np.testing.assert_array_equal(a[key], b[key])
    # A finished file with the same inputs is returned without work.
    _generate(aug, arrays, tmp_path / "resumed.npz")
    assert calls["n"] == -100 + 7


def test_generate_dataset_refuses_stale_outputs_and_mismatched_images(setup, tmp_path):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, bank=(z, arrays.y))
    path = _generate(aug, arrays, tmp_path / "nfa.npz")
    with pytest.raises(FileExistsError, match="other inputs"):
        generate_dataset(aug, arrays, copies=2, out_path=path, bits=5, batch_size=16, progress=False, seed=8)
    small = data.ImageArrays(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.arange(3), tuple("abc"))
    with pytest.raises(ValueError, match="flow expects"):
        generate_dataset(aug, small, copies=1, out_path=tmp_path / "bad.npz", bits=5, progress=False)
    with pytest.raises(ValueError, match="copies"):
        generate_dataset(aug, arrays, copies=0, out_path=tmp_path / "bad.npz", bits=5, progress=False)


# ------------------------------------------------------------------------- alternatives
def test_augment_is_the_decoded_move(setup):
    flow, arrays, x, z, pca = setup
    aug = NFAugmenter(flow, None, pca, bank=(z, arrays.y))
    out = aug.augment(x[:9], arrays.y[:9], torch.Generator().manual_seed(5))
    with torch.no_grad():
        moved = aug.move(flow(x[:9])[0], arrays.y[:9], torch.Generator().manual_seed(5))
        expected = flow.inverse(moved).clamp(-1, 1)
    torch.testing.assert_close(out, expected)


def test_matched_latent_noise_moves_latents_as_far_as_nfa(setup):
    flow, arrays, x, z, pca = setup
    nfa = NFAugmenter(flow, None, pca, AugmentConfig(k=4), bank=(z, arrays.y))
    noise = LatentNoise.matched(nfa, arrays, 8, seed=3)
    # sigma^2 is NFA's mean squared displacement per dimension, for the same draws ...
    step = nfa.move(z, arrays.y, torch.Generator().manual_seed(3)) - z
    assert noise.sigma == pytest.approx(float(step.pow(2).mean().sqrt()), rel=1e-6)
    assert noise.sigma > 0
    # ... and the noise itself has that RMS displacement in latent space, in every direction.
    with torch.no_grad():
        out = noise.augment(x, arrays.y, torch.Generator().manual_seed(0))
        unclamped = out.abs().lt(1).flatten(1).all(1)
        shift = flow(out[unclamped])[0] - z[unclamped]
    assert unclamped.sum() > 20
    assert float(shift.pow(2).mean().sqrt()) == pytest.approx(noise.sigma, rel=0.1)
    assert float(off_span(pca, shift, arrays.y[unclamped]).pow(2).mean()) > 0.5 * noise.sigma**2


def test_latent_noise_errors(setup):
    flow = setup[0]
    with pytest.raises(ValueError, match="sigma"):
        LatentNoise(flow, 0.0)


def test_pixel_mixup_lies_between_the_image_and_a_same_class_image(setup):
    _, arrays, x, _, _ = setup
    bank = x.float()
    mixup = PixelMixup(arrays, 8, AugmentConfig(beta_max=0.5))
    out = mixup.augment(bank, arrays.y, torch.Generator().manual_seed(1))
    for i in range(len(bank)):
        d = out[i] - bank[i]
        same = (arrays.y == arrays.y[i]).nonzero().flatten()
        # out = x + beta (p - x): some same-class p makes d parallel to p - x with beta in [0, 0.5].
        fits = []
        for j in same:
            v = bank[j] - bank[i]
            if v.abs().sum() == 0:
                continue
            beta = float((d * v).sum() / (v * v).sum())
            fits.append(0 <= beta <= 0.5 + 1e-6 and torch.allclose(d, beta * v, atol=1e-5))
        assert any(fits) or d.abs().max() < 1e-6
    again = mixup.augment(bank, arrays.y, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_pixel_mixup_errors():
    arrays = data.ImageArrays(
        torch.zeros(4, *SHAPE, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), tuple("abc")
    )
    with pytest.raises(ValueError, match=r"no training images of class\(es\) \[2\]"):
        PixelMixup(arrays, 8)


def test_class_samples_decode_the_class_gaussians(setup):
    flow, arrays, x, z, _ = setup
    prior = ClassGaussians.from_stats(ClassStats.from_latents(z, arrays.y, K))
    sampler = ClassSamples(flow, prior, temperature=0.5)
    y = arrays.y[:12]
    out = sampler.augment(x[:12], y, torch.Generator().manual_seed(2))
    eps = torch.randn(12, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = prior.means.double()[y] + 0.5 * prior.variances.double()[y].sqrt() * eps
    inside = out.abs().lt(1).flatten(1).all(1)
    assert inside.sum() > 6
    with torch.no_grad():
        torch.testing.assert_close(flow(out[inside])[0], expected[inside], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        ClassSamples(flow, prior, 0.0)


@given(
    counts=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    batch=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_same_class_bank_draws_rows_of_the_asked_class(counts, batch, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    y = y[torch.randperm(len(y), generator=g)]
    rows = torch.stack([y.double(), torch.arange(len(y), dtype=torch.float64)], 1)  # (N, 2): class, row id
    bank = SameClassBank(rows, y, len(counts))
    asked = torch.randint(0, len(counts), (batch,), generator=g)
    drawn = bank.draw(asked, torch.Generator().manual_seed(seed))
    assert torch.equal(drawn[:, 0].long(), asked)  # every partner is of its class ...
    assert torch.equal(rows[drawn[:, 1].long()], drawn)  # ... and a row of the bank
    again = bank.draw(asked, torch.Generator().manual_seed(seed))
    assert torch.equal(again, drawn)


def test_same_class_bank_is_uniform_within_a_class_and_needs_every_class():
    y = torch.tensor([0, 1, 1, 1, 0])
    bank = SameClassBank(torch.arange(5.0)[:, None], y, 2)
    drawn = bank.draw(torch.ones(30_000, dtype=torch.long), torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn[:, 0].long(), minlength=5).double() / 30_000
    torch.testing.assert_close(
        freq, torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0], dtype=torch.float64), atol=0.015, rtol=0
    )
    with pytest.raises(ValueError, match=r"no rows of class\(es\) \[2\]"):
        SameClassBank(torch.zeros(5, 1), y, 3)
