"""Tests of nfpi.flows: the Glow layers and model of docs/method.md §4.5.

One generic battery (inverse round trip, log-determinant against the autograd
Jacobian of paper Eq. 1, output shapes and batch independence, gradients to every
parameter, state-dict round trip) runs in float64 over every layer type and over
whole Glow models, after moving all parameters away from their identity init so
that the checks are not satisfied trivially. The reversible (memory-lean) mode is
checked against standard backprop over the same cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from nfpi.flows import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    FlowSequence,
    FlowStep,
    Glow,
    InvConv1x1LU,
    InvConv1x1MatExp,
    MatExpCoupling,
    Squeeze,
    expm_series,
    saved_activation_bytes,
)
from nfpi.flows.couplings import _phi
from nfpi.flows.glow import _ReversibleSteps

DTYPE = torch.float64


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    in_shape: tuple[int, ...]  # (C, H, W) of one sample
    out_shape: tuple[int, ...]  # shape of one sample's output
    volume_preserving: bool = False


CASES = {
    "squeeze": Case(Squeeze, (3, 4, 6), (12, 2, 3), volume_preserving=True),
    "actnorm": Case(lambda: ActNorm(4), (4, 3, 3), (4, 3, 3)),
    "conv-lu": Case(lambda: InvConv1x1LU(5), (5, 3, 3), (5, 3, 3)),
    "conv-matexp": Case(lambda: InvConv1x1MatExp(5), (5, 3, 3), (5, 3, 3)),
    "coupling-affine": Case(lambda: AffineCoupling(4, hidden=8), (4, 4, 4), (4, 4, 4)),
    "coupling-affine-odd": Case(lambda: AffineCoupling(5, hidden=8, blocks=2), (5, 3, 3), (5, 3, 3)),
    "coupling-additive": Case(
        lambda: AdditiveCoupling(4, hidden=8), (4, 4, 4), (4, 4, 4), volume_preserving=True
    ),
    "coupling-matexp": Case(lambda: MatExpCoupling(4, hidden=8), (4, 3, 3), (4, 3, 3)),
    "coupling-matexp-odd": Case(lambda: MatExpCoupling(5, hidden=8, blocks=2), (5, 3, 3), (5, 3, 3)),
    "coupling-matexp-low-rank": Case(
        lambda: MatExpCoupling(9, hidden=8, low_rank_above=3, rank=2), (9, 2, 3), (9, 2, 3)
    ),
    "step-lu-affine": Case(lambda: FlowStep(4, 8, "lu", "affine"), (4, 3, 3), (4, 3, 3)),
    "step-matexp-matexp": Case(lambda: FlowStep(6, 8, "matexp", "matexp"), (6, 3, 3), (6, 3, 3)),
    "step-matexp-additive": Case(
        lambda: FlowStep(6, 8, "matexp", "additive", blocks=0), (6, 3, 3), (6, 3, 3)
    ),
    "glow-digits-1x8x8": Case(lambda: Glow((1, 8, 8), levels=3, steps=2, hidden=8), (1, 8, 8), (64,)),
    "glow-3x8x8-matexp": Case(
        lambda: Glow((3, 8, 8), levels=2, steps=2, hidden=8, conv="matexp"), (3, 8, 8), (192,)
    ),
    "glow-3x8x8-additive-3-levels": Case(
        lambda: Glow((3, 8, 8), levels=3, steps=1, hidden=8, coupling="additive", blocks=2),
        (3, 8, 8),
        (192,),
    ),
    "glow-3x16x16-blocks-2": Case(
        lambda: Glow((3, 16, 16), levels=3, steps=1, hidden=8, blocks=2), (3, 16, 16), (768,)
    ),
    "glow-mef-blocks-8-4-2": Case(
        lambda: Glow(
            (3, 8, 8),
            levels=3,
            steps=2,
            hidden=8,
            conv="matexp",
            coupling="matexp",
            blocks=[8, 4, 2],
        ),
        (3, 8, 8),
        (192,),
    ),
    "glow-mef-low-rank": Case(  # level channels 64: c2 = 32 > 24, rank-3 W
        lambda: Glow((16, 4, 4), levels=1, steps=2, hidden=8, coupling="matexp"), (16, 4, 4), (256,)
    ),
    "glow-mef-rank-2-above-4": Case(  # level channels 12, 24: c2 = 6, 12 > 4, rank-2 W
        lambda: Glow(
            (3, 8, 8), levels=2, steps=1, hidden=8, coupling="matexp", matexp_rank=2, matexp_low_rank_above=4
        ),
        (3, 8, 8),
        (192,),
    ),
    "glow-1-level": Case(
        lambda: Glow((2, 4, 4), levels=1, steps=2, hidden=8, conv="matexp"), (2, 4, 4), (32,)
    ),
}

case_params = pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())


pytestmark = pytest.mark.usefixtures("single_thread")


def sample(shape: tuple[int, ...], batch: int, seed: int) -> Tensor:
    """Non-standardised float64 data, so ActNorm's init has something to undo."""
    gen = torch.Generator().manual_seed(seed)
    return 0.3 + 1.5 * torch.randn(batch, *shape, generator=gen, dtype=DTYPE)


