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
# # 03 — The latent space of a trained flow
#
# From the **shipped flows** `digits` (FPI) and `digits-data` (data init, Baseline 1): the
# digits_cpu runs of notebook 02 with the best validation NF accuracy among its seeds, shipped
# under `checkpoints/` and loaded with their SHA-256 checked (`nfpi.pretrained.load`); set
# `retrain` to a config to train both flows here instead (a few minutes on a CPU):
#
# 1. t-SNE of the test latents f(x) of the data-init and the FPI flows (as in Fig. 32 of the
#    GLEM supplementary): FPI separates the classes;
# 2. class-conditional samples x = f^-1(m_s mu_y + T sqrt(s_y) eps) ([method
# §6.2](../docs/method.md#62-sampling));
# 3. a temperature sweep T = 1.0 .. 0.1 with the same eps along each row;
# 4. rescaled interpolations between two test images of one class and of two classes.

# %% tags=["parameters"]
shipped = {"data": "digits-data", "fpi": "digits"}  # the shipped flows shown (nfpi.pretrained, checkpoints/)
retrain = None  # a config, e.g. "../configs/digits_cpu.yaml": train both flows instead
overrides = {}  # with retrain: TrainConfig overrides
runs = "../runs"  # with retrain: where the runs are trained (or reused)
run_seed = 0  # with retrain: the training seed
temperature = 0.7  # sample grid
temperatures = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]
mean_scale = 1.0  # the paper rescales the means by 1.3 for its sample figures
per_class = 10
pairs = [
    [0, 0],
    [3, 3],
    [1, 7],
    [4, 9],
    [5, 6],
]  # class pairs to interpolate between (same class: two images)
steps = 8
seed = 0  # of the samples, t-SNE and interpolation partners
figures = "../figures"
progress = True

# %%
from pathlib import Path

import matplotlib.pyplot as plt

from nfpi import plots, pretrained
from nfpi.config import TrainConfig
from nfpi.experiments import train_settings
from nfpi.latents import encode
from nfpi.prior import pairwise_kl
from nfpi.train import load_checkpoint, load_data

if retrain is None:
    flows = {p: pretrained.load(name) for p, name in shipped.items()}
else:
    trained = train_settings(
        TrainConfig.from_yaml(retrain, **overrides),
        {p: {"gaussians.prior": p} for p in shipped},
        [run_seed],
        runs,
        Path(retrain).stem,
        progress,
    )
    flows = {r.setting: load_checkpoint(r.run_dir) for r in trained.itertuples()}
model, prior, cfg = flows["fpi"]
lam = cfg.gaussians.lam
_, test_set = load_data(cfg)
latents = {p: (encode(m, test_set, cfg.bits)[0], test_set.y) for p, (m, _, _) in flows.items()}

# %% [markdown]
# ## Class separation and t-SNE of the test latents
#
# Smallest and median KL divergence between two class Gaussians, and NF accuracy on the
# test set, for the data-init and the FPI flow (one seed each; notebook 02 has the mean over seeds).

# %%
for p, (_, gaussians, _) in flows.items():
    kl = pairwise_kl(gaussians.means.double(), gaussians.variances.double())
    off = kl[kl > 0]
    hits = (gaussians.predict(latents[p][0]) == test_set.y).double().mean()
    print(f"{p:>4}: min KL {off.min():.1f}, median KL {off.median():.1f}, NF accuracy {100 * hits:.2f} %")

# %%
# NBVAL_CHECK_OUTPUT
print(
    {p: tuple(z.shape) for p, (z, _) in latents.items()}, f"lambda = {lam:g}, {len(test_set.classes)} classes"
)

# %%
fig = plots.latent_tsne(
    {"data init (Baseline 1)": latents["data"], "FPI": latents["fpi"]},
    test_set.classes,
    seed=seed,
    path=f"{figures}/03_tsne.png",
)
plt.show()

# %% [markdown]
# ## Class-conditional samples (FPI flow)

# %%
fig = plots.class_samples(
    model,
    prior,
    cfg.bits,
    test_set.classes,
    per_class=per_class,
    temperature=temperature,
    mean_scale=mean_scale,
    seed=seed,
    path=f"{figures}/03_samples.png",
)
plt.show()

# %% [markdown]
# ## Temperature sweep
#
# Lower temperatures move the samples towards the class mean mu_y: the images become
# cleaner and less diverse.

# %%
fig = plots.temperature_sweep(
    model,
    prior,
    cfg.bits,
    test_set.classes,
    temperatures=temperatures,
    mean_scale=mean_scale,
    seed=seed,
    path=f"{figures}/03_temperature.png",
)
plt.show()

# %% [markdown]
# ## Rescaled interpolations
#
# Within a class (first rows) and across classes: the path stays on images, and across
# classes it passes from one class to the other.

# %%
fig = plots.interpolations(
    model,
    prior,
    test_set,
    cfg.bits,
    [tuple(p) for p in pairs],
    steps=steps,
    path=f"{figures}/03_interpolations.png",
)
plt.show()
