"""The images (docs/method.md §4, §9): the in-memory container, the dataset registry and storage, subset
and split rules, preprocessing into flow inputs, and GLEM's class codes.

- :mod:`nfpi.data.arrays`: :class:`ImageArrays` (uint8 images, labels, class names);
- :mod:`nfpi.data.datasets`: the registry :data:`DATASETS`, npz / image-folder storage, loading
  and download. A new dataset goes here;
- :mod:`nfpi.data.download`: ``nfpi data fetch | list | check``: fetch the missing files,
  verified against the SHA-256 sums committed in :mod:`nfpi.data.checksums`;
- :mod:`nfpi.data.splits`: every subset and split rule (class-balanced subsets, stratified
  splits: train / validation, D_NF / D_G, digits train / test);
- :mod:`nfpi.data.preprocess`: quantisation, dequantisation, bits/dim, the training loader;
- :mod:`nfpi.data.codes`: GLEM's CE / CEGLEM class codes appended to the images.

Example:
    >>> import torch
    >>> digits = load("digits", "train")
    >>> len(digits), digits.shape, digits.num_classes
    (1438, (1, 8, 8), 10)
    >>> float(bits_per_dim(torch.tensor(0.0), dim=64, bits=5))
    4.0
"""

from .arrays import DatasetFormatError, ImageArrays
from .checksums import ChecksumError
from .codes import ClassCodes, CodeConfig
from .datasets import (
    DATASETS,
    DIGITS_SPLIT_SEED,
    REPO_ROOT,
    DatasetInfo,
    check_dataset,
    data_dir,
    info,
    load,
    registered,
)
from .download import FetchError, fetch
from .preprocess import (
    FlowDataset,
    bin_centres,
    bits_per_dim,
    dequantize,
    make_loader,
    quantize,
    to_uint8,
    tsne_embedding,
)
from .splits import class_balanced_indices, class_subset, split_arrays, stratified_split

__all__ = [
    "DATASETS",
    "DIGITS_SPLIT_SEED",
    "REPO_ROOT",
    "ChecksumError",
    "ClassCodes",
    "CodeConfig",
    "DatasetFormatError",
    "DatasetInfo",
    "FetchError",
    "FlowDataset",
    "ImageArrays",
    "bin_centres",
    "bits_per_dim",
    "check_dataset",
    "class_balanced_indices",
    "class_subset",
    "data_dir",
    "dequantize",
    "fetch",
    "info",
    "load",
    "make_loader",
    "quantize",
    "registered",
    "split_arrays",
    "stratified_split",
    "to_uint8",
    "tsne_embedding",
]
