"""One training engine for CoA-LoRA, its baselines and its reference rows, on the same backbone, task,
quantizer, data and steps (docs/method.md#training, docs/method.md#baselines). What each method
trains is `coalora.methods.METHODS[method].training`:

    per-configuration  a fresh LoRA (+ head) per configuration (QLoRA; LQ-LoRA and LoftQ-init LoRA
                       start from a low-rank fit of the quantization residual, `low_rank_init`)
    shared             one LoRA, a random switch among the configurations at every step (Shared-LoRA)
    pool               one LoRA (+ theta for CoA-LoRA); every batch runs under K configurations drawn
                       from the training set, losses summed, one AdamW step; after each epoch a
                       `refine` hook (the configuration search, coalora.search) may replace the set
    full-precision     one LoRA on the unquantized backbone (the ceiling)
    none               nothing (the quantized backbone as it is: the floor)

The loop runs through one `accelerate.Accelerator` per call, so the same code runs on CPU here and
multi-GPU under `accelerate launch`; `HyperParams.precision = "bf16"` runs forward and backward
under bf16 autocast. A padded classification batch runs as length-sorted micro-batches (same loss
and gradient, fewer padding tokens). Wall-clock seconds are recorded per trained adapter, and
every configuration a step trained on is recorded (`Trained.trained_on`).
"""

import contextlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from coalora import lora
from coalora.configs import Configuration
from coalora.methods import method as get_method
from coalora.models import MASK_DRAWS
from coalora.names import check_name
from coalora.quant import fake_quantize
from coalora.repro import atomic_path, from_main, processes, seed_everything

logger = logging.getLogger(__name__)

INIT_PREFIX = "low_rank_init::"  # adapter-state keys of the low-rank fit an LQ-LoRA base is quantized around
PRECISIONS = ("fp32", "bf16")
# "linear": every learning rate falls linearly to 0 over an adapter's steps, so the adapter kept is not
# one noisy step of a constant rate; "constant": the paper's code (no scheduler).
LR_SCHEDULES = ("linear", "constant")
# How the pool methods draw their K configurations per step. "uniform": K distinct ones, each equally
# likely, as the paper's code does. "by-error": K distinct ones drawn one at a time, each in proportion
# to 2^-bits among those left (NF's quantization error roughly halves with every bit), so the most
# damaged configurations train most: on a pool over 2.25-7.25 bits the uniform draw gives the lowest
# budgets too few forwards to learn (docs/measurements.md#the-low-bit-gap-of-the-pool).
POOL_DRAWS = ("uniform", "by-error")
FULL_PRECISION = "full-precision"  # what `Trained.trained_on` and result rows call the unquantized weights
# LQ-LoRA alternates until ||W - Q - L|| stops falling, at most 100 times in the original. The error
# keeps falling slowly for long (MiniLM-L6's first FFN matrix at 2.5 bits: 9.26 after one iteration,
# 8.62 after 11, 8.53 after 20), so 20 keeps most of the gain at a fifth of the cost.
MAX_LQLORA_ITERATIONS = 20
OVERSAMPLING = 10  # randomized SVD: r + 10 random directions, LQ-LoRA's own setting

# refine(epoch, model, pool) -> the training pool for the next epoch (methods that train on the pool).
RefineHook = Callable[[int, torch.nn.Module, list[Configuration]], list[Configuration]]


