"""Pareto-guided configuration search (docs/method.md#configuration-search): after every CoA-LoRA
epoch, re-score the training pool with the current model, fit a GP to configuration -> loss,
propose new configurations by one-step coordinate moves that raise the log expected hypervolume
improvement, then keep the per-bit-segment Pareto fronts (the segmented Pareto filter).

Objectives, both minimised: the task loss of the current model on a fixed held-out set of training
batches, and the average bits, computed exactly from the configuration (never modelled). BoTorch
maximises, so the acquisition sees (-bits, -loss).

Choices, and why:

* Encoding: x = index / (n_choices - 1) per coordinate, d = 5 N, over the FULL choice range.
  Normalising by the pool's observed min/max moves with the pool and gives NaN for a coordinate
  that never varies.
* Surrogate: a `SingleTaskGP` for -loss on x, outcomes standardised (`Standardize`), noise floor
  1e-4 (botorch's default constraint), hyper-parameters by `fit_gpytorch_mll`. Bits enter as a
  `GenericDeterministicModel` in a `ModelList`, so the acquisition sees both objectives and bits
  stay exact. Kernel (`KERNELS`): "rbf" (botorch's default ARD RBF with the dimension-scaled
  log-normal lengthscale prior) predicted held-out losses best or tied on synthetic and real
  MiniLM-L6 data and fits fastest (docs/measurements.md#gp-kernel); "matern" is
  ScaleKernel(ARD Matern-5/2) with the same prior; "categorical" is `MixedSingleTaskGP` with every
  dimension categorical (a Hamming-distance kernel), which ignores that the choices are ordered.
* GP data: every configuration ever scored, with its most recent loss. The pool is re-scored with
  the current model each epoch; a configuration the filter dropped keeps the loss of the epoch it
  was last scored in (its loss is from a less-trained model, so slightly high).
* Acquisition: `qLogExpectedHypervolumeImprovement`, q = 1, the front = the pool's current
  (-bits, -loss). Reference point: per objective, the pool's worst value minus 10 % of the pool's
  range (minus 10 % of |worst|, at least 1e-4, when the range is zero, e.g. a one-point pool); a
  reference at (0, 0) would make every point worse than the reference. Only the loss is random (a
  1-D Gaussian), so 16 Sobol QMC samples suffice (`MC_SAMPLES`). The samples are shared by all
  candidates, so neighbours are compared on the same draws.
* Proposals: from S random pool members, up to T moves of one choice step (+-1 index on one
  coordinate); each move evaluates ALL feasible neighbours (<= 2d) in one batched acquisition call
  and takes the best if it beats the current point, else the walk stops. End points that moved are
  the proposals, deduplicated against each other and the pool. This is the paper's "largest finite
  difference coordinate, unit step" restricted to feasible moves.
* Speed: gpytorch's batched posterior for b candidates of q = 1 stacks the n training inputs onto
  every candidate ([b, n + 1, d], 0.4 GB at b = 1440, n = 50, d = 720); `_PointwiseGP` returns the
  same marginals (equal to 1e-16) from one flat [b, d] call.
* Modes (`SEARCH_MODES`): "pareto" as above; "random" adds S random configurations per epoch, then
  the same filter (the paper's random-extension ablation); "frozen" keeps the pool unchanged (it is
  still scored, for the record).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from botorch.acquisition.multi_objective.logei import qLogExpectedHypervolumeImprovement
from botorch.exceptions.errors import ModelFittingError
from botorch.fit import fit_gpytorch_mll
from botorch.models import MixedSingleTaskGP, ModelList, SingleTaskGP
from botorch.models.deterministic import GenericDeterministicModel
from botorch.models.model import Model
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
from botorch.posteriors.gpytorch import GPyTorchPosterior
from botorch.sampling.index_sampler import IndexSampler
from botorch.sampling.list_sampler import ListSampler
from botorch.sampling.normal import SobolQMCNormalSampler
from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning
from botorch.utils.multi_objective.pareto import is_non_dominated
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.utils.warnings import NumericalWarning
from linear_operator.operators import DiagLinearOperator
from tqdm.auto import tqdm

from coalora import lora
from coalora.configs import FIELDS, Configuration, Layout, QuantSpace, unique
from coalora.names import check_name

logger = logging.getLogger(__name__)

SEARCH_MODES = ("pareto", "frozen", "random")
KERNELS = ("rbf", "matern", "categorical")
# Best or tied held-out prediction on every data set tried, and the fastest fit (docs/measurements.md#gp-kernel).
DEFAULT_KERNEL = "rbf"
# Only the loss is random, a 1-D Gaussian: 16 Sobol samples picked the same best neighbour as 512 on 8
# neighbour sets at d = 720 (Spearman 0.997 over all neighbours), at 0.07 s per call against 0.11 s with 32.
MC_SAMPLES = 16
REF_MARGIN = 0.1  # reference point = worst - 10 % of the range, per objective: every pool point adds volume
CHUNK = 2048  # candidates per posterior call: bounds memory, and 2d <= 1440 even for RoBERTa-Large

# scorer(model, configurations, batches) -> one mean loss per configuration
Scorer = Callable[[torch.nn.Module, Sequence[Configuration], Sequence[Mapping[str, torch.Tensor]]], list[float]]


@dataclass(frozen=True)
class SearchConfig:
    """How CoA-LoRA's training set is refined after each epoch; shared by `RunSpec` and the search."""

    mode: str = "frozen"  # "pareto", "frozen" or "random" (SEARCH_MODES)
    starts: int = 5  # S random starting points per round, as in the paper's code
    steps: int = 10  # T moves at most per walk: the low end of the paper's 10-20
    # U bit segments of the filter: the paper's 40 assumes pools of 50+; with the default preset's 15-21
    # configurations 10 segments keep one to three per segment, so the set stays spread over the bit range.
    segments: int = 10
    batches: int = 4  # held-out training batches the loss objective is scored on: 128 sentences by default
    kernel: str = DEFAULT_KERNEL

    def __post_init__(self):
        check_name(self.mode, SEARCH_MODES, "search mode")
        check_name(self.kernel, KERNELS, "GP kernel")
        for name, least in (("starts", 1), ("steps", 0), ("segments", 1), ("batches", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"search {name} must be an int >= {least}, got {value!r}")


# ---- objectives ----------------------------------------------------------------------------------

@torch.no_grad()
def score_configurations(model: torch.nn.Module, configurations: Sequence[Configuration],
                         batches: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """Mean task loss (model(**batch).loss averaged over `batches`) of `model` under each
    configuration, in eval mode; the model's train mode and configuration are restored after."""
    if not batches:
        raise ValueError("scoring configurations needs at least one held-out batch, got none")
    was_training, previous = model.training, getattr(model, "configuration", None)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    model.eval()
    losses = []
    try:
        for configuration in tqdm(configurations, desc="score configurations", leave=False):
            lora.set_configuration(model, configuration)
            losses.append(sum(float(model(**b).loss) for b in batches) / len(batches))
    finally:
        model.train(was_training)
        if previous is not None:
            lora.set_configuration(model, previous)
    return losses


def fixed_batches(batches: Iterable[Mapping[str, torch.Tensor]], n: int = 4) -> list[dict]:
    """The first `n` batches of a loader, materialised once so every epoch scores the same data."""
    if n < 1:
        raise ValueError(f"need at least one held-out batch, got n={n}")
    out = []
    for batch in batches:
        out.append(dict(batch))
        if len(out) == n:
            break
    return out


class Encoder:
    """Configurations <-> index vectors <-> GP inputs x = index / (n_choices - 1), and the exact
    average bits of GP inputs (a table lookup of each matrix's option, numel-weighted)."""

    def __init__(self, space: QuantSpace, layout: Layout):
        self.space, self.layout = space, layout
        n = torch.tensor(space.n_choices)  # [5]
        self.top = (n - 1).repeat(len(layout))  # [d] largest index per coordinate
        self.scale = self.top.clamp_min(1).double()  # a one-choice field encodes as 0, not 0/0
        self.strides = torch.tensor([int(np.prod(space.n_choices[k + 1:])) for k in range(len(FIELDS))])  # [5]
        self.option_bits = torch.tensor([o.storage_bits for o in space.options()], dtype=torch.float64)  # [J]
        self.numels = torch.as_tensor(layout.numels, dtype=torch.float64)  # [N]

    @property
    def d(self) -> int:
        return int(self.top.numel())

    def indices(self, configurations: Sequence[Configuration]) -> torch.Tensor:
        """[n, d] int64 choice indices."""
        return torch.as_tensor(np.stack([c.encode(self.space) for c in configurations]))

    def configurations(self, indices: torch.Tensor) -> list[Configuration]:
        return [Configuration.decode(row.numpy(), self.space, self.layout) for row in indices.cpu()]

    def normalise(self, indices: torch.Tensor) -> torch.Tensor:
        """[..., d] int64 -> [..., d] float64 in [0, 1]."""
        return indices.double() / self.scale

    def bits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] GP inputs -> [..., 1] average bits (equal to Configuration.avg_bits)."""
        index = (x * self.scale.to(x)).round().long().reshape(*x.shape[:-1], -1, len(FIELDS))  # [..., N, 5]
        per_matrix = self.option_bits.to(x)[(index * self.strides.to(x.device)).sum(-1)]  # [..., N]
        numels = self.numels.to(x)
        return ((per_matrix * numels).sum(-1) / numels.sum()).unsqueeze(-1)


# ---- surrogate and acquisition -------------------------------------------------------------------

def fit_loss_gp(x: torch.Tensor, losses: torch.Tensor, kernel: str = DEFAULT_KERNEL) -> SingleTaskGP:
    """A GP for -loss (maximisation convention) on GP inputs x [n, d], outcomes standardised,
    hyper-parameters by exact marginal likelihood (kept at their initial values if fitting fails)."""
    check_name(kernel, KERNELS, "GP kernel")
    x, y = x.double(), -torch.as_tensor(losses, dtype=torch.float64).reshape(-1, 1)  # [n, d], [n, 1]
    with warnings.catch_warnings(record=True) as caught:  # e.g. "not standardized" for equal losses
        warnings.simplefilter("always")
        if kernel == "rbf":
            gp = SingleTaskGP(x, y)
        elif kernel == "matern":
            base = get_covar_module_with_dim_scaled_prior(ard_num_dims=x.shape[-1], use_rbf_kernel=False)
            gp = SingleTaskGP(x, y, covar_module=ScaleKernel(base))
        else:
            gp = MixedSingleTaskGP(x, y, cat_dims=list(range(x.shape[-1])))
        try:
            fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        except ModelFittingError as err:
            logger.warning("GP fit failed (%s); using the initial hyper-parameters", err)
    for w in caught:
        logger.debug("GP fit: %s", w.message)
    return gp.eval()


class _PointwiseGP(Model):
    """q = 1 posteriors of a single-output GP, for a whole batch of candidates in one flat call.

    Identical numbers to `gp.posterior(X)` for X [b, 1, d]; gpytorch's batched path would stack the
    training inputs onto every candidate (see the module docstring). q > 1 goes to the GP as is."""

    def __init__(self, gp: SingleTaskGP):
        super().__init__()
        self.gp = gp

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size()

    def posterior(self, X, output_indices=None, observation_noise=False, posterior_transform=None, **kwargs):
        if X.shape[-2] != 1 or observation_noise is not False or posterior_transform is not None:
            return self.gp.posterior(X, output_indices=output_indices, observation_noise=observation_noise,
                                     posterior_transform=posterior_transform, **kwargs)
        with warnings.catch_warnings():  # round-off gives ~-1e-12 variances at training points; floored here
            warnings.simplefilter("ignore", NumericalWarning)
            flat = self.gp.posterior(X.reshape(-1, X.shape[-1]))  # marginals of b points
            mean = flat.mean.reshape(X.shape[:-1])  # [..., 1]
            variance = flat.variance.reshape(X.shape[:-1]).clamp_min(1e-12)
        return GPyTorchPosterior(MultivariateNormal(mean, DiagLinearOperator(variance)))


def reference_point(y: torch.Tensor, margin: float = REF_MARGIN) -> torch.Tensor:
    """[n, m] outcomes (maximised) -> [m]: worst minus `margin` x range per objective (margin x
    |worst|, at least 1e-4, where the range is zero)."""
    worst, span = y.min(0).values, y.max(0).values - y.min(0).values
    fallback = worst.abs().clamp_min(1e-3)
    return worst - margin * torch.where(span > 0, span, fallback)


def log_ehvi(gp: SingleTaskGP, encoder: Encoder, bits: Sequence[float], losses: Sequence[float],
             seed: int = 0) -> qLogExpectedHypervolumeImprovement:
    """qLogEHVI over (-bits exact, -loss from `gp`) against the front of the given (bits, losses)."""
    model = ModelList(GenericDeterministicModel(lambda x: -encoder.bits(x), num_outputs=1), _PointwiseGP(gp))
    y = torch.stack([-torch.as_tensor(bits, dtype=torch.float64),
                     -torch.as_tensor(losses, dtype=torch.float64)], dim=-1)  # [n, 2]
    ref = reference_point(y)
    shape = torch.Size([MC_SAMPLES])
    # Sobol is safe here: the deterministic member draws nothing, so the list has one random sampler.
    sampler = ListSampler(IndexSampler(shape, seed=seed), SobolQMCNormalSampler(shape, seed=seed))
    return qLogExpectedHypervolumeImprovement(model, ref, FastNondominatedPartitioning(ref_point=ref, Y=y),
                                              sampler=sampler)


@torch.no_grad()
def evaluate_acquisition(acq, x: torch.Tensor) -> torch.Tensor:
    """[b, d] GP inputs -> [b] acquisition values (q = 1), in chunks of CHUNK."""
    return torch.cat([acq(chunk.unsqueeze(-2)) for chunk in x.split(CHUNK)])


def neighbours(index: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """[d] index vector -> [m, d], m <= 2d: every vector one choice step (+-1) away, in range."""
    eye = torch.eye(index.numel(), dtype=index.dtype)
    return torch.cat([(index + eye)[index < top], (index - eye)[index > 0]])


def coordinate_ascent(acq, encoder: Encoder, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, float, int]:
    """Move from `start` [d] to the best +-1 neighbour while it beats the current point, at most
    `steps` times. Returns (end index vector, its acquisition value, number of moves)."""
    index = start.clone()
    value = float(evaluate_acquisition(acq, encoder.normalise(index)[None])[0])
    for move in range(steps):
        candidates = neighbours(index, encoder.top)  # [m, d]
        if len(candidates) == 0:
            return index, value, move
        values = evaluate_acquisition(acq, encoder.normalise(candidates))  # [m]
        best = int(values.argmax())
        if not float(values[best]) > value + 1e-9:  # strict: round-off cannot make the walk cycle
            return index, value, move
        index, value = candidates[best], float(values[best])
    return index, value, steps


# ---- the segmented Pareto filter -----------------------------------------------------------------

def segmented_pareto_filter(bits: Sequence[float], losses: Sequence[float], segments: int) -> list[int]:
    """Indices (ascending) of the configurations to keep: split [min, max] average bits into
    `segments` equal-width segments and keep each segment's non-dominated configurations in
    (bits down, loss down). Every non-empty segment keeps at least one; ties are all kept; a NaN
    loss counts as +inf."""
    if segments < 1:
        raise ValueError(f"the segmented Pareto filter needs at least one segment, got {segments}")
    bits = torch.as_tensor(bits, dtype=torch.float64).reshape(-1)
    losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1).nan_to_num(nan=float("inf"))
    if bits.shape != losses.shape:
        raise ValueError(f"need one loss per configuration, got {bits.numel()} bits and {losses.numel()} losses")
    if bits.numel() == 0:
        return []
    lo, hi = bits.min(), bits.max()
    segment = (((bits - lo) / (hi - lo) * segments).floor().long().clamp(0, segments - 1) if hi > lo
               else torch.zeros_like(bits, dtype=torch.long))
    y = torch.stack([-bits, -losses], dim=-1)  # maximisation convention
    keep = torch.zeros_like(bits, dtype=torch.bool)
    for u in segment.unique():
        members = (segment == u).nonzero().flatten()
        keep[members] = is_non_dominated(y[members], deduplicate=False)
    return keep.nonzero().flatten().tolist()


# ---- the hook ------------------------------------------------------------------------------------

class ConfigurationSearch:
    """The per-epoch search of CoA-LoRA's training set, run as `coalora.training.train(..., refine=search)`.

    `config` says how (mode, S, T, U, kernel); `score_batches` are the held-out training batches the
    loss objective is measured on; `scorer` replaces the model-based scoring (tests use a synthetic loss).

    `rounds` holds one dict per call: {"epoch", "mode", "pool", "proposals", "kept", "moves",
    "gp_points", "seconds"}, where pool (as received, re-scored), proposals and kept (the next pool)
    are lists of (digest, average bits, loss), moves is the number of steps behind each proposal and
    gp_points the number of configurations the GP was fitted on (0 without a GP).
    `configurations` maps every digest ever seen to its Configuration.
    """

    def __init__(self, config: SearchConfig, space: QuantSpace, layout: Layout, score_batches: Sequence[Mapping],
                 seed: int = 0, scorer: Scorer = score_configurations):
        if not isinstance(config, SearchConfig):
            raise ValueError(f"expected a coalora.search.SearchConfig, got {config!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.score_batches = list(score_batches)
        if not self.score_batches:
            raise ValueError("the configuration search needs at least one held-out batch to score with")
        self.config, self.space, self.layout, self.encoder = config, space, layout, Encoder(space, layout)
        self.seed, self.scorer = seed, scorer
        self.rounds: list[dict] = []
        self.configurations: dict[str, Configuration] = {}
        self.losses: dict[str, float] = {}  # GP data: digest -> most recent loss

    def __call__(self, epoch: int, model: torch.nn.Module, pool: list[Configuration]) -> list[Configuration]:
        pool = unique(pool)
        if not pool:
            raise ValueError("the configuration search got an empty pool")
        # Own RNG stream: searching does not change the training run's random numbers.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100_003 + epoch)
            return self._round(epoch, model, pool)

    def _round(self, epoch: int, model, pool: list[Configuration]) -> list[Configuration]:
        seconds, start = {}, time.perf_counter()
        pool_losses = self._score(model, pool)
        seconds["score"] = time.perf_counter() - start
        proposals, moves, gp_points = [], [], 0
        if self.config.mode == "pareto":
            gp_points = len(self.losses)  # every configuration scored so far, this pool included
            proposals, moves = self._pareto_proposals(epoch, pool, pool_losses, seconds)
        elif self.config.mode == "random":
            proposals = self._random_proposals(epoch, pool)
        tick = time.perf_counter()
        proposal_losses = self._score(model, proposals) if proposals else []
        seconds["score"] += time.perf_counter() - tick
        candidates = pool + proposals
        losses = pool_losses + proposal_losses
        bits = [c.avg_bits for c in candidates]
        kept = (list(range(len(pool))) if self.config.mode == "frozen"
                else segmented_pareto_filter(bits, losses, self.config.segments))
        seconds["total"] = time.perf_counter() - start
        rows = [(c.digest(), b, loss) for c, b, loss in zip(candidates, bits, losses)]
        self.rounds.append({
            "epoch": epoch, "mode": self.config.mode, "pool": rows[:len(pool)], "proposals": rows[len(pool):],
            "kept": [rows[i] for i in kept], "moves": moves, "gp_points": gp_points, "seconds": seconds})
        logger.info("search epoch %d (%s): pool %d + %d proposals -> %d kept (%.1f s)", epoch, self.config.mode,
                    len(pool), len(proposals), len(kept), seconds["total"])
        return [candidates[i] for i in kept]

    def _score(self, model, configurations: list[Configuration]) -> list[float]:
        losses = [float(v) for v in self.scorer(model, configurations, self.score_batches)]
        if len(losses) != len(configurations):
            raise ValueError(f"the scorer returned {len(losses)} losses for {len(configurations)} configurations")
        for c, loss in zip(configurations, losses):
            self.configurations[c.digest()] = c
            self.losses[c.digest()] = loss
        return losses

    def _pareto_proposals(self, epoch: int, pool, pool_losses, seconds) -> tuple[list[Configuration], list[int]]:
        tick = time.perf_counter()
        known = list(self.losses)
        x = self.encoder.normalise(self.encoder.indices([self.configurations[k] for k in known]))  # [n, d]
        gp = fit_loss_gp(x, torch.tensor([self.losses[k] for k in known]), self.config.kernel)
        seconds["fit"] = time.perf_counter() - tick
        tick = time.perf_counter()
        acq = log_ehvi(gp, self.encoder, [c.avg_bits for c in pool], pool_losses, seed=self.seed * 100_003 + epoch)
        rng = np.random.default_rng([self.seed, epoch])
        starts = rng.choice(len(pool), size=min(self.config.starts, len(pool)), replace=False)
        start_index = self.encoder.indices([pool[i] for i in starts])  # [S, d]
        seen = {c.digest() for c in pool}
        proposals, moves = [], []
        for index in tqdm(start_index, desc=f"search epoch {epoch}", leave=False):
            end, value, n_moves = coordinate_ascent(acq, self.encoder, index, self.config.steps)
            configuration = self.encoder.configurations(end[None])[0]
            logger.debug("start %s: %d moves, log-EHVI %.3f", configuration.digest(), n_moves, value)
            if n_moves and configuration.digest() not in seen:
                seen.add(configuration.digest())
                proposals.append(configuration)
                moves.append(n_moves)
        seconds["propose"] = time.perf_counter() - tick
        return proposals, moves

    def _random_proposals(self, epoch: int, pool) -> list[Configuration]:
        seen, proposals = {c.digest() for c in pool}, []
        for i in range(100 * self.config.starts):
            if len(proposals) == self.config.starts:
                break
            seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
            configuration = Configuration.random(self.layout, self.space, seed)
            if configuration.digest() not in seen:
                seen.add(configuration.digest())
                proposals.append(configuration)
        return proposals

    def state_dict(self) -> dict:
        """What later rounds depend on (a training checkpoint keeps it): the rounds so far and the
        GP's data. Each round's random numbers come from (seed, epoch), so nothing else is needed."""
        return {"rounds": self.rounds, "configurations": self.configurations, "losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.rounds, self.configurations, self.losses = (list(state["rounds"]), dict(state["configurations"]),
                                                         dict(state["losses"]))

    def to_rows(self) -> list[dict]:
        """`rounds` as tidy rows (epoch, role in pool / proposal / kept, id, avg_bits, loss), e.g.
        for pandas and the paper's Figure 2."""
        return [{"epoch": r["epoch"], "mode": r["mode"], "role": role, "configuration_id": cid,
                 "avg_bits": bits, "loss": loss}
                for r in self.rounds for role, key in (("pool", "pool"), ("proposal", "proposals"), ("kept", "kept"))
                for cid, bits, loss in r[key]]
