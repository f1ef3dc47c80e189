"""The multi-scale Glow encoder f of NFPI, its steps of flow and the reversible memory mode.

Implements docs/method.md §4.5: the Glow skeleton (Kingma & Dhariwal 2018) used by
the NFPI paper -- per level a squeeze, K steps of ActNorm -> invertible 1x1
convolution -> coupling, then a split of half the channels after every level
but the last. The layers live in :mod:`nfpi.flows.layers` (squeeze, ActNorm, the 1x1
convolutions ``"lu"`` and ``"matexp"``) and :mod:`nfpi.flows.couplings` (affine, additive
and the Matrix Exponential Flow's ``"matexp"`` coupling).

``Glow(..., memory="reversible")`` trains with activation memory that does not
grow with the number of steps per level: each level's steps run under a custom
autograd function (:class:`_ReversibleSteps`) that keeps only the level's output
and, in backward, rebuilds each layer's input with its inverse and recomputes the
layer (as in i-RevNet / memcnn / Glow's memory-saving mode).

The log-determinants of the layers add up to the change-of-variables term of the paper's
Eqs. (1)-(2), log p(x|y) = log p_Z(f(x)|y) + log|det J_f(x)|. The split-off halves get no
prior of their own: docs/method.md §1, §4.5 put one diagonal Gaussian per class over all D = C*H*W latent
dimensions, so :class:`Glow` reassembles every factored-out part and the final
output into one flat latent z of shape (B, D), ordered as
[level-1 split-off part, ..., level-(L-1) split-off part, final output], each
part flattened in (C, H, W) order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .couplings import COUPLINGS
from .layers import CONVS, ActNorm, FlowLayer, FlowSequence, Squeeze

__all__ = ["MEMORY_MODES", "FlowStep", "Glow", "saved_activation_bytes"]

MEMORY_MODES = ("standard", "reversible")


def _lookup(table: dict[str, type], name: str, what: str) -> type:
    if name not in table:
        raise ValueError(f"Unknown {what} {name!r}; choose one of {sorted(table)}.")
    return table[name]


class FlowStep(FlowSequence):
    """One Glow step of flow (docs/method.md §4.5): ActNorm -> invertible 1x1 conv -> coupling.

    ``conv`` is ``"lu"`` or ``"matexp"``; ``coupling`` is ``"affine"``, ``"additive"`` or
    ``"matexp"``; ``coupling_options`` are extra keyword arguments of the coupling class
    (e.g. ``rank``, ``low_rank_above`` of :class:`MatExpCoupling`).
    Shapes: (B, channels, H, W) -> (B, channels, H, W).
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 128,
        conv: str = "lu",
        coupling: str = "affine",
        blocks: int = 1,
        coupling_options: dict | None = None,
    ) -> None:
        conv_cls = _lookup(CONVS, conv, "conv")
        coupling_cls = _lookup(COUPLINGS, coupling, "coupling")
        coupling_layer = coupling_cls(channels, hidden, blocks, **(coupling_options or {}))
        super().__init__([ActNorm(channels), conv_cls(channels), coupling_layer])
        self.channels = channels


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _leaf_layers(layer: FlowLayer) -> list[FlowLayer]:
    """The layers of nested FlowSequences in forward order (Squeeze, ActNorm, conv, coupling, ...)."""
    if isinstance(layer, FlowSequence):
        return [leaf for child in layer.layers for leaf in _leaf_layers(child)]
    return [layer]