@dataclass(frozen=True)
class HyperParams:
    """Training hyper-parameters shared by all methods (docs/method.md#training)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0  # LoRA's own dropout, on the adapter's input
    # The pretrained model's dropout layers (None: as its checkpoint sets them, 0.1 in BERT and MPNet, as the
    # paper's fine-tuning keeps them). 0 is the option for a backbone whose quantized features drown in that
    # noise during training (MPNet-base at 2.5 bits: docs/measurements.md#the-scaling-study).
    backbone_dropout: float | None = None
    # How those layers draw their masks in training (one of models.MASK_DRAWS): "packed" takes 7 % off
    # the default SST-2 runs' training; "torch" is PyTorch's own draw.
    mask_draw: str = "packed"
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 2
    configs_per_step: int = 2  # K, for the methods that train on the pool
    clip: float = 1.0
    micro_batches: int = 2  # a padded classification batch runs as this many length-sorted parts
    precision: str = "fp32"  # "bf16": forward and backward under bf16 autocast (AVX-512 BF16 CPUs, GPUs)
    # theta's own learning rate (None: lr). None keeps the paper's ratio, theta at the LoRA's rate: on
    # MiniLM-L6 theta at the paper's 1e-4, beside this LoRA's raised 1e-3, moves the shared LoRA by 3.5 %,
    # leaving CoA-LoRA nearly its theta-free twin; at the LoRA's rate it moves it by 31 %. Neither rate's gain
    # over the twin is resolved on SST-2 (MiniLM-L6 and MPNet-base) or the causal LM, and under the decaying
    # schedule no run at the LoRA's rate collapsed (0 of 15: MiniLM-L6 seeds 0-4 with and without the
    # warm-up, MPNet-base seeds 0-4 with it) (docs/measurements.md#thetas-learning-rate, #what-theta-adds).
    theta_lr: float | None = None
    # The default decays: at a constant rate the pool methods' 2.5-bit accuracy spread over 3.8 points
    # between seeds (CoA-LoRA) and up to 11.6 between runs; decayed, over 1.0
    # (docs/measurements.md#the-low-bit-gap-of-the-pool).
    lr_schedule: str = "linear"  # one of LR_SCHEDULES
    # The share of all steps over which every learning rate rises linearly from 0 before the schedule
    # runs. 0.1: on MPNet-base at 2.5 bits fewer warmed-up shared and pool runs collapsed to chance (1 of
    # 29, the three seeds that collapse without it rescued; 3 of 21 without, Fisher's p = 0.30), and on the
    # default preset it changed CoA-LoRA and its twin by nothing measurable. It is no guarantee: a warmed-up
    # QLoRA run collapsed too. 0 is the paper's code (docs/measurements.md#the-scaling-study).
    warmup: float = 0.1
    # The paper's uniform draw. "by-error" steadies the lowest budget where the uniform one starves it (the
    # causal LM's 2.5-bit seeds agree; on MPNet-base CoA-LoRA's 2.5-bit deficit to Shared-LoRA is no longer
    # resolved), but it does not stop a 2.5-bit collapse (MPNet-base: one run of eight without the warm-up,
    # one of ten with it) and no gain over the uniform draw holds its interval, on the default preset or on
    # MPNet-base (docs/measurements.md#the-low-bit-gap-of-the-pool, #the-scaling-study).
    pool_draw: str = "uniform"  # one of POOL_DRAWS
    # LQ-LoRA's decomposition stops once its error stops falling or after this many iterations (a preset's hp
    # table in coalora/presets.toml may set fewer).
    lqlora_iterations: int = MAX_LQLORA_ITERATIONS

    def __post_init__(self):
        for name in ("rank", "alpha", "epochs", "configs_per_step", "micro_batches", "lqlora_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backbone_dropout is not None and not 0 <= self.backbone_dropout < 1:
            raise ValueError(f"backbone_dropout must be None (the checkpoint's) or in [0, 1), "
                             f"got {self.backbone_dropout}")
        if self.backbone_dropout is not None:  # 0 and 0.0 are one run: one cache key
            object.__setattr__(self, "backbone_dropout", float(self.backbone_dropout))
        for name in ("lr", "theta_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        check_name(self.precision, PRECISIONS, "precision")
        check_name(self.lr_schedule, LR_SCHEDULES, "learning-rate schedule")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the training steps in [0, 1), got {self.warmup}")
        object.__setattr__(self, "warmup", float(self.warmup))  # 0 and 0.0 are one run: one cache key
        check_name(self.pool_draw, POOL_DRAWS, "pool draw")
        check_name(self.mask_draw, MASK_DRAWS, "mask draw")


@dataclass
class Trained:
    """What training produced: the model (with the last adapter loaded) and, per method, the adapter
    state to load before evaluating a configuration."""

    method: str
    model: torch.nn.Module
    configurations: list[Configuration]  # the training set at the end (CoA-LoRA: after the last search)
    states: dict[str, dict[str, torch.Tensor]]  # configuration digest (or "shared") -> adapter state
    train_seconds: dict[str, float]  # same keys
    history: list[dict] = field(default_factory=list)  # per epoch: loss, pool (CoA-LoRA)
    trained_on: set[str] = field(default_factory=set)  # digests of every configuration a step trained on
    steps: list[tuple] = field(default_factory=list)  # (adapter, epoch, step, configuration, loss) per forward

    def load_for(self, configuration: Configuration | None) -> torch.nn.Module:
        """Switch the model to `configuration` (None: full precision) and load the adapter trained for it."""
        per_configuration = get_method(self.method).per_configuration
        key = configuration.digest() if per_configuration and configuration is not None else "shared"
        if key not in self.states:
            bits = "full precision" if configuration is None else f"{configuration.avg_bits:.3f} bits"
            raise ValueError(f"{self.method} has no adapter for configuration {key} ({bits}); it was trained for "
                             f"{', '.join(c.digest() for c in self.configurations)}")
        state = self.states[key]
        lora.set_configuration(self.model, configuration)
        lora.load_adapter_state(self.model, {k: v for k, v in state.items() if not k.startswith(INIT_PREFIX)})
        if any(k.startswith(INIT_PREFIX) for k in state):
            _quantize_around(self.model, configuration, {k[len(INIT_PREFIX):]: v for k, v in state.items()
                                                         if k.startswith(INIT_PREFIX)})
        return self.model


def micro_batches(batch: dict, k: int) -> list[tuple[float, dict]]:
    """(share of the batch, part) for k length-sorted parts of a padded classification batch, each
    trimmed to its own longest sentence. The share-weighted sum of the parts' mean losses is the
    batch's mean loss, for about half the tokens (48 % of a default batch is padding:
    docs/measurements.md#padding-and-micro-batches). Batches without padding, or with per-token
    labels (causal LM, whose loss is a mean over tokens), stay whole."""
    mask = batch.get("attention_mask")
    if k == 1 or mask is None or bool(mask.all()) or batch["labels"].dim() != 1:
        return [(1.0, batch)]
    lengths = mask.sum(dim=1)  # [B]
    order = lengths.argsort(stable=True)
    parts = []
    for rows in order.tensor_split(min(k, len(order))):
        width = int(lengths[rows].max())
        part = {name: (t[rows, :width] if t.dim() == 2 else t[rows]) for name, t in batch.items()}
        parts.append((len(rows) / len(order), part))
    return parts


def autocast(device: torch.device, precision: str):
    """The forward's arithmetic: bf16 autocast for "bf16", none for "fp32"."""
    if check_name(precision, PRECISIONS, "precision") == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def held_weights(model, precision: str):
    """The frozen base weights held in bf16 for "bf16" (`lora.base_weights_in`: the same numbers, no
    cast per forward), as they are for "fp32"."""
    if check_name(precision, PRECISIONS, "precision") == "bf16":
        return lora.base_weights_in(model, torch.bfloat16)
    return contextlib.nullcontext(model)


