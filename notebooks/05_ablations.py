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
# # 05 — Ablations: what the Gaussians learn, how they are learned, how they are sampled
#
# One flow per setting, all with the same data, flow and budget ([method
# §4](../docs/method.md#4-when-the-gaussians-are-learned-training-protocol) protocol), evaluated
# by `nfpi.experiments` (NF accuracy, bits/dim, CNN-Acc, and the oracle's FID, Coverage and
# Label Reliability; [method §6-§7](../docs/method.md#6-generation-classification-augmentation)).
# The blocks follow the papers' tables:
#
# 1. **NFPI Table 3**: the KL term learns nothing (data init, lambda = 0), the means only
#    (identity variances, as in the released configs), the variances only, or both;
# 2. **NFPI Table 1**: the objective J solved by gradient descent (Baseline 2) with the five
#    learning-rate policies of `nfpi.prior.gd` (lr_t = lr0 (1 - t/T)^p, our definitions of the
#    paper's names), against the fixed point of the paper's Eqs. 5-7; NF accuracy only, as in
#    the paper;
# 3. **solver options**: random Gaussians (GLEM supplementary), pi pairwise vs mean (Eqs. 9-10),
#    the paper's stationary variance rule vs the released code's rule ([method
#    §3](../docs/method.md#3-fixed-point-updates)) at the same
#    lambda;
# 4. **GLEM Table 5**: sampling temperature, and RFCM (re-estimated full covariances);
# 5. **GLEM Tables 1-2**: GLEM's EM training (gradient-descent Gaussians on D_G alternating with
#    flow training on D_NF, lambda annealed), CE (a monomodal flow on images with class codes
#    appended below; the label of a sample is read from its code) and CEGLEM (codes + EM
#    Gaussians).
#
# Every setting is trained with every seed of `seeds`; the tables give mean ± std over seeds
# and paired differences to data init (same seed). Rows are reused only when the same config,
# evaluation and library code made them.
#
# **CPU default**: digits, the 2-level, 2-step Glow of notebook 04 trained for 4 epochs (runs
# shared with notebook 04 where the settings coincide), 50 samples per class, width-8
# ResNet-18s. **Paper grid** (GPUs): `config = "../configs/cifar10.yaml"` or `cifar100.yaml`,
# `overrides = {}`, the lambdas of the released configs, and the sample sizes and ResNet-18s
# in the comments of the parameters cell. Every block reads and extends
# `../results/05_ablations.csv`.

# %% tags=["parameters"]
config = "../configs/digits_cpu.yaml"  # GPU: "../configs/cifar10.yaml" or "../configs/cifar100.yaml"
overrides = {"epochs": 4, "model.steps": 2}  # GPU: {}
lam = 1000.0  # lambda of every FPI / GD run (un-normalised); GPU: 3e5 (CIFAR-10), 3e6 (CIFAR-100)
seeds = [0, 1, 2]
paper_lambdas = [10.0, 20.0, 50.0]  # Table 1: candidates of GD and FPI on the paper's J, below 55.3
gd_policies = ["sublinear_v1", "sublinear_v2", "linear", "superlinear_v1", "superlinear_v2"]
gd_steps = 300  # Adam steps of each gradient-descent solve (T of the lr policies); GPU: 1000
temperatures = [1.2, 1.0, 0.8]
em = {
    "lam": 1000.0,
    "lam_decay": 0.5,
    "merge_epoch": 2,
}  # GLEM EM: lambda_0, its decay per M-step, merge epoch
code_rows = 4  # CE code rows: H + rows divisible by 2^levels (digits, 2 levels: 4; CIFAR, 3 levels: 8)
samples_per_class = 50  # GPU: 5000 (CIFAR-10) / 500 (CIFAR-100)
cnn = {"epochs": 10, "width": 8, "batch_size": 50, "flip": False}  # GPU: {"epochs": 30, "flip": True}
oracle = {"epochs": 8, "width": 8, "batch_size": 100, "flip": False}  # GPU: {"epochs": 30, "flip": True}
runs = "../runs/experiments"
results = "../results/05_ablations.csv"
figures = "../figures"
progress = False

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from nfpi import plots, repro
from nfpi.config import TrainConfig
from nfpi.evaluation import ClassifierConfig
from nfpi.experiments import EvalConfig, choose_lambda, load_oracle, paper_table, run_grid
from nfpi.train import em_overrides, load_data

