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
# # 01 — Class Gaussians by fixed-point iteration, in 2-D
#
# Reproduces Fig. 1 of the NFPI paper on a 2-D t-SNE embedding of scikit-learn's digits
# (or of a CIFAR-10 subset): **(a)** the embedded classes, **(b)** the class-wise data
# Gaussians (Baseline 1, lambda = 0), **(c)** FPI with a small lambda, **(d)** FPI with a large
# lambda. Full covariances are learned with the matrix-geometric-mean update ([method
# §3.2](../docs/method.md#32-full-covariances)).
# Then: how fast the solver converges (Anderson mixing vs plain damped iteration), and FPI
# against gradient descent with several learning-rate policies on the same objective.

# %% tags=["parameters"]
dataset = "digits"  # "digits" (needs nothing) or "cifar10" (from $NFPI_DATA)
per_class = None  # images per class to embed (None: all; use e.g. 200 for cifar10)
lam_small = 5.0  # un-normalised lambda (divided by K(K-1) inside)
lam_large = 50.0  # below 55.3: the pairwise objective with learned variances is bounded for K=10
alpha = 10.0
gd_steps = 2000
seed = 0
figures = "../figures"

# %%
import warnings

import matplotlib.pyplot as plt
import pandas as pd
import torch

from nfpi import data, plots
from nfpi.prior import ClassStats, fpi, gd, gradient_residual, pairwise_kl, unbounded_threshold

torch.manual_seed(seed)
arrays = data.load(dataset, "train")
z, y = data.tsne_embedding(arrays, per_class=per_class, seed=seed)
k = arrays.num_classes
print(
    f"{dataset}: {len(z)} points, {k} classes; lambda bound for learned variances: "
    f"{unbounded_threshold(k, alpha):.1f}"
)

# %% [markdown]
# ## Fig. 1: data, data-init Gaussians, FPI with small and large lambda

# %%
stats = ClassStats.from_latents(z, y, k, full=True)
fits = {
    f"lambda = {lam:g}": fpi.solve(stats, lam, alpha=alpha, covariance="full")
    for lam in (0.0, lam_small, lam_large)
}
fig = plots.toy_panels(
    z,
    y,
    dict(
        zip(
            ["data Gaussians (Baseline 1)", f"FPI, lambda = {lam_small:g}", f"FPI, lambda = {lam_large:g}"],
            fits.values(),
        )
    ),
    seed=seed,
    path=f"{figures}/01_toy_fig1.png",
)
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
rows = []
for name, res in fits.items():
    kl = pairwise_kl(res.means, res.variances)
    rows.append(
        {
            "fit": name,
            "lambda/K(K-1)": round(res.lam_normalised, 4),
            "converged": res.converged,
            "residual<1e-6": gradient_residual(stats, res.means, res.variances, res.lam, alpha) < 1e-6,
            "min KL": round(float(kl[kl > 0].min()), 2),
            "mean det(Sigma)": round(float(torch.linalg.det(res.variances).mean()), 3),
        }
    )
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# Larger lambda pushes the class means apart and shrinks the covariances (smaller
# determinants) until every pair of classes is separated; at lambda = 0 the Gaussians are the
# class statistics themselves.
#
# ## Convergence: Anderson mixing against plain damped iteration

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore", fpi.FPIWarning)
    runs = {
        f"{mode}, lambda={lam:g}": fpi.solve(
            stats,
            lam,
            alpha=alpha,
            covariance="full",
            max_iter=5000,
            accel="anderson" if mode == "Anderson" else "none",
            damping=1.0 if mode == "Anderson" else 0.5,
        )
        for lam in (lam_small, lam_large)
        for mode in ("Anderson", "damped 0.5")
    }
plots.solver_curves(runs, x="iteration", y="change", path=f"{figures}/01_convergence.png")
plt.show()

# %%
print(
    pd.DataFrame(
        [{"run": n, "iterations": r.iterations, "converged": r.converged} for n, r in runs.items()]
    ).to_string(index=False)
)

# %%
# NBVAL_CHECK_OUTPUT
# What holds whatever the float reduction order of the embedding: both modes converge, and
# Anderson mixing needs fewer iterations (the counts themselves are printed above).
for lam in (lam_small, lam_large):
    fast, slow = runs[f"Anderson, lambda={lam:g}"], runs[f"damped 0.5, lambda={lam:g}"]
    print(
        f"lambda={lam:g}: both converged {fast.converged and slow.converged}, "
        f"Anderson faster {fast.iterations < slow.iterations}"
    )

# %% [markdown]
# ## FPI against gradient descent on the same objective
#
# Diagonal covariances (the setting of the image experiments). Gradient descent (Adam, sigmoid
# variance reparametrisation, [method §5](../docs/method.md#5-baselines)) runs with each learning-rate policy;
# the curves show the
# objective's gap above the FPI optimum against iterations (one FPI iteration and one Adam step
# both cost O(K^2 D); wall times are measured by `benchmarks/bench_fpi.py`, and a figure of
# them would change on every run).

# %%
dstats = ClassStats.from_latents(z, y, k)
ours = fpi.solve(dstats, lam_large, alpha=alpha)
baselines = {
    f"GD {p}": gd.solve(dstats, lam_large, alpha=alpha, policy=p, steps=gd_steps, lr=0.05)
    for p in ("constant", "sublinear_v1", "linear", "superlinear_v2")
}
curves = {"FPI (Anderson)": ours, **baselines}
plots.solver_curves(
    curves,
    x="iteration",
    y="objective",
    relative_to=ours.objective - 1e-12,
    path=f"{figures}/01_fpi_vs_gd.png",
)
plt.show()

# %%
gaps = {n: (r.objective - ours.objective) / abs(ours.objective) for n, r in curves.items()}
print("relative gap above the FPI optimum:", {n: f"{g:.1e}" for n, g in gaps.items()})

# %% [markdown]
# The decaying policies reach the FPI optimum to float64 precision; Adam at a constant rate
# keeps hovering above it, at a relative gap that depends on the float reduction order (7e-8
# with AVX-512 kernels, 2e-6 with scalar ones: `make test-portable`). The checked cell below
# states what holds on every processor: every method ends within 1e-4 of the FPI optimum, none
# below it.

# %%
# NBVAL_CHECK_OUTPUT
summary = pd.DataFrame(
    [
        {
            "method": n,
            "steps": r.iterations,
            "within 1e-4 of the FPI optimum": gaps[n] < 1e-4,
            "not below it (1e-9)": gaps[n] > -1e-9,
        }
        for n, r in curves.items()
    ]
)
print(summary.to_string(index=False))

# %%
print("iterations:", {n: r.iterations for n, r in curves.items()})
