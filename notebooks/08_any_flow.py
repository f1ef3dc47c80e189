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
# # 08 — FPI class Gaussians on a peer's flow: normflows' Glow, head to head
#
# Every flow library with a class-conditional base learns it by gradient descent, jointly with
# the flow; normflows' `ClassCondDiagGaussian` is one. nfpi fits the class Gaussians in closed
# form (FPI, [method §3](../docs/method.md#3-fixed-point-updates)) and trades likelihood against
# class separation with the KL repulsion of weight lambda. Here both are given **the same
# normflows Glow** (`nfpi.flows.normflows_glow`: normflows' `MultiscaleFlow` of GlowBlocks, one
# `ClassCondDiagGaussian` per level), the same images in the same order with the same
# dequantisation noise, the same ActNorm init images, the same optimiser (Adamax, warm-up, EMA)
# and the same number of image presentations ([docs/flows.md](../docs/flows.md#use-fpi-with-your-own-flow)):
#
# * **normflows_base**: normflows' own objective (`forward_kld`): the flow and its
#   `ClassCondDiagGaussian` trained jointly by gradient (`nfpi.experiments.train_native`);
# * **fpi**: the flow trained by `nfpi.train.train` through the flow protocol (`model.factory`),
#   the class Gaussians (means and variances) solved by FPI after epoch 0 and then frozen, with
#   lambda chosen on the validation split among `lambdas`;
# * **data_init**: the same, with the class statistics instead (lambda = 0, Baseline 1);
# * **our_glow_fpi**: nfpi's own Glow with FPI at the chosen lambda, its width set so that it has
#   about the same number of parameters (`params`; the normflows base's parameters not counted).
#
# NF accuracy is argmax_y log N(f(x); mu_y, s_y) on the test set under each arm's own class
# Gaussians (for normflows_base: its learned base, read as nfpi class Gaussians); bits/dim is
# the uniform-dequantisation bound. Every arm runs with every seed of `seeds` (flow init, data
# order, noise; the lambda sweep with `lam_seeds`); differences are paired by seed, with their
# 95 % intervals.
#
# **CPU default**: 300 MNIST training images per class (10 % of them the validation split),
# 300 test images per class, 5 bits, 6 epochs, a 2-level x 4-step normflows Glow with 32 hidden
# channels (30k parameters); 30-65 s per run on a shared core, 33 runs. Rows of
# `../results/08_any_flow.csv` recorded for the same trainer and config are reused whatever code
# made them (their `code` column names it; `nfpi.train.config_key`), so a re-execution trains
# only the check that ties them to the current code: seed 0 of `fpi` and `normflows_base`,
# trained afresh and compared with the recorded seeds. To re-record after a change that is
# meant to move the numbers, delete the file's rows (or the file) and execute the notebook.

# %% tags=["parameters"]
config = "../configs/mnist_cpu.yaml"
overrides = {
    "per_class": 300,
    "test_per_class": 300,
    "epochs": 6,
    "init_images": 500,
    "gaussians.learn": "both",  # means and variances, as normflows' base learns them
    "gaussians.means_only_identity": False,
    "solver.rule": "released",
}
normflows = {"levels": 2, "steps": 4, "hidden": 32}  # nfpi.flows.normflows_glow(shape, **normflows)
ours = {"model.levels": 2, "model.steps": 4, "model.hidden": 15}  # our Glow at about the same size
lambdas = [100.0, 300.0, 1000.0, 3000.0, 10000.0]  # candidates for FPI, chosen on validation
seeds = [0, 1, 2, 3, 4, 5]  # of the head to head
lam_seeds = [0, 1, 2]  # of the lambda sweep on validation
check_seed = 0
runs = "../runs/any_flow"
results = "../results/08_any_flow.csv"
figures = "../figures"
progress = False

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from nfpi import plots, repro
from nfpi.config import TrainConfig
from nfpi.experiments import compare_arms
from nfpi.train import load_data

base = TrainConfig.from_yaml(config, **overrides)
nf_glow = base.replace(**{"model.factory": "nfpi.flows:normflows_glow", "model.kwargs": normflows})
recorded = repro.read_recorded(results)
print(
    f"{base.dataset}: {base.per_class} images per class ({base.val_fraction:.0%} validation), "
    f"{base.test_per_class} test images per class, {base.epochs} epochs, batch {base.batch_size}; "
    f"normflows Glow {normflows}; seeds {seeds} (lambda sweep: {lam_seeds})"
)

# %% [markdown]
# ## lambda chosen on the validation split
#
# FPI at every candidate lambda (un-normalised; the solver uses lambda / (K (K - 1))), every
# seed; the chosen lambda has the best mean validation NF accuracy. A choice at either end of
# the grid stops the notebook: extend `lambdas` then.

# %%
sweep = compare_arms(
    {
        f"fpi_lam{lam:g}": ("nfpi", nf_glow.replace(**{"gaussians.prior": "fpi", "gaussians.lam": lam}))
        for lam in lambdas
    },
    lam_seeds,
    runs,
    results,
    progress,
)
by_lam = repro.seed_summary(sweep, ["val_acc_top1", "val_bpd"])
by_lam.insert(0, "lambda", sweep.groupby("setting", sort=False)["lam"].first())
best = by_lam["val_acc_top1_mean"].idxmax()
lam = float(by_lam.loc[best, "lambda"])
print(by_lam.round(2).to_string())
print(f"chosen on validation NF accuracy: lambda = {lam:g}")
if lam in (min(lambdas), max(lambdas)):
    raise ValueError(f"lambda = {lam:g} is at the edge of the grid {lambdas}: extend lambdas")