def prepare(case: Case, seed: int = 0) -> nn.Module:
    """Float64 model, ActNorm-initialised on data, every parameter perturbed off its init."""
    torch.manual_seed(seed)
    model = case.build().to(DTYPE)
    with torch.no_grad():
        model(sample(case.in_shape, 16, seed=100))
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
    return model


@case_params
def test_inverse_round_trip(case: Case) -> None:
    model = prepare(case)
    x = sample(case.in_shape, 3, seed=1)
    with torch.no_grad():
        y, _ = model(x)
        x_back = model.inverse(y)
    assert (x_back - x).abs().max().item() < 1e-10


@case_params
def test_logdet_matches_autograd_jacobian(case: Case) -> None:
    model = prepare(case)
    x = sample(case.in_shape, 1, seed=2)

    def flat_forward(v: Tensor) -> Tensor:
        return model(v.view(1, *case.in_shape))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(flat_forward, x.reshape(-1), vectorize=True)
    sign, log_abs_det = torch.linalg.slogdet(jac)
    with torch.no_grad():
        _, logdet = model(x)
    assert sign.item() != 0
    torch.testing.assert_close(logdet[0], log_abs_det, rtol=1e-9, atol=1e-9)
    if case.volume_preserving:
        assert logdet.abs().max().item() == 0.0
    else:
        # The perturbation must have made the check non-trivial.
        assert abs(logdet.item()) > 1e-3


@case_params
def test_shapes_dtype_and_batch_independence(case: Case) -> None:
    model = prepare(case)
    x = sample(case.in_shape, 3, seed=3)
    with torch.no_grad():
        y, logdet = model(x)
        singles = [model(x[i : i + 1]) for i in range(3)]
    assert y.shape == (3, *case.out_shape)
    assert logdet.shape == (3,)
    assert y.dtype == logdet.dtype == DTYPE
    for i, (y_i, logdet_i) in enumerate(singles):
        torch.testing.assert_close(y_i[0], y[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logdet_i[0], logdet[i], rtol=1e-12, atol=1e-12)


@case_params
def test_gradients_reach_every_parameter(case: Case) -> None:
    model = prepare(case)
    x = sample(case.in_shape, 2, seed=4).requires_grad_(True)
    y, logdet = model(x)
    (0.5 * y.pow(2).sum() - logdet.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"all-zero gradient for {name}"


@case_params
def test_state_dict_round_trip(case: Case, tmp_path) -> None:
    model = prepare(case, seed=0)
    path = tmp_path / "flow.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)  # a different random init, overwritten by the load
    restored = case.build().to(DTYPE)
    restored.load_state_dict(torch.load(path, weights_only=True))
    x = sample(case.in_shape, 3, seed=5)
    with torch.no_grad():
        y, logdet = model(x)
        y_restored, logdet_restored = restored(x)
        # Different data on the first forward must not re-run ActNorm's init.
        restored(10.0 * sample(case.in_shape, 4, seed=6) - 7.0)
    assert torch.equal(y, y_restored) and torch.equal(logdet, logdet_restored)
    restored_state = restored.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored_state[key]), key
    with torch.no_grad():
        assert torch.equal(model.inverse(y), restored.inverse(y))


def test_actnorm_init_standardises_and_then_freezes() -> None:
    scale = torch.tensor([1.0, 5.0, 0.1], dtype=DTYPE).view(1, 3, 1, 1)
    shift = torch.tensor([0.0, -3.0, 20.0], dtype=DTYPE).view(1, 3, 1, 1)
    x = shift + scale * sample((3, 5, 5), 16, seed=7)
    layer = ActNorm(3).to(DTYPE)
    y, _ = layer(x)
    zeros = torch.zeros(3, dtype=DTYPE)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), zeros, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=DTYPE), atol=1e-5, rtol=0
    )
    assert bool(layer.initialized)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(3.0 * x + 1.0)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_loading_an_uninitialised_state_reenables_actnorm_init() -> None:
    layer = ActNorm(2).to(DTYPE)
    layer(sample((2, 3, 3), 8, seed=8))
    layer.load_state_dict(ActNorm(2).to(DTYPE).state_dict())
    x = 4.0 + 2.0 * sample((2, 3, 3), 8, seed=9)
    y, _ = layer(x)
    assert bool(layer.initialized)
    zeros = torch.zeros(2, dtype=DTYPE)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), zeros, atol=1e-12, rtol=0)


