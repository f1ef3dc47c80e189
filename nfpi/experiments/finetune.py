"""Training a timm transformer with NF augmentation (NFA) and/or standard augmentation (SA):
the comparison of paper Sec. 5 "Extra Comparison (Image Augmentation)", Tables 5-6 (docs/method.md §6,
§8), with the EVA02 protocol of the GLEM supplementary §1.

Paper protocol (:meth:`FinetuneConfig.paper`): the pretrained EVA02
``eva02_base_patch14_448.mim_in22k_ft_in22k_in1k`` (87M parameters, 448x448 inputs) is
fine-tuned with SGD, global gradient-norm clipping at 1, learning rate 1e-5 annealed once per
epoch by SGDR (``CosineAnnealingWarmRestarts`` with PyTorch defaults and a 3-epoch period, i.e.
1e-5, 0.75e-5, 0.25e-5), batch 64, 3 epochs, on a training set "duplicated 3 times with
augmented images". Four settings are compared by top-1 / top-5 test accuracy:

- ``baseline``: the training set repeated ``copies`` times (same number of steps as the others);
- ``sa``: the same with standard augmentations (RandAugment + RandomErasing, through timm);
- ``nfa``: the training set plus ``copies - 1`` NFA copies (:func:`nfpi.augment.generate_dataset`);
- ``nfa+sa``: the NFA-enlarged set with standard augmentations on top.

Unspecified by the paper and chosen here: SGD momentum 0.9 (timm's SGD default), no weight
decay, timm's DeiT-style RandAugment string and RandomErasing probability 0.25. The
pretrained weights are used only when they are already in the local Hugging Face cache
(:func:`cached_weights`); nothing is downloaded.

CPU default (:meth:`FinetuneConfig.cpu`): a small EVA02 (timm ``eva02_tiny_patch14_224``
shrunk to 4 blocks of width 64, 7x7 patches on 28x28 MNIST) trained from scratch with AdamW,
since a from-scratch model does not move at lr 1e-5. Images are float tensors in [-1, 1] at
the flow's bit depth; models see them through :class:`InputAdapter`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import data
from .._progress import tqdm
from .._util import pick_device, threads
from ..augment import AugmentConfig, NFAugmenter, generate_dataset, generation_fingerprint, load_generated
from ..data import bin_centres
from ..evaluation import apply_batched, topk_accuracy
from ..prior import ClassGaussians

__all__ = [
    "PAPER_MODEL",
    "SETTINGS",
    "FinetuneConfig",
    "InputAdapter",
    "PretrainedWeightsMissing",
    "build_model",
    "cached_weights",
    "compare",
    "make_optimizer",
    "nfa_copies",
    "train_setting",
    "training_set",
    "weights_status",
]

PAPER_MODEL = "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k"
SETTINGS = ("baseline", "sa", "nfa", "nfa+sa")
# timm's DeiT/EVA recipe string "rand-m9-mstd0.5-inc1" with the magnitude capped at 9: at 10 its
# increasing posterize keeps 0 bits, which Pillow >= 11 rejects with a ValueError.
RANDAUGMENT = "rand-m9-mstd0.5-inc1-mmax9"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsMissing(RuntimeError):
    """Pretrained weights were requested but are not in the local Hugging Face cache."""


@dataclass
class FinetuneConfig:
    """One training run of a timm classifier (defaults: the CPU setting, see :meth:`cpu`).

    model / model_kwargs: ``timm.create_model(model, **model_kwargs)``; from-scratch models get
    ``img_size`` = the image size unless given (the default patch size 7 suits 28x28 MNIST: 16
    tokens; use 8 or 4 for 32x32). pretrained: load the weights from the local HF cache (error
    if absent). optimizer: "sgd" (momentum) or "adamw".
    clip: global gradient-norm clipping (None: off). restart_epochs: SGDR period T_0 in epochs
    (None: ``epochs``); the learning rate is stepped once per epoch as in the paper. copies:
    the training set is enlarged to ``copies`` times its size (paper: 3). randaugment /
    erase_prob: the standard augmentations of the "sa" settings. threads: CPU threads during
    the run (None: torch's default); runs are bit-repeatable for a fixed thread count.
    """

    model: str = "eva02_tiny_patch14_224"
    model_kwargs: dict[str, Any] = field(
        default_factory=lambda: dict(patch_size=7, embed_dim=64, depth=4, num_heads=4)
    )
    pretrained: bool = False
    optimizer: str = "adamw"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.05
    clip: float | None = 1.0
    epochs: int = 10
    restart_epochs: int | None = None
    batch_size: int = 32
    copies: int = 3
    randaugment: str = RANDAUGMENT
    erase_prob: float = 0.25
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw'; got {self.optimizer!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {self.device!r}")
        for name in ("epochs", "batch_size", "copies", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0 or None (no clipping); got {self.clip}")
        if self.restart_epochs is not None and self.restart_epochs < 1:
            raise ValueError(f"restart_epochs must be >= 1 or None (= epochs); got {self.restart_epochs}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob must lie in [0, 1]; got {self.erase_prob}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None; got {self.threads}")

    @classmethod
    def cpu(cls, **overrides: Any) -> FinetuneConfig:
        """The CPU default (module docstring): a 0.2M-parameter EVA02 from scratch, AdamW lr 3e-3,
        wd 0.05, batch 32, 10 epochs with one SGDR cycle, clipping at 1, data tripled. Sized so
        that the model fits a small training set (train loss ~0.1 on 20 MNIST images per class),
        the regime where augmentation can matter."""
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> FinetuneConfig:
        """The paper's EVA02 protocol (GLEM supplementary §1): pretrained EVA02-base at 448 px,
        SGD lr 1e-5, clipping at 1, SGDR over 3 epochs, batch 64, data tripled."""
        values = dict(
            model=PAPER_MODEL,
            model_kwargs={},
            pretrained=True,
            optimizer="sgd",
            lr=1e-5,
            momentum=0.9,
            weight_decay=0.0,
            clip=1.0,
            epochs=3,
            restart_epochs=3,
            batch_size=64,
            copies=3,
            eval_batch_size=64,
            threads=None,
        )
        return cls(**{**values, **overrides})

    def replace(self, **overrides: Any) -> FinetuneConfig:
        return dataclasses.replace(self, **overrides)

    def flat(self) -> dict[str, Any]:
        """Scalar fields for a results table (model_kwargs spelled out as ``model.<key>``)."""
        out = {f"ft_{k}": v for k, v in dataclasses.asdict(self).items() if k != "model_kwargs"}
        out.update({f"ft_model.{k}": v for k, v in self.model_kwargs.items()})
        return out


# --------------------------------------------------------------------------------- model
def cached_weights(model_name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Path of ``model_name``'s pretrained weights in the local Hugging Face cache, or None.

    Only looks at the cache (``cache_dir``, default the HF hub cache; no network): the weights
    count as available when ``huggingface_hub.try_to_load_from_cache`` finds one of the files
    timm loads.
    """
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in _WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def weights_status(model_name: str = PAPER_MODEL) -> str:
    """One line saying whether ``model_name``'s pretrained weights are in the local HF cache."""
    path = cached_weights(model_name)
    if path is not None:
        return f"{model_name}: pretrained weights found in the local Hugging Face cache ({path})"
    return (
        f"{model_name}: pretrained weights not cached locally (nothing is downloaded here); the paper's "
        "setting (FinetuneConfig.paper()) needs them: on an online machine run "
        f"`python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\"` and copy "
        "~/.cache/huggingface/hub to this machine."
    )


class InputAdapter(nn.Module):
    """Feeds images (B, C, h, w) in [-1, 1] to a timm model: grey images are repeated to the
    model's channels, resized (bicubic) to its input size when it is fixed and different, and
    normalised with the model's mean/std. Returns logits (B, K)."""

    def __init__(
        self,
        model: nn.Module,
        in_chans: int,
        size: tuple[int, int] | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.model, self.in_chans, self.size = model, in_chans, size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False)
        return self.model(((x + 1) / 2 - self.mean) / self.std)


def build_model(cfg: FinetuneConfig, num_classes: int, image_shape: Sequence[int]) -> InputAdapter:
    """The classifier of ``cfg`` for images (C, H, W) and ``num_classes`` classes, on the CPU.

    From scratch: ``in_chans=C`` and inputs mapped [-1, 1] -> [-1, 1]. Pretrained: the cached
    weights (head replaced for ``num_classes``), 3 input channels, the model's own mean/std
    and input size; raises :class:`PretrainedWeightsMissing` when they are not cached.
    """
    channels = int(image_shape[0])
    if cfg.pretrained:
        path = cached_weights(cfg.model)
        if path is None:
            raise PretrainedWeightsMissing(
                weights_status(cfg.model) + " Or train from scratch (pretrained=False, FinetuneConfig.cpu())."
            )
        model = timm.create_model(
            cfg.model,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=dict(file=str(path)),
            **cfg.model_kwargs,
        )
        in_chans = 3
        data_cfg = timm.data.resolve_model_data_config(model)
        mean, std = data_cfg["mean"], data_cfg["std"]
    else:
        kwargs = {"img_size": int(image_shape[1]), **cfg.model_kwargs}
        patch = kwargs.get("patch_size")
        if patch is not None and any(int(s) % patch for s in image_shape[1:]):
            raise ValueError(
                f"images of size {tuple(image_shape[1:])} do not split into {patch}x{patch} patches; "
                "set model_kwargs['patch_size'] to a divisor of the image size (7 for 28, 8 or 4 for 32)"
            )
        model = timm.create_model(
            cfg.model, pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs
        )
        in_chans, mean, std = channels, (0.5,) * channels, (0.5,) * channels
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = tuple(int(s) for s in img_size) if img_size is not None else None
    return InputAdapter(model, in_chans, size, mean, std)


# ---------------------------------------------------------------------------------- data
class _Images(Dataset):
    """Items (x float32 (C, H, W) in [-1, 1] at ``bits``, y int) of uint8 images (N, C, H, W),
    with RandAugment (on PIL images, before quantisation) and RandomErasing when ``standard``."""

    def __init__(self, x: Tensor, y: Tensor, bits: int, standard: bool, cfg: FinetuneConfig) -> None:
        self.x, self.y, self.bits = x, y, bits
        self.randaugment = self.erasing = None
        if standard:
            c, h, w = x.shape[1:]
            hparams = dict(translate_const=int(min(h, w) * 0.45), img_mean=(128,) * c)
            self.randaugment = rand_augment_transform(cfg.randaugment, hparams)
            self.erasing = RandomErasing(probability=cfg.erase_prob, mode="pixel", device="cpu")

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        pixels = self.x[i]
        if self.randaugment is not None:
            image = Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).numpy())
            array = np.asarray(self.randaugment(image), dtype=np.uint8).reshape(
                pixels.shape[1], pixels.shape[2], -1
            )
            pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)
        x = bin_centres(pixels, self.bits)
        if self.erasing is not None:
            x = self.erasing(x)
        return x, int(self.y[i])


