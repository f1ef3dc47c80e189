# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -papermill,-execution,-ExecuteTime
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 — Does NF augmentation help? A paired study with the power to tell
#
# The paper's last experiment (Sec. 5 "Extra Comparison (Image Augmentation)", Tables 5-6,
# Fig. 2; GLEM supplementary §1) enlarges a training set with **NF augmentations** (NFA): a
# training image x of class y is encoded, z = f(x), moved a random fraction beta of the way to
# a random same-class latent z' *only inside the span of the top-k principal axes P_y of class
# y's latents*, z_new = z + P_y P_y^T beta (z' - z), and decoded ([method
# §6.4](../docs/method.md#64-nf-augmentation-nfa), `nfpi.augment`).
# The paper reports +1.0 point for a 7M-parameter Swin trained from scratch on CIFAR-10 with
# NFA and no other augmentation (Table 5), +0.1 to +0.2 on ImageNet with a pretrained EVA02,
# and claims that mixing in the principal subspace beats "simply adding noise in the latent
# space". GLEM Table 4 shows a ResNet-18's accuracy growing with the number of generated
# training images per class.
#
# **Design (`nfpi.experiments.downstream`).** A seed is one paired replicate: `per_class` training images
# per class drawn with that seed, a flow trained on exactly those images (so NFA brings in no
# image the classifier could not have seen, as in the paper, where flow and classifier share
# the training set), validation images from the rest of the training split, and the same
# classifier initialisation and batches in every arm. The arms differ only in their extra
# images, so each arm's effect is its per-seed difference to the baseline, with a Student-t
# 95 % interval. Every arm trains on the same number of image presentations (equal budget).
#
# **CPU default.** scikit-learn's 8x8 digits, 20 training images per class, the data tripled
# (two extra images per original, the paper's protocol), a ResNet-18 of width 8 (0.18M
# parameters, GLEM §5.1 one-cycle SGD, 30 epochs) as the data-starved but capable classifier,
# random shifts of up to one pixel as the standard augmentation (no flips: they change digits),
# 10 seeds. The EVA02 protocol runs as its own arms (a small EVA02 from scratch, 2x2 patches);
# `protocol = "paper"` uses the pretrained EVA02-base when its weights are in the local cache.

