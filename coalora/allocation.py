"""Budget allocation: pick one quantization option per matrix so the model's average bits stay
within a budget while the total (optionally Fisher-weighted) quantization error is smallest.

This is LQ-LoRA's integer linear program (docs/method.md#allocation), solved with `scipy.optimize.milp` (HiGHS):
    minimise   sum_ij cost[i, j] x[i, j]
    subject to sum_j x[i, j] = 1 for every matrix i,
               sum_ij numel_i * bits_j * x[i, j] <= budget * sum_i numel_i,   x binary.
Options dominated within a matrix (no fewer bits and no lower cost than another option) are dropped
before solving; some optimal solution never uses them, and the ILP shrinks ~10x.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from tqdm.auto import tqdm

from coalora import assets, models
from coalora.configs import Configuration, LayerQuant, Layout, MatrixSpec, QuantSpace
from coalora.names import check_name
from coalora.presets import preset as get_preset
from coalora.quant import double_quantize_scales, snap_to_code, to_blocks
from coalora.repro import atomic_path, from_main, processes, write_text_atomic

logger = logging.getLogger(__name__)

COST_TABLE_VERSION = 2  # bump when a table's numbers change: every cached table (and run) is recomputed
# Cost tables are exact up to COST_TABLE_EXACT quantized weights (MiniLM-L6 has 10.6M); bigger models
# score a seeded sample of COST_TABLE_SAMPLE weights in 64-weight chunks (allocations then cost within
# ~1% of the exact optimum, tested on MiniLM).
WEIGHTINGS = ("fisher", "error")
# The Fisher of LQ-LoRA and the paper sums squared per-example gradients over 10,000 C4 examples. Here
# 512 sentences of a classification task (about 10k tokens; seconds on MiniLM-L6), or 64 token blocks of
# a causal LM (8k tokens: about a minute on SmolLM2-135M, where 512 blocks took 8.5 min); the table is
# computed once per backbone, space, task and count.
FISHER_EXAMPLES = {"classification": 512, "causal-lm": 64}
FISHER_MAX_LENGTH = 128  # tokens per sentence, or the block size of a causal LM
COST_TABLE_EXACT = 2**24
COST_TABLE_SAMPLE = 2**22
SAMPLE_CHUNK = 64  # a multiple of every block size, so a sampled chunk is whole blocks at any size
# ILP solutions of this process: (table digest, budget) -> (choice, cost); see solve_allocation.
_SOLVED: dict[tuple[str, float], tuple[np.ndarray, float]] = {}
# HiGHS's options. A solve ends well inside the time limit (a SmolLM2 table: 2-5 s on 2 CPU cores), and
# HiGHS is deterministic, so a stored solution is the one a fresh solve of the same table returns.
MILP_OPTIONS = {"time_limit": 60, "mip_rel_gap": 1e-7}


@dataclass
class CostTable:
    """cost[i, j]: error of matrix i (layout order) under option j (space.options() order)."""

    layout: Layout
    space: QuantSpace
    costs: np.ndarray  # [N, J] float64
    importance: str  # "none" or a description of the Fisher data

    @property
    def option_bits(self) -> np.ndarray:
        return np.array([o.storage_bits for o in self.space.options()])

    def save(self, path) -> None:
        layout = [[m.name, list(m.shape), m.block, m.module_type] for m in self.layout.matrices]
        meta = {"backbone": self.layout.backbone, "layout": layout, "space": self.space.name,
                "importance": self.importance, "version": COST_TABLE_VERSION}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, costs=self.costs, meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path) -> CostTable:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            costs = data["costs"]
        if meta.get("version") != COST_TABLE_VERSION:
            raise ValueError(f"cost table {path} has version {meta.get('version')}, need {COST_TABLE_VERSION}")
        layout = Layout(meta["backbone"], tuple(MatrixSpec(n, tuple(s), b, t) for n, s, b, t in meta["layout"]))
        return cls(layout, QuantSpace.named(meta["space"]), costs, meta["importance"])


def matrix_costs(weight: torch.Tensor, space: QuantSpace, importance: torch.Tensor | None = None,
                 fraction: float = 1.0) -> np.ndarray:
    """Errors ||sqrt(F) * (W - Q_j(W))||^2 of one matrix for every option j of `space`: [J].

    Work is shared across options: blocks and absmax per block size, double-quantized scales per
    scale setting, then one dequantization per bit-width. With `fraction` < 1 the error is summed
    over a fixed random sample of that share of the matrix's 64-weight chunks (whole blocks for
    every block size) and scaled up: an unbiased estimate. Scales always come from the whole matrix.
    """
    column = {lq: j for j, lq in enumerate(space.options())}
    out = np.empty(len(column))
    chunks = _sampled_chunks(weight.numel(), fraction)                       # [k] or None
    for block_size in space.block_size:
        blocks = to_blocks(weight, block_size)                               # [n, B0]
        absmax = blocks.abs().amax(dim=1)                                    # scales see every block
        rows = slice(None) if chunks is None else _chunk_rows(chunks, block_size, len(blocks))
        kept = blocks[rows]                                                  # [k, B0], gathered once
        weights = None if importance is None else to_blocks(importance, block_size)[rows]
        for scale_bits in space.scale_bits:
            for scale_dtype in space.scale_dtype:
                for group_size in space.group_size:
                    scales = double_quantize_scales(absmax, scale_bits, scale_dtype, group_size)[rows, None]
                    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
                    normalized = kept / safe                                  # once per scale setting
                    for bits in space.bits:
                        err = (kept - snap_to_code(normalized, space.kind, bits) * scales) ** 2
                        if weights is not None:
                            err = err * weights
                        lq = LayerQuant(space.kind, bits, scale_bits, scale_dtype, block_size, group_size)
                        out[column[lq]] = float(err.sum(dtype=torch.float64))
    if chunks is not None:
        out *= _n_chunks(weight.numel()) / len(chunks)
    return out


def _n_chunks(numel: int) -> int:
    return -(-numel // SAMPLE_CHUNK)


def _sampled_chunks(numel: int, fraction: float) -> torch.Tensor | None:
    """Sorted indices of the sampled 64-weight chunks (seeded, so tables are reproducible), or None for all."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    n = _n_chunks(numel)
    k = max(1, round(fraction * n))
    if k >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values


