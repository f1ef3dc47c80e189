"""ResNet-18 classifiers for the generated-data metrics (docs/method.md §7; GLEM paper §5.1).

Two uses of one architecture:

* **CNN-Acc** (docs/method.md §7): a ResNet-18 adapted to small images is trained *only* on
  images sampled from the flow and tested on the real test set.
* **Oracle** (docs/method.md §7; GLEM supplementary): a ResNet-18 trained on the real training set.
  Its 512-d penultimate features feed FID and Coverage and its predictions on generated
  images give Label Reliability (see :mod:`nfpi.evaluation.metrics`). :func:`load_or_train_oracle`
  caches it on disk together with the metadata that identifies it.

Training follows the paper recipe (GLEM §5.1 "Implementation Details"): SGD, lr 1e-3,
momentum 0.9, weight decay 5e-4, one-cycle schedule with maximum lr 0.1, batch 100,
random crop + horizontal flip, 30 epochs. The one-cycle schedule starts at ``lr`` (its
``div_factor`` is ``max_lr / lr``) so that both numbers of the recipe are honoured.

Images are float tensors (N, C, H, W) in [-1, 1]; labels are integer tensors (N,).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._progress import tqdm
from .._util import atomic_write, check_labels, eval_mode, pick_device
from .accuracy import topk_accuracy

__all__ = [
    "ClassifierConfig",
    "ResNet18Small",
    "apply_batched",
    "check_images",
    "evaluate",
    "load_or_train_oracle",
    "resnet18_small",
    "train_classifier",
]

logger = logging.getLogger(__name__)

ORACLE_FORMAT = "nfpi-oracle-v1"
# Keys that load_or_train_oracle derives from the data and config itself.
_DERIVED_META_KEYS = ("num_classes", "image_shape", "num_train", "config")


# --------------------------------------------------------------------------- validation


def check_images(
    x: Tensor, y: Tensor | None = None, num_classes: int | None = None, name: str = "images"
) -> None:
    """Raise ValueError unless ``x`` is a non-empty float (N, C, H, W) tensor and ``y`` fits it."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4 or not x.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a float tensor (N, C, H, W) in [-1, 1], got dtype {x.dtype} and "
            f"shape {tuple(x.shape)}; convert uint8 images with x.float() / 127.5 - 1"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one image is needed")
    if y is not None:
        check_labels(y, x.shape[0], num_classes)


# --------------------------------------------------------------------------- model


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016, ResNet-18/34 block)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # A projection is only needed where the identity cannot be added (shape change).
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18Small(nn.Module):
    """ResNet-18 for small images: 3x3 stride-1 stem, no max-pool, stages of width w..8w.

    ``features(x)`` returns the (N, 8*width) globally pooled penultimate activations,
    ``forward(x)`` the (N, num_classes) logits. ``num_features`` holds 8*width.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        c_in = width
        for i in range(4):
            c_out = width * 2**i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init as in torchvision's ResNet; PyTorch's default conv init is tuned for other nets.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: (N, C, H, W) -> (N, 8*width)."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Logits: (N, C, H, W) -> (N, num_classes)."""
        return self.fc(self.features(x))


def resnet18_small(num_classes: int, in_channels: int = 3, width: int = 64) -> ResNet18Small:
    """ResNet-18 adapted to small images (8x8 .. 32x32); ``width`` = channels of stage 1.

    torchvision's and timm's ResNets fix the stem at 64 channels for BasicBlock nets, so the
    reduced CPU widths need this compact implementation. width=64 is the paper's network
    (11.17M parameters for 10 classes, 512-d features).
    """
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    return ResNet18Small(num_classes, in_channels, width)


# --------------------------------------------------------------------------- training


