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
# # Figure 4: perplexity of causal LMs across average bit-widths
#
# *Paper, Figure 4: "Perplexity results on causal LLMs of varying sizes."* (Qwen2.5-1.5B/3B and
# LLaMA-2-7B on C4.) Here: SmolLM2-135M under `smoke`/`default`, Qwen2.5-Coder-1.5B under `large`, the
# paper's models under `paper`. Offline, both LMs come as 4-bit GGUF files dequantized to full precision,
# and the text is an offline stand-in for C4; the title names both.

# %% tags=["parameters"]
preset = "default"   # smoke | default | large | paper
seeds = [0, 1, 2]
backbone = None      # None: the preset's causal LM
recompute = False
output_root = None   # None: the project root (figures/ and results/)

# %%
import matplotlib.pyplot as plt

from coalora import claims, plots, studies
from coalora.configs import QuantSpace
from coalora.methods import COMPARED, METHODS

plots.use_style()
fields = {} if backbone is None else {"backbone": backbone}
specs = studies.study_specs(preset, "c4", "nf", [*COMPARED, "no-adapter"], seeds=seeds, **fields)
rows = studies.collect(specs, recompute)
summary = studies.by_budget(rows)
hv = studies.hypervolumes(rows, QuantSpace.nf().bits_range())
figures, results = studies.output_dirs(preset, output_root)
parameters = dict(preset=preset, seeds=seeds, backbone=backbone)
studies.write_results(studies.with_references(summary, rows), results / "fig4_perplexity_by_bits.csv", parameters,
                      specs)
studies.write_results(hv, results / "fig4_hypervolume.csv", parameters, specs)
summary.round(3)

# %%
fig, ax = plt.subplots(figsize=(4.6, 3.3), layout="constrained")
plots.plot_by_budget(ax, rows, "perplexity (lower is better)", scale=1.0)
ax.set_yscale("log")  # low-bit configurations of a 135M model are orders of magnitude worse
ax.set_title(plots.caption(f"Figure 4 ({preset} preset, seeds {seeds})", rows, 75), fontsize=7)
plots.save_figure(fig, figures, "fig4_perplexity")

# %%
wide = summary.pivot(index="budget", columns="method", values="mean").round(2)
print("perplexity by budget:\n", wide.to_string())
ceiling = studies.references(rows)
print("the same LoRA on the unquantized backbone:", ceiling[["mean", "std"]].round(2).to_dict("records"))
adapters = wide.drop(columns=["no-adapter"])
print("best per budget:", {budget: METHODS[m].label for budget, m in adapters.idxmin(axis=1).items()})
print("methods no better than the no-adapter floor (perplexity at or above it):",
      {budget: [METHODS[m].label for m in adapters.columns if adapters.loc[budget, m] >= wide.loc[budget, "no-adapter"]]
       for budget in wide.index})
claims.causal_claims(preset, seeds).round(3)

# %% [markdown]
# **Reading.** In the paper (its Figure 6; Qwen2.5-1.5B/3B, LLaMA-2-7B on C4) CoA-LoRA is consistently better
# than Shared-LoRA and comparable to or better than QLoRA and LQ-LoRA, while training once. The printed lines
# give this run's perplexities, the best method per budget, any method no better than the quantized model
# without an adapter (the dashed floor), and the claims with their intervals (log-perplexity differences). The
# offline "full-precision" model is itself a dequantized 4-bit GGUF and the text is a stand-in for C4, so the
# perplexities are not comparable to the paper's; only the ordering of methods within a budget is.