def test_couplings_and_matexp_conv_start_as_identity_or_rotation() -> None:
    x = sample((4, 3, 3), 2, seed=10)
    couplings = (
        AffineCoupling(4, hidden=8),
        AdditiveCoupling(4, hidden=8),
        MatExpCoupling(4, hidden=8),
        MatExpCoupling(4, hidden=8, low_rank_above=1, rank=2),
    )
    for layer in couplings:
        y, logdet = layer.to(DTYPE)(x)
        assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(2, dtype=DTYPE))
    conv = InvConv1x1MatExp(4).to(DTYPE)
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=DTYPE), rtol=0, atol=1e-12)
    assert not torch.allclose(w, torch.eye(4, dtype=DTYPE))


@pytest.mark.parametrize(
    "in_shape, levels, latent_parts",
    [
        ((1, 8, 8), 3, [(2, 4, 4), (4, 2, 2), (16, 1, 1)]),
        ((1, 28, 28), 2, [(2, 14, 14), (8, 7, 7)]),
        ((3, 32, 32), 3, [(6, 16, 16), (12, 8, 8), (48, 4, 4)]),
    ],
    ids=["digits", "mnist", "cifar"],
)
def test_dataset_sized_models_round_trip(in_shape, levels, latent_parts) -> None:
    torch.manual_seed(0)
    model = Glow(in_shape, levels=levels, steps=1, hidden=8).to(DTYPE)
    x = sample(in_shape, 2, seed=11)
    with torch.no_grad():
        z, logdet = model(x)
        x_back = model.inverse(z)
    c, h, w = in_shape
    assert model.latent_dim == c * h * w and model.in_shape == in_shape
    assert z.shape == (2, c * h * w) and logdet.shape == (2,)
    assert model.part_shapes == latent_parts
    assert (x_back - x).abs().max().item() < 1e-10
    rebuilt = Glow(**model.config).to(DTYPE)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], z)


def test_float32_model_round_trip() -> None:
    torch.manual_seed(0)
    model = Glow((3, 8, 8), levels=2, steps=2, hidden=16)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        z, logdet = model(x)
        x_back = model.inverse(z)
    assert z.dtype == logdet.dtype == torch.float32
    assert (x_back - x).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_shape=(1, 8, 8), conv="qr"), "Unknown conv"),
        (dict(in_shape=(1, 8, 8), coupling="spline"), "Unknown coupling"),
        (dict(in_shape=(1, 28, 28), levels=3), "divisible by 2\\*\\*levels"),
        (dict(in_shape=(8, 8)), "in_shape"),
        (dict(in_shape=(1, 8, 8), levels=0), "levels"),
        (dict(in_shape=(1, 8, 8), hidden=0), "hidden"),
        (dict(in_shape=(1, 8, 8), blocks=[8, 4]), "one per level"),
        (dict(in_shape=(1, 8, 8), blocks=[8, 4, -1]), "one per level"),
        (dict(in_shape=(1, 8, 8), blocks=2.0), "blocks"),
        (dict(in_shape=(1, 8, 8), memory="checkpoint"), "Unknown memory mode"),
    ],
)
def test_glow_rejects_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Glow(**kwargs)


def test_layers_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown conv"):
        FlowStep(4, 8, conv="qr")
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match="scale_bound"):
        AffineCoupling(4, scale_bound=0.0)