def _backward(model, accelerator: Accelerator, parts: list[tuple[float, dict]], precision: str = "fp32") -> float:
    """Accumulate the gradient of a batch's mean loss over its `micro_batches`; returns that loss."""
    total = 0.0
    for share, part in parts:
        with autocast(accelerator.device, precision):
            loss = model(**part).loss * share
        accelerator.backward(loss)
        total += loss.item()
    return total


def draw_configurations(rng: random.Random, pool: Sequence[Configuration], k: int,
                        mode: str = "uniform") -> list[Configuration]:
    """min(k, len(pool)) distinct configurations of `pool`, drawn with `rng` as `mode` (one of POOL_DRAWS) says."""
    k = min(k, len(pool))
    if check_name(mode, POOL_DRAWS, "pool draw") == "uniform":
        return rng.sample(list(pool), k)
    left = list(pool)
    drawn = []
    for _ in range(k):  # one at a time, each in proportion to its weight among those left
        pick = rng.choices(range(len(left)), weights=[2.0 ** -c.avg_bits for c in left])[0]
        drawn.append(left.pop(pick))
    return drawn


def lr_factor(schedule: str, step: int, total_steps: int, warmup: float = 0.0) -> float:
    """The learning rate of step `step` (0-based) of `total_steps`, as a fraction of the base rate:
    (step + 1) / W over the first W = ceil(warmup x total_steps) steps, then the schedule over the rest;
    from the step count alone, so a resumed run continues its schedule."""
    ramp = math.ceil(warmup * total_steps)
    if step < ramp:
        return (step + 1) / ramp
    if check_name(schedule, LR_SCHEDULES, "learning-rate schedule") == "constant":
        return 1.0
    return 1.0 - (step - ramp) / (total_steps - ramp)