class _ReversibleSteps(torch.autograd.Function):
    """Run a :class:`FlowSequence` keeping only its output; backward rebuilds the inputs.

    ``forward(x, layers, *params) -> (y, logdet)`` runs under ``no_grad``, so none of the
    layers' intermediate activations is stored: only y (which the caller holds anyway).
    ``backward`` walks the single layers (ActNorm, conv, coupling, ...) from last to first:
    :meth:`FlowLayer.recompute` rebuilds the layer's input from its output with the inverse
    and re-runs the layer under autograd (a coupling evaluates its net once for both), under
    the forward's autocast state, and ``torch.autograd.grad`` gives the gradients of the
    input and of the layer's parameters. Peak memory is then one layer's activations plus
    y, independent of the depth; the extra cost is about one forward of the flow.
    Gradients are exact up to the reconstruction error of the inverses (float64:
    ~1e-13 relative; float32: see docs/flows.md). ``params`` must be every parameter of
    ``layers`` that requires grad, so that autograd routes their gradients (and DDP's hooks).
    """

    @staticmethod
    def forward(ctx, x: Tensor, layers: FlowSequence, *params: Tensor) -> tuple[Tensor, Tensor]:
        ctx.layers, ctx.params = layers, params
        ctx.autocast = (x.device.type, *_autocast_state(x.device.type))
        with torch.no_grad():
            y, logdet = layers(x)
        ctx.save_for_backward(y)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):
        y = ctx.saved_tensors[0].detach()
        device_type, autocast, autocast_dtype = ctx.autocast
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        index = {id(p): i for i, p in enumerate(ctx.params)}
        grads: list[Tensor | None] = [None] * len(ctx.params)
        # The forward's autocast state for both the inverse and the recomputation: a coupling
        # can only be undone with the very net output (same precision) its forward used.
        amp = torch.autocast(device_type, autocast_dtype, autocast)
        for layer in reversed(_leaf_layers(ctx.layers)):
            params = [p for p in layer.parameters() if id(p) in index]
            with torch.enable_grad(), amp:
                parts, out, logdet = layer.recompute(y)
                # A volume-preserving layer's log-det (e.g. Squeeze's zeros) has no graph.
                pairs = [(t, g) for t, g in ((out, grad_y), (logdet, grad_logdet)) if t.requires_grad]
                outputs, out_grads = zip(*pairs)
                layer_grads = torch.autograd.grad(outputs, (*parts, *params), out_grads, allow_unused=True)
            part_grads = [
                torch.zeros_like(t) if g is None else g for t, g in zip(parts, layer_grads[: len(parts)])
            ]
            grad_y = part_grads[0] if len(parts) == 1 else torch.cat(part_grads, dim=1)
            y = parts[0].detach() if len(parts) == 1 else torch.cat(parts, dim=1).detach()
            for p, g in zip(params, layer_grads[len(parts) :]):
                i = index[id(p)]
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        return (grad_y, None, *grads)


