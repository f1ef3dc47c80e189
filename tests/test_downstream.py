"""Tests of nfpi.experiments.downstream (the NF augmentation study): the replicate's data split,
the enlarged training sets, the arms' options, equal budgets and the paired, repeatable study."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from nfpi import data
from nfpi.augment import AugmentConfig
from nfpi.data import class_subset
from nfpi.evaluation import ClassifierConfig
from nfpi.experiments import downstream
from nfpi.train import load_data

pytestmark = pytest.mark.usefixtures("single_thread")

STUDY = downstream.StudyConfig(
    per_class=10,
    val_per_class=5,
    copies=1,
    epochs=2,
    classifier=ClassifierConfig(width=4, epochs=2, flip=False, crop_padding=4, batch_size=50),
)


def test_replicate_data_is_a_seeded_disjoint_class_balanced_split():
    cfg = tiny_config()
    run_cfg, train, val, test = downstream.replicate_data(cfg, STUDY, seed=3)
    assert (run_cfg.per_class, run_cfg.seed, run_cfg.val_fraction) == (10, 3, 0.0)
    assert torch.bincount(train.y).tolist() == [10] * 10
    assert torch.bincount(val.y).tolist() == [5] * 10
    assert len(test) == 359
    pixels = {bytes(x.numpy()) for x in train.x}
    assert not any(
        bytes(x.numpy()) in pixels for x in val.x
    )  # no image in both (digits has no duplicates here)
    again = downstream.replicate_data(cfg, STUDY, seed=3)[1]
    other = downstream.replicate_data(cfg, STUDY, seed=4)[1]
    assert torch.equal(again.x, train.x) and not torch.equal(other.x, train.x)


def test_replicate_data_trains_on_the_images_of_the_flow_config():
    cfg = tiny_config()
    run_cfg, train, val, _ = downstream.replicate_data(cfg, STUDY, seed=3)
    assert torch.equal(load_data(run_cfg)[0].x, train.x)  # the flow and the classifier share them
    full = data.load("digits", "train")
    chosen, rest = class_subset(full, 10, 3)
    assert torch.equal(chosen.x, train.x) and len(chosen) + len(rest) == len(full)
    assert torch.equal(torch.bincount(rest.y) + 10, torch.bincount(full.y))


def test_study_config_resnet():
    cfg = downstream.StudyConfig.resnet(width=6, shift=2, epochs=7, per_class=5, copies=3)
    assert (cfg.per_class, cfg.copies, cfg.epochs, cfg.classifier.epochs) == (5, 3, 7, 7)
    assert (cfg.classifier.width, cfg.classifier.crop_padding, cfg.classifier.flip) == (6, 2, False)


def test_replicate_data_errors():
    with pytest.raises(ValueError, match="val_per_class"):
        downstream.replicate_data(tiny_config(), downstream.StudyConfig(per_class=100, val_per_class=90), 0)
    with pytest.raises(ValueError, match="pad"):
        downstream.replicate_data(tiny_config(pad=2), STUDY, 0)


class _Shift:
    """A stand-in augmenter: adds 0.25 times the copy's call count, so rows can be traced."""

    def __init__(self) -> None:
        self.calls = 0

    def augment(self, x, y, generator=None):
        self.calls += 1
        return (x + 0.25 * self.calls).clamp(-1, 1)


def test_enlarge_orders_copies_and_quantises():
    x = torch.full((6, 1, 2, 2), 64, dtype=torch.uint8)
    arrays = data.ImageArrays(x, torch.tensor([0, 1, 2, 0, 1, 2]), tuple("abc"))
    out = downstream.enlarge(_Shift(), arrays, 8, copies=2, seed=0, batch_size=6)
    assert out.x.dtype == torch.uint8 and len(out) == 12
    assert torch.equal(out.y, arrays.y.repeat(2))  # copy j of image i is row j N + i
    assert (out.x[:6] < out.x[6:]).all()  # the second copy came from the second call


def test_arm_errors():
    with pytest.raises(ValueError, match="copies"):
        downstream.Arm(copies=0)
    with pytest.raises(ValueError, match="source"):
        downstream.Arm(originals=False)
    with pytest.raises(ValueError, match="originals"):
        downstream.Arm(
            downstream.Samples(), originals=False, transformer=downstream.finetune.FinetuneConfig()
        )
    with pytest.raises(ValueError, match="per_class"):
        downstream.StudyConfig(per_class=0)


def test_default_arms_compose_the_alternatives():
    arms = downstream.default_arms(k=(2, 8), copies=(1, 3), nfa=AugmentConfig(k=8))
    assert list(arms)[:4] == ["baseline", "sa", "nfa", "nfa+sa"]
    assert arms["nfa_k2"].source.cfg.k == 2 and "nfa_k8" not in arms
    assert arms["nfa_other_law"].source.cfg.law == "beta"
    assert arms["latent_noise"].source.like.k == 8
    assert arms["samples_3x"] == downstream.Arm(downstream.Samples(), copies=3, originals=False)
    assert not any(name.startswith("eva02") for name in arms)


def test_study_is_paired_repeatable_and_at_equal_budget(tmp_path):
    arms = {
        "baseline": downstream.Arm(),
        "again": downstream.Arm(),
        "nfa": downstream.Arm(downstream.NFA(AugmentConfig(k=2))),
        "samples 3x": downstream.Arm(downstream.Samples(), copies=3, originals=False),
    }
    table = downstream.study(tiny_config(), arms, STUDY, [0, 1], tmp_path, progress=False)
    assert len(table) == 8 and table.groupby("setting")["seed"].apply(sorted).tolist() == [[0, 1]] * 4
    rows = table.set_index(["setting", "seed"])
    # Identical arms in one replicate give identical results: the only differences are the arms'.
    for col in ("top1", "top5", "val_top1"):
        assert rows.loc[("baseline", 0), col] == rows.loc[("again", 0), col]
    # Equal budget: epochs x images is the same for every ResNet arm.
    assert rows.loc[("baseline", 0), "n_train"] == 200 and rows.loc[("samples 3x", 0), "n_train"] == 300
    budget = (rows["epochs"] * rows["n_train"]).unique()
    assert len(budget) <= 2 and abs(budget.max() - budget.min()) <= 150  # rounding of epochs
    assert table["flow_nf_top1"].between(0, 100).all() and (table["flow_run"].nunique() == 2)
    # A rerun reuses the seeds' flows and reproduces every number.
    rerun = downstream.study(tiny_config(), arms, STUDY, [0, 1], tmp_path, progress=False)
    assert rerun[["top1", "val_top1"]].equals(table[["top1", "val_top1"]])