def _chunk_rows(chunks: torch.Tensor, block_size: int, n_blocks: int) -> torch.Tensor:
    """Block rows covering the sampled chunks at `block_size` (padding rows past the matrix dropped)."""
    per_chunk = SAMPLE_CHUNK // block_size
    rows = (chunks[:, None] * per_chunk + torch.arange(per_chunk)).reshape(-1)
    return rows[rows < n_blocks]


def sample_fraction(layout: Layout) -> float:
    """Share of each matrix's weights a cost table scores: all of them up to COST_TABLE_EXACT in
    total, else COST_TABLE_SAMPLE of them, so a table takes minutes, not hours, on a CPU."""
    total = int(layout.numels.sum())
    return 1.0 if total <= COST_TABLE_EXACT else COST_TABLE_SAMPLE / total


def compute_cost_table(weights: Mapping[str, torch.Tensor], layout: Layout, space: QuantSpace,
                       importance: Mapping[str, torch.Tensor] | None = None,
                       importance_label: str = "none", fraction: float = 1.0) -> CostTable:
    """Cost table for the matrices of `layout`, given their weights (and optional diagonal Fisher);
    `fraction` < 1 estimates each matrix's errors from a sample (see `matrix_costs`)."""
    rows = []
    for m in tqdm(layout.matrices, desc=f"cost table {layout.backbone}/{space.name}", leave=False):
        if m.name not in weights:
            raise ValueError(f"no weight given for matrix {m.name!r} of {layout.backbone!r}")
        bad = int((~torch.isfinite(weights[m.name].detach())).sum())
        if bad:
            raise ValueError(f"matrix {m.name!r} of {layout.backbone!r} has {bad} NaN or infinite weights: "
                             f"check the checkpoint it was loaded from")
        rows.append(matrix_costs(weights[m.name], space, None if importance is None else importance[m.name],
                                 fraction))
    return CostTable(layout, space, np.stack(rows), importance_label)


def fisher_diagonal(model: torch.nn.Module, matrices: Mapping[str, torch.nn.Module],
                    batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of each matrix: the sum over batches of squared gradients of the
    model's loss (batches must include labels so `model(**batch).loss` exists). Batches of one
    example give the per-example Fisher that LQ-LoRA's (and the paper's) allocation uses."""
    params = {name: mod.weight for name, mod in matrices.items()}
    saved = {name: p.requires_grad for name, p in params.items()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for name, p in params.items():
                fisher[name] += p.grad.detach().float() ** 2
    finally:
        for name, p in params.items():
            p.requires_grad_(saved[name])
            p.grad = None
    return fisher


def solve_allocation(table: CostTable, budget: float) -> tuple[np.ndarray, float]:
    """Solve the ILP. Returns (option index per matrix [N], total cost).

    Solutions are remembered for the life of the process and stored under $COALORA_HOME/allocations,
    keyed by the table's contents, the budget and the solver (`_solution_path`): every run, notebook
    and worker process asks for the same few budgets, and a solve on SmolLM2's 210 matrices takes 2-5 s."""
    key = (_table_digest(table), float(budget))
    if key not in _SOLVED:
        _SOLVED[key] = _stored_solution(table, budget, _solution_path(*key))
    choice, cost = _SOLVED[key]
    return choice.copy(), cost