def _run_epochs(model, accelerator: Accelerator, batches: DataLoader, hp: HyperParams,
                pick: Callable[[], Sequence[Configuration | None]], adapter: str, desc: str, trained_on: set[str],
                steps: list[tuple], on_epoch_end: Callable[[int, list[dict], dict], None] | None = None,
                resume: dict | None = None) -> list[dict]:
    """The shared loop: per batch, sum the loss over the configurations `pick()` returns (None: full
    precision), clip, step. `model` and `batches` come prepared by `accelerator`; the optimizer is
    new. Adds every configuration trained on to `trained_on` and every forward's loss to `steps`
    (what shows which configuration and step a collapse starts at). Returns per-epoch mean losses.
    `on_epoch_end(epoch, losses so far, optimizer state)` runs after each epoch; `resume` (a checkpoint)
    continues after its epoch with its optimizer state and losses."""
    inner = accelerator.unwrap_model(model)
    params = lora.trainable_parameters(inner)
    theta = {id(p) for p in inner.theta.parameters()} if inner.theta is not None else set()
    groups = [{"params": [p for p in params if id(p) not in theta]},
              {"params": [p for p in params if id(p) in theta], "lr": hp.theta_lr or hp.lr}]
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, weight_decay=hp.weight_decay))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    total_steps = hp.epochs * len(batches)
    history, first = [], 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        history, first = list(resume["losses"]), resume["epoch"] + 1
    for epoch in range(first, hp.epochs):
        model.train()
        total, count = 0.0, 0
        with held_weights(inner, hp.precision):  # released before on_epoch_end's fp32 search scoring
            for step, batch in enumerate(tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{hp.epochs}", leave=False)):
                optimizer.zero_grad(set_to_none=True)
                parts = micro_batches(batch, hp.micro_batches)  # once per batch, shared by its K configurations
                for configuration in pick():
                    if not inner.is_set or inner.configuration is not configuration:
                        lora.set_configuration(inner, configuration)  # identity check keeps an LQ-LoRA base
                    key = FULL_PRECISION if configuration is None else configuration.digest()
                    trained_on.add(key)
                    loss = _backward(model, accelerator, parts, hp.precision)
                    steps.append((adapter, epoch, step, key, loss))
                    total, count = total + loss, count + 1
                accelerator.clip_grad_norm_(params, hp.clip)
                factor = lr_factor(hp.lr_schedule, epoch * len(batches) + step, total_steps, hp.warmup)
                for group, lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = lr * factor
                optimizer.step()
        history.append({"epoch": epoch, "loss": total / max(count, 1)})
        if on_epoch_end is not None:
            on_epoch_end(epoch, history, optimizer.state_dict())
    return history


# ---- low-rank initialisation: LQ-LoRA and LoftQ ------------------------------------------------------

# (backbone, matrix, LayerQuant, rank, init, LQ-LoRA's iteration cap, fingerprint of W) -> (B [out, r], A [r, in]),
# B A ~ L: the fit depends on nothing else (no seed, no data), so every run of a process shares it.
_LOW_RANK: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_LOW_RANK_ENTRIES = 4096  # about 20 configurations of a 200-matrix model; a few MB at r = 8


def _svd_r(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors B [out, r], A [r, in] of `matrix` from its randomized truncated SVD (seeded,
    and on an RNG stream of its own, so it changes no other random number)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + OVERSAMPLING, *matrix.shape), niter=2)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * v[:, :rank].T


