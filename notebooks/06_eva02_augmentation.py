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
# # 06 — NF augmentation (NFA) for a transformer: EVA02 protocol at CPU scale
#
# The paper's last experiment (Sec. 5 "Extra Comparison (Image Augmentation)", Tables 5-6,
# Fig. 2; GLEM supplementary §1) enlarges a training set with **NF augmentations**: a training
# image x of class y is encoded, z = f(x), its latent is mixed with a random same-class latent
# z' *only inside the span of the top-k principal axes of class y's latents*,
# z_new = z + P_y P_y^T beta (z' - z), and decoded, x_new = f^-1(z_new) (SPEC §6,
# `nfpi.augment`). A pretrained EVA02 is then fine-tuned on ImageNet under four settings —
# baseline, standard augmentation (SA: RandAugment + RandomErasing), NFA, NFA + SA — with SGD,
# clipping at 1, lr 1e-5 annealed per epoch by SGDR, batch 64, 3 epochs, data tripled.
# The paper reports top-1 90.896 (baseline), 90.986 (SA), 91.031 (NFA), 91.082 (NFA + SA).
#
# **CPU default.** No ImageNet, no GPU and no pretrained EVA02 weights here, so the same
# comparison runs at toy scale: the shipped full-MNIST flow `mnist` (`nfpi.pretrained`; notebook
# 07), a small MNIST training subset, and a 0.2M-parameter EVA02
# (timm `eva02_tiny_patch14_224` shrunk, 7x7 patches) trained **from scratch** with AdamW (at
# lr 1e-5 a from-scratch model does not learn), three seeds per setting. The paper's protocol
# is one parameter away (`protocol = "paper"`): it loads the pretrained
# `eva02_base_patch14_448.mim_in22k_ft_in22k_in1k` weights only if they are already in the
# local Hugging Face cache.

# %% tags=["parameters"]
flow = "mnist"  # the shipped flow (nfpi.pretrained, checkpoints/); None: train flow_config instead
flow_config = "../configs/mnist_cpu.yaml"  # with flow = None: the flow's config ...
flow_overrides = {}  # ... and its overrides, e.g. {"per_class": 20, "epochs": 100}
runs = "../runs"  # a trained flow goes to {runs}/<config>-<key>; NFA copies to {runs}/06_nfa/
protocol = "cpu"  # "cpu": small EVA02 from scratch; "paper": pretrained EVA02-base 448 (cached weights, GPU)
finetune_overrides = {}  # FinetuneConfig fields, e.g. {"epochs": 3, "lr": 1e-3}
per_class = 20  # classifier training images per class (a subset of the flow's training set)
test_per_class = 100  # test images per class
seeds = [0, 1, 2]
settings = ["baseline", "sa", "nfa", "nfa+sa"]
k = 8  # principal axes per class spanning the mixing subspace
law = "uniform"  # beta ~ U[0, beta_max]; "beta": beta_max * Beta(beta_a, beta_a)
beta_max = 0.5
beta_a = 0.4
grid_variants = 3  # Fig. 2: augmented variants shown per original
figures = "../figures"
results = "../results"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from nfpi import finetune, plots, pretrained, repro
from nfpi.augment import AugmentConfig, NFAugmenter
from nfpi.experiments import train_settings
from nfpi.splits import load_data
from nfpi.train import TrainConfig, load_checkpoint

torch.manual_seed(0)
table_path = f"{results}/06_eva02_augmentation.csv"
recorded = repro.read_recorded(table_path)
print(finetune.weights_status())
ft_presets = {"cpu": finetune.FinetuneConfig.cpu, "paper": finetune.FinetuneConfig.paper}
ft_cfg = ft_presets[protocol](**finetune_overrides)
aug_cfg = AugmentConfig(k=k, law=law, beta_max=beta_max, beta_a=beta_a, copies=ft_cfg.copies - 1)
print(
    f"protocol {protocol!r}: {ft_cfg.model} (pretrained={ft_cfg.pretrained}), "
    f"{ft_cfg.optimizer} lr={ft_cfg.lr:g}, "
    f"clip={ft_cfg.clip}, {ft_cfg.epochs} epochs, batch {ft_cfg.batch_size}, data x{ft_cfg.copies}"
)

# %% [markdown]
# ## The flow
#
# The shipped NFPI flow `flow` (full MNIST, SPEC §4 protocol: data init, one FPI solve after
# epoch 0; its file is checked against its SHA-256 before loading). With `flow = None` the flow
# of `flow_config` is trained here instead, or reused from its run directory (`mnist_cpu.yaml`:
# 15 epochs on 3,000 MNIST images, about 3-7 minutes on a shared CPU).

# %%
if flow is None:
    flow_base = TrainConfig.from_yaml(flow_config, **flow_overrides)
    trained = train_settings(flow_base, {"fpi": {}}, [flow_base.seed], runs, Path(flow_config).stem, progress)
    flow_name, flow_metrics = Path(trained.loc[0, "run_dir"]).name, trained.loc[0]
    model, prior, flow_cfg = load_checkpoint(trained.loc[0, "run_dir"])
else:
    flow_name, flow_metrics = flow, pretrained.manifest()[flow]
    model, prior, flow_cfg = pretrained.load(flow)
