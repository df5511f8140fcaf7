"""What each paper figure and table is made of: the runs it needs, the tidy summaries drawn from their
rows, the paper's own published numbers, and where the outputs go.

Notebooks call these so they stay thin; every run goes through `experiments.run_experiment`, so a run
trained for one figure is a cache hit for the next.

    study_specs(...) -> [RunSpec] --collect--> rows --summaries--> tidy frames --write_results--> results/
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from coalora import experiments
from coalora.experiments import RunSpec, run_dir, run_experiment
from coalora.methods import METHODS
from coalora.presets import preset as get_preset
from coalora.repro import atomic_path, package_versions, write_json_atomic
from coalora.search import SEARCH_MODES

TASK_LABELS = {"sst2": "SST-2", "qnli": "QNLI", "mnli": "MNLI", "c4": "C4"}

# The poster's Table 1 (integer mixed precision, RoBERTa-Large on GLUE): accuracy per task, in the
# order the poster prints them in each cell (QNLI / MNLI / SST-2).
_PAPER_TABLE1_TASKS = ("qnli", "mnli", "sst2")
_PAPER_TABLE1 = {
    3: {"qlora": "0.8537 / 0.8153 / 0.8291", "lqlora": "0.8552 / 0.7397 / 0.9208",
        "shared": "0.7772 / 0.6618 / 0.8199", "coalora": "0.8616 / 0.8099 / 0.8589"},
    4: {"qlora": "0.8828 / 0.8491 / 0.9116", "lqlora": "0.8762 / 0.7913 / 0.9185",
        "shared": "0.8762 / 0.7632 / 0.8486", "coalora": "0.8841 / 0.8441 / 0.9254"},
    5: {"qlora": "0.8859 / 0.8554 / 0.9105", "lqlora": "0.8761 / 0.8481 / 0.9369",
        "shared": "0.8777 / 0.7674 / 0.8383", "coalora": "0.8863 / 0.8533 / 0.9346"},
    6: {"qlora": "0.8833 / 0.8466 / 0.9174", "lqlora": "0.8744 / 0.8484 / 0.9323",
        "shared": "0.8790 / 0.7704 / 0.8440", "coalora": "0.8925 / 0.8558 / 0.9323"},
}


def paper_table1(task: str | None = None) -> pd.DataFrame:
    """The paper's Table 1 as tidy rows (task, budget, method, value, source="paper")."""
    rows = [{"task": t, "budget": float(budget), "method": method, "value": float(v), "source": "paper"}
            for budget, cells in _PAPER_TABLE1.items() for method, cell in cells.items()
            for t, v in zip(_PAPER_TABLE1_TASKS, cell.split(" / "))]
    frame = pd.DataFrame(rows)
    if task is not None:
        if task not in _PAPER_TABLE1_TASKS:
            raise ValueError(f"the paper's Table 1 has no task {task!r}; it reports {', '.join(_PAPER_TABLE1_TASKS)}")
        frame = frame[frame["task"] == task].reset_index(drop=True)
    return frame


# ---- runs ----------------------------------------------------------------------------------------

def study_specs(preset: str, task: str, quantizer: str = "nf", methods: Iterable[str] = tuple(METHODS),
                seeds: Iterable[int] = (0,), **fields) -> list[RunSpec]:
    """One RunSpec per (method, seed); `fields` (e.g. search="pareto") go to every spec."""
    return [RunSpec(preset=preset, task=task, method=m, quantizer=quantizer, seed=int(s), **fields)
            for m in methods for s in seeds]


def ablation_specs(preset: str, task: str, seeds: Iterable[int] = (0,),
                   modes: Iterable[str] = SEARCH_MODES) -> list[RunSpec]:
    """Figure 8's runs: CoA-LoRA (NF) with each search mode, per seed. Every mode trains its first
    epoch on the same data order, so the modes differ only from the first search on."""
    return [spec for mode in modes for spec in study_specs(preset, task, "nf", ["coalora"], seeds, search=mode)]


def collect(specs: Sequence[RunSpec], recompute: bool = False) -> pd.DataFrame:
    """All runs' tidy rows, computing only those not cached (or all with `recompute`)."""
    return pd.concat([run_experiment(s, recompute) for s in specs], ignore_index=True)


