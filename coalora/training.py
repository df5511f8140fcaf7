"""One training engine for CoA-LoRA and its three baselines, on the same backbone, task, quantizer
and configurations (docs/method.md#training, docs/method.md#baselines):

    coalora  one shared LoRA + theta; every batch runs under K configurations drawn from the
             training set, losses summed, one AdamW step; after each epoch a `refine` hook (the
             configuration search, coalora.search) may replace the training set
    qlora    a fresh LoRA (+ head) trained per configuration
    lqlora   like qlora, with A, B initialised from the top-r SVD of the quantization residual
             W - Q(W) (one-shot; `lqlora_iterations > 1` alternates SVD and quantization as LQ-LoRA
             does, and the base weight becomes Q(W - BA))
    shared   one LoRA (+ head) trained with a random switch among the configurations at every step

The loop runs through `accelerate`, so the same code runs on CPU here and multi-GPU under
`accelerate launch`. A padded classification batch runs as length-sorted micro-batches (same loss and
gradient, fewer padding tokens). Wall-clock seconds are recorded per trained adapter.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from coalora import lora
from coalora.configs import Configuration
from coalora.methods import method as get_method
from coalora.quant import fake_quantize
from coalora.repro import seed_everything

logger = logging.getLogger(__name__)

BASE_PREFIX = "base_weight::"  # adapter-state keys of base weights that replace Q(W) (iterative LQ-LoRA)

# refine(epoch, model, pool) -> the training pool for the next epoch (CoA-LoRA only).
RefineHook = Callable[[int, torch.nn.Module, list[Configuration]], list[Configuration]]


@dataclass(frozen=True)
class HyperParams:
    """Training hyper-parameters shared by all methods (docs/method.md#training)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 2
    configs_per_step: int = 2  # K, CoA-LoRA only
    clip: float = 1.0
    lqlora_iterations: int = 1
    micro_batches: int = 2  # a padded classification batch runs as this many length-sorted parts

    def __post_init__(self):
        for name in ("rank", "alpha", "epochs", "configs_per_step", "lqlora_iterations", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Trained:
    """What training produced: the model (with the last adapter loaded) and, per method, the adapter
    state to load before evaluating a configuration."""

    method: str
    model: torch.nn.Module
    configurations: list[Configuration]
    states: dict[str, dict[str, torch.Tensor]]  # configuration digest (or "shared") -> adapter state
    train_seconds: dict[str, float]  # same keys
    history: list[dict] = field(default_factory=list)  # per epoch: loss, pool (CoA-LoRA)

    def load_for(self, configuration: Configuration) -> torch.nn.Module:
        """Switch the model to `configuration` and load the adapter trained for it."""
        key = configuration.digest() if get_method(self.method).per_configuration else "shared"
        if key not in self.states:
            raise ValueError(f"{self.method} has no adapter for configuration {key} "
                             f"({configuration.avg_bits:.3f} bits); it was trained for "
                             f"{', '.join(c.digest() for c in self.configurations)}")
        state = self.states[key]
        lora.set_configuration(self.model, configuration)
        lora.load_adapter_state(self.model, {k: v for k, v in state.items() if not k.startswith(BASE_PREFIX)})
        for k, weight in state.items():
            if k.startswith(BASE_PREFIX):
                lora.override_base_weight(self.model, k[len(BASE_PREFIX):], weight)
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


def _backward(model, accelerator: Accelerator, parts: list[tuple[float, dict]]) -> float:
    """Accumulate the gradient of a batch's mean loss over its `micro_batches`; returns that loss."""
    total = 0.0
    for share, part in parts:
        loss = model(**part).loss * share
        accelerator.backward(loss)
        total += loss.item()
    return total


def _run_epochs(model, batches: DataLoader, hp: HyperParams, pick: Callable[[], Sequence[Configuration]],
                desc: str, on_epoch_end: Callable[[int], None] | None = None) -> list[dict]:
    """The shared loop: per batch, sum the loss over the configurations `pick()` returns, clip,
    step. Returns per-epoch mean losses."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    params = lora.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    model, optimizer, batches = accelerator.prepare(model, optimizer, batches)
    history = []
    for epoch in range(hp.epochs):
        model.train()
        total, count = 0.0, 0
        for batch in tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{hp.epochs}", leave=False):
            optimizer.zero_grad(set_to_none=True)
            parts = micro_batches(batch, hp.micro_batches)  # once per batch, shared by its K configurations
            for configuration in pick():
                inner = accelerator.unwrap_model(model)
                if inner.configuration is not configuration:  # keeps LQ-LoRA's Q(W - BA) base
                    lora.set_configuration(inner, configuration)
                total, count = total + _backward(model, accelerator, parts), count + 1
            accelerator.clip_grad_norm_(params, hp.clip)
            optimizer.step()
        history.append({"epoch": epoch, "loss": total / max(count, 1)})
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return history


def lqlora_init_(model: torch.nn.Module, configuration: Configuration, hp: HyperParams) -> None:
    """Initialise every LoRA so that Q + s*B@A approximates W (LQ-LoRA; docs/method.md#baselines).

    One-shot (iterations=1): B A = top-r SVD of W - Q(W) / s, base stays Q(W).
    Iterative: L <- SVD_r(W - Q), Q <- quantize(W - L), repeated; the base weight becomes that Q.
    """
    scaling = hp.alpha / hp.rank
    for name, layer in model.lora_layers.items():
        weight = model.full_precision[name].float()
        lq = configuration[name]
        low_rank = torch.zeros_like(weight)
        for _ in range(hp.lqlora_iterations):
            base = fake_quantize(weight - low_rank, lq)
            u, s, vh = torch.linalg.svd(weight - base, full_matrices=False)
            root = s[: hp.rank].sqrt()
            b, a = u[:, : hp.rank] * root, root[:, None] * vh[: hp.rank]  # [out, r], [r, in]
            low_rank = b @ a
        lora.set_lora_factors(layer, a / math.sqrt(scaling), b / math.sqrt(scaling))
        if hp.lqlora_iterations > 1:
            lora.override_base_weight(model, name, base)


def train(method: str, model: torch.nn.Module, configurations: Sequence[Configuration], batches: DataLoader,
          hp: HyperParams = HyperParams(), seed: int = 0, refine: RefineHook | None = None) -> Trained:
    """Train `method` on `model` (a `coalora.lora.build_lora_model` model, config-aware for
    "coalora") for the given configurations and return the trained adapters with their timings.
    `refine` (CoA-LoRA only) replaces the training set after each epoch."""
    spec = get_method(method)
    configurations = list(configurations)
    if not configurations:
        raise ValueError(f"{method} needs at least one training configuration, got none")
    if spec.config_aware != (model.theta is not None):
        raise ValueError(f"method {method!r} needs a model built with config_aware={spec.config_aware}")
    if refine is not None and not spec.config_aware:
        raise ValueError(f"a configuration search only refines CoA-LoRA's training set, not {method!r}'s")
    initial = lora.adapter_state(model)
    states, seconds = {}, {}
    history: list[dict] = []

    if spec.per_configuration:
        for configuration in tqdm(configurations, desc=method, leave=False):
            seed_everything(seed)
            lora.load_adapter_state(model, initial)
            start = time.perf_counter()
            lora.set_configuration(model, configuration)
            if method == "lqlora":
                lqlora_init_(model, configuration, hp)
            epochs = _run_epochs(model, batches, hp, lambda: [configuration], f"{method} {configuration.avg_bits:.2f}b")
            key = configuration.digest()
            seconds[key] = time.perf_counter() - start
            states[key] = lora.adapter_state(model)
            if method == "lqlora" and hp.lqlora_iterations > 1:
                states[key].update({BASE_PREFIX + name: layer.get_base_layer().weight.detach().clone()
                                    for name, layer in model.lora_layers.items()})
            history += [{"configuration": key, **e} for e in epochs]
        return Trained(method, model, configurations, states, seconds, history)

    seed_everything(seed)
    rng = random.Random(seed)
    pool = list(configurations)
    if method == "shared":
        def pick():
            return [rng.choice(pool)]
    else:
        def pick():
            return rng.sample(pool, min(hp.configs_per_step, len(pool)))

    def end_epoch(epoch: int) -> None:
        if refine is not None:
            pool[:] = refine(epoch, model, list(pool))
            if not pool:
                raise ValueError("the configuration search returned an empty training set")
        history.append({"epoch": epoch, "pool": [c.digest() for c in pool]})

    start = time.perf_counter()
    epochs = _run_epochs(model, batches, hp, pick, method, end_epoch if spec.config_aware else None)
    seconds["shared"] = time.perf_counter() - start
    states["shared"] = lora.adapter_state(model)
    for row, extra in zip(epochs, history or [{}] * len(epochs)):
        row.update(extra)
    return Trained(method, model, pool if spec.config_aware else configurations, states, seconds, epochs)