def test_glow_rejects_bad_inputs() -> None:
    model = Glow((1, 8, 8), levels=3, steps=1, hidden=4)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expects input of shape"):
        model(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"latents of shape \(B, 64\)"):
        model.inverse(torch.randn(2, 63))
    with pytest.raises(ValueError, match=r"latents of shape"):
        model.inverse(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize(
    "layer, x",
    [
        (ActNorm(4), torch.randn(2, 3, 5, 5)),
        (InvConv1x1LU(4), torch.randn(2, 4)),
        (InvConv1x1MatExp(4), torch.randn(2, 5, 3, 3)),
        (AffineCoupling(4, hidden=4), torch.randn(2, 6, 3, 3)),
        (Squeeze(), torch.randn(2, 3, 5, 4)),
    ],
    ids=["actnorm", "lu", "matexp", "coupling", "squeeze-odd"],
)
def test_layers_reject_bad_inputs(layer: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match="expects input|even height"):
        layer(x)
    if not isinstance(layer, Squeeze):
        with pytest.raises(ValueError, match="expects"):
            layer.inverse(x)


# ------------------------------------------------------------------ matrix-exponential coupling
def test_low_rank_matrix_exponential_identity() -> None:
    """expm(A B) = I + A phi(B A) B, also for -A B and for large norms (phi via matrix_exp)."""
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(4, 30, 3, generator=gen, dtype=DTYPE)
    b = torch.randn(4, 3, 30, generator=gen, dtype=DTYPE)
    eye = torch.eye(30, dtype=DTYPE)
    for scale in (0.1, 1.0):  # |B A| ~ 1 and ~ 30
        for sign in (1.0, -1.0):
            sa, sb = scale * a, scale * b
            expected = torch.linalg.matrix_exp(sign * sa @ sb)
            low_rank = eye + sign * sa @ _phi(sign * sb @ sa) @ sb
            torch.testing.assert_close(low_rank, expected, rtol=1e-10, atol=1e-10)


def test_matexp_coupling_threshold_and_bounded_matrices() -> None:
    assert MatExpCoupling(48, hidden=4).rank is None  # c2 = 24: full, as released
    assert MatExpCoupling(50, hidden=4).rank == 3  # c2 = 25 > 24: rank 3
    assert MatExpCoupling(50, hidden=4, low_rank_above=30).rank is None
    with pytest.raises(ValueError, match="rank"):
        MatExpCoupling(50, hidden=4, rank=0)
    for layer in (MatExpCoupling(48, hidden=4), MatExpCoupling(50, hidden=4)):
        layer = layer.to(DTYPE)
        with torch.no_grad():  # saturate every raw entry: |W_ij| = a, ||W||_inf <= 1
            layer.net.conv_out.bias.fill_(1e6)
        x = sample((layer.channels, 2, 2), 2, seed=13)
        with torch.no_grad():
            y, logdet = layer(x)
            x_back = layer.inverse(y)
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
        # |trace W| <= ||W||_inf <= 1 per pixel (a = 1/c2 rounded to float32: 1e-6 slack).
        assert logdet.abs().max() <= 4 * (1.0 + 1e-6)
        assert (x_back - x).abs().max().item() < 1e-10


def test_full_matexp_coupling_has_finite_gradients_at_the_identity_init() -> None:
    layer = MatExpCoupling(6, hidden=8).to(DTYPE)
    y, logdet = layer(sample((6, 3, 3), 4, seed=14))
    (0.5 * y.pow(2).sum() - logdet.sum()).backward()
    grad = layer.net.conv_out.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_low_rank_factors_both_learn_from_the_identity_init() -> None:
    """With A = B = 0 at init both factors' gradients would vanish for ever."""
    layer = MatExpCoupling(8, hidden=8, low_rank_above=2, rank=2).to(DTYPE)
    x = sample((8, 3, 3), 4, seed=14)
    y, logdet = layer(x)
    (0.5 * y.pow(2).sum() - logdet.sum()).backward()
    grad = layer.net.conv_out.weight.grad.abs().flatten(1).sum(1)  # per output channel
    c2, k = 4, 2
    assert (grad[c2 + k * c2 :] > 0).all(), "B gets no gradient at init"
    assert (grad[:c2] > 0).all(), "shift gets no gradient at init"


def test_glow_passes_low_rank_settings_to_matexp_couplings() -> None:
    model = Glow(
        (3, 8, 8), levels=2, steps=1, hidden=4, coupling="matexp", matexp_rank=2, matexp_low_rank_above=6
    )
    ranks = [level.layers[1].layers[2].rank for level in model.level_flows]
    assert ranks == [None, 2]  # c2 = 6 (not > 6), then 12


def test_glow_builds_per_level_block_counts() -> None:
    model = Glow((3, 8, 8), levels=3, steps=2, hidden=4, blocks=[3, 1, 0])
    counts = [[len(step.layers[2].net.blocks) for step in level.layers[1:]] for level in model.level_flows]
    assert counts == [[3, 3], [1, 1], [0, 0]]
    assert Glow(**model.config).config["blocks"] == [3, 1, 0]
    uniform = Glow((3, 8, 8), levels=3, steps=1, hidden=4, blocks=2)
    assert [len(level.layers[1].layers[2].net.blocks) for level in uniform.level_flows] == [2, 2, 2]


# ------------------------------------------------------------------ reversible (memory-lean) mode
def reversible_twin(model: nn.Module) -> nn.Module:
    """The same map run through _ReversibleSteps: Glow rebuilt with memory="reversible",
    any other layer wrapped as a one-layer sequence."""
    if isinstance(model, Glow):
        twin = Glow(**{**model.config, "memory": "reversible"}).to(DTYPE)
        twin.load_state_dict(model.state_dict())
        return twin

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = FlowSequence([model])

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return _ReversibleSteps.apply(x, self.flow, *self.flow.parameters())

    return Wrapped()


def graph_nodes(*outputs: Tensor) -> set[str]:
    """Names of every autograd node behind ``outputs``."""
    names, seen = set(), set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return names


def loss_gradients(model: nn.Module, x: Tensor, seed: int, reversible: bool) -> list[Tensor]:
    """Gradients of a random linear functional of (y, logdet) w.r.t. x and every parameter."""
    x = x.clone().requires_grad_(True)
    y, logdet = model(x)
    assert reversible == ("_ReversibleStepsBackward" in graph_nodes(y, logdet))
    gen = torch.Generator().manual_seed(seed)
    loss = (torch.randn(y.shape, generator=gen, dtype=y.dtype) * y).sum()
    loss = loss + (torch.randn(logdet.shape, generator=gen, dtype=y.dtype) * logdet).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, [x, *params]))