def _solution_path(table_digest: str, budget: float) -> Path:
    """Where the solution of one table and budget is stored; the name changes with the solver's code,
    its options and SciPy's version (which ships HiGHS), so no edit reads a solution it would not give."""
    solver = _solver_identity(json.dumps(MILP_OPTIONS, sort_keys=True))
    digest = hashlib.sha256(f"{table_digest}\n{float(budget)!r}\n{solver}".encode()).hexdigest()
    return assets.home() / "allocations" / f"{digest[:32]}.json"


@functools.cache
def _solver_identity(options: str) -> str:
    return "\n".join([inspect.getsource(_solve), inspect.getsource(pareto_options), scipy.__version__, options])


def _stored_solution(table: CostTable, budget: float, path: Path) -> tuple[np.ndarray, float]:
    """The stored solution at `path` if there is a valid one, else a fresh solve, stored when optimal."""
    n, n_options = table.costs.shape
    if path.exists():
        try:
            choice = np.array(json.loads(path.read_text())["choice"], dtype=np.int64)
            if (choice.shape == (n,) and ((0 <= choice) & (choice < n_options)).all()
                    and table.layout.average_bits(table.option_bits[choice]) <= budget + 1e-9):
                return choice, float(table.costs[np.arange(n), choice].sum())
            reason = (f"{choice.size} choices for {n} matrices, an option outside [0, {n_options}) "
                      f"or more than {budget} bits")
        except (ValueError, KeyError, TypeError) as err:
            reason = f"{type(err).__name__}: {err}"
        logger.warning("solving again: the stored allocation %s is unreadable (%s)", path, reason)
    choice, cost, optimal = _solve(table, budget)
    if optimal:
        write_text_atomic(path, json.dumps({"budget": float(budget), "choice": choice.tolist()}))
    return choice, cost


def _table_digest(table: CostTable) -> str:
    """Content hash of what an allocation depends on: the space, the matrices, their costs."""
    digest = hashlib.sha256(repr((table.space, [m.name for m in table.layout.matrices])).encode())
    for array in (table.costs, table.option_bits, table.layout.numels):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _solve(table: CostTable, budget: float) -> tuple[np.ndarray, float, bool]:
    """(choice, cost, whether HiGHS proved it optimal within MILP_OPTIONS' gap, not stopped by its time limit)."""
    lo, hi = table.space.bits_range()
    if not lo <= budget <= hi:
        raise ValueError(f"budget {budget} bits is outside the reachable range of space "
                         f"{table.space.name!r}: [{lo:.4f}, {hi:.4f}]")
    bits = table.option_bits
    share = table.layout.numels / table.layout.numels.sum()                      # [N]
    scale = max(float(table.costs.max()), 1e-30)
    var_matrix, var_option = [], []
    for i in range(len(table.layout)):
        for j in pareto_options(bits, table.costs[i]):
            var_matrix.append(i)
            var_option.append(j)
    var_matrix, var_option = np.array(var_matrix), np.array(var_option)
    n_vars = len(var_matrix)
    one_per_matrix = scipy.sparse.csr_array(
        (np.ones(n_vars), (var_matrix, np.arange(n_vars))), shape=(len(table.layout), n_vars))
    bits_row = (share[var_matrix] * bits[var_option])[None, :]
    result = milp(
        c=table.costs[var_matrix, var_option] / scale,
        integrality=np.ones(n_vars),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_per_matrix, 1, 1), LinearConstraint(bits_row, -np.inf, budget)],
        options=MILP_OPTIONS,
    )
    if result.x is None:
        raise RuntimeError(f"ILP found no allocation at budget {budget}: {result.message}")
    chosen = result.x > 0.5
    choice = np.empty(len(table.layout), dtype=np.int64)
    choice[var_matrix[chosen]] = var_option[chosen]
    return choice, float(table.costs[np.arange(len(choice)), choice].sum()), result.status == 0


def pareto_options(bits: np.ndarray, costs: np.ndarray) -> list[int]:
    """Options not dominated in (bits, cost) for one matrix, cheapest-in-bits first."""
    keep, best = [], np.inf
    for j in np.lexsort((costs, bits)):
        if costs[j] < best:
            keep.append(int(j))
            best = costs[j]
    return keep


def configuration_from_choice(table: CostTable, choice: np.ndarray) -> Configuration:
    options = table.space.options()
    return Configuration(table.layout, {m.name: options[j] for m, j in zip(table.layout.matrices, choice)})


