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

TASK_METRICS = {"classification": "accuracy", "causal-lm": "perplexity"}


@torch.no_grad()
def evaluate(model: torch.nn.Module, configuration: Configuration, batches: Iterable[Mapping[str, torch.Tensor]],
             task_type: str) -> dict[str, float]:
    """Accuracy (classification) or perplexity (causal LM) of `model` under `configuration`.

    Batches carry `labels` (class ids, or the input ids for a causal LM). Perplexity is
    exp(mean token loss) over all batches, weighting each batch by its number of predicted tokens.
    Returns {metric: value, "loss": mean loss, "eval_seconds": wall-clock seconds}.
    """
    check_task_type(task_type)
    start = time.perf_counter()
    if model.configuration != configuration:  # keep weights a caller set up for it (LQ-LoRA)
        lora.set_configuration(model, configuration)
    was_training = model.training
    model.eval()
    loss_sum, weight, correct, seen = 0.0, 0, 0, 0
    for batch in tqdm(batches, desc=f"eval {configuration.avg_bits:.2f} bits", leave=False):
        out = model(**batch)
        if task_type == "classification":
            n = batch["labels"].numel()
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            seen += n
        else:
            mask = batch.get("attention_mask")
            n = int(mask[:, 1:].sum()) if mask is not None else batch["labels"][:, 1:].numel()
        loss_sum += float(out.loss) * n
        weight += n
    model.train(was_training)
    if weight == 0:
        raise ValueError("evaluation got no batches")
    loss = loss_sum / weight
    value = correct / seen if task_type == "classification" else math.exp(loss)
    return {TASK_METRICS[task_type]: value, "loss": loss, "eval_seconds": time.perf_counter() - start}


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