def search_history(spec: RunSpec, recompute: bool = False) -> pd.DataFrame:
    """Figure 2's data: a pareto-search CoA-LoRA run's per-epoch pool, proposals and kept set."""
    if spec.search.mode != "pareto":
        raise ValueError(f"Figure 2 draws a run with search='pareto', got search={spec.search.mode!r}")
    run_experiment(spec, recompute)
    return experiments.search_rounds(spec)


# ---- summaries -----------------------------------------------------------------------------------

def by_budget(rows: pd.DataFrame, by: str = "method") -> pd.DataFrame:
    """Target-configuration scores per (`by`, budget): mean, std and count over seeds, and the
    configurations' mean average bits. `by` is "method" (in the order of `coalora.methods.METHODS`)
    or another column, e.g. "search" for the search ablation (in SEARCH_MODES order)."""
    target = rows[rows["configuration_set"] == "target"]
    out = (target.groupby([by, "budget"], sort=False)
           .agg(mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"),
                avg_bits=("avg_bits", "mean"))
           .reset_index())
    out["std"] = out["std"].fillna(0.0)                       # one seed: no spread, not NaN
    if by == "method":
        out = _in_method_order(out)
    elif by == "search":
        out[by] = pd.Categorical(out[by], categories=[m for m in SEARCH_MODES if m in set(out[by])], ordered=True)
    return out.sort_values([by, "budget"]).reset_index(drop=True)


def seen_vs_unseen(specs: Sequence[RunSpec], recompute: bool = False) -> pd.DataFrame:
    """CoA-LoRA's per-configuration scores on the configurations it trained on ("seen", from
    `experiments.seen_rows`) and on every evaluated one it never saw: method, seed,
    configuration_id, configuration_set, avg_bits, value, seen. Uses the CoA-LoRA specs among `specs`."""
    coalora = [s for s in specs if s.method == "coalora"]
    if not coalora:
        raise ValueError("seen vs unseen needs CoA-LoRA runs; no spec has method='coalora'")
    frames = [pd.concat([run_experiment(s), experiments.seen_rows(s, recompute)]) for s in coalora]
    cols = ["method", "seed", "configuration_id", "configuration_set", "avg_bits", "value", "seen"]
    return pd.concat(frames)[cols].sort_values(["seed", "avg_bits"]).reset_index(drop=True)


def accuracy_gap(rows: pd.DataFrame, method: str = "shared", reference: str = "qlora") -> pd.DataFrame:
    """Figure 1 (left): per target budget, `reference` minus `method` in points (mean over seeds)."""
    table = by_budget(rows[rows["method"].isin([method, reference])])
    wide = table.pivot(index="budget", columns="method", values="mean")
    missing = {method, reference} - set(wide.columns)
    if missing:
        raise ValueError(f"no target rows for {sorted(missing)}")
    return pd.DataFrame({"budget": wide.index, reference: wide[reference].to_numpy(),
                         method: wide[method].to_numpy(),
                         "gap_points": 100 * (wide[reference] - wide[method]).to_numpy()})


def fine_tuning_time(rows: pd.DataFrame, n_configurations: Sequence[int]) -> pd.DataFrame:
    """Figure 1 (right): cumulative fine-tuning seconds to serve n configurations. Per-configuration
    methods (QLoRA, LQ-LoRA) pay their measured mean seconds per configuration n times; Shared-LoRA
    and CoA-LoRA train once, so their cost is their measured training time for any n."""
    target = rows[rows["configuration_set"] == "target"]
    per_seed = target.groupby(["method", "seed"]).apply(_training_seconds, include_groups=False)
    rows_out = []
    for method, seconds in per_seed.groupby(level="method"):
        once = METHODS[method].trains_once
        for n in n_configurations:
            rows_out.append({"method": method, "n_configurations": int(n),
                             "seconds": float(seconds.mean()) * (1 if once else n),
                             "trains_once": once})
    return _in_method_order(pd.DataFrame(rows_out)).sort_values(["method", "n_configurations"]).reset_index(drop=True)


