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
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from coalora import experiments
from coalora.experiments import RunSpec, run_dir, run_experiment
from coalora.methods import COMPARED, METHODS
from coalora.data import task_identity, task_type
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

def study_specs(preset: str, task: str, quantizer: str = "nf", methods: Iterable[str] = COMPARED,
                seeds: Iterable[int] = (0,), **fields) -> list[RunSpec]:
    """One RunSpec per (method, seed), by default of the compared methods and the full-precision
    ceiling; `fields` (e.g. search="pareto") go to every spec."""
    return [RunSpec(preset=preset, task=task, method=m, quantizer=quantizer, seed=int(s), **fields)
            for m in methods for s in seeds]


def ablation_specs(preset: str, task: str, seeds: Iterable[int] = (0,), modes: Iterable[str] = SEARCH_MODES,
                   epochs: int | None = None) -> list[RunSpec]:
    """Figure 8's runs: CoA-LoRA (NF) with each search mode, per seed, for `epochs` epochs (None: the
    preset's). Every mode trains its first epoch on the same data order, so the modes differ only
    from the first search on; with E epochs the search refines the training set E - 1 times."""
    seeds = list(seeds)
    fields = {} if epochs is None else {"hp": experiments.preset_hyperparams(preset, epochs)}
    return [spec for mode in modes
            for spec in study_specs(preset, task, "nf", ["coalora"], seeds, search=mode, **fields)]


# The numbered notebooks' defaults (their `parameters` cells): seeds, and the epochs of Figure 8's runs.
SEQUENCE_SEEDS = (0, 1, 2)
SEQUENCE_ABLATION_EPOCHS = 3


def sequence_specs(preset: str, task: str = "sst2", seeds: Iterable[int] = SEQUENCE_SEEDS,
                   ablation_epochs: int = SEQUENCE_ABLATION_EPOCHS) -> list[RunSpec]:
    """Every run the numbered notebooks train with these parameters: Figures 1-3 and Table 1 (NF and
    integer), Figure 2's search, Figure 4's causal LM with the no-adapter floor, Figure 8's ablation.
    `python -m coalora.studies runs` computes them side by side before the notebooks read them."""
    seeds = list(seeds)
    return [*study_specs(preset, task, "nf", seeds=seeds), *study_specs(preset, task, "int", seeds=seeds),
            *study_specs(preset, task, "nf", methods=["coalora"], seeds=seeds[:1], search="pareto"),
            *study_specs(preset, "c4", "nf", [*COMPARED, "no-adapter"], seeds=seeds),
            *ablation_specs(preset, task, seeds, epochs=ablation_epochs)]


# The scaling study: what each gap says about the method, and which runs measure it.
SCALING_GAPS = {  # name -> (method, reference, budgets: "lowest" or "mean")
    "full precision - QLoRA, lowest budget": ("fp-lora", "qlora", "lowest"),
    "full precision - QLoRA, mean": ("fp-lora", "qlora", "mean"),
    "CoA-LoRA - Shared-LoRA, mean": ("coalora", "shared", "mean"),
    "CoA-LoRA - without theta, mean": ("coalora", "coalora-no-theta", "mean"),
}
SCALING_METHODS = ("fp-lora", "qlora", "shared", "coalora-no-theta", "coalora")
# The ones whose one adapter serves every budget: what `head_features` reads.
SHARED_ADAPTER_METHODS = tuple(m for m in SCALING_METHODS if METHODS[m].serves_any_configuration)


# The scaling study scores the lowest and the highest NF budget only: QLoRA trains one adapter per budget,
# and two are what its gaps need (the lowest budget, and an average over a low and a high one).
SCALING_BUDGETS = (2.5, 4.0)
# The scaling study trains without a warm-up, as the paper's code, with theta at 1e-4, the paper's value
# (ten times below this LoRA's rate), and with PyTorch's dropout masks: these are the runs its committed
# results come from, and `make scaling` (6 hours) regenerates them. Its warm-up and theta-rate arms are
# measured beside it (docs/measurements.md#the-scaling-study, #what-theta-adds).
SCALING_HP = {"warmup": 0.0, "theta_lr": 1e-4, "mask_draw": "torch"}