# %% tags=["parameters"]
flow_config = "../configs/digits_cpu.yaml"  # the flow trained on each seed's training images ...
flow_overrides = {"epochs": 60}  # ... 60 epochs on 200 images: the steps of 10 epochs on all 1,295
per_class = 20  # training images per class (the classifier's and the flow's)
val_per_class = 50  # validation images per class, from the other training images
copies = 2  # extra images per original: the data tripled
epochs = 30  # classifier epochs at (1 + copies) x N images; other sizes get the same budget
width = 8  # ResNet-18 width (stage-1 channels)
shift = 4  # standard augmentation: random crop after padding by shift/32 of the image (1 px at 8x8)
seeds = list(range(10))
k = 8  # NFA: principal axes per class
law = "uniform"  # NFA: beta ~ U[0, beta_max]; "beta": beta_max * Beta(beta_a, beta_a)
beta_max = 0.5
beta_a = 0.4
alternative_k = [2, 19]  # NFA with other k; 19, per_class - 1, spans all: plain latent mixup
generated_copies = [1, 2, 5, 10]  # GLEM Table 4: classifiers on m x per_class generated images per class
shipped = "digits"  # also NFA by this shipped flow (trained on all 1,295 training images); None: skip
protocol = "cpu"  # EVA02 arms: "cpu" (small, from scratch), "paper" (pretrained EVA02-base, cached), None
finetune_overrides = {"model_kwargs": {"patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4}}
runs = "../runs"
figures = "../figures"
results = "../results"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from nfpi import plots, repro
from nfpi.augment import AugmentConfig, LatentNoise, NFAugmenter, PixelMixup
from nfpi.config import TrainConfig
from nfpi.experiments import downstream, finetune

torch.manual_seed(0)
table_path = f"{results}/06_nf_augmentation.csv"
recorded = repro.read_recorded(table_path)
flow_base = TrainConfig.from_yaml(flow_config, **flow_overrides)
nfa_cfg = AugmentConfig(k=k, law=law, beta_max=beta_max, beta_a=beta_a, copies=copies)
study_cfg = downstream.StudyConfig.resnet(
    width, shift, epochs, per_class=per_class, val_per_class=val_per_class, copies=copies
)
ft_presets = {"cpu": finetune.FinetuneConfig.cpu, "paper": finetune.FinetuneConfig.paper}
transformer = ft_presets[protocol](**finetune_overrides) if protocol else None
arms = downstream.default_arms(alternative_k, generated_copies, shipped, transformer, nfa_cfg)
print(finetune.weights_status())

# %%
# NBVAL_CHECK_OUTPUT
print(f"flow: {flow_config} with {flow_overrides}; {per_class} training images per class, seeds {seeds}")
print(f"arms: {list(arms)}")

# %% [markdown]
# ## Fig. 2: NFA and its alternatives on seed 0's images
#
# Per row a training image, then two variants by each augmenter: NFA (top-k subspace), latent
# Gaussian noise moving latents as far as NFA does (in mean square), and within-class pixel
# mixup with NFA's law of beta.

# %%
rep = downstream.replicate(flow_base, study_cfg, seeds[0], runs)
ctx = rep.ctx
nfa = NFAugmenter.from_arrays(ctx.flow, ctx.train, ctx.bits, nfa_cfg, ctx.prior)
noise = LatentNoise.matched(nfa, ctx.train, ctx.bits, seed=ctx.seed)
augmenters = {"NFA": nfa, "noise": noise, "mixup": PixelMixup(ctx.train, ctx.bits, nfa_cfg)}
fig = plots.augmentation_grid(augmenters, ctx.train, ctx.bits, seed=0, path=f"{figures}/06_nfa_grid.png")
plt.show()
print(
    f"seed 0 flow: test NF accuracy {rep.flow_metrics['acc_top1']:.1f} %, {rep.flow_metrics['test_bpd']:.2f} "
    f"bits/dim; k={k} axes hold {100 * nfa.pca.explained.mean():.0f} % of the class latent variance; "
    f"matched latent noise sigma = {noise.sigma:.3f}"
)

# %% [markdown]
# ## Every arm, every seed
#
# One row per arm and seed in `results/06_nf_augmentation.csv` (test and validation top-1,
# images trained on, epochs, the seed's flow).

# %%
table = downstream.study(flow_base, arms, study_cfg, seeds, runs, progress)
table.insert(0, "code", repro.code_fingerprint())
Path(results).mkdir(parents=True, exist_ok=True)
table.to_csv(table_path, index=False)
summary = repro.seed_summary(table, ["top1", "val_top1"], baseline="baseline")
resnet = [name for name, arm in arms.items() if arm.transformer is None]

# %%
# NBVAL_CHECK_OUTPUT
print(table.groupby("setting", sort=False)["seed"].apply(list).to_string())

# %% [markdown]
# ## The paper's four settings and the alternatives (ResNet-18, equal budget)
#
# Mean ± std of test top-1 over seeds, and the paired difference to the baseline with the
# half-width of its 95 % interval (`top1_diff_ci95`); an interval that excludes 0 is an
# effect this study resolves.

# %%
columns = ["seeds", "top1_mean", "top1_std", "top1_diff_mean", "top1_diff_ci95", "val_top1_mean"]
main = [name for name in resnet if not name.startswith("samples")]
print(summary.loc[main, columns].round(2).to_string())
fig = plots.paired_differences(summary.loc[main], path=f"{figures}/06_paired_differences.png")
plt.show()

# %% [markdown]
# The paper's claims are about NFA against the others, so here are the same arms as paired
# differences to NFA (positive: better than NFA), and NFA + SA against SA alone.

# %%
print(
    repro.seed_summary(table[table["setting"].isin(main)], ["top1"], baseline="nfa")[columns[:5]]
    .round(2)
    .to_string()
)
with_sa = table[table["setting"].isin(["sa", "nfa+sa"])]
print(repro.seed_summary(with_sa, ["top1"], baseline="sa")[columns[:5]].round(2).to_string())

# %% [markdown]
# ## GLEM Table 4: a classifier trained on generated images only
#
# `m x` trains the same ResNet on m x `per_class` images per class sampled from the seed's class
# Gaussians (temperature 1) and decoded, nothing else, at the same budget; the difference is to
# the baseline on the real images (GLEM's CIFAR-10 row: 81.02 at 1x to 87.14 at 100x).

# %%
generated = ["baseline"] + [name for name in resnet if name.startswith("samples")]
print(summary.loc[generated, columns].round(2).to_string())

# %% [markdown]
# ## The EVA02 protocol
#
# The same data and NFA copies through `nfpi.experiments.finetune` (the protocol of notebook 06's earlier
# version: AdamW, SGDR, clipping at 1), baseline and NFA; the difference is to the EVA02
# baseline. No validation column: this protocol has no choice to make.

# %%
if transformer is not None:
    eva = table[table["setting"].str.startswith("eva02")]
    print(repro.seed_summary(eva, ["top1"], baseline="eva02_baseline").round(2).to_string())

# %% [markdown]
# Checked against `results/06_nf_augmentation.csv` as committed: each arm's mean over seeds
# within a tolerance derived from the recorded seed spread (floor: two test images).

# %%
one_image = 100 / len(rep.test)
repro.expect_recorded(table, recorded, {"top1": 2 * one_image})

# %% [markdown]
# ## Reading
#
# Written from the committed run (10 seeds, `results/06_nf_augmentation.csv`); the README
# repeats it next to the paper's numbers. "±" after a difference is the half-width of its
# 95 % interval.
#
# * **NFA does not clearly help the ResNet here.** NFA against the baseline: +0.7 ± 0.9 points
#   (test top-1), an interval that covers both 0 and the +1.0 point the paper reports for a
#   Swin on CIFAR-10 (Table 5). An earlier replication of the same 10 seeds on another
#   processor (commit `cff20f7`) gave -1.0 ± 1.4: another machine is another draw of every
#   classifier, and the two agree only that the effect here is within about ± 1.5 points. NFA
#   by the shipped flow, trained on all 1,295 training images, is no better than by the flow of
#   the 200 (+0.4 ± 1.1 over it). Its knobs move little: k = 2 or 19 (the whole span: plain
#   latent mixup) and the Beta law are all within ± 1 point of NFA, with intervals that cover 0.
# * **Latent noise is ahead of NFA** (+1.7 ± 1.3, paired) at the same mean squared latent
#   displacement, and pixel mixup ties with it (+0.6 ± 1.4): the paper's claim that mixing in
#   the principal subspace is better than noise in the latent space is not supported here
#   (read with the other claims and Holm-corrected, the latent-noise lead is not shown either,
#   p = 0.09; docs/results.md).
# * **Standard augmentation is the one clear gain**: random one-pixel shifts give +4.4 ± 1.7.
#   NFA on top of them adds nothing (NFA + SA against SA: -0.8 ± 1.6).
# * **The EVA02 protocol** (a from-scratch 0.2M-parameter transformer, 13 points below the
#   ResNet): NFA +0.9 ± 3.9, no effect resolved (the earlier replication: +3.8 ± 3.5).
# * **GLEM Table 4's direction holds**: a ResNet trained on generated images alone improves
#   with their number (74.6 % at 1x, 82.5 % at 2x, 83.4 % at 5x, 85.8 % at 10x; GLEM's
#   CIFAR-10 row: 81.0 to 87.1 from 1x to 100x), with diminishing returns, and stays 5 to 16
#   points below the 20 real images per class: a flow on 200 images is a weak generator.
#
# What this cannot say: anything about CIFAR-10 with a Swin or a pretrained EVA02 on ImageNet
# (the paper's +0.1 to +0.2 points there are far below this study's resolution of about ± 1.5
# points). The resolution is limited by digits' 359 test images (one image is 0.28 points) and
# by the spread of classifiers trained on 200 images; the paired differences' standard
# deviations are 1.6-2.5 points, so an interval of ± 0.5 points would need 40 to 100 seeds here,
# or a larger test set (MNIST's 10,000 images: `flow_config = "../configs/mnist_cpu.yaml"`, with
# a ResNet on 28x28 images, at many times the cost).
