"""How good a flow and its samples are (docs/method.md §6-§7; GLEM paper §5.1): every metric lives here.

- :mod:`nfpi.evaluation.accuracy`: top-k accuracy of class scores (NF-Acc, CNN-Acc);
- :mod:`nfpi.evaluation.flow`: the held-out metrics of a flow from its per-image results
  (test NLL, bits/dim, NF accuracy). A new per-image metric of a flow goes here;
- :mod:`nfpi.evaluation.classifiers`: the ResNet-18 oracle and the classifiers of CNN-Acc;
- :mod:`nfpi.evaluation.metrics`: metrics of generated images (FID, Coverage, Label
  Reliability, CNN-Acc). A new metric of generated data goes here.

Example:
    >>> import torch
    >>> topk_accuracy(torch.eye(4), torch.tensor([0, 1, 1, 3]), ks=(1, 4))
    {'top1': 75.0, 'top4': 100.0}
"""

from .accuracy import topk_accuracy
from .classifiers import (
    ClassifierConfig,
    ResNet18Small,
    apply_batched,
    check_images,
    evaluate,
    load_or_train_oracle,
    resnet18_small,
    train_classifier,
)
from .flow import EVAL_NOISE_SEED, evaluate_flow
from .metrics import cnn_accuracy, coverage, extract_features, fid, generated_metrics, label_reliability

__all__ = [
    "EVAL_NOISE_SEED",
    "ClassifierConfig",
    "ResNet18Small",
    "apply_batched",
    "check_images",
    "cnn_accuracy",
    "coverage",
    "evaluate",
    "evaluate_flow",
    "extract_features",
    "fid",
    "generated_metrics",
    "label_reliability",
    "load_or_train_oracle",
    "resnet18_small",
    "topk_accuracy",
    "train_classifier",
]