def _check_glow_args(
    in_shape: Sequence[int],
    levels: int,
    steps: int,
    hidden: int,
    conv: str,
    coupling: str,
    blocks: int | Sequence[int],
    memory: str,
) -> tuple[tuple[int, ...], Sequence[int]]:
    """:class:`Glow`'s argument checks, before any layer is built: one-line ValueErrors naming the fix.

    Returns ``in_shape`` as a tuple of ints (C, H, W) and the residual blocks of each of the
    ``levels`` levels.
    """
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W) with positive sizes; got {in_shape}.")
    for name, value, low in (("levels", levels, 1), ("steps", steps, 1), ("hidden", hidden, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
    level_blocks = [blocks] * levels if isinstance(blocks, int) else blocks
    if (
        not isinstance(level_blocks, (list, tuple))
        or len(level_blocks) != levels
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in level_blocks)
    ):
        raise ValueError(
            f"blocks must be an integer >= 0 or a list of {levels} such integers (one per "
            f"level); got {blocks!r}."
        )
    _lookup(CONVS, conv, "conv")
    _lookup(COUPLINGS, coupling, "coupling")
    if memory not in MEMORY_MODES:
        raise ValueError(f"Unknown memory mode {memory!r}; choose one of {list(MEMORY_MODES)}.")
    c, h, w = in_shape
    if h % 2**levels or w % 2**levels:
        raise ValueError(
            f"Image size {h}x{w} is not divisible by 2**levels = {2**levels}; "
            f"use fewer levels or pad/crop the images."
        )
    return in_shape, level_blocks


class Glow(nn.Module):
    """Multi-scale Glow mapping images (B, C, H, W) to one flat latent (B, C*H*W) (docs/method.md §4.5).

    Level l (1..L): squeeze, ``steps`` FlowSteps, then (for l < L) half of the
    channels are factored out. All factored-out parts and the final output are
    concatenated into z (see the module docstring for the order), because the
    class Gaussians of NFPI cover every latent dimension.

    Args:
        in_shape: (C, H, W) of the images; H and W must be divisible by 2**levels.
        levels: number of levels L (paper: 3).
        steps: flow steps per level K (paper: 8).
        hidden: hidden channels of the coupling nets (paper: 128).
        conv: ``"lu"`` (Glow) or ``"matexp"`` (Matrix Exponential Flow).
        coupling: ``"affine"``, ``"additive"`` or ``"matexp"`` (:class:`MatExpCoupling`).
        blocks: residual blocks per coupling net: one int for every level, or one per
            level (released configs: ``[8, 4, 2]``).
        matexp_rank, matexp_low_rank_above: with ``coupling="matexp"``, W is low-rank
            (rank ``matexp_rank``) when the transformed half has more than
            ``matexp_low_rank_above`` channels (released: 3 and 24).
        memory: ``"standard"`` (autograd stores every activation) or ``"reversible"``
            (while gradients are recorded, each level's steps run under
            :class:`_ReversibleSteps`: activation memory independent of ``steps``, at the
            cost of one extra forward and one inverse per step in backward). ActNorm's
            data-dependent init always runs in a standard forward.

    Attributes: ``in_shape``, ``latent_dim`` (D), ``part_shapes`` (the (C, H, W)
    of each block of z, in order), ``config`` (the constructor arguments:
    ``Glow(**model.config)`` rebuilds the architecture for ``load_state_dict``).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        levels: int = 3,
        steps: int = 8,
        hidden: int = 128,
        conv: str = "lu",
        coupling: str = "affine",
        blocks: int | Sequence[int] = 1,
        matexp_rank: int = 3,
        matexp_low_rank_above: int = 24,
        memory: str = "standard",
    ) -> None:
        super().__init__()
        in_shape, level_blocks = _check_glow_args(
            in_shape, levels, steps, hidden, conv, coupling, blocks, memory
        )
        c, h, w = in_shape
        self.in_shape = in_shape
        self.latent_dim = c * h * w
        # Constructor arguments, so a checkpoint can store how to rebuild the model.
        self.config = dict(
            in_shape=in_shape,
            levels=levels,
            steps=steps,
            hidden=hidden,
            conv=conv,
            coupling=coupling,
            blocks=blocks,
            matexp_rank=matexp_rank,
            matexp_low_rank_above=matexp_low_rank_above,
            memory=memory,
        )
        self.memory = memory

        options = (
            dict(rank=matexp_rank, low_rank_above=matexp_low_rank_above) if coupling == "matexp" else None
        )
        levels_list = []
        #: (C, H, W) of each factored-out part, then of the final output, in latent order.
        self.part_shapes: list[tuple[int, int, int]] = []
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            levels_list.append(
                FlowSequence(
                    [Squeeze()]
                    + [
                        FlowStep(c, hidden, conv, coupling, level_blocks[level], options)
                        for _ in range(steps)
                    ]
                )
            )
            if level < levels - 1:
                self.part_shapes.append((c - c // 2, h, w))
                c = c // 2
        self.part_shapes.append((c, h, w))
        self.level_flows = nn.ModuleList(levels_list)
        self._part_sizes = [math.prod(s) for s in self.part_shapes]
        self._actnorms = [m for m in self.modules() if isinstance(m, ActNorm)]

    def _run_level(self, level: FlowSequence, x: Tensor) -> tuple[Tensor, Tensor]:
        """One level's squeeze and steps, through :class:`_ReversibleSteps` when it saves memory."""
        params = [p for p in level.parameters() if p.requires_grad]
        reversible = (
            self.memory == "reversible"
            and torch.is_grad_enabled()
            and bool(params)
            # The ActNorm init needs a standard forward (it reads the batch once, no inverse).
            and all(m.is_initialized() for m in self._actnorms)
        )
        if reversible:
            return _ReversibleSteps.apply(x, level, *params)
        return level(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> (z (B, D), logdet (B,)), D = C*H*W."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"Glow(in_shape={self.in_shape}) expects input of shape (B, "
                f"{', '.join(map(str, self.in_shape))}); got {tuple(x.shape)}."
            )
        parts = []
        logdet = x.new_zeros(x.shape[0])
        last = len(self.level_flows) - 1
        for index, level in enumerate(self.level_flows):
            x, level_logdet = self._run_level(level, x)
            logdet = logdet + level_logdet
            if index < last:
                keep = x.shape[1] // 2
                parts.append(x[:, keep:].flatten(1))
                x = x[:, :keep]
        parts.append(x.flatten(1))
        return torch.cat(parts, dim=1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        """z: (B, D) -> x (B, C, H, W)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"Glow.inverse expects latents of shape (B, {self.latent_dim}); got {tuple(z.shape)}."
            )
        batch = z.shape[0]
        parts = [
            p.reshape(batch, *shape) for p, shape in zip(z.split(self._part_sizes, dim=1), self.part_shapes)
        ]
        x = parts[-1]
        last = len(self.level_flows) - 1
        for index in reversed(range(last + 1)):
            if index < last:
                x = torch.cat((x, parts[index]), dim=1)
            x = self.level_flows[index].inverse(x)
        return x


def saved_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the non-parameter tensors autograd keeps for the backward pass of one training
    loss ``0.5 |z|^2 - logdet`` on ``x`` (B, C, H, W): what ``memory="reversible"`` reduces.

    Counted with saved-tensor hooks; a storage saved by several nodes counts once.
    """
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, logdet = model(x)
        loss = 0.5 * z.pow(2).sum() - logdet.sum()
    loss.backward()
    return total
