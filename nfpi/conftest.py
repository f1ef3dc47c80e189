"""The namespace of the docstring examples (``pytest tests nfpi --doctest-modules``), zuko-style:
every example sees ``torch`` and, to stay short and offline, the shipped digits flow (``flow``,
its class Gaussians ``prior`` and config ``cfg``), 200 of its training images (``train_set``) and
six of them as flow inputs (``x`` in [-1, 1], labels ``y``). Examples run on one intra-op thread;
those of :mod:`nfpi.flows.adapters` are skipped when normflows or zuko is not installed.
(Here, not at the repository root, so that the unit tests' own ``tests/conftest.py`` stays the
only module named ``conftest`` on their path.)"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _pytest.doctest import DoctestItem

from nfpi import pretrained
from nfpi.data import bin_centres, load


@pytest.fixture(scope="session")
def _doctest_objects() -> dict[str, Any]:
    flow, prior, cfg = pretrained.load("digits")
    train_set = load("digits", "train").subset(range(200))  # 18-23 images of each class
    return {
        "torch": torch,
        "flow": flow,
        "prior": prior,
        "cfg": cfg,
        "train_set": train_set,
        "x": bin_centres(train_set.x[:6], cfg.bits),
        "y": train_set.y[:6],
    }


@pytest.fixture(autouse=True)
def _doctest_namespace(request: pytest.FixtureRequest) -> Iterator[None]:
    if not isinstance(request.node, DoctestItem):
        yield
        return
    if request.node.name.startswith("nfpi.flows.adapters"):  # the optional peers (the bench extra)
        missing = [m for m in ("normflows", "zuko") if importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[bench]')")
    request.getfixturevalue("doctest_namespace").update(request.getfixturevalue("_doctest_objects"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