@case_params
def test_reversible_gradients_equal_standard_backprop(case: Case) -> None:
    model = prepare(case)
    twin = reversible_twin(model)
    x = sample(case.in_shape, 3, seed=15)
    expected = loss_gradients(model, x, seed=16, reversible=False)
    got = loss_gradients(twin, x, seed=16, reversible=True)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert e.abs().max() > 0
        assert ((g - e).norm() / e.norm()).item() <= 1e-8


def flat_grad(loss: Tensor, model: nn.Module) -> Tensor:
    """All parameter gradients of ``loss`` as one flat vector."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def test_reversible_mode_keeps_activations_independent_of_depth() -> None:
    x = sample((3, 8, 8), 4, seed=17)
    saved = {}
    for memory in ("standard", "reversible"):
        for steps in (2, 6):
            torch.manual_seed(0)
            model = Glow((3, 8, 8), levels=2, steps=steps, hidden=16, memory=memory).to(DTYPE)
            with torch.no_grad():
                model(x)  # ActNorm init
            saved[memory, steps] = saved_activation_bytes(model, x)
    assert saved["reversible", 6] == saved["reversible", 2]
    assert saved["standard", 6] > 2.5 * saved["standard", 2]
    assert saved["standard", 6] > 20 * saved["reversible", 6]


def test_reversible_model_runs_actnorm_init_in_a_standard_forward() -> None:
    x = sample((3, 8, 8), 8, seed=18)
    models = {}
    for memory in ("standard", "reversible"):
        torch.manual_seed(0)
        models[memory] = Glow((3, 8, 8), levels=2, steps=2, hidden=8, memory=memory).to(DTYPE)
        z, logdet = models[memory](x)  # with gradients on: the init must still happen
        (z.sum() + logdet.sum()).backward()
    standard, reversible = models["standard"], models["reversible"]
    assert all(bool(m.initialized) for m in reversible.modules() if isinstance(m, ActNorm))
    for (name, p), q in zip(standard.named_parameters(), reversible.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_reversible_mode_under_bf16_autocast() -> None:
    """Under autocast reversible gradients are as accurate as standard ones (CPU bf16).

    Guarantee: the inverse and the recomputation run under the forward's autocast state
    (a coupling can only be undone with the same-precision net output), so reversible mode
    adds bf16 reconstruction error of the same order as bf16 itself: over all parameters,
    the relative distance to float32 gradients measured 2.4-3.1% in standard and 2.7-3.5%
    in reversible mode (ratio <= 1.32; asserted <= 2). The matrix-exponential coupling
    runs its matrix part in float32 (bf16 gave NaN gradients through matrix_exp).
    """
    for coupling in ("affine", "matexp"):
        torch.manual_seed(0)
        model = Glow((3, 8, 8), levels=2, steps=2, hidden=16, coupling=coupling)
        x = sample((3, 8, 8), 4, seed=19).float()
        with torch.no_grad():
            model(x)
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        twin = Glow(**{**model.config, "memory": "reversible"})
        twin.load_state_dict(model.state_dict())
        grads = []
        for m, amp in ((model, False), (model, True), (twin, True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                z, logdet = m(x)
                loss = (0.5 * z.float().pow(2).sum() - logdet.float().sum()) / z.numel()
            grads.append(flat_grad(loss, m))
        exact, standard, reversible = grads
        assert torch.isfinite(reversible).all()
        standard_error = ((standard - exact).norm() / exact.norm()).item()
        reversible_error = ((reversible - exact).norm() / exact.norm()).item()
        assert 0 < standard_error < 0.1
        assert reversible_error <= 2 * standard_error, (coupling, standard_error, reversible_error)


def float32_paper_depth_model(coupling: str, hidden: int) -> tuple[Glow, Tensor]:
    """The paper's depth (3 levels x 8 steps, 3x32x32), couplings moved off the identity."""
    torch.manual_seed(0)
    model = Glow((3, 32, 32), 3, 8, hidden, conv="matexp", coupling=coupling)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        model(x)
        for name, p in model.named_parameters():
            if "conv_out" in name:
                p.normal_(0.0, 0.01)
    return model, x