base = TrainConfig.from_yaml(config, **overrides)
run_dir = Path(runs) / Path(config).stem
full = EvalConfig(samples_per_class=samples_per_class, classifier=ClassifierConfig(**cnn))
nf_only = full.replace(cnn=False, generated=False)
fpi_at = {"gaussians.prior": "fpi", "gaussians.lam": lam}
names = {
    "nf_top1": "NF-Acc",
    "cnn_top1": "CNN-Acc",
    "fid": "FID",
    "coverage": "Coverage",
    "label_reliability": "Label rel.",
    "bpd": "bits/dim",
    "code_agreement": "code agrees",
    "lam_normalised": "lambda/K(K-1)",
    "temperature": "T",
    "solve_bounds_active": "solve bounds",
}
metrics = ["nf_top1", "cnn_top1", "fid", "coverage", "label_reliability", "bpd"]
shown = [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
recorded = repro.read_recorded(results)
print(
    f"{base.dataset}, {base.epochs} epochs, {base.model.levels} levels x {base.model.steps} steps, "
    f"rule={base.solver.rule}, lambda={lam:g}, seeds {seeds}; evaluation {full.tag()}"
)

judge = load_oracle(
    base, ClassifierConfig(**oracle), run_dir / f"oracle_{base.dataset}.pt", progress=progress
)

# %% [markdown]
# ## 1. What the KL term learns (NFPI Table 3)
#
# With two controls: `identity_lam0`, the class means with identity variances and no KL term
# (lambda = 0; does a gain of `means_only` come from the identity variances or from the KL
# term?), and `data_refit_end`, data init whose Gaussians are refitted to the class statistics
# after the last epoch instead of the first (is a falling data-init accuracy the mechanism of
# Gaussians frozen while the flow moves? The refit also restarts the weights' EMA, so its
# evaluation uses the last weights).

# %%
table3 = run_grid(
    {
        "data_init": {"gaussians.prior": "data"},
        "means_only": {**fpi_at, "gaussians.learn": "means"},
        "variances_only": {**fpi_at, "gaussians.learn": "variances"},
        f"fpi_lam{lam:g}": fpi_at,
        "identity_lam0": {**fpi_at, "gaussians.learn": "means", "gaussians.lam": 0.0},
        "data_refit_end": {"gaussians.prior": "data", "schedule.solve_epoch": base.epochs - 1},
    },
    base,
    run_dir,
    results,
    judge,
    full,
    progress,
    seeds,
)

# %%
summary3 = repro.seed_summary(table3, metrics, baseline="data_init")
print(summary3[["seeds"] + shown].round(2).to_string())
print(summary3[[f"{m}_diff_{s}" for m in ("nf_top1", "fid") for s in ("mean", "ci95")]].round(2).to_string())
print("\nNFPI Table 3 (CIFAR-10 / CIFAR-100)")
print(paper_table("nfpi_table3").to_string(index=False))

# %% [markdown]
# ## 2. Fixed point against gradient descent on one objective (NFPI Table 1)
#
# Both solve the paper's J (pi pairwise, means and variances): the fixed point of Eqs. 5-7
# with the paper's stationary rule (`fpi_paper`) and `gd_steps` Adam steps (lr0 = 0.05,
# policy `linear`) on J (`gd`), with the same variance box [v/rho, v*rho] (`solver.rho`,
# 1e3). Each chooses its lambda among the same candidates `paper_lambdas` on the validation
# split (mean validation NF accuracy over the seeds). J is unbounded below above
# `unbounded_threshold(K=10)` = 55.3 with learned variances
# ([method §3.4](../docs/method.md#34-bounds-and-the-unbounded-regime)), which caps the grid;
# `solve bounds` counts the learned variances left on the box. Then the learning-rate
# policies of GD at its chosen lambda, and both solvers above the threshold (lambda = `lam`),
# where both answers are set by the box: exploratory rows, not a second selection.

# %%
paper_rule = {"gaussians.prior": "fpi", "solver.rule": "paper"}
on_j = {"gd": {**paper_rule, "gaussians.prior": "gd", "gd.steps": gd_steps}, "fpi_paper": paper_rule}
selection1, chosen1 = choose_lambda(
    base, on_j, {s: paper_lambdas for s in on_j}, seeds, run_dir, "flow", progress
)
print(repro.seed_summary(selection1, ["val_acc_top1"]).round(2).to_string())
print(f"chosen on validation NF accuracy: {chosen1}")
at_choice = {s: {**o, "gaussians.lam": chosen1[s]} for s, o in on_j.items()}
table1 = run_grid(
    {
        "data_init": {"gaussians.prior": "data"},
        **at_choice,
        **{f"gd_{p}": {**at_choice["gd"], "gd.policy": p} for p in gd_policies if p != "linear"},
        **{f"{s}_lam{lam:g}": {**o, "gaussians.lam": lam} for s, o in on_j.items()},
    },
    base,
    run_dir,
    results,
    judge,
    nf_only,
    progress,
    seeds,
)

# %%
summary1 = repro.seed_summary(table1, ["nf_top1", "bpd", "solve_bounds_active"], baseline="data_init")
print(
    summary1[
        [
            "seeds",
            "nf_top1_mean",
            "nf_top1_std",
            "nf_top1_diff_mean",
            "nf_top1_diff_ci95",
            "bpd_mean",
            "solve_bounds_active_mean",
        ]
    ]
    .round(2)
    .to_string()
)
print("\nNFPI Table 1 (NF-Acc)")
print(paper_table("nfpi_table1").to_string(index=False))

# %% [markdown]
# ## 3. Solver options: random init, pi, variance rule

# %%
solver = run_grid(
    {
        "random_init": {"gaussians.prior": "random"},
        f"fpi_lam{lam:g}": fpi_at,
        "pi_mean": {**fpi_at, "gaussians.pi": "mean"},
        f"fpi_paper_lam{lam:g}": {**paper_rule, "gaussians.lam": lam},
    },
    base,
    run_dir,
    results,
    judge,
    full,
    progress,
    seeds,
)

# %%
print(f"pi pairwise and pi mean use the config's {base.solver.rule} rule; fpi_paper uses the paper's rule")
print(
    repro.seed_summary(solver, metrics + ["solve_bounds_active"])[
        ["seeds"] + shown + ["solve_bounds_active_mean"]
    ]
    .round(2)
    .to_string()
)

# %% [markdown]
# ## 4. Sampling temperature and RFCM (GLEM Table 5)
#
# The flows of block 1 ("both"), sampled at z = mu_y + T sqrt(s_y) eps, and with the
# re-estimated full class covariances of their training latents (RFCM) at T = 1.

# %%
temps = run_grid(
    {f"fpi_lam{lam:g}": fpi_at},
    base,
    run_dir,
    results,
    judge,
    [full.replace(temperature=t) for t in temperatures] + [full.replace(covariance="rfcm")],
    progress,
    seeds,
)
temps["temperature"] = temps["eval.temperature"].where(temps["eval.covariance"] == "diag")

# %%
print(repro.seed_summary(temps, metrics, by="eval")[["seeds"] + shown].round(2).to_string())
print("\nGLEM Table 5 (CIFAR-100; temperature NaN = RFCM)")
print(paper_table("glem_table5").rename(columns=names).to_string(index=False))

# %% [markdown]
# ## 5. GLEM: EM training, CE, CEGLEM (GLEM Tables 1-2)
#
# `nfpi.train.schedule.em_overrides`: after every epoch up to `merge_epoch`, 100 Adam steps on J for the
# statistics of D_G (10 % of each class), starting from the current Gaussians, with lambda
# halved at each M-step; then D_G joins the training set. CE: every class is N(0, I) (a
# monomodal flow) and `code_rows` rows of a learned class code are appended below each
# training image; its samples are unconditional and labelled by the nearest prototype of their
# code. CEGLEM: the codes with the EM Gaussians. Test images carry random code rows (their
# label is unknown), which is why CE flows cannot classify.

# %%
em_run = em_overrides(em["lam"], em["merge_epoch"], lam_decay=em["lam_decay"])
ce = {"codes.rows": code_rows}
glem_rows = run_grid(
    {"glem_em": em_run, "ce": {**ce, "gaussians.prior": "standard"}, "ceglem": {**ce, **em_run}},
    base,
    run_dir,
    results,
    judge,
    full,
    progress,
    seeds,
)
glem_rfcm = run_grid(
    {"glem_em_rfcm": em_run}, base, run_dir, results, judge, full.replace(covariance="rfcm"), progress, seeds
)
glem_rows = pd.concat([glem_rows, glem_rfcm], ignore_index=True)

# %%
print(
    repro.seed_summary(glem_rows, metrics + ["code_agreement"])[["seeds"] + shown + ["code_agreement_mean"]]
    .round(2)
    .to_string()
)
print("\nGLEM Table 2 (CIFAR-100)")
print(paper_table("glem_table2").rename(columns=names).to_string(index=False))

# %% [markdown]
# ## Checked against the committed results
#
# Each (setting, evaluation)'s mean over seeds against `results/05_ablations.csv` as
# committed, within a tolerance derived from the recorded seed spread (floors: two test images
# for accuracies, 1 point for Coverage and Label Reliability, 1 for FID, 0.02 bits/dim).

# %%
one_image = 100 / len(load_data(base)[1])
floors = {
    "nf_top1": 2 * one_image,
    "cnn_top1": 2 * one_image,
    "fid": 1.0,
    "coverage": 1.0,
    "label_reliability": 1.0,
    "bpd": 0.02,
}
everything = pd.concat([table3, table1, solver, temps, glem_rows], ignore_index=True)
repro.expect_recorded(everything.drop_duplicates(["run", "eval"]), recorded, floors, by=["setting", "eval"])

# %%
# NBVAL_CHECK_OUTPUT
print(
    everything.drop_duplicates(["run", "eval"])
    .groupby(["setting", "eval"], sort=False)
    .agg(runs=("run", "count"), epochs=("epochs", "first"))
    .to_string()
)

# %% [markdown]
# ## Figures
#
# Our settings (digits) beside the papers' (CIFAR); each panel has its own y axis; bars are
# means over seeds with ±1 std.

# %%
ablation = pd.concat(
    [table3, solver[solver["setting"].isin(["random_init", "pi_mean", f"fpi_paper_lam{lam:g}"])], glem_rows],
    ignore_index=True,
).assign(source="ours")
fig = plots.metric_grid(
    ablation, "setting", metrics[:-1], kind="bar", names=names, path=f"{figures}/05_ablations.png"
)
plt.show()

# %%
sweep = pd.concat(
    [
        temps.dropna(subset=["temperature"]).assign(source=f"ours ({base.dataset})"),
        paper_table("glem_table5").dropna(subset=["temperature"]).assign(source="GLEM Table 5 (CIFAR-100)"),
    ],
    ignore_index=True,
)
fig = plots.metric_grid(
    sweep,
    "temperature",
    ["cnn_top1", "fid", "coverage", "label_reliability"],
    row="source",
    names=names,
    path=f"{figures}/05_temperature.png",
)
plt.show()

# %% [markdown]
# ## Reading
#
# Digits, 4 epochs, 3 seeds per setting (mean ± std); NF accuracy differences below ~1.5 points
# are within the paired 95 % intervals. Numbers from `results/05_ablations.csv`.
#
# * **NFPI Table 3: the NF-Acc ordering does not hold here; the generation ordering does.**
#   NF-Acc: variances only 93.5, both 93.1, means only 92.3, data init 92.1, and every paired
#   difference to data init has an interval that includes 0. For generation, learning both is
#   best (FID 8.8, Label Reliability 85.7, against 11.5 / 76.9 for data init), and learning
#   the variances alone is worse than data init (FID 15.1, Label Reliability 73.7): as the
#   paper argues, the variances alone do not help generation.
# * **The controls.** Identity variances without the KL term (`identity_lam0`) are no better
#   than data init (NF-Acc 91.4, -0.7 ± 0.8; FID 18.6): what `means_only` gains in generation
#   (FID 10.7) comes from the KL term on the means, not from the identity variances. Refitting
#   data init's Gaussians after the last epoch (`data_refit_end`) gains +0.9 ± 0.4 NF-Acc over
#   keeping those of the first: part of data init's deficit is the flow moving away from frozen
#   Gaussians.
# * **NFPI Table 1 does not hold at this scale, and the solver is not what differs.** On the
#   same J in the same box, GD and FPI chose the same lambda (20, tied with 50 on validation)
#   and end at data init's NF-Acc on every seed (92.1): below the threshold the Gaussians barely
#   move. Above it (lambda = 1e3) FPI's fixed point has ~22 variances on the box and reaches
#   91.2 ± 2.1; GD's 300 Adam steps do not reach the box (0 entries on it) and reach 90.3 ±
#   1.1; the other learning-rate policies change nothing at GD's chosen lambda.
# * **The variance rule matters more than the solver.** At lambda = 1e3 the paper's
#   stationary rule collapses generation (CNN-Acc 44.1 ± 13.3, FID 23.0) where the released
#   rule gives 82.2 / 8.8. pi = mean and pi = pairwise are close (FID 9.5 vs 8.8). Random
#   Gaussians fail on every metric (NF-Acc 66.9, Label Reliability 13.0), as in GLEM Table 7.
# * **GLEM Table 5 holds in direction.** Lowering the temperature from 1.2 to 0.8 raises Label
#   Reliability (80.5 -> 89.1) and lowers FID (9.6 -> 8.7). RFCM improves every metric:
#   NF-Acc 98.1, FID 4.5, Coverage 93.8.
# * **GLEM Tables 1-2, in part.** GLEM's EM schedule (gradient-descent M-steps on D_G, lambda
#   annealed) is worse than one FPI solve in NF accuracy (89.0 vs 93.1) and in generation
#   (FID 11.2 vs 8.8, Label Reliability 77.1 vs 85.7). CEGLEM cannot classify test images with
#   random code rows (NF-Acc 11.7, near GLEM's 12.8 on CIFAR-10) and its codes name the
#   conditioning class for every sample. CE does not reproduce GLEM: in 4 epochs the monomodal
#   flow does not tie the code to the image (Label Reliability 13.5 %, near chance).