train_set, test_set = load_data(
    flow_cfg.replace(per_class=per_class, test_per_class=test_per_class, val_fraction=0.0)
)
bits = flow_cfg.bits
augmenter = NFAugmenter.from_arrays(model, train_set, bits, aug_cfg, prior)

# %%
# NBVAL_CHECK_OUTPUT
print(
    f"flow {flow_name}: {flow_cfg.dataset}, {bits}-bit, {flow_cfg.epochs} epochs, "
    f"per class: {flow_cfg.per_class or 'all'}"
)
print(
    f"classifier data: {len(train_set)} training images ({per_class} per class), {len(test_set)} test images"
)

# %%
print(f"flow: test bits/dim {flow_metrics['test_bpd']:.3f}, NF accuracy {flow_metrics['acc_top1']:.2f}%")
print(
    f"PCA: k={k} axes per class hold {100 * augmenter.pca.explained.mean():.1f}% "
    "of the class latent variance "
    f"(min {100 * augmenter.pca.explained.min():.1f}%)"
)

# %% [markdown]
# ## Fig. 2: originals and NF-augmented variants
#
# One training image per class (left) and `grid_variants` variants (right): each is the
# image's latent moved a random fraction beta <= beta_max of the way to a random same-class
# training latent, inside the top-k principal subspace of the class, then decoded.

# %%
fig = plots.nfa_grid(
    augmenter, train_set, bits, variants=grid_variants, seed=0, path=f"{figures}/06_nfa_grid.png"
)
plt.show()

# %% [markdown]
# ## Baseline, SA, NFA, NFA + SA
#
# Every setting trains on `copies` times the training subset (the paper's "data tripled"):
# baseline and SA repeat the originals, NFA and NFA + SA add `copies - 1` NF-augmented copies
# (generated per seed, resumably, into `runs/06_nfa/`). SA applies timm's RandAugment and
# RandomErasing on the fly. Accuracies are on the test subset; one CSV row per setting x seed.

# %%
table = finetune.compare(
    model,
    prior,
    train_set,
    test_set,
    bits,
    ft_cfg,
    aug_cfg,
    seeds,
    out_dir=Path(runs) / "06_nfa",
    settings=settings,
    progress=progress,
)
table.insert(0, "flow_run", flow_name)
table.insert(1, "flow_per_class", flow_cfg.per_class)
table.insert(2, "code", repro.code_fingerprint())
Path(results).mkdir(parents=True, exist_ok=True)
table.drop(columns=["seconds"]).to_csv(table_path, index=False)  # wall times change on every run

# %%
print(table.pivot_table(index="seed", columns="setting", values="top1")[settings].round(1).to_string())
print()
print(repro.seed_summary(table, ["top1", "top5"], baseline="baseline").round(1).to_string())

# %% [markdown]
# Checked against `results/06_eva02_augmentation.csv` as committed: each setting's mean over
# seeds within a tolerance derived from the recorded seed spread (floor: two test images).

# %%
one_image = 100 / len(test_set)
repro.expect_recorded(table, recorded, {"top1": 2 * one_image, "top5": 2 * one_image})

# %%
# NBVAL_CHECK_OUTPUT
print(table.groupby("setting", sort=False)["seed"].apply(list).to_string())

# %%
fig = plots.augmentation_bars(table, order=settings, path=f"{figures}/06_augmentation_bars.png")
plt.show()

# %% [markdown]
# ## Reading
#
# *Does NFA help at this scale?* Not demonstrably. The paired differences to the baseline above
# (`top1_diff_mean` ± `top1_diff_std` over the seeds, `top1_diff_ci95` the half-width of the 95 %
# interval) are positive for every seed with the full-MNIST flow, but three seeds leave an
# interval that includes zero; with earlier flows of the same pipeline (3,000-image MNIST flows,
# and a flow trained only on the classifier's own 200 images) the mean NFA gain ranged between
# about -1 and +3.5 points and the per-seed gains changed sign. Three seeds cannot resolve
# effects of the size the paper reports (+0.1 to +0.2 points on ImageNet, up to +1 point on
# CIFAR with a Swin); issue 14 asks for an experiment with that power.
#
# Standard augmentation (timm's DeiT-style RandAugment m9 + RandomErasing 0.25, as in the
# paper's SA) costs ~20 points here: a 0.2M-parameter transformer trained from scratch for 10
# short epochs on 200 digits cannot fit the heavily distorted images (its training loss stays
# near 1.9, against ~0.1-0.3 without SA); RandAugment's Invert/Solarize/Posterize ops are also
# harsh on binary-looking digits. NFA on top of SA does not rescue it.
#
# Differences from the paper's setting that matter: a from-scratch toy transformer instead of a
# pretrained 87M-parameter EVA02 fine-tuned at lr 1e-5; 200 MNIST training images instead of
# 1.28M ImageNet images; an 8-epoch CPU flow instead of a 500-epoch GPU flow; and the flow has
# seen 54,000 labelled training images while the classifier sees 200 (NFA carries some of that
# extra data; the flow-on-200-images control, `flow = None` with `flow_overrides`, removes it).