@pytest.mark.parametrize(
    "coupling, hidden",
    [
        ("matexp", 32),
        ("affine", 32),
        pytest.param("matexp", 128, marks=pytest.mark.slow),
    ],
)
def test_float32_reconstruction_drift_at_paper_depth(coupling: str, hidden: int) -> None:
    """Documents the float32 drift of reversible gradients over 24 steps and bounds it.

    Reference: float64 standard backprop of the same weights. Measured relative error over
    all parameters, these cases: standard float32 0.7e-5 to 5.1e-5, reversible 0.8e-5 to
    1.4e-5; with batch 4 and output convs at std 0.01-0.05, also with the released [8, 4, 2]
    blocks, reversible 1.5e-4 to 2.3e-4. Guaranteed bound: 1e-3, for models whose float32
    round trip f^-1(f(x)) is accurate (here < 1e-4): the drift is the inverse's rounding
    error propagated through the remaining steps, so an ill-conditioned flow drifts more.
    """
    model, x = float32_paper_depth_model(coupling, hidden)
    twin = Glow(**{**model.config, "memory": "reversible"})
    twin.load_state_dict(model.state_dict())
    exact = Glow(**model.config).to(DTYPE)
    exact.load_state_dict(model.state_dict())
    grads = []
    for m, xx in ((exact, x.to(DTYPE)), (model, x), (twin, x)):
        z, logdet = m(xx)
        loss = (0.5 * z.pow(2).sum(1) - logdet).mean() / z.shape[1]
        grads.append(flat_grad(loss, m).double())
    reference, standard, reversible = grads
    with torch.no_grad():
        round_trip = (model.inverse(model(x)[0]) - x).abs().max().item()
    assert round_trip < 1e-4
    assert ((standard - reference).norm() / reference.norm()).item() < 1e-4
    assert ((reversible - reference).norm() / reference.norm()).item() < 1e-3