# %% [markdown]
# ## Head to head

# %%
fpi_at = {"gaussians.prior": "fpi", "gaussians.lam": lam}
arms = {
    "normflows_base": ("native", nf_glow),
    "fpi": ("nfpi", nf_glow.replace(**fpi_at)),
    "data_init": ("nfpi", nf_glow.replace(**{"gaussians.prior": "data"})),
    "our_glow_fpi": ("nfpi", base.replace(**ours, **fpi_at)),
}
table = compare_arms(arms, seeds, runs, results, progress)
metrics = ["acc_top1", "acc_top5", "test_bpd", "val_acc_top1", "params", "seconds"]
summary = repro.seed_summary(table, metrics)
print(summary[["seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]].round(2).to_string())

# %% [markdown]
# Paired differences (same seed), **fpi minus** the baseline named in each block: mean, std and
# the half-width of the 95 % interval of the mean difference.

# %%
paired = {}
for baseline in ("normflows_base", "data_init"):
    diff = repro.seed_summary(table, ["acc_top1", "acc_top5", "test_bpd"], baseline=baseline)
    paired[baseline] = diff
    cols = [f"{m}_diff_{s}" for m in ("acc_top1", "acc_top5", "test_bpd") for s in ("mean", "std", "ci95")]
    print(f"fpi - {baseline}:")
    print(diff.loc[["fpi"], cols].round(2).to_string(index=False))

# %% [markdown]
# ## Checked: seed 0 retrained afresh against the recorded seeds
#
# `fpi` and `normflows_base` at seed `check_seed`, trained in a fresh folder (nothing reused),
# against their recorded means over seeds in `results/08_any_flow.csv` as committed, within a
# tolerance derived from the recorded seed spread (`repro.expect_recorded`; floors: two test
# images for accuracies, 0.02 bits/dim).

# %%
fresh_dir = Path(tempfile.mkdtemp(prefix="nfpi-08-"))
fresh = compare_arms(
    {k: arms[k] for k in ("fpi", "normflows_base")}, [check_seed], fresh_dir, fresh_dir / "check.csv"
)
one_image = 100 / len(load_data(base)[1])
repro.expect_recorded(
    fresh, recorded, {"acc_top1": 2 * one_image, "acc_top5": 2 * one_image, "test_bpd": 0.02}
)

# %%
# NBVAL_CHECK_OUTPUT
print(
    table.groupby("setting", sort=False)
    .agg(
        runs=("run", "count"),
        trainer=("trainer", "first"),
        prior=("prior", "first"),
        params=("params", "first"),
    )
    .to_string()
)
print(f"chosen lambda {lam:g} among {lambdas}")

# %% [markdown]
# ## Figure
#
# Test NF accuracy top-1 / top-5 and bits/dim per arm (bars: mean over seeds, ±1 std), and the
# paired differences of fpi to normflows' base and to data init with their 95 % intervals.

# %%
names = {"acc_top1": "NF-Acc top-1 %", "acc_top5": "NF-Acc top-5 %", "test_bpd": "bits/dim"}
fig = plots.metric_grid(
    table,
    "setting",
    ["acc_top1", "acc_top5", "test_bpd"],
    kind="bar",
    names=names,
    path=f"{figures}/08_any_flow.png",
)
plt.show()
for baseline, diff in paired.items():
    fig = plots.paired_differences(
        diff, "acc_top1", baseline=baseline, path=f"{figures}/08_any_flow_vs_{baseline}.png"
    )
    plt.show()

# %% [markdown]
# ## Reading
#
# MNIST subset, 6 epochs, 6 seeds per arm (mean ± std; paired differences with their 95 %
# intervals). Numbers from `results/08_any_flow.csv`.
#
# * **FPI does not beat normflows' own class-conditional base in top-1 on the same flow at
#   this budget**: +2.82 ± 6.63 points (69.03 ± 3.75 against 66.21 ± 7.83), an interval that
#   covers 0. It does in **top-5**: +2.21 ± 1.29 (98.25 against 96.04). The jointly learned
#   base has the better likelihood: FPI costs +0.05 ± 0.02 bits/dim (1.71 against 1.66), the
#   price of the KL repulsion.
# * FPI's top-1 varies half as much over seeds: normflows' base ranges from 53.7 to 73.7 %, FPI
#   from 64.4 to 73.7 %.
# * **FPI beats data init on the same flow**: +8.65 ± 4.03 points top-1 and 0.56 ± 0.06
#   bits/dim less, as with our own Glow (notebook 07).
# * Our Glow with FPI at about the same size (28,912 against 30,272 parameters) ties FPI on
#   normflows' Glow in NF accuracy and has the best bits/dim of the four arms (1.57).
# * Every arm is far from converged (6 epochs on 2,700 images; top-1 60-74 %), and a top-1 seed
#   spread of 4-8 points needs many more seeds to resolve a 3-point difference.
