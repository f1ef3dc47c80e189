"""The normalizing flow f of NFPI (docs/method.md §4.5; paper Eqs. 1-2): invertible layers, couplings
and the multi-scale Glow.

- :mod:`nfpi.flows.layers`: the layer protocol, squeeze, ActNorm, the LU and matrix-exponential
  1x1 convolutions (:data:`CONVS`). A new invertible layer goes here.
- :mod:`nfpi.flows.couplings`: the affine, additive and Matrix Exponential Flow couplings and
  their conv net (:data:`COUPLINGS`). A new coupling goes here.
- :mod:`nfpi.flows.glow`: steps of flow, levels and splits, the reversible memory mode.
- :mod:`nfpi.flows.protocol`: what any flow must offer nfpi (:class:`Flow`), checked by
  :func:`check_flow` before training.
- :mod:`nfpi.flows.adapters`: normflows' ``MultiscaleFlow`` and zuko's flows as nfpi flows.

Example:
    >>> import torch
    >>> flow = Glow((1, 8, 8), levels=2, steps=1, hidden=8)
    >>> z, logdet = flow(torch.zeros(2, 1, 8, 8))
    >>> tuple(z.shape), tuple(logdet.shape)
    ((2, 64), (2,))
"""

from .adapters import NormflowsFlow, ZukoFlow, normflows_glow, zuko_flow
from .couplings import COUPLINGS, AdditiveCoupling, AffineCoupling, CouplingNet, MatExpCoupling, expm_series
from .glow import MEMORY_MODES, FlowStep, Glow, saved_activation_bytes
from .layers import CONVS, ActNorm, FlowLayer, FlowSequence, InvConv1x1LU, InvConv1x1MatExp, Squeeze
from .protocol import (
    Flattened,
    Flow,
    FlowError,
    as_flow,
    check_flow,
    class_path,
    flow_signature,
    import_object,
)

__all__ = [
    "CONVS",
    "COUPLINGS",
    "MEMORY_MODES",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "CouplingNet",
    "Flattened",
    "Flow",
    "FlowError",
    "FlowLayer",
    "FlowSequence",
    "FlowStep",
    "Glow",
    "InvConv1x1LU",
    "InvConv1x1MatExp",
    "MatExpCoupling",
    "NormflowsFlow",
    "Squeeze",
    "ZukoFlow",
    "as_flow",
    "check_flow",
    "class_path",
    "expm_series",
    "flow_signature",
    "import_object",
    "normflows_glow",
    "saved_activation_bytes",
    "zuko_flow",
]
