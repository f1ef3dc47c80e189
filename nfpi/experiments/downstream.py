"""Does NF augmentation help a data-starved classifier? A paired study of paper Sec. 5
"Extra Comparison (Image Augmentation)" (Table 5: a 7M-parameter Swin trained from scratch
gains +1.0 point on CIFAR-10 with NFA alone), of its claim that mixing inside the principal
subspace of a class beats adding noise in the latent space, and of GLEM Table 4 (CNN accuracy
against the number of generated images per class); docs/method.md §6.

One *seed* s fixes one paired replicate:

1. the classifier's training images, ``per_class`` per class drawn from the training split with
   seed s, and a validation set of ``val_per_class`` other training images per class;
2. the flow, trained on exactly those training images (``flow_cfg`` with ``per_class`` and
   seed s), so that NFA adds no image the classifier could not have seen, as in the paper,
   where the flow and the classifier share the training set;
3. every arm's extra images and the classifier's initialisation and batches.

Arms differ only in their extra images and standard augmentation, so an arm's effect is its
per-seed difference to the baseline, reported with a Student-t 95 % interval
(:func:`nfpi.repro.seed_summary`). An :class:`Arm` composes a *source* of extra images
(:class:`NFA`, :class:`Noise`, :class:`Mixup`, :class:`Samples`, or None for the originals
repeated), standard augmentation on or off, and a classifier (a small ResNet-18 by default, or
the EVA02 protocol of :mod:`nfpi.experiments.finetune`). Equal budget: every arm trains for the same number
of image presentations, ``epochs`` x (1 + ``copies``) x N, so arms with other set sizes get
proportionally fewer (or more) epochs.

Example (notebook 06 runs the study: ``study(flow_cfg, arms, StudyConfig(), seeds, runs_dir)``,
summarised by ``repro.seed_summary(table, ["top1"], baseline="baseline")``):
    >>> list(default_arms())[:4]
    ['baseline', 'sa', 'nfa', 'nfa+sa']

References:
    Paper (NFPI) Sec. 5 and Table 5; GLEM Table 4 and supplementary §1 (EVA02 protocol).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import Tensor, nn

from .. import data, pretrained
from .._progress import tqdm
from .._util import threads
from ..augment import AugmentConfig, ClassSamples, LatentNoise, NFAugmenter, PixelMixup
from ..config import TrainConfig
from ..data import bin_centres, class_balanced_indices, class_subset, to_uint8
from ..evaluation import ClassifierConfig, apply_batched, topk_accuracy, train_classifier
from ..prior import ClassGaussians
from ..train import keyed_run_dir, load_checkpoint, train
from . import finetune

__all__ = [
    "NFA",
    "Arm",
    "Context",
    "Mixup",
    "Noise",
    "Replicate",
    "Samples",
    "StudyConfig",
    "default_arms",
    "enlarge",
    "replicate",
    "replicate_data",
    "study",
]


@dataclass(frozen=True)
class Context:
    """What a source builds its augmenter from: this seed's flow and class Gaussians (trained
    on ``train``), the training images, their bit depth and the seed."""

    flow: nn.Module
    prior: ClassGaussians
    train: data.ImageArrays
    bits: int
    seed: int


class Augmenter(Protocol):
    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


@dataclass(frozen=True)
class NFA:
    """NF augmentation (:class:`nfpi.augment.NFAugmenter`) with ``cfg``'s k and mixing law, by
    this seed's flow, or by the shipped flow ``shipped`` (:mod:`nfpi.pretrained`), which may
    have seen more training images than the classifier."""

    cfg: AugmentConfig = field(default_factory=AugmentConfig)
    shipped: str | None = None

    def build(self, ctx: Context) -> Augmenter:
        if self.shipped is None:
            return NFAugmenter.from_arrays(ctx.flow, ctx.train, ctx.bits, self.cfg, ctx.prior)
        flow, prior, _ = pretrained.load(self.shipped)
        return NFAugmenter.from_arrays(flow, ctx.train, ctx.bits, self.cfg, prior)


@dataclass(frozen=True)
class Noise:
    """Gaussian noise in the latent space (:class:`nfpi.augment.alternatives.LatentNoise`) moving latents as
    far, in mean square, as NFA with ``like`` does: only the direction differs."""

    like: AugmentConfig = field(default_factory=AugmentConfig)

    def build(self, ctx: Context) -> Augmenter:
        nfa = NFAugmenter.from_arrays(ctx.flow, ctx.train, ctx.bits, self.like, ctx.prior)
        return LatentNoise.matched(nfa, ctx.train, ctx.bits, seed=ctx.seed)


@dataclass(frozen=True)
class Mixup:
    """Within-class mixup in pixel space (:class:`nfpi.augment.PixelMixup`) with ``cfg``'s law."""

    cfg: AugmentConfig = field(default_factory=AugmentConfig)

    def build(self, ctx: Context) -> Augmenter:
        return PixelMixup(ctx.train, ctx.bits, self.cfg)


