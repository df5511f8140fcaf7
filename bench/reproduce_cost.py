"""What `make reproduce` costs from an empty run cache: the training and evaluation seconds recorded by
every run the notebooks use at a preset (each run counted once), by notebook. The cost tables and
model loading are not included; time `make reproduce` itself for the wall clock.
Run: `.venv/bin/python bench/reproduce_cost.py [--preset default]` (needs the runs cached).
"""

import argparse

import pandas as pd

from coalora import experiments, studies


def notebook_specs(preset: str) -> dict[str, list]:
    """The runs each notebook asks for with its default parameters (keep in step with notebooks/)."""
    classification = {space: studies.study_specs(preset, "sst2", space, seeds=[0, 1]) for space in ("nf", "int")}
    return {
        "01_fig1_motivation": classification["nf"],
        "02_fig2_workflow": studies.study_specs(preset, "sst2", "nf", methods=["coalora"], seeds=[0], search="pareto"),
        "03_table1": classification["int"],
        "04_fig3_bitwidth": classification["nf"] + classification["int"],
        "05_fig4_perplexity": studies.study_specs(preset, "c4", "nf", seeds=[0]),
    }


def run_seconds(spec) -> float:
    rows = experiments.run_experiment(spec)
    train = rows.drop_duplicates("configuration_id" if spec.method in ("qlora", "lqlora") else "method")
    return float(train["train_seconds"].sum() + rows["eval_seconds"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    seen, table = set(), []
    for notebook, specs in notebook_specs(args.preset).items():
        new = [s for s in specs if s.key() not in seen]
        seen |= {s.key() for s in new}
        table.append({"notebook": notebook, "runs": len(specs), "new runs": len(new),
                      "minutes": sum(run_seconds(s) for s in new) / 60})
    table = pd.DataFrame(table)
    print(table.round(1).to_string(index=False))
    print(f"total: {table['minutes'].sum():.1f} min of recorded training + evaluation over {len(seen)} runs")


if __name__ == "__main__":
    main()