def low_rank_fit(weight: torch.Tensor, lq, rank: int, init: str,
                 max_iterations: int = MAX_LQLORA_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Factors B, A of a rank-r L with Q + L ~ W, and ||W - Q - L||_F after each iteration.

    "loftq" (LoftQ's order, one shot): Q = quant(W), then L = SVD_r(W - Q).
    "lqlora" (LQ-LoRA's order): Q starts at 0; L = SVD_r(W - Q), Q = quant(W - L), repeated while the
    error falls (at most `max_iterations`); the factors of the lowest error are returned, so the
    fit never ends worse than its first iteration. Q is then quant(W - B A), recomputed where needed.
    """
    weight = weight.detach().float()
    if init == "loftq":
        base = fake_quantize(weight, lq)
        b, a = _svd_r(weight - base, rank)
        return b, a, [float(torch.linalg.norm(weight - base - b @ a))]
    if init != "lqlora":
        raise ValueError(f"unknown low-rank initialisation {init!r}; valid: 'lqlora', 'loftq'")
    base, errors, best = torch.zeros_like(weight), [], None
    for _ in range(max_iterations):
        b, a = _svd_r(weight - base, rank)
        base = fake_quantize(weight - b @ a, lq)
        error = float(torch.linalg.norm(weight - base - b @ a))
        if errors and error >= min(errors):
            errors.append(error)
            break
        errors.append(error)
        best = (b, a)
    return best[0], best[1], errors


def _cached_fit(model, name: str, lq, rank: int, init: str, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = model.full_precision[name]
    cap = iterations if init == "lqlora" else None  # LoftQ's one shot has none
    key = (model.layout.backbone, name, lq, rank, init, cap, float(weight.float().sum()), tuple(weight.shape))
    if key not in _LOW_RANK:
        _LOW_RANK[key] = low_rank_fit(weight, lq, rank, init, iterations)[:2]
        while len(_LOW_RANK) > _LOW_RANK_ENTRIES:
            _LOW_RANK.popitem(last=False)
    _LOW_RANK.move_to_end(key)
    return _LOW_RANK[key]


def _quantize_around(model, configuration: Configuration, fits: dict[str, torch.Tensor]) -> None:
    """Base weights quant(W - B0 A0) from the stored low-rank fits (LQ-LoRA's order), for the current
    configuration only: the next `set_configuration` restores the plain quantized weights."""
    for name in model.lora_layers:
        low_rank = fits[f"{name}::b"].float() @ fits[f"{name}::a"].float()
        weight = model.full_precision[name].float()
        lora.override_base_weight(model, name, fake_quantize(weight - low_rank, configuration[name]))


def low_rank_init_(model, configuration: Configuration, hp: HyperParams, init: str) -> dict[str, torch.Tensor]:
    """Initialise every LoRA so that Q + s B A approximates W (docs/method.md#baselines), and for
    LQ-LoRA make the base weights quant(W - s B A). Returns the fits to store with the adapter."""
    scaling = hp.alpha / hp.rank
    fits = {}
    for name, layer in model.lora_layers.items():
        b, a = _cached_fit(model, name, configuration[name], hp.rank, init, hp.lqlora_iterations)
        lora.set_lora_factors(layer, a / math.sqrt(scaling), b / math.sqrt(scaling))
        fits[f"{name}::b"], fits[f"{name}::a"] = b, a
    if init == "lqlora":
        _quantize_around(model, configuration, fits)
        return {INIT_PREFIX + k: v.clone() for k, v in fits.items()}
    return {}


# ---- the engine --------------------------------------------------------------------------------------

def _loader_generator(batches: DataLoader) -> torch.Generator | None:
    """The generator that shuffles `batches` (accelerate keeps it in sync across processes)."""
    from accelerate.data_loader import get_sampler

    return getattr(get_sampler(batches), "generator", None)


def _reseed(batches: DataLoader, seed: int) -> None:
    """Seed every random stream of a training: Python, NumPy, torch and the batches' shuffling."""
    seed_everything(seed)
    generator = _loader_generator(batches)
    if generator is not None:
        generator.manual_seed(seed)


def _random_states(batches: DataLoader, rng: random.Random | None = None) -> dict:
    generator = _loader_generator(batches)
    # CUDA's generators too: dropout on a GPU draws from them, and a resumed run must draw the same masks.
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "picks": None if rng is None else rng.getstate(),
            "loader": None if generator is None else generator.get_state()}


def _restore_random_states(states: dict, batches: DataLoader, rng: random.Random | None = None) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if rng is not None:
        rng.setstate(states["picks"])
    generator = _loader_generator(batches)
    if generator is not None and states["loader"] is not None:
        generator.set_state(states["loader"])


def _save_checkpoint(path: Path | None, data: dict) -> None:
    """Write a checkpoint whole (main process only): a later `train` with the same path resumes there."""
    if path is None or not processes().is_main_process:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def _load_checkpoint(path: Path | None, method: str) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    # Our own file (configurations and RNG states pickled); on the CPU, whichever device saved it.
    data = torch.load(path, map_location="cpu", weights_only=False)
    if data.get("method") != method:
        raise ValueError(f"checkpoint {str(path)!r} is of method {data.get('method')!r}, not {method!r}; "
                         f"delete it to start over")
    logger.info("resuming %s from %s", method, path)
    return data


def train(method: str, model: torch.nn.Module, configurations: Sequence[Configuration], batches: DataLoader,
          hp: HyperParams = HyperParams(), seed: int = 0, refine: RefineHook | None = None,
          checkpoint: str | Path | None = None) -> Trained:
    """Train `method` on `model` (a `coalora.lora.build_lora_model` model, config-aware for methods
    with theta) for the given configurations and return the trained adapters with their timings.
    `refine` (methods that train on the pool) replaces the training set after each epoch.

    With `checkpoint` (a file path), the state after each epoch (each configuration, for the methods
    that train one adapter per configuration) is written there, and a later call with the same path
    resumes from it: adapters, optimizer, training set, search history and every random state, so
    an interrupted run ends as an uninterrupted one would. Delete the file once the result is kept."""
    spec = get_method(method)
    configurations = list(configurations)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if not configurations and spec.training not in ("full-precision", "none"):
        raise ValueError(f"{method} needs at least one training configuration, got none")
    if spec.theta != (model.theta is not None):
        raise ValueError(f"method {method!r} needs a model built with config_aware={spec.theta}")
    if refine is not None and spec.training != "pool":
        raise ValueError(f"a configuration search only refines CoA-LoRA's training set, not {method!r}'s")
    # Autocast is ours, not the Accelerator's: accelerate's precision is fixed once per process,
    # and one process may train runs of both precisions.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    prepared, batches = accelerator.prepare(model, batches)
    initial = lora.adapter_state(model)
    resume = _load_checkpoint(checkpoint, method)
    states, seconds, trained_on, steps = {}, {}, set(), []
    history: list[dict] = []
    if resume is not None:
        states, seconds, history = resume["states"], resume["seconds"], resume["history"]
        trained_on, steps = resume["trained_on"], resume["steps"]

    if spec.per_configuration:
        if resume is not None:
            _restore_random_states(resume["random"], batches)
        for configuration in tqdm(configurations, desc=method, leave=False):
            key = configuration.digest()
            if key in states:  # trained before an interruption
                continue
            _reseed(batches, seed)  # every adapter sees the batches in the same order, as the shared ones do
            lora.load_adapter_state(model, initial)
            start = time.perf_counter()
            lora.set_configuration(model, configuration)
            fits = {} if spec.init == "default" else low_rank_init_(model, configuration, hp, spec.init)
            epochs = _run_epochs(prepared, accelerator, batches, hp, lambda: [configuration], key,
                                 f"{method} {configuration.avg_bits:.2f}b", trained_on, steps)
            seconds[key] = time.perf_counter() - start
            states[key] = lora.adapter_state(model) | fits
            history += [{"configuration": key, **e} for e in epochs]
            _save_checkpoint(checkpoint, {"method": method, "states": states, "seconds": seconds, "history": history,
                                          "trained_on": trained_on, "steps": steps,
                                          "random": _random_states(batches)})
        return Trained(method, model, configurations, states, seconds, history, trained_on, steps)

    _reseed(batches, seed)
    if spec.training == "none":
        return Trained(method, model, configurations, {"shared": initial}, {"shared": 0.0}, [], trained_on, steps)
    rng = random.Random(seed)
    pool = list(configurations)
    elapsed = 0.0
    if resume is not None:
        lora.load_adapter_state(model, resume["adapter"])
        pool[:] = resume["pool"]
        elapsed = resume["elapsed"]
        if resume["search"] is not None:
            refine.load_state_dict(resume["search"])
        _restore_random_states(resume["random"], batches, rng)
    if spec.training == "full-precision":
        def pick():
            return [None]
    elif spec.training == "shared":
        def pick():
            return [rng.choice(pool)]
    else:
        def pick():
            return draw_configurations(rng, pool, hp.configs_per_step, hp.pool_draw)

    start = time.perf_counter()

    def end_epoch(epoch: int, losses: list[dict], optimizer_state: dict) -> None:
        if refine is not None:
            # Under `accelerate launch` every process trains on the main process's refined set, so the
            # seeded draws from it (rng above) agree too.
            pool[:] = from_main(refine(epoch, model, list(pool)))
            if not pool:
                raise ValueError("the configuration search returned an empty training set")
        if spec.training == "pool":
            history.append({"epoch": epoch, "pool": [c.digest() for c in pool]})
        _save_checkpoint(checkpoint, {
            "method": method, "epoch": epoch, "losses": losses, "optimizer": optimizer_state,
            "adapter": lora.adapter_state(model), "pool": list(pool), "history": history, "states": {},
            "seconds": {}, "trained_on": trained_on, "steps": steps, "elapsed": elapsed + time.perf_counter() - start,
            "search": refine.state_dict() if hasattr(refine, "state_dict") else None,
            "random": _random_states(batches, rng)})

    epochs = _run_epochs(prepared, accelerator, batches, hp, pick, "shared", method, trained_on, steps, end_epoch,
                         resume)
    seconds["shared"] = elapsed + time.perf_counter() - start
    states["shared"] = lora.adapter_state(model)
    for row, extra in zip(epochs, history or [{}] * len(epochs)):
        row.update(extra)
    return Trained(method, model, pool if spec.training == "pool" else configurations, states, seconds, epochs,
                   trained_on, steps)