@dataclass(frozen=True)
class Samples:
    """Images sampled from the class Gaussians at ``temperature``
    (:class:`nfpi.augment.alternatives.ClassSamples`)."""

    temperature: float = 1.0

    def build(self, ctx: Context) -> Augmenter:
        return ClassSamples(ctx.flow, ctx.prior, self.temperature)


Source = NFA | Noise | Mixup | Samples


@dataclass(frozen=True)
class Arm:
    """One setting of the study.

    source: where the extra images come from (None: the originals repeated).
    copies: extra images per original (None: the study's ``copies``).
    standard: standard augmentation (random shifts for the ResNet, timm's RandAugment and
        RandomErasing for the EVA02 protocol).
    originals: train on the originals plus the extra images; False trains on the extra images
        alone (GLEM Table 4's CNN accuracy of generated data).
    transformer: train this :class:`nfpi.experiments.finetune.FinetuneConfig` (the EVA02 protocol; its
        ``copies`` is set to 1 + copies) instead of the study's ResNet-18.
    """

    source: Source | None = None
    copies: int | None = None
    standard: bool = False
    originals: bool = True
    transformer: finetune.FinetuneConfig | None = None

    def __post_init__(self) -> None:
        if self.copies is not None and self.copies < 1:
            raise ValueError(f"copies must be >= 1 or None (the study's); got {self.copies}")
        if not self.originals and self.source is None:
            raise ValueError("an arm without the originals needs a source of images")
        if self.transformer is not None and not self.originals:
            raise ValueError("the EVA02 protocol always trains on the originals (originals=True)")