@dataclass
class ClassifierConfig:
    """Training recipe of the CNN-Acc / oracle ResNet-18 (defaults: GLEM paper §5.1)."""

    epochs: int = 30
    batch_size: int = 100
    lr: float = 1e-3  # start of the one-cycle schedule
    max_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_padding: int = 4  # pixels at 32 px; scaled to the image size (8x8 -> 1)
    flip: bool = True  # horizontal flips; turn off for digits, where they change the class
    width: int = 64
    seed: int = 0
    device: str | None = None  # None: CUDA when available, else CPU
    amp: bool = True  # mixed precision, only ever used on CUDA

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch norm needs 2 samples), got {self.batch_size}")
        if not 0 < self.lr <= self.max_lr:
            raise ValueError(f"need 0 < lr <= max_lr, got lr={self.lr}, max_lr={self.max_lr}")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _augment(x: Tensor, pad_h: int, pad_w: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop after padding by (pad_h, pad_w), then optional horizontal flip; (N,C,H,W)."""
    n, c, h, w = x.shape
    if pad_h or pad_w:
        # Pad with -1 (black): the usual zero padding of [0, 1] images before normalisation.
        padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), value=-1.0)
        # Offsets come from the CPU generator so that runs are reproducible on any device.
        dy = torch.randint(0, 2 * pad_h + 1, (n, 1, 1), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad_w + 1, (n, 1, 1), generator=generator).to(x.device)
        rows = dy + torch.arange(h, device=x.device)[:, None]
        cols = dx + torch.arange(w, device=x.device)
        # A gather over flat pixel indices keeps the plain NCHW layout; index-and-permute
        # tricks give channels-last strides for C=1, on which CPU convolutions are not repeatable.
        flat = (rows * padded.shape[3] + cols).view(n, 1, h * w).expand(n, c, h * w)
        x = padded.flatten(2).gather(2, flat).view(n, c, h, w)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def train_classifier(
    x: Tensor, y: Tensor, num_classes: int, cfg: ClassifierConfig | None = None, progress: bool = True
) -> ResNet18Small:
    """Train ``resnet18_small`` on images x (N, C, H, W) in [-1, 1] with labels y (N,).

    Seeded by ``cfg.seed``: initialisation, shuffling and augmentation draw from their own
    generators (the global RNG is left untouched), so CPU runs with the same number of
    threads are bit-for-bit repeatable.
    Each epoch is split into ceil(N / batch_size) batches of near-equal size, which avoids a
    trailing batch of one sample that batch norm cannot train on. Returns the model in eval mode.
    """
    cfg = cfg or ClassifierConfig()
    check_images(x, y, num_classes)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 training images, got {n}")
    device = pick_device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = resnet18_small(num_classes, x.shape[1], cfg.width)
    model.to(device).train()

    n_batches = math.ceil(n / cfg.batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    # cycle_momentum=False: the paper's recipe has a fixed momentum (0.9); OneCycleLR would
    # otherwise cycle it between 0.85 and 0.95 and overwrite cfg.momentum.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.max_lr,
        total_steps=cfg.epochs * n_batches,
        div_factor=cfg.max_lr / cfg.lr,
        cycle_momentum=False,
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator().manual_seed(cfg.seed)
    pad_h = int(cfg.crop_padding * x.shape[2] / 32 + 0.5)
    pad_w = int(cfg.crop_padding * x.shape[3] / 32 + 0.5)

    bar = tqdm(range(cfg.epochs), desc="train ResNet-18", disable=not progress)
    for _ in bar:
        loss_sum = 0.0
        for idx in torch.tensor_split(torch.randperm(n, generator=generator), n_batches):
            xb = _augment(x[idx].to(device), pad_h, pad_w, cfg.flip, generator)
            yb = y[idx].to(device)
            with torch.autocast(device.type, enabled=use_amp):
                loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
        bar.set_postfix(loss=f"{loss_sum / n:.4f}")
    return model.eval()


# --------------------------------------------------------------------------- evaluation


def apply_batched(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 500,
    *,
    method: str = "forward",
    progress: bool = False,
) -> Tensor:
    """Run ``model.<method>`` over x (N, ...) in eval mode and no-grad; returns (N, ...) on CPU.

    Batches go to the model's device; the model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fn = getattr(model, method, None)
    if not callable(fn):
        raise ValueError(f"{type(model).__name__} has no {method}() method")
    device = _model_device(model)
    with eval_mode(model), torch.inference_mode():
        starts = range(0, x.shape[0], batch_size)
        outs = [
            fn(x[s : s + batch_size].to(device)).cpu()
            for s in tqdm(starts, desc=method, disable=not progress)
        ]
    return torch.cat(outs)


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500, progress: bool = False
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``model`` on images x (N, C, H, W), labels y (N,)."""
    check_images(x, y)
    logits = apply_batched(model, x, batch_size, progress=progress)
    return topk_accuracy(logits, y, (1, 5))


# --------------------------------------------------------------------------- oracle cache


def _plain(value: Any, what: str) -> Any:
    """JSON round trip: turns tuples into lists and rejects anything but plain types."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must hold only plain types (str, int, float, bool, None, lists, dicts): {err}"
        ) from err