def test_reversible_training_run_matches_standard(tmp_path) -> None:
    """A short digits run (tiny config of tests/test_train.py, 4 steps per level, 2 epochs).

    Measured: train/test NLL and gradient norm agree to ~2e-6 relative, accuracies are
    identical; asserted within 1e-4 relative (the float32 drift bound above, 1e-3 on a
    gradient, averaged over steps) and one test image (0.28 points).
    """
    from nfpi.config import TrainConfig
    from nfpi.train import train

    tiny = {
        "dataset": "digits",
        "bits": 5,
        "per_class": 60,
        "epochs": 2,
        "batch_size": 100,
        "eval_batch_size": 128,
        "init_images": 256,
        "seed": 3,
        "threads": 1,
        "model": {"levels": 2, "steps": 4, "hidden": 8},
        "optim": {"warmup": 5, "ema": 0.99},
        "gaussians": {"prior": "fpi", "lam": 40.0},
        "schedule": {"solve_epoch": 0},
    }
    rows = {}
    for memory in ("standard", "reversible"):
        cfg = TrainConfig.from_dict(tiny, **{"model.memory": memory})
        rows[memory] = train(cfg, tmp_path / memory, progress=False)
    standard, reversible = rows["standard"], rows["reversible"]
    for key in ("train_nll", "test_nll", "grad_norm"):
        assert reversible[key] == pytest.approx(standard[key], rel=1e-4), key
    for key in ("acc_top1", "acc_top5"):
        assert abs(reversible[key] - standard[key]) <= 100 / 359 + 1e-9, key


# ------------------------------------------------------------------ paper configs (docs/method.md §4.8)
# The released model settings, as recorded in docs/method.md §4.8 (docs/flows.md "Paper settings"
# gives sources).
RELEASED_MODEL = dict(
    levels=3,
    steps=8,
    hidden=128,
    conv="matexp",
    coupling="matexp",
    blocks=[8, 4, 2],
    matexp_rank=3,
    matexp_low_rank_above=24,
)
RELEASED_TRAINING = {
    "bits": 8,
    "epochs": 500,
    "batch_size": 512,
    "optim.lr": 1e-2,
    "optim.warmup": 1000,
    "optim.ema": 0.9999,
}


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
def test_paper_configs_match_the_released_settings(name: str) -> None:
    from pathlib import Path

    from nfpi.config import TrainConfig
    from nfpi.train import build_flow

    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    for key, value in RELEASED_MODEL.items():
        assert getattr(cfg.model, key) == value, f"{name}: model.{key}"
    for key, value in RELEASED_TRAINING.items():
        section, _, field = key.rpartition(".")
        assert getattr(getattr(cfg, section) if section else cfg, field) == value, f"{name}: {key}"
    model = build_flow(cfg.model, (1 if name == "mnist" else 3, 32, 32))
    assert model.config["blocks"] == [8, 4, 2]
    assert sum(isinstance(m, MatExpCoupling) for m in model.modules()) == 24


def _ddp_reversible_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of 2 gloo processes: DDP over a reversible Glow, each rank on its own batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = Glow((3, 8, 8), levels=2, steps=2, hidden=8, coupling="matexp", memory="reversible")
        model = model.to(DTYPE)
        with torch.no_grad():
            model(sample((3, 8, 8), 8, seed=20))  # the same ActNorm init on both ranks
        ddp = DistributedDataParallel(model)
        z, logdet = ddp(sample((3, 8, 8), 4, seed=21 + rank))
        (0.5 * z.pow(2).sum() - logdet.sum()).backward()
        torch.save([p.grad for p in model.parameters()], f"{out_dir}/grads.{rank}")
    finally:
        dist.destroy_process_group()


def test_reversible_mode_under_ddp_averages_exact_gradients(tmp_path) -> None:
    """DDP's all-reduce hooks fire for parameters whose gradients come from _ReversibleSteps."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _ddp_reversible_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    torch.manual_seed(0)
    model = Glow((3, 8, 8), levels=2, steps=2, hidden=8, coupling="matexp").to(DTYPE)
    with torch.no_grad():
        model(sample((3, 8, 8), 8, seed=20))
    grads = []
    for rank in range(2):
        z, logdet = model(sample((3, 8, 8), 4, seed=21 + rank))
        grads.append(torch.autograd.grad(0.5 * z.pow(2).sum() - logdet.sum(), list(model.parameters())))
    expected = [(a + b) / 2 for a, b in zip(*grads)]
    for rank in range(2):
        got = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 8),
    batch=st.integers(1, 4),
    scale=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_expm_series_matches_matrix_exp(n: int, batch: int, scale: float, seed: int) -> None:
    """The MEF coupling's scaled Taylor series equals matrix_exp for any norm (float64)."""
    gen = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(batch, n, n, generator=gen, dtype=DTYPE)
    expected = torch.linalg.matrix_exp(w)
    got = expm_series(w)
    scale_of = expected.abs().amax((-2, -1), keepdim=True)
    assert ((got - expected).abs() / scale_of).max().item() < 1e-11
