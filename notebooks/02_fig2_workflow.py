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
# # Figure 2: the CoA-LoRA workflow, as data
#
# *Paper, Figure 2: "CoA-LoRA workflow: optimizing both the quantization configurations and the
# configuration-aware model to achieve maximum accuracy at any given bit-width."*
#
# Left: the loop. Right: one real run with `search="pareto"`: after each epoch the training configuration
# set is re-scored with the current model (task loss on fixed held-out training batches), a GP proposes
# new configurations by coordinate moves that raise expected hypervolume improvement, and the segmented
# Pareto filter keeps each bit segment's non-dominated configurations (the lines).

# %% tags=["parameters"]
preset = "default"   # smoke | default | large | paper
task = "sst2"
quantizer = "nf"     # nf | int
seed = 0
recompute = False
output_root = None   # None: the project root (figures/ and results/)

# %%
import matplotlib.pyplot as plt

from coalora import plots, studies

plots.use_style()
(spec,) = studies.study_specs(preset, task, quantizer, methods=["coalora"], seeds=[seed], search="pareto")
rows = studies.collect([spec], recompute)
rounds = studies.search_history(spec)
figures, results = studies.output_dirs(preset, output_root)
parameters = dict(preset=preset, task=task, quantizer=quantizer, seed=seed, search="pareto")
studies.write_results(rounds, results / "fig2_search_rounds.csv", parameters, [spec])
rounds.groupby(["epoch", "role"]).size().unstack("role")

# %%
fig, (loop, data) = plt.subplots(1, 2, figsize=(9, 3.4), width_ratios=[1, 1.4], layout="constrained")
plots.plot_workflow(loop)
loop.set_title("the loop")
plots.plot_search_rounds(data, rounds)
data.set_title("training configuration set across search rounds")
data.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
fig.suptitle(plots.caption(f"Figure 2 ({preset} preset, seed {seed}, {quantizer.upper()} space)", rows, 120),
             fontsize=8)
plots.save_figure(fig, figures, "fig2_workflow")

# %%
for epoch, r in rounds.groupby("epoch"):
    pool, kept = r[r["role"] == "pool"], r[r["role"] == "kept"]
    print(f"epoch {epoch}: scored {len(pool)} (loss {pool['loss'].min():.3f}-{pool['loss'].max():.3f}), "
          f"proposed {(r['role'] == 'proposal').sum()}, kept {len(kept)} "
          f"over {kept['avg_bits'].min():.2f}-{kept['avg_bits'].max():.2f} bits")

# %% [markdown]
# **Reading.** The paper draws this loop as a schematic only. Here it is one recorded run on the
# offline stand-ins named in the title: the printed lines show, per epoch, how many configurations were
# scored, proposed and kept. Losses fall from one epoch to the next as the shared adapter trains, and the
# kept set stays spread over the bit range because the filter keeps a front per segment.
