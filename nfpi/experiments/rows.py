"""Result rows of trained flows: the numbers of NFPI Tables 1-3 and GLEM Tables 1-7
(docs/method.md §6-§8; GLEM §5, supplementary §3.3).

:func:`evaluate_run` turns one checkpoint of :func:`nfpi.train.train` into ONE tidy row
(a flat dict) holding the run's config (dotted keys: ``gaussians.lam``,
``schedule.solve_epoch``, ...), the evaluation settings (``eval.*``) and the metrics:

* ``nf_top1`` / ``nf_top5``, ``bpd``, ``bpd_centres``: NF accuracy at the bin centres, test
  bits/dim as the uniform-dequantisation bound (seeded noise, deterministic; the number
  published bits/dim report) and at the bin centres (docs/method.md §6; EMA weights), through
  :func:`nfpi.evaluation.evaluate_flow`;
* ``lam`` / ``lam_normalised``: the un-normalised lambda of the last solve and
  lambda / (K (K - 1)) (docs/method.md §2: the paper quotes the first, the solver uses the second);
  ``solves``, ``solve_iterations``, ``solve_converged``, ``solve_bounds_active``: how many
  times the Gaussians were fitted, and the last solver's report (docs/method.md §3);
* ``cnn_top1`` / ``cnn_top5``: CNN-Acc (docs/method.md §7), a ResNet-18 trained only on
  ``samples_per_class`` images per class sampled at ``temperature`` and ``mean_scale``
  (z = m_s mu_y + T sqrt(s_y) eps), tested on the real test set;
* ``fid``, ``precision``, ``recall``, ``density``, ``coverage``, ``label_reliability``: the
  GLEM proxy metrics on the oracle's 512-d (8 x width) features (docs/method.md §7, GLEM supplementary
  §3.3; not comparable with Inception FIDs), generated images against the real test set;
  precision, recall, coverage and label reliability in percent, as GLEM reports them;
* GLEM options (:class:`nfpi.prior.FullGaussians`, :mod:`nfpi.data.codes`): ``covariance="rfcm"``
  re-estimates full class covariances of the training latents and uses them to classify and
  sample (GLEM Table 5); a checkpoint trained with class codes (CE / CEGLEM) is sampled with
  its codes cropped off, the label of an unconditional CE sample is decoded from its code, and
  ``code_agreement`` is the percent of CEGLEM samples whose code names their conditioning
  class.

Generated images are quantised to the flow's bit depth (bin centres), like the real images
the oracle and the CNN see. Samples whose decoding is not finite are dropped and counted
(``nonfinite``). Metrics that a setting cannot produce are NaN (e.g. NF accuracy of the
monomodal CE flow).

The papers' numbers are in :mod:`nfpi.experiments.references`; :mod:`nfpi.experiments.grid`
trains and evaluates grids of runs into results CSVs.

Example:
    >>> ev = EvalConfig(samples_per_class=10, cnn=False)
    >>> ev.tag() == EvalConfig(samples_per_class=10, cnn=False, threads=2).tag()
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .. import data, repro
from .._util import pick_device
from .._util import threads as cpu_threads
from ..config import NOT_KEYED, TrainConfig
from ..data import ClassCodes, bin_centres, to_uint8
from ..evaluation import (
    ClassifierConfig,
    cnn_accuracy,
    evaluate_flow,
    generated_metrics,
    load_or_train_oracle,
)
from ..latents import encode
from ..prior import ClassGaussians, FullGaussians
from ..train import load_checkpoint, load_data, load_validation

__all__ = [
    "EvalConfig",
    "Oracle",
    "check_compatible",
    "config_hash",
    "evaluate_run",
    "generate",
    "load_oracle",
    "rfcm",
    "solve_info",
]

_EVAL_NOT_HASHED = ("batch_size", "threads")
Prior = ClassGaussians | FullGaussians


# ----------------------------------------------------------------------------------- settings
@dataclass
class EvalConfig:
    """What :func:`evaluate_run` measures and how.

    ``samples_per_class``: generated images per class for CNN-Acc and the proxy metrics;
    ``temperature`` T and ``mean_scale`` m_s of the sampler; ``covariance``: "diag" (the
    trained Gaussians) or "rfcm" (re-estimated full covariances, ``rfcm_rank`` None = exact,
    r = low rank + diagonal); ``cnn`` / ``generated``: compute CNN-Acc / FID, PRDC and Label
    Reliability (both need an oracle); ``k``: neighbours of PRDC; ``classifier``: the CNN-Acc
    recipe (default: GLEM §5.1, 30 epochs, width 64; its ``seed`` fixes the CNN's
    initialisation and batches); ``seed``: of the samples;
    ``threads``: CPU threads while evaluating (None: torch's default; results are bit-repeatable
    for a fixed count).
    """

    samples_per_class: int = 100
    temperature: float = 1.0
    mean_scale: float = 1.0
    covariance: str = "diag"
    rfcm_rank: int | None = None
    cnn: bool = True
    generated: bool = True
    k: int = 5
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    seed: int = 0
    batch_size: int = 500
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.covariance not in ("diag", "rfcm"):
            raise ValueError(f"covariance must be 'diag' or 'rfcm', got {self.covariance!r}")
        if self.samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {self.samples_per_class}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.k < 1:
            raise ValueError(f"k (nearest neighbours) must be >= 1, got {self.k}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")

    @classmethod
    def paper(cls, dataset: str, **overrides: Any) -> EvalConfig:
        """The papers' protocol: as many samples as real training images (GLEM Table 4 "1x":
        5,000 per class on CIFAR-10, 500 on CIFAR-100), CNN-Acc ResNet-18 of GLEM §5.1 with
        30 (CIFAR-10) / 50 (CIFAR-100) epochs, flips only for natural images."""
        per_class = {"cifar10": 5000, "cifar100": 500, "mnist": 6000, "digits": 144}[dataset]
        epochs = 50 if dataset == "cifar100" else 30
        clf = ClassifierConfig(epochs=epochs, flip=data.DATASETS[dataset].flip)
        return cls(**{"samples_per_class": per_class, "classifier": clf, "threads": None, **overrides})

    def replace(self, **overrides: Any) -> EvalConfig:
        return dataclasses.replace(self, **overrides)

    def tag(self) -> str:
        """The ``eval`` part of a row's key: the sampling settings ("nf" without samples)."""
        if not (self.cnn or self.generated):
            return "nf" if self.covariance == "diag" else f"nf,{self._cov()}"
        parts = [
            f"n={self.samples_per_class}",
            f"T={self.temperature:g}",
            f"ms={self.mean_scale:g}",
            self._cov(),
        ]
        parts += (["cnn"] if self.cnn else []) + (["gen"] if self.generated else [])
        if (self.seed, self.classifier.seed) != (0, 0):
            parts.append(f"seed={self.seed}/{self.classifier.seed}")
        return ",".join(parts)

    def _cov(self) -> str:
        return (
            "diag" if self.covariance == "diag" else f"rfcm{'' if self.rfcm_rank is None else self.rfcm_rank}"
        )

    def flat(self) -> dict[str, Any]:
        """``eval.<field>`` columns, the classifier as ``eval.classifier.<field>``."""
        out = {f"eval.{k}": v for k, v in dataclasses.asdict(self).items() if k != "classifier"}
        out.update({f"eval.classifier.{k}": v for k, v in dataclasses.asdict(self.classifier).items()})
        return out


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> flat dict with dotted keys (``gaussians.lam``)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_hash(cfg: TrainConfig, ev: EvalConfig) -> str:
    """Digest of everything that changes a row's numbers (not devices, threads, batch sizes),
    the ``nfpi`` code included (:func:`nfpi.repro.code_fingerprint`): a row made by other code
    is recomputed."""
    train_part = {k: v for k, v in cfg.to_dict().items() if k not in NOT_KEYED}
    eval_part = {
        k: v
        for k, v in ev.flat().items()
        if k.removeprefix("eval.") not in _EVAL_NOT_HASHED and k != "eval.classifier.device"
    }
    text = json.dumps(
        {"train": train_part, "eval": eval_part, "code": repro.code_fingerprint()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------- oracle
@dataclass
class Oracle:
    """The oracle ResNet-18 of docs/method.md §7 with the real test images it judges against.

    ``test_x`` (N, C, H, W) are the real test images at ``bits`` bits (bin centres, padded
    like the flow's), ``test_y`` (N,) their labels; the CNN-Acc test set as well.
    """

    model: nn.Module
    dataset: str
    bits: int
    pad: int
    classes: tuple[str, ...]
    test_x: Tensor
    test_y: Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.test_x.shape[1:]
        return (c, h, w)


def load_oracle(
    cfg: TrainConfig,
    classifier: ClassifierConfig,
    path: str | os.PathLike[str],
    progress: bool = False,
    threads: int | None = 1,
) -> Oracle:
    """The oracle for the real data of ``cfg`` (dataset, bits, pad, class-balanced subsets),
    trained on its training images once and cached at ``path``
    (:func:`nfpi.evaluation.classifiers.load_or_train_oracle`; a cache made for other data is an error).
    Class codes of ``cfg`` are ignored: the oracle sees real images only."""
    real = cfg.replace(**{"codes.rows": 0})
    train_set, test_set = load_data(real)
    meta = {
        "dataset": cfg.dataset,
        "bits": cfg.bits,
        "pad": cfg.pad,
        "per_class": cfg.per_class,
        "test_per_class": cfg.test_per_class,
        "subset_seed": cfg.seed,
    }
    with cpu_threads(threads):
        model = load_or_train_oracle(
            bin_centres(train_set.x, cfg.bits),
            train_set.y,
            train_set.num_classes,
            classifier,
            path,
            meta,
            progress=progress,
        )
    return Oracle(
        model, cfg.dataset, cfg.bits, cfg.pad, test_set.classes, bin_centres(test_set.x, cfg.bits), test_set.y
    )


def check_compatible(cfg: TrainConfig, oracle: Oracle) -> None:
    """Raise ValueError unless a flow of ``cfg`` generates what ``oracle`` can judge."""
    info = data.info(cfg.dataset, cfg.data_dir)
    c, h, w = info.shape
    flow = {
        "dataset": cfg.dataset,
        "number of classes": info.num_classes,
        "bits": cfg.bits,
        "image shape": (c, h + 2 * cfg.pad, w + 2 * cfg.pad),
    }
    judge = {
        "dataset": oracle.dataset,
        "number of classes": oracle.num_classes,
        "bits": oracle.bits,
        "image shape": oracle.shape,
    }
    diff = [f"{k}: flow {flow[k]!r}, oracle/test set {judge[k]!r}" for k in flow if flow[k] != judge[k]]
    if diff:
        raise ValueError(
            "the checkpoint and the oracle/test set do not match (" + "; ".join(diff) + "). "
            "Build the oracle with load_oracle(<the run's TrainConfig>, ...) and its own cache path."
        )


def _check_sample_sizes(ev: EvalConfig, num_classes: int, oracle: Oracle) -> None:
    """Fail before sampling when FID / Coverage cannot be computed from the sample sizes."""
    if not ev.generated:
        return
    n_gen, n_real = ev.samples_per_class * num_classes, oracle.test_x.shape[0]
    need = max(2, ev.k + 1)
    if n_gen < need or n_real < need:
        raise ValueError(
            f"too few samples for FID / Coverage with k={ev.k}: {n_gen} generated "
            f"({ev.samples_per_class} per class x {num_classes} classes) and {n_real} real test "
            f"images; both need at least {need}. Raise samples_per_class or lower k."
        )


# ----------------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(
    model: nn.Module,
    gaussians: Prior,
    y: Tensor,
    bits: int,
    temperature: float = 1.0,
    mean_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 500,
) -> tuple[Tensor, Tensor, int]:
    """Images x = f^-1(z), z ~ the class-y Gaussian at temperature and mean scale, for labels y (N,).

    Returns the images (M, C, H, W) at ``bits`` bits (bin centres), their labels (M,) and the
    number N - M of samples dropped because their decoding was not finite.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=gaussians.means.device).manual_seed(seed)
    images, labels, dropped = [], [], 0
    for chunk in y.split(batch_size):
        z = gaussians.sample(chunk.to(gaussians.means.device), temperature, mean_scale, generator=gen)
        x = model.inverse(z.to(device)).float().cpu()
        finite = torch.isfinite(x).flatten(1).all(1)
        dropped += int((~finite).sum())
        images.append(bin_centres(to_uint8(x[finite], bits), bits))
        labels.append(chunk[finite].cpu())
    return torch.cat(images), torch.cat(labels), dropped


def rfcm(
    model: nn.Module,
    arrays: data.ImageArrays,
    bits: int,
    rank: int | None = None,
    batch_size: int = 500,
    noise: int | None = 0,
) -> FullGaussians:
    """GLEM's RFCM: means and full covariances re-estimated from the latents of ``arrays``
    (one class at a time; ``noise``: seed of the training dequantisation noise, so that pixels
    constant within a class do not give zero-variance directions)."""
    return FullGaussians.fit(
        encode(model, arrays.subset((arrays.y == c).nonzero().flatten()), bits, batch_size, noise=noise)[0]
        for c in range(arrays.num_classes)
    )


def solve_info(run_dir: Path) -> dict[str, Any]:
    """lambda, its normalised value and the last solver's report of the run in ``run_dir``."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    solves = summary.get("solves") or []
    last = solves[-1] if solves else {}
    # Counts as floats (NaN without a solve): a CSV column then reads back as float whatever
    # rows it holds, so printed tables do not depend on which rows exist yet.
    return {
        "lam": float(last.get("lam", 0.0)) if last.get("kind") in ("fpi", "gd") else 0.0,
        "lam_normalised": float(last.get("lam_normalised", 0.0)),
        "solves": len(solves),
        "solve_iterations": float(last.get("iterations", math.nan)),
        "solve_converged": last.get("converged"),
        "solve_bounds_active": float(last.get("bounds_active", math.nan)),
    }


# ----------------------------------------------------------------------------------- one row
def evaluate_run(
    run_dir: str | os.PathLike[str],
    ev: EvalConfig | None = None,
    oracle: Oracle | None = None,
    name: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One result row for the finished run in ``run_dir`` (see the module docstring).

    ``name``: the ``run`` key (default: the directory name). An ``oracle`` is needed for
    CNN-Acc and the proxy metrics; a checkpoint of another dataset, class count, bit depth
    or image shape than the oracle, or too few samples for FID / Coverage, is a ValueError
    raised before any sampling.
    """
    ev = ev or EvalConfig()
    run_dir = Path(run_dir)
    start = time.perf_counter()
    model, gaussians, cfg = load_checkpoint(run_dir, device=pick_device())
    k = gaussians.num_classes
    if (ev.cnn or ev.generated) and oracle is None:
        raise ValueError(
            "CNN-Acc and FID / Coverage / Label Reliability need an oracle (load_oracle(cfg, ...)); "
            "or set cnn=False, generated=False for NF accuracy and bits/dim only"
        )
    if oracle is not None:
        check_compatible(cfg, oracle)
        _check_sample_sizes(ev, k, oracle)
    standard = cfg.gaussians.prior == "standard"
    row: dict[str, Any] = {
        "run": name or run_dir.name,
        "eval": ev.tag(),
        "config_hash": config_hash(cfg, ev),
        "code": repro.code_fingerprint(),
        **_flatten(cfg.to_dict()),
        **ev.flat(),
        **solve_info(run_dir),
    }
    with cpu_threads(ev.threads):
        train_set, test_set = load_data(cfg)
        if ev.covariance == "rfcm":
            gaussians = rfcm(model, train_set, cfg.bits, ev.rfcm_rank, ev.batch_size).to(pick_device())
        nf = evaluate_flow(model, gaussians, test_set, cfg.bits, ev.batch_size)
        row.update(
            nf_top1=math.nan if standard else nf["acc_top1"],
            nf_top5=math.nan if standard else nf["acc_top5"],
            bpd=nf["test_bpd"],
            bpd_centres=nf["test_bpd_centres"],
        )
        val_set = load_validation(cfg)
        if val_set is not None:  # what settings are chosen on (the test set never is)
            val = evaluate_flow(model, gaussians, val_set, cfg.bits, ev.batch_size)
            row.update(
                val_nf_top1=math.nan if standard else val["acc_top1"],
                val_nf_top5=math.nan if standard else val["acc_top5"],
                val_bpd=val["test_bpd"],
            )
        if ev.cnn or ev.generated:
            row.update(_generated_row(model, gaussians, cfg, ev, oracle, progress))
    epochs = pd.read_csv(run_dir / "metrics.csv")
    row.update(train_seconds=float(epochs["time"].sum()), eval_seconds=time.perf_counter() - start)
    return row


def _generated_row(
    model: nn.Module, gaussians: Prior, cfg: TrainConfig, ev: EvalConfig, oracle: Oracle, progress: bool
) -> dict[str, Any]:
    k = gaussians.num_classes
    wanted = torch.arange(k).repeat_interleave(ev.samples_per_class)
    x, y, dropped = generate(
        model, gaussians, wanted, cfg.bits, ev.temperature, ev.mean_scale, ev.seed, ev.batch_size
    )
    out: dict[str, Any] = {"n_generated": len(y), "nonfinite": dropped, "code_agreement": math.nan}
    if cfg.codes.rows:
        codes = ClassCodes.for_config(cfg.codes, k, x.shape[1], x.shape[3])
        decoded = codes.decode(x)
        x = codes.split(x)[0]
        if cfg.gaussians.prior == "standard":  # CE: unconditional samples, labelled by their code
            y = decoded
        else:
            out["code_agreement"] = 100.0 * float((decoded == y).double().mean())
    if ev.cnn:
        acc = cnn_accuracy(x, y, oracle.test_x, oracle.test_y, k, ev.classifier, progress=progress)
        out.update(cnn_top1=acc["top1"], cnn_top5=acc["top5"])
    if ev.generated:
        scores = generated_metrics(oracle.model, oracle.test_x, x, y, ev.k, ev.batch_size, progress=progress)
        # Percent, as GLEM reports Coverage; density is a ratio without a percent scale.
        out.update(
            {m: 100.0 * v if m in ("precision", "recall", "coverage") else v for m, v in scores.items()}
        )
    return out
