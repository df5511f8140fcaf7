# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The scaling study: does this scale leave the methods anything to differ on?
#
# *Paper, Table 1: RoBERTa-Large (355M) on GLUE, 10 epochs; QLoRA at 3 bits loses up to 9 points to its
# 6-bit configuration on SST-2, so the configuration matters there.*
#
# The default preset trains a 22M-parameter stand-in for a few hundred steps. Before reading any difference
# between methods, this study measures how the gaps that matter move with training steps (MiniLM-L6, seed 0)
# and backbone size (MPNet-base, 110M, three seeds): what quantization costs (the same LoRA at full precision
# minus QLoRA at the lowest budget and on average), what one shared adapter costs against CoA-LoRA, and what
# theta adds (CoA-LoRA minus its theta-free twin), at the lowest and the highest NF budget (2.5 and 4 bits).
# More training sentences at the preset's two epochs are more steps. It then repeats each backbone's runs at
# its first size with the backbone's dropout off (MPNet-base also at twice the steps), and probes what the
# quantized backbone alone still gives a classifier. Run with `make scaling` (not part of `make reproduce`: it
# takes about 6 hours on 2 CPU cores).

# %% tags=["parameters"]
preset = "default"   # smoke | default | large | paper
task = "sst2"
seed = 0
backbones = ["minilm-l6", "mpnet-base"]
n_trains = [2048, 4096, 8192]      # training sentences; at 2 epochs of 32: 128, 256, 512 steps
mpnet_n_trains = [2048]            # MPNet-base is about 5x slower per step
mpnet_seeds = [0, 1, 2]
# backbone -> training sentences run again with backbone_dropout=0: each backbone's first size (beside its
# checkpoint-dropout twin), and MPNet-base at twice the steps: whether more training lifts its shared adapters
# off the 2.5-bit plateau
dropout_off_n_trains = {"minilm-l6": [2048], "mpnet-base": [2048, 4096]}
probe_budgets = [None, 4.0, 3.0, 2.5]   # None: full precision
probe_sentences = 512
recompute = False
output_root = None   # None: the project root (figures/ and results/)

# %%
import matplotlib.pyplot as plt
import pandas as pd

from coalora import plots, studies

plots.use_style()
sizes = {backbone: n_trains if backbone == backbones[0] else mpnet_n_trains for backbone in backbones}
seeds = {backbone: [seed] if backbone == backbones[0] else mpnet_seeds for backbone in backbones}
unknown = sorted(set(dropout_off_n_trains) - {backbone for backbone in backbones if sizes[backbone]})
if unknown:
    raise ValueError(f"dropout_off_n_trains names {unknown}, which are not run here; choose among the backbones "
                     f"with sizes: {[backbone for backbone in backbones if sizes[backbone]]}")
specs = [spec for backbone in backbones for s in seeds[backbone]
         for spec in studies.scaling_specs(preset, task, [backbone], sizes[backbone], s)]


def dropout_arm(dropout, n_trains):
    """Every method at each backbone and number of training sentences of `n_trains` (backbone -> sizes),
    with the backbone's seeds and `backbone_dropout=dropout` (0: every dropout layer of the pretrained
    model off; None: the checkpoint's)."""
    return [spec for backbone, ns in n_trains.items() for s in seeds[backbone]
            for spec in studies.scaling_specs(preset, task, [backbone], ns, s, backbone_dropout=dropout)]


off = dropout_arm(0.0, dropout_off_n_trains)
rows = studies.collect(specs + off, recompute)
gaps = (studies.scaling_gaps(specs + off).astype({"backbone_dropout": object})
        .fillna({"backbone_dropout": "checkpoint"}))
figures, results = studies.output_dirs(preset, output_root)
parameters = dict(preset=preset, task=task, seed=seed, backbones=backbones, n_trains=n_trains,
                  mpnet_n_trains=mpnet_n_trains, mpnet_seeds=mpnet_seeds, dropout_off_n_trains=dropout_off_n_trains)
studies.write_results(gaps, results / "scaling_gaps.csv", parameters, specs + off)
gaps.round(2)