def training_set(
    setting: str, train: data.ImageArrays, nfa: data.ImageArrays | None, copies: int
) -> data.ImageArrays:
    """The images of ``setting`` (see the module docstring): ``copies`` * N images, either the
    originals repeated or the originals followed by the first ``(copies - 1) * N`` NFA images."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {list(SETTINGS)}; got {setting!r}")
    if not setting.startswith("nfa"):
        return train.subset(torch.arange(len(train)).repeat(copies))
    if copies < 2:
        raise ValueError(
            f"setting {setting!r} adds NFA copies to the originals: it needs copies >= 2, got {copies}"
        )
    extra = (copies - 1) * len(train)
    if nfa is None or len(nfa) < extra or nfa.shape != train.shape:
        have = "none" if nfa is None else f"{len(nfa)} of shape {nfa.shape}"
        raise ValueError(
            f"setting {setting!r} needs {extra} NFA images of shape {train.shape} "
            f"({copies - 1} copies of the {len(train)} training images); got {have}. "
            "Generate them with nfpi.augment.generate_dataset(copies=copies - 1)"
        )
    return data.ImageArrays(
        torch.cat([train.x, nfa.x[:extra]]), torch.cat([train.y, nfa.y[:extra]]), train.classes, train.name
    )


def _seed_everything(seed: int) -> None:
    # timm's RandAugment and RandomErasing draw from Python's and NumPy's global generators.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ training
def make_optimizer(
    cfg: FinetuneConfig, params: Sequence[nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts]:
    """SGD (momentum) or AdamW, and SGDR with period ``restart_epochs`` (default ``epochs``),
    to be stepped once per epoch: the paper's 3 epochs give lr, 0.75 lr, 0.25 lr."""
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    period = cfg.restart_epochs or cfg.epochs
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=period)