@dataclass
class StudyConfig:
    """The shared protocol of every arm.

    per_class: training images per class (the classifier's and the flow's).
    val_per_class: validation images per class, drawn from the other training images.
    copies: extra images per original (2: the data tripled, the paper's EVA02 protocol).
    epochs: epochs of an arm with (1 + copies) x N images; others get the same number of image
        presentations.
    classifier: the ResNet-18 recipe (GLEM §5.1 one-cycle SGD); its ``crop_padding`` and
        ``flip`` are the standard augmentation, used only by arms with ``standard=True``.
    batch_size: of the extra-image generation.
    threads: CPU threads of the whole study (None: torch's default). One is fastest for these
        small models on a shared CPU, and results are bit-repeatable for a fixed count.
    """

    per_class: int = 20
    val_per_class: int = 50
    copies: int = 2
    epochs: int = 30
    classifier: ClassifierConfig = field(
        default_factory=lambda: ClassifierConfig(width=8, epochs=30, flip=False, crop_padding=4)
    )
    batch_size: int = 500
    threads: int | None = 1

    @classmethod
    def resnet(cls, width: int, shift: int, epochs: int, **fields: Any) -> StudyConfig:
        """The protocol with the ResNet-18 of ``width`` (stage-1 channels) trained ``epochs``
        epochs, standard augmentation = random crops after padding by ``shift`` pixels of 32
        (no flips); ``fields`` set the others (notebook 06's flat parameters).

        Example:
            >>> StudyConfig.resnet(width=8, shift=4, epochs=30, per_class=20).classifier.crop_padding
            4
        """
        classifier = ClassifierConfig(width=width, epochs=epochs, flip=False, crop_padding=shift)
        return cls(epochs=epochs, classifier=classifier, **fields)

    def __post_init__(self) -> None:
        for name in ("per_class", "val_per_class", "copies", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None; got {self.threads}")


def default_arms(
    k: Sequence[int] = (2, 8, 19),
    copies: Sequence[int] = (1, 2, 5, 10),
    shipped: str | None = None,
    transformer: finetune.FinetuneConfig | None = None,
    nfa: AugmentConfig | None = None,
) -> dict[str, Arm]:
    """The arms of notebook 06: the paper's four (baseline, SA, NFA, NFA + SA), the
    alternatives at equal budget (latent noise, pixel mixup, NFA with other ``k`` and the Beta
    law), NFA by the ``shipped`` flow (if given), GLEM Table 4 (a classifier trained on
    ``m`` x N samples of the class Gaussians for m in ``copies``) and the EVA02 protocol
    (baseline and NFA, if ``transformer`` is given). ``nfa``: NFA's own settings. Names have
    no spaces, so that README blocks can list them (:func:`nfpi.repro.render_readme`)."""
    cfg = nfa or AugmentConfig()
    arms = {
        "baseline": Arm(),
        "sa": Arm(standard=True),
        "nfa": Arm(NFA(cfg)),
        "nfa+sa": Arm(NFA(cfg), standard=True),
        "latent_noise": Arm(Noise(cfg)),
        "pixel_mixup": Arm(Mixup(cfg)),
        **{f"nfa_k{n}": Arm(NFA(dataclasses.replace(cfg, k=n))) for n in k if n != cfg.k},
        "nfa_other_law": Arm(
            NFA(dataclasses.replace(cfg, law="beta" if cfg.law == "uniform" else "uniform"))
        ),
    }
    if shipped is not None:
        arms[f"nfa_{shipped}_flow"] = Arm(NFA(cfg, shipped=shipped))
    arms.update({f"samples_{m}x": Arm(Samples(), copies=m, originals=False) for m in copies})
    if transformer is not None:
        arms.update(
            {
                "eva02_baseline": Arm(transformer=transformer),
                "eva02_nfa": Arm(NFA(cfg), transformer=transformer),
            }
        )
    return arms


# ------------------------------------------------------------------------------------ data
def replicate_data(
    flow_cfg: TrainConfig, cfg: StudyConfig, seed: int
) -> tuple[TrainConfig, data.ImageArrays, data.ImageArrays, data.ImageArrays]:
    """(flow config, training, validation, test images) of replicate ``seed``: the flow config
    trains on the ``per_class`` training images of this seed (no validation split of its own);
    the validation images are ``val_per_class`` per class of the remaining training images."""
    if flow_cfg.pad or flow_cfg.codes.rows:
        raise ValueError("the augmentation study needs a flow config without pad and class codes")
    run_cfg = flow_cfg.replace(per_class=cfg.per_class, seed=seed, val_fraction=0.0)
    full = data.load(run_cfg.dataset, "train", run_cfg.data_dir, download=run_cfg.download)
    test = data.load(run_cfg.dataset, "test", run_cfg.data_dir, download=run_cfg.download)
    chosen, others = class_subset(full, cfg.per_class, seed)  # the images splits(run_cfg) trains on
    have = int(torch.bincount(others.y, minlength=others.num_classes).min())
    if have < cfg.val_per_class:
        raise ValueError(
            f"{run_cfg.dataset}: after {cfg.per_class} training images per class only {have} remain in "
            f"the smallest class for validation; lower val_per_class (now {cfg.val_per_class}) or per_class"
        )
    val = others.subset(class_balanced_indices(others.y, cfg.val_per_class, seed))
    return run_cfg, chosen, val, test


@torch.no_grad()
def enlarge(
    augmenter: Augmenter, train: data.ImageArrays, bits: int, copies: int, seed: int, batch_size: int = 500
) -> data.ImageArrays:
    """``copies`` variants of every image of ``train`` (copy j of image i is row j N + i),
    quantised to ``bits`` like the originals. Random draws come from one CPU generator seeded
    with ``seed``, so the images are the same on any device."""
    generator = torch.Generator().manual_seed(seed)
    x = bin_centres(train.x, bits)
    out = [
        to_uint8(augmenter.augment(chunk, labels, generator).cpu(), bits)
        for _ in range(copies)
        for chunk, labels in zip(x.split(batch_size), train.y.split(batch_size))
    ]
    return data.ImageArrays(torch.cat(out), train.y.repeat(copies), train.classes, train.name)


@dataclass(frozen=True)
class Replicate:
    """One seed's data and flow: ``ctx`` (flow, Gaussians, training images, bits, seed), the
    validation and test images, the flow's run folder and its final metrics row."""

    ctx: Context
    val: data.ImageArrays
    test: data.ImageArrays
    folder: Path
    flow_metrics: dict[str, Any]


def replicate(
    flow_cfg: TrainConfig, cfg: StudyConfig, seed: int, runs_dir: str | os.PathLike[str] = "runs"
) -> Replicate:
    """Replicate ``seed`` (:func:`replicate_data`) with its flow trained on its training images,
    in (or reused from) ``runs_dir/<dataset>_study-<key>``."""
    run_cfg, train_set, val, test = replicate_data(flow_cfg, cfg, seed)
    folder = keyed_run_dir(runs_dir, f"{run_cfg.dataset}_study", run_cfg)
    final = train(run_cfg, folder, progress=False)
    flow, prior, _ = load_checkpoint(folder)
    return Replicate(Context(flow, prior, train_set, run_cfg.bits, seed), val, test, Path(folder), final)


# ------------------------------------------------------------------------------- the study
def _resnet_run(
    images: data.ImageArrays, standard: bool, epochs: int, cfg: StudyConfig, seed: int, bits: int
) -> nn.Module:
    recipe = cfg.classifier
    if not standard:
        recipe = dataclasses.replace(recipe, crop_padding=0, flip=False)
    recipe = dataclasses.replace(recipe, epochs=epochs, seed=seed)
    return train_classifier(bin_centres(images.x, bits), images.y, images.num_classes, recipe, progress=False)


def _accuracy(model: nn.Module, images: data.ImageArrays, bits: int) -> dict[str, float]:
    return topk_accuracy(apply_batched(model, bin_centres(images.x, bits), 500), images.y, (1, 5))


def _run_arm(
    arm: Arm,
    ctx: Context,
    val: data.ImageArrays,
    test: data.ImageArrays,
    cfg: StudyConfig,
    cache: dict[tuple[str, int], data.ImageArrays],
) -> dict[str, Any]:
    copies = arm.copies or cfg.copies
    extra = None
    if arm.source is not None:
        key = (repr(arm.source), copies)
        if key not in cache:  # arms that differ only in training share their extra images
            augmenter = arm.source.build(ctx)
            cache[key] = enlarge(augmenter, ctx.train, ctx.bits, copies, ctx.seed, cfg.batch_size)
        extra = cache[key]
    if arm.transformer is not None:
        setting = {
            (False, False): "baseline",
            (False, True): "sa",
            (True, False): "nfa",
            (True, True): "nfa+sa",
        }[(extra is not None, arm.standard)]
        run = arm.transformer.replace(seed=ctx.seed, copies=1 + copies)
        row = finetune.train_setting(setting, ctx.train, test, ctx.bits, run, extra, progress=False)
        return {"top1": row["top1"], "top5": row["top5"], "n_train": row["n_train"], "epochs": run.epochs}
    if extra is None:
        images = ctx.train.subset(torch.arange(len(ctx.train)).repeat(1 + copies))
    elif arm.originals:
        images = data.ImageArrays(
            torch.cat([ctx.train.x, extra.x]),
            torch.cat([ctx.train.y, extra.y]),
            ctx.train.classes,
            ctx.train.name,
        )
    else:
        images = extra
    budget = cfg.epochs * (1 + cfg.copies) * len(ctx.train)
    epochs = max(1, round(budget / len(images)))
    model = _resnet_run(images, arm.standard, epochs, cfg, ctx.seed, ctx.bits)
    acc, val_acc = _accuracy(model, test, ctx.bits), _accuracy(model, val, ctx.bits)
    return {
        "top1": acc["top1"],
        "top5": acc["top5"],
        "val_top1": val_acc["top1"],
        "n_train": len(images),
        "epochs": epochs,
    }


def study(
    flow_cfg: TrainConfig,
    arms: Mapping[str, Arm],
    cfg: StudyConfig,
    seeds: Sequence[int],
    runs_dir: str | os.PathLike[str] = "runs",
    progress: bool = True,
) -> pd.DataFrame:
    """Every arm x seed (module docstring); one row per run: ``setting``, ``seed``, test
    ``top1`` / ``top5``, validation ``val_top1`` (ResNet arms), ``n_train``, ``epochs``, the
    seed's flow (``flow_run``, its test ``flow_nf_top1`` and ``flow_bpd``), the arm and the
    study config. The seed's flow trains in (or is reused from) ``runs_dir`` (:func:`replicate`)."""
    if not arms:
        raise ValueError("no arms to run; e.g. arms=default_arms()")
    with threads(cfg.threads):
        return pd.DataFrame(_study_rows(flow_cfg, arms, cfg, seeds, runs_dir, progress))


def _study_rows(
    flow_cfg: TrainConfig,
    arms: Mapping[str, Arm],
    cfg: StudyConfig,
    seeds: Sequence[int],
    runs_dir: str | os.PathLike[str],
    progress: bool,
) -> list[dict[str, Any]]:
    rows = []
    for seed in tqdm(seeds, desc="seeds", disable=not progress):
        rep = replicate(flow_cfg, cfg, seed, runs_dir)
        cache: dict[tuple[str, int], data.ImageArrays] = {}
        for name, arm in tqdm(arms.items(), desc=f"seed {seed}", leave=False, disable=not progress):
            rows.append(
                {
                    "setting": name,
                    "seed": seed,
                    "source": type(arm.source).__name__ if arm.source is not None else "originals",
                    **_run_arm(arm, rep.ctx, rep.val, rep.test, cfg, cache),
                    "flow_run": rep.folder.name,
                    "flow_nf_top1": rep.flow_metrics["acc_top1"],
                    "flow_bpd": rep.flow_metrics["test_bpd"],
                    "arm": repr(arm),
                    **{f"study.{k}": v for k, v in dataclasses.asdict(cfg).items() if k != "classifier"},
                    **{f"study.classifier.{k}": v for k, v in dataclasses.asdict(cfg.classifier).items()},
                }
            )
    return rows
