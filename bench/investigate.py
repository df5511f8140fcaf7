"""Why CoA-LoRA trails QLoRA at the lowest budget on the default preset (issue 3): CoA-LoRA variants
of learning rate, epochs, K (configurations per step), rank and the initial pool's bit range, each
against the default, at the NF budgets. Runs are cached. Run: `.venv/bin/python bench/investigate.py`.
"""

import argparse
import logging

import pandas as pd

from coalora.experiments import SCALES, RunSpec, run_experiment
from coalora.train import HyperParams

EPOCHS = SCALES["default"].epochs
VARIANTS = {
    "default (lr 1e-3, 2 epochs, K=2, r=8, pool 2.25-7.25)": {},
    "lr 3e-3": {"hp": HyperParams(lr=3e-3, epochs=EPOCHS)},
    "4 epochs": {"hp": HyperParams(epochs=4)},
    "K=4": {"hp": HyperParams(configs_per_step=4, epochs=EPOCHS)},
    "rank 16": {"hp": HyperParams(rank=16, epochs=EPOCHS)},
    "pool 2.25-4.25": {"pool_range": (2.25, 4.25)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    frames = []
    for name in args.variants:
        for seed in args.seeds:
            rows = run_experiment(RunSpec(preset="default", task="sst2", method="coalora", seed=seed,
                                          **VARIANTS[name]))
            frames.append(rows.assign(variant=name))
    qlora = pd.concat([run_experiment(RunSpec(preset="default", task="sst2", method="qlora", seed=s))
                       for s in args.seeds]).assign(variant="QLoRA (reference)")
    rows = pd.concat([*frames, qlora], ignore_index=True)
    target = rows[rows["kind"] == "target"]
    table = target.pivot_table(index="variant", columns="budget", values="value", aggfunc="mean").mul(100)
    table["mean"] = table.mean(axis=1)
    seconds = rows.drop_duplicates(["variant", "seed", "train_seconds"]).groupby("variant")["train_seconds"].sum()
    table["train s"] = seconds / len(args.seeds)
    print(f"\nCoA-LoRA variants, accuracy (%) at the NF budgets, seeds {args.seeds}")
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