def _training_seconds(group: pd.DataFrame) -> float:
    """Seconds of one run: per configuration for per-configuration methods, else its one training."""
    if group["train_seconds"].nunique() == 1:                 # one shared training for every row
        return float(group["train_seconds"].iloc[0])
    return float(group.drop_duplicates("configuration_id")["train_seconds"].mean())


def hypervolumes(rows: pd.DataFrame, bits_range: tuple[float, float], by: Sequence[str] = ("method", "seed"),
                 higher_is_better: bool = True) -> pd.DataFrame:
    """Hypervolume of (average bits, score) over every evaluated configuration, per group."""
    from coalora.metrics import hypervolume

    value_range = (0.0, 1.0) if higher_is_better else (0.0, float(rows["value"].max()) * 1.1)  # shared by groups
    out = [{**dict(zip(by, key if isinstance(key, tuple) else (key,))),
            "hypervolume": hypervolume(g["avg_bits"], g["value"], bits_range, value_range, higher_is_better)}
           for key, g in rows.groupby(list(by))]
    return pd.DataFrame(out)


def wide_table(frame: pd.DataFrame, value: str = "mean", decimals: int = 2, scale: float = 100.0) -> pd.DataFrame:
    """Table 1 layout: one row per budget, one column per method (labelled, in METHODS order).
    Cells are `value` x `scale`, with "± std" where the frame has a std over more than one seed
    (a `by_budget` summary), so the paper's single numbers (`paper_table1`) lay out the same way."""
    spread = {"std", "n_seeds"} <= set(frame.columns)
    cells = [f"{row[value] * scale:.{decimals}f}"
             + (f" ± {row['std'] * scale:.{decimals}f}" if spread and row["n_seeds"] > 1 else "")
             for _, row in frame.iterrows()]
    wide = frame.assign(cell=cells).pivot(index="budget", columns="method", values="cell")
    wide = wide[[m for m in METHODS if m in wide.columns]].rename(columns={m: METHODS[m].label for m in METHODS})
    wide.index.name = "avg bits"
    wide.columns.name = None
    return wide


def _in_method_order(frame: pd.DataFrame) -> pd.DataFrame:
    present = [m for m in METHODS if m in set(frame["method"].astype(str))]
    return frame.assign(method=pd.Categorical(frame["method"], categories=present, ordered=True))


# ---- outputs -------------------------------------------------------------------------------------

def output_dirs(preset: str, root: str | Path | None = None) -> tuple[Path, Path]:
    """(figures, results) folders: `figures/` and `results/` under `root` (default: the project
    root, found from the working directory) for the default preset, `figures/<preset>/` and
    `results/<preset>/` for the others, so a smoke or large run never overwrites the committed files."""
    sub = get_preset(preset).output_subfolder
    root = Path(root) if root is not None else project_root()
    figures, results = root.joinpath("figures", *sub), root.joinpath("results", *sub)
    figures.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    return figures, results


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: the working directory) holding this
    project's pyproject.toml and notebooks/, so a notebook opened in notebooks/ writes to the root."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "notebooks").is_dir():
            return folder
    return here


def write_results(frame: pd.DataFrame, path: str | Path, parameters: dict,
                  specs: Sequence[RunSpec] = ()) -> Path:
    """Write `frame` as tidy CSV at `path` and its provenance beside it (`<stem>.provenance.json`):
    the notebook parameters and each run's key and own provenance. Both writes are atomic, and the
    record holds no clock time of its own, so a cache-hit re-run rewrites identical files."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    record = {"file": path.name, "parameters": _jsonable(parameters), "rows": len(frame),
              "runs": [_run_record(s) for s in specs]}
    record["packages"], record["python"] = package_versions(), platform.python_version()
    write_json_atomic(path.with_name(path.stem + ".provenance.json"), record)
    return path


def _run_record(spec: RunSpec) -> dict:
    spec = spec.resolved()
    folder = run_dir(spec)
    run = json.loads((folder / "provenance.json").read_text())
    keep = ("created_utc", "git", "device")
    return {"key": folder.name, "method": spec.method, "task": spec.task, "quantizer": spec.quantizer,
            "seed": spec.seed, "search": spec.search.mode, "backbone": spec.backbone,
            **{k: run[k] for k in keep if k in run}}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, RunSpec):
        return _jsonable(asdict(value))
    return value
