"""First fidelity table (issue 3): the four methods on the default preset (MiniLM-L6, RT-sentence
SST-2 stand-in, NF space) at the four NF budgets, plus CoA-LoRA on unseen configurations, over seeds.

Runs go through the experiment cache (COALORA_HOME/runs), so a rerun only prints, and the notebooks
reuse them. Run: `.venv/bin/python bench/fidelity.py [--seeds 0 1 2] [--preset default]`.
"""

import argparse
import logging

import pandas as pd

from coalora.experiments import RunSpec, run_experiment
from coalora.train import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = pd.concat([run_experiment(RunSpec(preset=args.preset, task="sst2", method=m, seed=s))
                      for s in args.seeds for m in args.methods], ignore_index=True)
    print(f"\n{rows['backbone_label'].iloc[0]}\n{rows['task_source'].iloc[0]}\n")

    target = rows[rows["kind"] == "target"]
    table = (target.groupby(["budget", "method"])["value"].agg(["mean", "std"]).mul(100).round(2)
             .unstack("method"))
    print("accuracy (%) at the NF budgets, mean and std over seeds", args.seeds)
    print(table.to_string(), "\n")

    unseen = rows[(rows["kind"] == "unseen") & (rows["method"] == "coalora")]
    if len(unseen):
        per_seed = unseen.groupby("seed")["value"].mean() * 100
        print(f"CoA-LoRA on {unseen.groupby('seed').size().iloc[0]} unseen configurations per seed: "
              f"mean accuracy {per_seed.mean():.2f} +- {per_seed.std():.2f} %")
        seen_mean = target[target["method"] == "coalora"].groupby("seed")["value"].mean() * 100
        print(f"CoA-LoRA at the target budgets: {seen_mean.mean():.2f} +- {seen_mean.std():.2f} %\n")

    seconds = (rows.drop_duplicates(["method", "seed", "configuration_id", "train_seconds"])
               .query("kind == 'target' or method in ['coalora', 'shared']")
               .drop_duplicates(["method", "seed", "train_seconds"])
               .groupby(["method", "seed"])["train_seconds"].sum().groupby("method").agg(["mean", "std"]).round(1))
    print("training seconds per method (QLoRA / LQ-LoRA: cumulative over the 4 configurations)")
    print(seconds.to_string())


if __name__ == "__main__":
    main()