def scaling_specs(preset: str, task: str, backbones: Iterable[str], n_trains: Iterable[int], seed: int = 0,
                  methods: Iterable[str] = SCALING_METHODS, backbone_dropout: float | None = None) -> list[RunSpec]:
    """The scaling study's runs: every method on each backbone with each number of training sentences
    (the preset's epochs and batch size, so more sentences are more steps), one seed, SCALING_BUDGETS,
    SCALING_HP; `backbone_dropout` as in HyperParams (None: the checkpoint's)."""
    base = get_preset(preset).size(task_type(task))
    specs = [RunSpec(preset=preset, task=task, method=m, seed=seed, backbone=b, size=replace(base, n_train=int(n)),
                     eval_budgets=SCALING_BUDGETS)
             for b in backbones for n in n_trains for m in methods]
    dropout = {} if backbone_dropout is None else {"backbone_dropout": backbone_dropout}
    return [replace(s, hp=replace(s.resolved().hp, **SCALING_HP, **dropout)) for s in specs]


def target_accuracy(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """One row per run and evaluation budget (the full-precision reference: budget NaN): backbone,
    training sentences, backbone dropout (NaN: the checkpoint's), method, seed, budget, accuracy (%)."""
    out = []
    for spec in specs:
        resolved = spec.resolved()
        rows = run_experiment(spec)
        for _, row in rows[rows["configuration_set"].isin(["target", "reference"])].iterrows():
            out.append({"backbone": resolved.backbone, "n_train": resolved.size.n_train,
                        "backbone_dropout": resolved.hp.backbone_dropout, "method": spec.method, "seed": spec.seed,
                        "budget": None if pd.isna(row["budget"]) else float(row["budget"]),
                        "accuracy": 100 * float(row["value"])})
    return pd.DataFrame(out)


def scaling_gaps(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """Per (backbone, training steps, backbone dropout) of `scaling_specs`: each gap of SCALING_GAPS in
    points with its 95 % paired interval (`stats.paired_difference`: dev examples, and seeds where there are
    several)."""
    from coalora import stats

    out = []
    groups = {}
    for spec in specs:
        resolved = spec.resolved()
        groups.setdefault((resolved.backbone, resolved.size, resolved.hp.backbone_dropout), []).append(spec)
    for (backbone, size, dropout), group in groups.items():
        steps = size.epochs * -(-size.n_train // size.batch_size)
        targets, budgets = per_example([s for s in group if s.method != "fp-lora"])
        ceiling = _full_precision([s for s in group if s.method == "fp-lora"])
        arrays = {**targets, "fp-lora": np.repeat(ceiling, len(budgets), axis=1)}
        for name, (method, reference, over) in SCALING_GAPS.items():
            gaps = stats.paired_difference(arrays[method], arrays[reference])
            estimate, lo, hi = gaps[0 if over == "lowest" else "mean"]
            out.append({"backbone": backbone, "n_train": size.n_train, "steps": steps, "backbone_dropout": dropout,
                        "gap": name,
                        "estimate": 100 * estimate, "ci_low": 100 * lo, "ci_high": 100 * hi})
    return pd.DataFrame(out)


# Sentences the probe is fitted on: as many as the 384-768 features it weighs, so a linear probe neither
# memorises a handful nor costs the backbone's forward over the whole training split.
PROBE_SENTENCES = 512


def feature_probe(backbone: str, budgets: Iterable[float | None], preset: str = "default", task: str = "sst2",
                  n_sentences: int = PROBE_SENTENCES, seed: int = 0) -> pd.DataFrame:
    """What the quantized backbone alone (no adapter, no training) leaves a classifier, at each ILP budget
    (None: full precision), on the features the classification head reads (the first token's last hidden
    state; BERT's pooler and MPNet's dense layer start from it):

    - probe: dev accuracy of a logistic-regression probe fitted to `n_sentences` training sentences
      (standardised features, L2 penalty 1/2): whether the label is still linearly readable;
    - cosine: mean pairwise cosine between dev sentences' features (1: every sentence looks alike);
    - error: ||f - f_fp|| / ||f_fp|| over the dev set, against full precision;
    - dropout_noise: ||f_train - f|| / ||f - mean f||: how far one training-mode forward (the
      checkpoint's dropout on) moves the features, against their spread between sentences;
    - two_bit_share: the share of weight matrices the ILP puts at 2 bits.
    """
    import copy

    import torch

    from coalora import models
    from coalora.data import TASKS, load_task
    from coalora.lora import quantize_weights_
    from coalora.metrics import mean_cosine, sentence_features
    from coalora.repro import seed_everything

    if task_type(task) != "classification":
        raise ValueError(f"the feature probe reads a classifier's features; task {task!r} is a {task_type(task)} "
                         f"task; classification tasks: {', '.join(t for t in TASKS if task_type(t) == 'classification')}")
    budgets = list(budgets)
    spec = RunSpec(preset=preset, task=task, method="qlora", seed=seed, backbone=backbone,
                   eval_budgets=tuple(b for b in budgets if b is not None) or None).resolved()
    seed_everything(seed)
    data = load_task(task, preset)
    base, tokenizer = models.load_backbone(spec.backbone, "classification", num_labels=data.num_labels)
    train = experiments._batches(data, tokenizer, spec, "train", shuffle=False)
    dev = experiments._batches(data, tokenizer, spec, "dev", shuffle=False)

    reference, reference_y = sentence_features(base, dev)  # full precision: what every budget's error is against
    rows = []
    for budget in budgets:
        model, share = base, 0.0
        avg_bits = 8 * next(base.parameters()).element_size()  # full precision: the weights' own bits
        if budget is not None:
            configuration = experiments._allocate(spec, budget)
            model = quantize_weights_(copy.deepcopy(base), configuration)
            avg_bits = configuration.avg_bits
            share = float(np.mean([lq.bits == 2 for _, lq in configuration]))
        fit_x, fit_y = sentence_features(model, train, n_sentences)
        dev_x, dev_y = (reference, reference_y) if budget is None else sentence_features(model, dev)
        torch.manual_seed(seed)  # the dropout masks
        noisy = sentence_features(model, dev, training=True)[0]
        rows.append({
            "backbone": spec.backbone, "budget": budget, "avg_bits": avg_bits, "two_bit_share": share,
            "probe": _probe_accuracy(fit_x, fit_y, dev_x, dev_y),
            "cosine": mean_cosine(dev_x),
            "error": float((dev_x - reference).norm() / reference.norm()),
            "dropout_noise": float((noisy - dev_x).norm() / (dev_x - dev_x.mean(0)).norm()),
        })
    return pd.DataFrame(rows)


def head_features(specs: Sequence[RunSpec], recompute: bool = False) -> pd.DataFrame:
    """What a trained run's one adapter leaves its classification head, at each target budget: the
    run's accuracy (%) beside the mean pairwise cosine of the features the head reads (as in
    `feature_probe`) over the dev split, in the run's precision. A cosine near 1 means every sentence
    looks alike to the head, which can then only guess. For runs of SHARED_ADAPTER_METHODS on a
    classification task; cached per run."""
    from coalora import lora
    from coalora.data import TASKS
    from coalora.metrics import mean_cosine, sentence_features

    out = []
    for spec in specs:
        spec = spec.resolved()
        if spec.method not in SHARED_ADAPTER_METHODS:
            raise ValueError(f"head features are read from one trained adapter; got method {spec.method!r}; "
                             f"choose among {', '.join(SHARED_ADAPTER_METHODS)}")
        if task_type(spec.task) != "classification":
            raise ValueError(f"head features are a classifier's; task {spec.task!r} is a {task_type(spec.task)} task; "
                             f"classification tasks: {', '.join(t for t in TASKS if task_type(t) == 'classification')}")
        rows = run_experiment(spec)
        targets = rows[rows["configuration_set"] == "target"]

        def compute(spec=spec, targets=targets):
            _, trained, dev, _ = experiments._reloaded(spec)
            lora.load_adapter_state(trained.model, trained.states["shared"])
            found = []
            for budget, cid in zip(targets["budget"], targets["configuration_id"]):
                configuration = experiments._allocate(spec, budget)
                assert configuration.digest() == cid, f"budget {budget} allocates another configuration than the run's"
                lora.set_configuration(trained.model, configuration)
                features, _ = sentence_features(trained.model, dev, precision=spec.hp.precision)
                found.append({"configuration_id": cid, "cosine": mean_cosine(features)})
            return found

        cosines = experiments._cached_rows(spec, "head_features.csv", recompute, compute,
                                            columns=["configuration_id", "cosine"])
        merged = targets.merge(cosines[["configuration_id", "cosine"]], on="configuration_id", validate="one_to_one")
        if len(merged) != len(targets):
            raise ValueError(f"{run_dir(spec) / 'head_features.csv'} lacks target configurations of the run; "
                             f"recompute it (recompute=True)")
        for _, row in merged.iterrows():
            out.append({"backbone": spec.backbone, "n_train": spec.size.n_train,
                        "backbone_dropout": spec.hp.backbone_dropout, "method": spec.method, "seed": spec.seed,
                        "budget": float(row["budget"]), "accuracy": 100 * float(row["value"]),
                        "cosine": float(row["cosine"])})
    return pd.DataFrame(out)


def theta_adjustments(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """How far theta moves a trained run's shared LoRA at each target budget, as a share of that LoRA:
    `adjustment` is the mean over matrices of ||B (M_i - I) A|| / ||B A|| (Frobenius norms; M_i = I +
    gamma U_i), and `configuration_part` the same for M_i minus its mean over the run's target
    configurations, the part of the adjustment that depends on the configuration. Both are 0 when theta
    does nothing. For runs of a method with theta; reads the cached adapter."""
    import torch

    from coalora.lora import ADAPTER

    out = []
    for spec in specs:
        spec = spec.resolved()
        if not METHODS[spec.method].theta:
            raise ValueError(f"theta's adjustments need a method with theta, got {spec.method!r}; choose among "
                             f"{', '.join(m for m, v in METHODS.items() if v.theta)}")
        targets = run_experiment(spec).query("configuration_set == 'target'").sort_values("budget")
        model = experiments.trained_model(spec)
        configurations = [experiments._allocate(spec, b) for b in targets["budget"]]
        for c, budget, cid in zip(configurations, targets["budget"], targets["configuration_id"]):
            if c.digest() != cid:
                raise ValueError(f"budget {budget} now allocates configuration {c.digest()}, but the run in "
                                 f"{run_dir(spec)} was scored on {cid}; recompute the run (recompute=True)")
        with torch.no_grad():
            theta = model.theta
            m = torch.stack([theta.adjustments(theta.config_index(c)) for c in configurations])  # [C, N, r, r]
            layers = list(model.lora_layers.values())
            # ||B D A||^2 = tr(D^T (B^T B) D (A A^T)): r x r Gram matrices instead of out x in products.
            bs = [la.lora_B[ADAPTER].weight.float() for la in layers]  # N x [out, r]
            as_ = [la.lora_A[ADAPTER].weight.float() for la in layers]  # N x [r, in]
            gram_b = torch.stack([b.T @ b for b in bs])  # [N, r, r]
            gram_a = torch.stack([a @ a.T for a in as_])  # [N, r, r]

            def norm(d: torch.Tensor) -> torch.Tensor:  # d [N, r, r] -> ||B_i d_i A_i|| [N]
                return torch.einsum("nji,njk,nkl,nil->n", d, gram_b, d, gram_a).clamp_min(0).sqrt()

            eye = torch.eye(theta.rank, device=m.device).expand(len(layers), -1, -1)
            plain = norm(eye)  # ||B_i A_i||
            for k, budget in enumerate(targets["budget"]):
                out.append({"method": spec.method, "seed": spec.seed, "theta_lr": spec.hp.theta_lr or spec.hp.lr,
                            "warmup": spec.hp.warmup, "budget": float(budget),
                            "adjustment": float((norm(m[k] - eye) / plain).mean()),
                            "configuration_part": float((norm(m[k] - m.mean(0)) / plain).mean()),
                            "gamma": float(theta.gamma)})
    return pd.DataFrame(out)


def _probe_accuracy(fit_x, fit_y, test_x, test_y) -> float:
    """Accuracy on (test_x, test_y) of multinomial logistic regression fitted by L-BFGS to standardised
    (fit_x [N, H], fit_y [N]) with an L2 penalty of 1/2 ||W||^2 on the summed loss."""
    import torch

    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-6
    x, t = (fit_x - mean) / std, (test_x - mean) / std
    classes = int(max(fit_y.max(), test_y.max())) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(x @ weight + bias, fit_y, reduction="sum")
                + 0.5 * weight.square().sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((t @ weight + bias).argmax(1) == test_y).float().mean())


def _full_precision(specs: Sequence[RunSpec]) -> np.ndarray:
    """[S, 1, N] per-example results of full-precision reference runs."""
    return np.stack([experiments.predictions(s)[experiments.FULL_PRECISION][None] for s in
                     sorted(specs, key=lambda s: s.seed)])


def collect(specs: Sequence[RunSpec], recompute: bool = False) -> pd.DataFrame:
    """All runs' tidy rows, computing only those not cached (or all with `recompute`, each distinct
    run once: specs that differ only in what cannot change a run share it)."""
    computed: set[str] = set()

    def rows(spec: RunSpec) -> pd.DataFrame:
        again = recompute and spec.key() not in computed
        computed.add(spec.key())
        return run_experiment(spec, again)
    return pd.concat([rows(s) for s in specs], ignore_index=True)


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
    `experiments.seen_rows`), on its targets, and on the ones it never saw (`experiments.unseen_rows`):
    method, seed, configuration_id, configuration_set, avg_bits, value, seen. Uses the CoA-LoRA specs
    among `specs`."""
    coalora = [s for s in specs if s.method == "coalora"]
    if not coalora:
        raise ValueError("seen vs unseen needs CoA-LoRA runs; no spec has method='coalora'")
    frames = [pd.concat([run_experiment(s), experiments.unseen_rows(s, recompute), experiments.seen_rows(s, recompute)])
              for s in coalora]
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
    target = target[[not METHODS[m].reference for m in target["method"].astype(str)]]
    per_seed = target.groupby(["method", "seed"]).apply(run_training_seconds, include_groups=False)
    rows_out = []
    for method, seconds in per_seed.groupby(level="method"):
        once = METHODS[method].trains_once
        for n in n_configurations:
            rows_out.append({"method": method, "n_configurations": int(n),
                             "seconds": float(seconds.mean()) * (1 if once else n),
                             "trains_once": once})
    return _in_method_order(pd.DataFrame(rows_out)).sort_values(["method", "n_configurations"]).reset_index(drop=True)


def run_training_seconds(group: pd.DataFrame) -> float:
    """Seconds of one run: per configuration for per-configuration methods, else its one training."""
    if group["train_seconds"].nunique() == 1:                 # one shared training for every row
        return float(group["train_seconds"].iloc[0])
    return float(group.drop_duplicates("configuration_id")["train_seconds"].mean())


def hypervolumes(rows: pd.DataFrame, bits_range: tuple[float, float],
                 by: Sequence[str] = ("method", "seed")) -> pd.DataFrame:
    """Hypervolume of (average bits, score) per group over the target configurations only, which
    every method is scored on, so every group's point set is the same configurations.

    Bits are normalised over `bits_range` (fewer is better). Accuracy counts over [0, 1]; perplexity
    on a log scale from 1 (a perfect model) to the vocabulary size (uniform guessing, the rows'
    `chance`): y = 1 - log(ppl) / log(vocabulary), a fixed reference that no single bad point moves."""
    from coalora.metrics import hypervolume

    target = rows[rows["configuration_set"] == "target"]
    out = []
    for key, g in target.groupby(list(by), observed=True):
        if (g["metric"] == "perplexity").all():
            y = 1 - np.log(g["value"]) / np.log(g["chance"])
        else:
            y = g["value"]
        out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))),
                    "hypervolume": hypervolume(g["avg_bits"], y, bits_range), "n_points": len(g)})
    return pd.DataFrame(out)


def references(rows: pd.DataFrame) -> pd.DataFrame:
    """The reference rows' scores (the full-precision ceiling): mean, std and count over seeds."""
    ref = rows[rows["configuration_set"] == "reference"]
    out = (ref.groupby("method").agg(mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"),
                                     avg_bits=("avg_bits", "mean")).reset_index())
    out["std"] = out["std"].fillna(0.0)
    return out


FULL_PRECISION = "full precision"  # the budget column's label for a reference (unquantized) row in results/


def with_references(summary: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """`summary` (from `by_budget`, by method) with the reference rows (`references`) appended under
    the budget FULL_PRECISION: what the notebooks write, so a ceiling a reading quotes stands in a
    results file. Only `summary`'s columns are kept; numeric budgets become text ("3", "2.5"; `budget_labels`)."""
    ref = references(rows).assign(budget=FULL_PRECISION)
    return pd.concat([budget_labels(summary), ref[[c for c in summary.columns if c in ref]]], ignore_index=True)


def budget_labels(frame: pd.DataFrame, missing: str = "mean") -> pd.DataFrame:
    """`frame` with its numeric budget column as text ("3", "2.5"; NaN as `missing`, e.g. the mean
    over budgets of `paired_gaps`), for a results file whose budget column also holds a label."""
    labels = [missing if pd.isna(b) else f"{b:g}" if isinstance(b, (int, float, np.number)) else b
              for b in frame["budget"]]
    return frame.assign(budget=pd.Series(labels, index=frame.index, dtype=object))


def paired_gaps(specs: Sequence[RunSpec], method: str, reference: str, scale: float = 100.0) -> pd.DataFrame:
    """`method` minus `reference` at each target budget and on average over them, with 95 % paired
    intervals over seeds and dev examples (coalora.stats): budget (NaN for the average),
    estimate, ci_low, ci_high, n_seeds. Points of accuracy by default (`scale`)."""
    from coalora import stats

    arrays, budgets = per_example([s for s in specs if s.method in (method, reference)])
    gaps = stats.paired_difference(arrays[method], arrays[reference])
    n_seeds = arrays[method].shape[0]
    return pd.DataFrame([{"budget": budgets[k] if k != "mean" else np.nan, "estimate": scale * e,
                          "ci_low": scale * lo, "ci_high": scale * hi, "n_seeds": n_seeds}
                         for k, (e, lo, hi) in gaps.items()])


def per_example(specs: Sequence[RunSpec], configuration_set: str = "target") -> tuple[dict[str, np.ndarray], list]:
    """Per-example results of each method's runs, paired: method -> [S seeds, K configurations,
    N examples] (seeds in sorted order, configurations by budget), and the K budgets. Every method
    must have run the same seeds; the configurations are those of `configuration_set` (runs without
    any are left out)."""
    by_method: dict[str, dict[int, np.ndarray]] = {}
    budgets, configurations = None, None
    for spec in specs:
        rows = run_experiment(spec)
        rows = rows[rows["configuration_set"] == configuration_set].sort_values("budget")
        if rows.empty:  # e.g. the full-precision reference has no target configurations
            continue
        predictions = experiments.predictions(spec)
        by_method.setdefault(spec.method, {})[spec.seed] = np.stack([predictions[c] for c in rows["configuration_id"]])
        if configurations is None:
            budgets, configurations = list(rows["budget"]), list(rows["configuration_id"])
        elif list(rows["configuration_id"]) != configurations:  # pairs must be the same configurations
            raise ValueError(f"run {spec.method} seed {spec.seed} was scored on other {configuration_set} "
                             f"configurations ({list(rows['configuration_id'])}) than the first run "
                             f"({configurations}); recompute the runs of the study together")
    seeds = {tuple(sorted(s)) for s in by_method.values()}
    if len(seeds) != 1:
        raise ValueError(f"paired comparisons need the same seeds for every method, got "
                         f"{ {m: sorted(s) for m, s in by_method.items()} }")
    order = sorted(next(iter(by_method.values())))
    return {m: np.stack([runs[s] for s in order]) for m, runs in by_method.items()}, budgets


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
    return {"key": folder.name, "method": spec.method, "task": task_identity(spec.task), "quantizer": spec.quantizer,
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


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import logging

    from coalora.data import TASKS
    from coalora.presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m coalora.studies",
                                     description="Compute the runs the numbered notebooks read, side by side.")
    commands = parser.add_subparsers(dest="command", required=True)
    runs = commands.add_parser("runs", help="train and evaluate every run of the notebook sequence not yet cached")
    runs.add_argument("--preset", default="default", choices=sorted(PRESETS))
    runs.add_argument("--task", default="sst2", help="the classification task (the causal LM's is c4)",
                      choices=sorted(t for t in TASKS if task_type(t) == "classification"))
    runs.add_argument("--workers", type=int, default=1,
                      help="processes side by side, each with an equal share of the CPU threads (default 1)")
    runs.add_argument("--recompute", action="store_true", help="recompute cached runs too")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    logging.basicConfig(level=logging.WARNING)
    done = experiments.run_many(sequence_specs(args.preset, args.task), args.workers, args.recompute)
    print(f"{done} runs computed; the rest were cached")


if __name__ == "__main__":
    main()