def _oracle_meta(x: Tensor, num_classes: int, cfg: ClassifierConfig, meta: dict) -> dict:
    """Caller's meta plus what identifies the oracle: classes, image shape, data size, recipe."""
    full = _plain(meta, "meta")
    config = dataclasses.asdict(cfg)
    del config["device"]  # where it trained does not change which oracle it is
    derived = _plain(
        {
            "num_classes": num_classes,
            "image_shape": list(x.shape[1:]),
            "num_train": x.shape[0],
            "config": config,
        },
        "config",
    )
    for key in _DERIVED_META_KEYS:
        if key in full and full[key] != derived[key]:
            raise ValueError(
                f"meta[{key!r}] = {full[key]!r} disagrees with the data/config ({derived[key]!r})"
            )
    full.update(derived)
    return full


def _read_oracle_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types (pickle, zip, EOF) for a damaged file
        raise ValueError(
            f"cannot read oracle checkpoint {path} ({type(err).__name__}: {err}); the file is corrupt "
            "or not a checkpoint: delete it or pass overwrite=True to retrain"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != ORACLE_FORMAT:
        raise ValueError(
            f"{path} is not an nfpi oracle checkpoint (expected format {ORACLE_FORMAT!r}); "
            "delete it or pass overwrite=True to retrain"
        )
    return ckpt


def _save_atomic(obj: dict, path: Path) -> None:
    """torch.save beside ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def load_or_train_oracle(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    cfg: ClassifierConfig,
    path: str | os.PathLike,
    meta: dict,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> ResNet18Small:
    """The oracle ResNet-18 for real training data x (N, C, H, W), y (N,), cached at ``path``.

    ``meta`` names the data (e.g. ``{"dataset": "cifar10", "bits": 5}``); the number of
    classes, image shape, number of training images and the training config (except the
    device) are added to it. A cached file is loaded only if its metadata equals this
    description; otherwise a ValueError lists each differing key with both values, unless
    ``overwrite=True``, which retrains and replaces the file. A corrupt file also raises a
    ValueError (or is replaced when ``overwrite=True``). Returns the model in eval mode on
    ``cfg.device``.
    """
    check_images(x, y, num_classes)
    full_meta = _oracle_meta(x, num_classes, cfg, meta)
    path = Path(path)
    if path.exists() and not overwrite:
        ckpt = _read_oracle_checkpoint(path)
        cached = ckpt.get("meta", {})
        diffs = [
            f"{key}: cached {cached.get(key, '<missing>')!r} vs requested {full_meta.get(key, '<missing>')!r}"
            for key in sorted(set(cached) | set(full_meta))
            if cached.get(key) != full_meta.get(key)
        ]
        if diffs:
            raise ValueError(
                f"oracle checkpoint {path} was made for other data or settings ("
                + "; ".join(diffs)
                + "): use another path, or pass overwrite=True to retrain"
            )
        model = resnet18_small(num_classes, x.shape[1], cfg.width)
        model.load_state_dict(ckpt["state_dict"])
        logger.info("loaded cached oracle from %s", path)
        return model.to(pick_device(cfg.device)).eval()

    model = train_classifier(x, y, num_classes, cfg, progress=progress)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _save_atomic({"format": ORACLE_FORMAT, "meta": full_meta, "state_dict": state}, path)
    logger.info("trained oracle saved to %s", path)
    return model