# %%
shown = [backbone for backbone in backbones if sizes[backbone]]
# Own y axes: MPNet-base's 2.5-bit gaps are tens of points, MiniLM-L6's a few.
fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.4), squeeze=False, layout="constrained")
for ax, backbone in zip(axes[0], shown):
    plots.plot_scaling(ax, gaps[gaps["backbone"] == backbone])
    label = rows.loc[rows["backbone"] == backbone, "backbone_label"].iloc[0].split(" (")[0]
    ax.set_title(f"{label}, seed{'s' * (len(seeds[backbone]) > 1)} {', '.join(map(str, seeds[backbone]))}",
                 fontsize=8)
axes[0][0].legend(fontsize=7)
fig.suptitle(plots.caption(f"Scaling study ({preset} preset)", rows, 130), fontsize=8)
plots.save_figure(fig, figures, "scaling")

# %%
accuracy = studies.target_accuracy(specs)
print("accuracy (%), mean over seeds:")
print(accuracy.astype({"budget": object}).fillna({"budget": studies.FULL_PRECISION})
      .pivot_table(index=["backbone", "n_train", "method"], columns="budget", values="accuracy").round(1).to_string())

# %% [markdown]
# **With the backbone's dropout off.** Every run of the dropout arm (`dropout_off_n_trains`) beside the same
# run with the checkpoint's dropout where the study has one, per seed.

# %%
on = dropout_arm(None, {backbone: [n for n in ns if n in sizes[backbone]]  # the sizes with a checkpoint-dropout twin
                        for backbone, ns in dropout_off_n_trains.items()})
dropout = (studies.target_accuracy(on + off).astype({"backbone_dropout": object, "budget": object})
           .fillna({"backbone_dropout": "checkpoint", "budget": studies.FULL_PRECISION}))
studies.write_results(dropout, results / "scaling_dropout.csv", parameters, on + off)
print(dropout.pivot_table(index=["backbone", "n_train", "method"], columns=["backbone_dropout", "budget"],
                          values="accuracy", aggfunc="mean").round(1).to_string())

# %% [markdown]
# **What each shared adapter leaves its head** (`studies.head_features`): per run of the dropout arm whose one
# adapter serves every budget, the accuracy beside how alike the dev sentences' features look to the head
# (mean pairwise cosine; 1: the head can only guess).

# %%
shared_off = [spec for spec in off if spec.method in studies.SHARED_ADAPTER_METHODS]
heads = studies.head_features(shared_off)
studies.write_results(heads, results / "scaling_head_features.csv", parameters, shared_off)
print(heads.pivot_table(index=["backbone", "n_train", "method", "seed"], columns="budget",
                        values=["accuracy", "cosine"]).round(2).to_string())

# %% [markdown]
# **What the quantized backbone alone leaves a classifier** (no adapter, no training; `studies.feature_probe`):
# a logistic-regression probe's dev accuracy on the sentence features, how alike the sentences' features
# are (mean pairwise cosine), their error against full precision, and how far one training-mode forward
# (the checkpoint's dropout) moves them, against their spread between sentences.

# %%
probe = pd.concat([studies.feature_probe(backbone, probe_budgets, preset, task, probe_sentences, seed)
                   for backbone in backbones], ignore_index=True)
probe = probe.astype({"budget": object}).fillna({"budget": studies.FULL_PRECISION})
studies.write_results(probe, results / "scaling_probe.csv",
                      dict(parameters, probe_budgets=probe_budgets, probe_sentences=probe_sentences), [])
probe.round(3)

# %% [markdown]
# **Reading.** Each point of the figure is a difference with its 95 % interval over dev examples (and over
# seeds for MPNet-base). Where quantization costs the full-precision LoRA no more than a point or two, no
# adapter can recover more than that, and a comparison between methods at that scale can only come out
# inconclusive; the default preset's scale is chosen where the gaps are measurable within the time budget
# of `make reproduce`. Where every method sits at chance at one budget, the probe says whether the
# quantized features still hold the label, and the dropout table whether training can reach it.
