"""Evaluation of a trained adapter under a configuration, and the paper's summary metrics:
hypervolume of (average bits, metric) and the accuracy gap to QLoRA."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import torch
from botorch.utils.multi_objective.hypervolume import Hypervolume
from botorch.utils.multi_objective.pareto import is_non_dominated
from tqdm.auto import tqdm

from coalora import lora
from coalora.configs import Configuration
from coalora.presets import check_task_type
from coalora.training import autocast, held_weights

TASK_METRICS = {"classification": "accuracy", "causal-lm": "perplexity"}


@torch.no_grad()
def evaluate(model: torch.nn.Module, configuration: Configuration | None,
             batches: Iterable[Mapping[str, torch.Tensor]], task_type: str, precision: str = "fp32") -> dict:
    """Accuracy (classification) or perplexity (causal LM) of `model` under `configuration` (None:
    full precision), with batches moved to the model's device and, for `precision="bf16"`, the
    forward under bf16 autocast.

    Batches carry `labels` (class ids, or the input ids for a causal LM). Perplexity is
    exp(mean token loss) over all batches, weighting each batch by its number of predicted tokens.
    Returns {metric: value, "loss": mean loss, "eval_seconds": wall-clock seconds, "per_example":
    one number per example in batch order: 1/0 for a correct/wrong label, or a block's mean token
    loss}: what paired comparisons resample.
    """
    check_task_type(task_type)
    start = time.perf_counter()
    if not model.is_set or model.configuration != configuration:  # keep weights a caller set up (LQ-LoRA)
        lora.set_configuration(model, configuration)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, weight, per_example = 0.0, 0, []
    name = "full precision" if configuration is None else f"{configuration.avg_bits:.2f} bits"
    with held_weights(model, precision):
        for batch in tqdm(batches, desc=f"eval {name}", leave=False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            # A causal LM's per-token losses are computed below; given the labels, the model would also
            # compute their mean over the whole vocabulary (docs/measurements.md#training-step).
            inputs = batch if task_type == "classification" else {k: v for k, v in batch.items() if k != "labels"}
            with autocast(device, precision):
                out = model(**inputs)
            if task_type == "classification":
                n = batch["labels"].numel()
                per_example.append((out.logits.argmax(-1) == batch["labels"]).to(torch.float32).cpu())
                loss_sum += float(out.loss) * n
            else:
                mask = batch.get("attention_mask")
                mask = torch.ones_like(batch["labels"]) if mask is None else mask
                logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
                token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                          reduction="none")  # [B, L-1]
                tokens = mask[:, 1:].to(token.dtype)
                per_example.append(((token * tokens).sum(1) / tokens.sum(1).clamp_min(1)).cpu())
                n = int(tokens.sum())
                loss_sum += float((token * tokens).sum())
            weight += n
    model.train(was_training)
    if weight == 0:
        raise ValueError("evaluation got no batches")
    loss = loss_sum / weight
    per_example = torch.cat(per_example).numpy()
    value = float(per_example.mean()) if task_type == "classification" else math.exp(loss)
    return {TASK_METRICS[task_type]: value, "loss": loss, "eval_seconds": time.perf_counter() - start,
            "per_example": per_example}


@torch.no_grad()
def sentence_features(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], limit: int | None = None,
                      training: bool = False, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """The features a classification head reads, as the model's configuration leaves them: the first
    token's last hidden state [N, H] (BERT's pooler and MPNet's dense layer start from it), float32,
    with the labels [N], for the first `limit` examples in batch order (None: all). `training` runs the
    forwards in training mode (the backbone's dropout on); `precision` as in `evaluate`, so a bf16 run's
    features are the ones its evaluation scored."""
    was_training = model.training
    model.train(training)
    device = next(model.parameters()).device
    out, labels = [], []
    with held_weights(model, precision):
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            labels.append(batch.pop("labels").cpu())
            with autocast(device, precision):
                hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # [B, L, H]
            out.append(hidden[:, 0].float().cpu())
            if limit is not None and sum(len(x) for x in out) >= limit:
                break
    model.train(was_training)
    return torch.cat(out)[:limit], torch.cat(labels)[:limit]


def mean_cosine(features: torch.Tensor) -> float:
    """Mean pairwise cosine between the rows of `features` [N, H], N >= 2, self-pairs left out: 1 when
    every example looks alike to a head reading them, about 0 for unrelated directions."""
    n = len(features)
    if n < 2:
        raise ValueError(f"a mean pairwise cosine needs at least 2 examples, got {n}")
    normalized = torch.nn.functional.normalize(features.double(), dim=1)
    return float(((normalized @ normalized.T).sum() - n) / (n * (n - 1)))


def hypervolume(bits: Iterable[float], values: Iterable[float], bits_range: tuple[float, float],
                value_range: tuple[float, float] = (0.0, 1.0), higher_is_better: bool = True) -> float:
    """Hypervolume of the (average bits, metric) points, in [0, 1].

    Normalisation: x = (bits_hi - bits) / (bits_hi - bits_lo) (fewer bits is better) and
    y = (value - lo) / (hi - lo) for accuracy (or (hi - value) / (hi - lo) when lower is better,
    e.g. perplexity), both clipped to [0, 1]; reference point (0, 0). A method whose every
    configuration reaches the best metric at the fewest bits scores 1.
    """
    bits = torch.as_tensor(list(bits), dtype=torch.float64)
    values = torch.as_tensor(list(values), dtype=torch.float64)
    if bits.numel() == 0 or bits.shape != values.shape:
        raise ValueError(f"need equally many bits and values (at least one), got {bits.numel()} and {values.numel()}")
    (b_lo, b_hi), (v_lo, v_hi) = bits_range, value_range
    if not (b_hi > b_lo and v_hi > v_lo):
        raise ValueError(f"ranges must be increasing, got bits_range={bits_range}, value_range={value_range}")
    x = ((b_hi - bits) / (b_hi - b_lo)).clamp(0, 1)
    y = (values - v_lo) / (v_hi - v_lo) if higher_is_better else (v_hi - values) / (v_hi - v_lo)
    points = torch.stack([x, y.clamp(0, 1)], dim=1)
    front = points[is_non_dominated(points)]
    return float(Hypervolume(torch.zeros(2, dtype=torch.float64)).compute(front))


def accuracy_gap(method: Mapping[str, float], qlora: Mapping[str, float]) -> float:
    """Mean accuracy difference to QLoRA in percentage points over the configurations both have
    (keyed by configuration id); positive means better than QLoRA."""
    shared = sorted(set(method) & set(qlora))
    if not shared:
        raise ValueError("no configuration was evaluated for both the method and QLoRA")
    return 100.0 * sum(method[k] - qlora[k] for k in shared) / len(shared)