def train_setting(
    setting: str,
    train: data.ImageArrays,
    test: data.ImageArrays,
    bits: int,
    cfg: FinetuneConfig,
    nfa: data.ImageArrays | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train the classifier of ``cfg`` under ``setting`` and evaluate it on ``test``.

    Returns {"setting", "seed", "top1", "top5" (test accuracy, %), "train_loss" (last epoch
    mean), "n_train", "steps", "seconds"}. ``max_steps`` stops early (for smoke tests).
    Seeded by ``cfg.seed`` (Python, NumPy and torch global generators and the data order).
    """
    images = training_set(setting, train, nfa, cfg.copies)
    device = pick_device(cfg.device)
    start = time.perf_counter()
    with threads(cfg.threads):
        _seed_everything(cfg.seed)
        model = build_model(cfg, train.num_classes, train.shape).to(device)
        dataset = _Images(images.x, images.y, bits, setting.endswith("sa"), cfg)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=len(dataset) > cfg.batch_size,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(cfg, params)
        steps, loss_mean = 0, math.nan
        bar = tqdm(range(cfg.epochs), desc=setting, leave=False, disable=not progress)
        for _ in bar:
            model.train()
            total, count = 0.0, 0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip is not None:
                    nn.utils.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                total, count, steps = total + loss.item() * len(y), count + len(y), steps + 1
                if max_steps is not None and steps >= max_steps:
                    break
            loss_mean = total / count
            scheduler.step()  # SGDR stepped per epoch, as in the paper
            bar.set_postfix(loss=f"{loss_mean:.3f}")
            if max_steps is not None and steps >= max_steps:
                break
        x_test = bin_centres(test.x, bits)
        logits = apply_batched(model, x_test, cfg.eval_batch_size)
        acc = topk_accuracy(logits, test.y, ks=(1, 5))
    return {
        "setting": setting,
        "seed": cfg.seed,
        "top1": acc["top1"],
        "top5": acc["top5"],
        "train_loss": loss_mean,
        "n_train": len(images),
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }


def nfa_copies(
    flow: nn.Module,
    prior: ClassGaussians | None,
    train: data.ImageArrays,
    bits: int,
    aug_cfg: AugmentConfig,
    copies: int,
    out_dir: str | os.PathLike[str],
    seed: int,
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[data.ImageArrays, NFAugmenter]:
    """``copies`` NFA variants of every image of ``train`` (PCA and partner bank fitted on
    ``train``'s latents), generated resumably into ``out_dir`` under a name derived from their
    fingerprint, so a rerun with the same inputs reuses the file. Returns (images, augmenter)."""
    augmenter = NFAugmenter.from_arrays(flow, train, bits, aug_cfg, prior)
    key = generation_fingerprint(augmenter, train, copies, bits, batch_size, seed)[:16]
    path = generate_dataset(
        augmenter,
        train,
        copies,
        Path(out_dir) / f"nfa_{train.name}_{key}.npz",
        bits,
        batch_size,
        progress=progress,
        seed=seed,
    )
    return load_generated(path, train.name), augmenter


def compare(
    flow: nn.Module,
    prior: ClassGaussians | None,
    train: data.ImageArrays,
    test: data.ImageArrays,
    bits: int,
    cfg: FinetuneConfig,
    aug_cfg: AugmentConfig,
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str],
    settings: Sequence[str] = SETTINGS,
    progress: bool = True,
) -> pd.DataFrame:
    """Tables 5-6 at any scale: every setting x seed, tidy (one row per run with its config).

    For each seed the NFA copies are generated with that seed (``cfg.copies - 1`` per image)
    and every setting is trained with ``cfg.replace(seed=seed)``; the NFA design choices are
    recorded as ``nfa_*`` columns.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    rows = []
    for seed in tqdm(seeds, desc="seeds", disable=not progress):
        nfa = None
        if any(s.startswith("nfa") for s in settings):
            nfa, _ = nfa_copies(
                flow, prior, train, bits, aug_cfg, cfg.copies - 1, out_dir, seed, progress=progress
            )
        for setting in settings:
            run = cfg.replace(seed=seed)
            result = train_setting(setting, train, test, bits, run, nfa, progress=progress)
            rows.append(
                {
                    **result,
                    "dataset": train.name,
                    "bits": bits,
                    "n_test": len(test),
                    **{f"nfa_{k}": v for k, v in dataclasses.asdict(aug_cfg).items()},
                    **run.flat(),
                }
            )
    return pd.DataFrame(rows)
