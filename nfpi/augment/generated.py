"""NFA datasets generated offline (docs/method.md §6; paper Sec. 5, Tables 5-6): the training set
enlarged with augmented copies by :func:`generate_dataset`, written resumably as an npz file
(docs/method.md §9), its input
:func:`generation_fingerprint`, and :func:`load_generated`. The augmentation itself is
:class:`nfpi.augment.NFAugmenter` (:mod:`nfpi.augment.nfa`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._progress import tqdm
from .._util import atomic_write, derive_seed
from ..data import ImageArrays, bin_centres, to_uint8
from .nfa import NFAugmenter

__all__ = ["generate_dataset", "generation_fingerprint", "load_generated"]


def generation_fingerprint(
    augmenter: NFAugmenter, arrays: ImageArrays, copies: int, bits: int, batch_size: int, seed: int
) -> str:
    """SHA-256 (hex) of everything that determines :func:`generate_dataset`'s output: flow
    weights, PCA, partner source, config, images, labels, copies, bits, batch size, seed."""
    h = hashlib.sha256()

    def add(t: Tensor) -> None:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    for name, value in augmenter.flow.state_dict().items():
        h.update(name.encode())
        add(value)
    for t in (augmenter.pca.axes, arrays.x, arrays.y):
        add(t)
    source = (
        augmenter._bank.tensors()
        if augmenter._bank is not None
        else (augmenter.prior.means, augmenter.prior.variances)
    )
    for t in source:
        add(t)
    h.update(
        json.dumps(
            {
                "cfg": dataclasses.asdict(augmenter.cfg),
                "copies": copies,
                "bits": bits,
                "batch_size": batch_size,
                "seed": seed,
                "classes": list(arrays.classes),
            }
        ).encode()
    )
    return h.hexdigest()


def _read_fingerprint(path: Path) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return str(npz["fingerprint"]) if "fingerprint" in npz.files else None
    except (OSError, ValueError, EOFError):
        return None


def generate_dataset(
    augmenter: NFAugmenter,
    arrays: ImageArrays,
    copies: int | None,
    out_path: str | os.PathLike[str],
    bits: int,
    batch_size: int = 256,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``copies`` NFA variants of every image of ``arrays`` to ``out_path`` (npz, docs/method.md §9).

    The file holds ``x`` uint8 (copies * N, H, W, C) (variants quantised to ``bits``, stored
    as 8-bit pixels like the source files), ``y`` (copies * N,), ``classes``, ``source`` (index
    of each variant's original in ``arrays``) and ``fingerprint``; copy j of image i is row
    j * N + i. Inputs are the images quantised to ``bits`` with the +0.5 dequantisation.

    Resumable: work is split into chunks of ``batch_size`` images of one copy; each chunk is
    written atomically to ``<out_path>.parts/`` and skipped when it exists, and every chunk
    draws from its own seeded generator, so an interrupted run, rerun, gives the same file as
    an uninterrupted one. The final file is written atomically, then the chunks are removed;
    if it already exists with the same fingerprint it is returned at once. ``copies=None``
    uses ``augmenter.cfg.copies``. Returns the path.
    """
    copies = _check_generation(augmenter, arrays, copies, batch_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = generation_fingerprint(augmenter, arrays, copies, bits, batch_size, seed)
    if out_path.exists():
        if _read_fingerprint(out_path) == fingerprint:
            return out_path
        raise FileExistsError(
            f"{out_path} exists but was generated from other inputs (flow, images or "
            "settings); delete it or choose another out_path"
        )
    parts = _parts_dir(out_path, fingerprint)
    files = _write_chunks(augmenter, arrays, copies, parts, bits, batch_size, progress, seed)

    n = len(arrays)
    x = np.concatenate([np.load(f) for f in files]).transpose(0, 2, 3, 1)
    source = np.tile(np.arange(n, dtype=np.int64), copies)
    y = arrays.y.numpy()[source]
    atomic_write(
        out_path,
        lambda f: np.savez_compressed(
            f,
            x=np.ascontiguousarray(x),
            y=y,
            classes=np.array(arrays.classes),
            source=source,
            fingerprint=np.array(fingerprint),
        ),
    )
    shutil.rmtree(parts)
    return out_path


def _check_generation(
    augmenter: NFAugmenter, arrays: ImageArrays, copies: int | None, batch_size: int
) -> int:
    """:func:`generate_dataset`'s argument checks; returns the number of copies."""
    copies = augmenter.cfg.copies if copies is None else copies
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an integer >= 1; got {copies!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if tuple(arrays.shape) != augmenter.in_shape:
        raise ValueError(
            f"images have shape {arrays.shape} but the flow expects {augmenter.in_shape}; "
            "pad/crop them as in the flow's training config (TrainConfig.pad)"
        )
    if arrays.num_classes != augmenter.num_classes:
        raise ValueError(
            f"the images have {arrays.num_classes} classes but the augmenter {augmenter.num_classes}"
        )
    return copies


def _parts_dir(out_path: Path, fingerprint: str) -> Path:
    """``<out_path>.parts/`` with its fingerprint manifest; chunks of other inputs are an error."""
    parts = out_path.with_name(out_path.name + ".parts")
    parts.mkdir(exist_ok=True)
    manifest = parts / "fingerprint.txt"
    if manifest.exists() and manifest.read_text() != fingerprint:
        raise FileExistsError(
            f"{parts} holds chunks of a different generation (other inputs or settings); "
            "delete that directory to start over"
        )
    atomic_write(manifest, fingerprint.encode())
    return parts


def _write_chunks(
    augmenter: NFAugmenter,
    arrays: ImageArrays,
    copies: int,
    parts: Path,
    bits: int,
    batch_size: int,
    progress: bool,
    seed: int,
) -> list[Path]:
    """Write the missing chunk files of ``parts`` (each atomically, from its own seed); all chunk paths."""
    n = len(arrays)
    starts = list(range(0, n, batch_size))
    chunks = [s for _ in range(copies) for s in starts]  # chunk c covers copy c // len(starts)
    files = [parts / f"chunk_{c:06d}.npy" for c in range(len(chunks))]
    done = sum(f.exists() for f in files)
    bar = tqdm(total=len(chunks), initial=done, desc=f"NFA x{copies}", unit="chunk", disable=not progress)
    for c, (s, file) in enumerate(zip(chunks, files)):
        if file.exists():
            continue
        x = bin_centres(arrays.x[s : s + batch_size], bits)
        gen = torch.Generator().manual_seed(derive_seed(seed, c))
        pixels = to_uint8(augmenter.augment(x, arrays.y[s : s + batch_size], gen), bits).numpy()
        atomic_write(file, lambda f, a=pixels: np.save(f, a))
        bar.update(1)
    bar.close()
    return files


def load_generated(path: str | os.PathLike[str], name: str = "") -> ImageArrays:
    """The images of a :func:`generate_dataset` file as :class:`nfpi.data.ImageArrays`."""
    with np.load(path, allow_pickle=False) as npz:
        x, y, classes = npz["x"], npz["y"], npz["classes"]
    return ImageArrays(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
        torch.from_numpy(y.astype(np.int64)),
        tuple(str(c) for c in classes),
        name,
    )