def task_fisher(backbone: str, task, preset: str, n_examples: int | None = None):
    """(model, diagonal Fisher per quantized matrix, description): the per-example Fisher of the
    task loss on the last `n_examples` training examples of `task` under `preset` (token blocks for
    a causal LM). A classifier's head is the freshly initialised one of seed 0, as fine-tuning starts."""
    from coalora.data import lm_blocks, load_task, tokenize_classification

    data = load_task(task, preset)
    n_examples = n_examples or FISHER_EXAMPLES[data.task_type]
    torch.manual_seed(0)
    model, tokenizer = models.load_backbone(backbone, data.task_type, num_labels=data.num_labels or 2,
                                            dtype=torch.float32)
    # From the end of the training split: the configuration search's held-out slice is its start
    # (coalora.experiments), and the allocation should not have seen it either.
    if data.task_type == "classification":
        shuffled = data.train.shuffle(seed=0)
        n = min(n_examples, len(shuffled))
        rows = tokenize_classification(shuffled.select(range(len(shuffled) - n, len(shuffled))), tokenizer,
                                       FISHER_MAX_LENGTH)
        batches = ({k: v[None] for k, v in row.items()} for row in rows)
    else:
        blocks = lm_blocks(list(reversed(data.train["text"])), tokenizer, FISHER_MAX_LENGTH, n_examples)
        batches = ({"input_ids": b[None], "labels": b[None]} for b in blocks)
    linears = models.quantized_linears(model)
    fisher = fisher_diagonal(model, linears, tqdm(batches, total=n_examples, desc="Fisher", leave=False))
    return model, fisher, f"fisher: {data.name} ({data.source}), {n_examples} examples"


def cost_table(backbone: str, space: QuantSpace | str = "nf", weighting: str = "error", task: str | None = None,
               preset: str = "default", recompute: bool = False) -> CostTable:
    """The (cached) cost table of an offline or hub backbone: plain quantization error, or for
    `weighting="fisher"` the error weighted by the diagonal Fisher of `task`'s loss (`task_fisher`).
    Backbones with more than COST_TABLE_EXACT quantized weights get errors estimated from a seeded
    sample (`sample_fraction`)."""
    space = QuantSpace.named(space) if isinstance(space, str) else space
    check_name(weighting, WEIGHTINGS, "cost weighting")
    if weighting == "fisher" and task is None:
        raise ValueError("a Fisher-weighted cost table needs the task whose loss the Fisher is taken of: pass task=...")
    # The Fisher depends on the task's data (which the offline presets share) and how much of it is used.
    if weighting == "error":
        label = "none"
    else:
        from coalora.data import task_identity, task_type

        count = FISHER_EXAMPLES[task_type(task)]
        label = f"fisher{count}-{task_identity(task)}-{'hub' if get_preset(preset).needs_hub else 'offline'}"
    identity = models.backbone_spec(backbone).cache_id
    path = assets.home() / "cost_tables" / f"{identity}.{space.name}.{label}.v{COST_TABLE_VERSION}.npz"
    # A local folder's table is cached by content: its layout is named as this caller names the model.
    def load():
        table = CostTable.load(path)
        return replace(table, layout=replace(table.layout, backbone=backbone))

    state = processes()
    if from_main(path.exists() and not recompute):  # under `accelerate launch` the main process decides
        return load()
    if not state.is_main_process:  # the main process computes the table and tells the others how it went
        error = from_main(None)
        if error is not None:
            raise RuntimeError(f"the main process could not compute cost table {path.name}: {error}")
        return load()
    try:
        if weighting == "fisher":
            model, importance, description = task_fisher(backbone, task, preset)
        else:
            task_type = "classification" if models.backbone_spec(backbone).architecture == "encoder" else "causal-lm"
            (model, _), importance, description = models.load_backbone(backbone, task_type), None, "none"
        layout = models.matrix_layout(model, backbone)
        weights = {name: mod.weight for name, mod in models.quantized_linears(model).items()}
        table = compute_cost_table(weights, layout, space, importance, description, fraction=sample_fraction(layout))
        table.save(path)
    except Exception as err:
        from_main(f"{type(err).__name__}: {err}")  # the others raise too, instead of waiting for ever
        raise
    logger.info("saved cost table %s (errors from %.1f%% of the weights)", path, 100 * sample_fraction(layout))
    from_main(None)
    return table


def allocate(backbone: str | CostTable, budget: float, space: QuantSpace | str = "nf", weighting: str = "error",
             task: str | None = None, preset: str = "default") -> Configuration:
    """The configuration with the least total (optionally Fisher-weighted) quantization error whose
    average bits are <= budget.

    `backbone` is a backbone name (its cached cost table is used, computed on first use; `weighting`,
    `task` and `preset` choose it, see `cost_table`) or a ready `CostTable`.
    """
    table = (backbone if isinstance(backbone, CostTable)
             else cost_table(backbone, space, weighting, task, preset))
    choice, _ = solve_allocation(table, budget)
    return configuration_from_choice(table, choice)
