"""The search ablation (paper Fig. 8; issue 4): CoA-LoRA with search "pareto" vs "frozen" vs
"random" on the default preset (MiniLM-L6, RT-sentence SST-2 stand-in, NF space), over seeds:
accuracy at the NF budgets and the hypervolume of (average bits, accuracy) over the target and
unseen configurations. Runs are cached (the frozen ones are the fidelity table's CoA-LoRA runs).
Run: `.venv/bin/python bench/ablation.py [--seeds 0 1 2]`.
"""

import argparse
import logging

import pandas as pd

from coalora.configs import QuantSpace
from coalora.experiments import RunSpec, run_experiment
from coalora.metrics import hypervolume
from coalora.search import SEARCH_MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(SEARCH_MODES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = pd.concat([run_experiment(RunSpec(preset=args.preset, task="sst2", method="coalora", seed=s, search=m))
                      for s in args.seeds for m in args.modes], ignore_index=True)
    print(f"\n{rows['backbone_label'].iloc[0]}\n{rows['task_source'].iloc[0]}\n")
    target = rows[rows["kind"] == "target"]
    table = target.groupby(["budget", "search"])["value"].agg(["mean", "std"]).mul(100).round(2).unstack("search")
    print("CoA-LoRA accuracy (%) at the NF budgets by search mode, mean and std over seeds", args.seeds)
    print(table.to_string(), "\n")
    per_seed = target.groupby(["search", "seed"])["value"].mean().mul(100).round(2).unstack("seed")
    print("mean over the budgets (%) per seed (every mode starts from the same first-epoch data order):")
    print(per_seed.to_string(), "\n")
    bits_range = QuantSpace.nf().bits_range()
    hv = rows.groupby(["search", "seed"]).apply(
        lambda g: hypervolume(g["avg_bits"], g["value"], bits_range), include_groups=False)
    print(f"hypervolume of (avg bits in {bits_range[0]:.2f}-{bits_range[1]:.2f}, accuracy), "
          "target + unseen configurations:")
    print(hv.groupby("search").agg(["mean", "std"]).round(4).to_string())


if __name__ == "__main__":
    main()
