"""CoA-LoRA on PEFT LoRA: configuration switching, the configuration-aware variant, and export
(docs/method.md#the-adapter).

Per quantized linear i, under the current configuration c:

    y = x W_c^T + bias + s * B M_i A dropout(x),   M_i = I + gamma * U_theta(c_i),   s = alpha / r

W_c is the frozen base weight fake-quantized under c; the bias stays in full precision. A, B, the
task head (PEFT SEQ_CLS `modules_to_save`) and theta are trained. The pieces:

* `CoALoRAModel`: an nn.Module holding a stock `peft.PeftModel` (plain LoRA layers) and theta. Its
  forward evaluates theta ONCE for all N matrices (M [N, r, r]) and leaves the rows in a slot shared
  with every layer's `CoALoRAVariant`, PEFT's `LoraVariant` hook, which puts M_i between A and B.
  No forward method is patched.
* `set_configuration` swaps fake-quantized base weights in, from a `WeightCache` (LRU, bounded in
  bytes, with the weights' one-byte codes behind them) so that switching back to a configuration
  seen before does no quantization while the codes fit their budget; `base_weights_in` holds them
  in bf16 for a block of bf16-autocast forwards.
* `materialize` folds A' = M_i A for one configuration and returns a stock PEFT LoRA adapter, to be
  loaded with `PeftModel.from_pretrained` on the backbone quantized by `quantize_weights_`.

`config_aware=False` leaves theta and the variants out: a plain PEFT LoRA on fake-quantized weights
(the QLoRA, LQ-LoRA and Shared-LoRA baselines), with the same switching and export.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils import SAFETENSORS_WEIGHTS_NAME, ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn

from coalora import repro
from coalora.configs import FIELDS, Configuration, Layout, MatrixSpec, QuantSpace
from coalora.hypernet import ConfigAwareModel, check_layout
from coalora.models import family_of, head_modules, lora_target_modules, matrix_layout, quantized_linears
from coalora.presets import check_task_type
from coalora.quant import dequantize, fake_quantize, quantize

log = logging.getLogger(__name__)

ADAPTER = "default"  # the PEFT adapter name used throughout
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}  # our task type -> PEFT's
# Holds the default SST-2 pool's weights whole. The causal LM's pool outgrows any budget of this size, and
# there a smaller one trades cheap rebuilds from the codes for less memory the allocator keeps fragmented
# (docs/measurements.md#weight-cache).
DEFAULT_CACHE_BYTES = 1 * 1024**3
DEFAULT_CODE_BYTES = 2 * 1024**3  # every matrix option of the default causal-LM runs: 1.3 GiB of codes + scales
CONFIGURATION_FILE = "quantization_configuration.json"  # written next to a materialized adapter
SAVED_CONFIG = "coalora_config.json"  # a saved CoALoRAModel: what to rebuild it from ...
SAVED_WEIGHTS = "coalora_model.safetensors"  # ... and every trained tensor (A, B, head, theta)
SAVED_FORMAT = 1
_SAVED_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors


class _LRU:
    """Values by key, the least recently used dropped once they hold more than `max_bytes`; a value
    larger than the whole budget is returned but not kept. `hits` and `misses` count lookups."""

    def __init__(self, max_bytes: int, size: Callable[[object], int]):
        if max_bytes < 0:
            raise ValueError(f"the weight cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes, self.size = max_bytes, size
        self.nbytes = 0
        self.hits = self.misses = 0
        self.entries: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple, compute: Callable[[], object]):
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = compute()
        size = self.size(value)
        if size <= self.max_bytes:
            self.entries[key] = value
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.nbytes -= self.size(old)
        return value


class WeightCache:
    """Fake-quantized weights keyed by (matrix name, LayerQuant, device, dtype), LRU within
    `max_bytes`; behind them the same weights' `Codes` (one byte a weight) LRU within `code_bytes`.
    `hits`, `misses`, `nbytes` and len() are the weights'; `codes` is the second tier.

    Why two tiers: CoA-LoRA cycles through a pool of configurations, and the fp32 weights of every
    matrix option a causal-LM pool uses fill 4.4 GiB (SmolLM2-135M, the default preset), so an LRU of
    weights alone evicts each one just before it is needed again. Rebuilt from its codes, a weight
    costs a gather and a multiply, a fourth to a fifth of quantizing it afresh (bench/quant.py)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, code_bytes: int = DEFAULT_CODE_BYTES):
        self.weights = _LRU(max_bytes, lambda t: t.numel() * t.element_size())
        self.codes = _LRU(code_bytes, lambda c: c.nbytes)

    max_bytes = property(lambda self: self.weights.max_bytes)
    nbytes = property(lambda self: self.weights.nbytes)
    hits = property(lambda self: self.weights.hits)
    misses = property(lambda self: self.weights.misses)

    def __len__(self) -> int:
        return len(self.weights.entries)

    def get(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.weights.get(key, compute)

    def quantized(self, fingerprint: str, original: torch.Tensor, lq, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        """`original` fake-quantized under `lq` on `device` in `dtype`: from the weights, else rebuilt
        from the codes, else quantized (and both tiers filled)."""
        def rebuild() -> torch.Tensor:
            codes = self.codes.get((fingerprint, lq, device), lambda: quantize(original.to(device), lq))
            return dequantize(codes, original.dtype).to(dtype)  # via the weight's dtype, as fake_quantize
        return self.weights.get((fingerprint, lq, device, dtype), rebuild)


class _Adjustments:
    """Where a CoALoRAModel forward leaves theta's output, N x [r, r], for its variants to read."""

    def __init__(self):
        self.rows: tuple[torch.Tensor, ...] | None = None


class CoALoRAVariant(LoraVariant):
    """LoRA variant of layout matrix `index`: result + s * B (M_index (A dropout(x))).

    M comes from the shared `_Adjustments` slot, filled once per model forward, so the layer does
    no theta work of its own and gradients reach theta through the slot's tensors.
    """

    def __init__(self, adjustments: _Adjustments, index: int, name: str):
        self.adjustments, self.index, self.name = adjustments, index, name

    def supports_lora_conversion(self) -> bool:
        return False  # M depends on the configuration: `materialize` is the conversion

    def forward(self, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        if self.adjustments.rows is None:
            raise RuntimeError(f"CoA-LoRA layer {self.name!r} ran without theta's adjustments: call the "
                               f"CoALoRAModel itself (not its peft_model), after set_configuration")
        h = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))  # [..., r]
        h = h @ self.adjustments.rows[self.index].to(h.dtype).T  # [..., r]: M_i A x
        return result + module.lora_B[active_adapter](h) * module.scaling[active_adapter]

    @staticmethod
    def _refuse_merge(*args, **kwargs):
        raise NotImplementedError("a CoA-LoRA layer cannot be merged: its update depends on the configuration; "
                                  "use coalora.lora.materialize(model, configuration) for a plain LoRA of one")

    merge_safe = merge_unsafe = unmerge = _refuse_merge


class CoALoRAModel(nn.Module):
    """A PEFT LoRA model of a backbone, plus theta when configuration-aware, run under one
    quantization configuration at a time (`set_configuration`).

    Attributes: `peft_model` (the stock peft.PeftModel), `theta` (ConfigAwareModel, or None for plain
    LoRA), `layout`, `space`, `configuration` (current; None for full precision), `is_set` (whether a
    configuration or full precision was set), `lora_layers` (matrix name -> PEFT LoRA layer, layout
    order), `full_precision` (matrix name -> original weight, where it was loaded), `fingerprints`
    (matrix name -> what identifies that weight in a weight cache shared by several models), `heads`
    (name -> trained copy of each `modules_to_save` module), `weight_cache`, `task_type`.
    """

    def __init__(self, peft_model: PeftModel, layout: Layout, space: QuantSpace, theta: ConfigAwareModel | None,
                 cache: WeightCache | None = None, task_type: str = "classification"):
        super().__init__()
        self.peft_model, self.theta, self.task_type = peft_model, theta, check_task_type(task_type)
        self.layout, self.space = layout, space
        self.configuration: Configuration | None = None
        self.is_set = False
        self.lora_layers = quantized_linears(peft_model)
        if list(self.lora_layers) != list(layout.names):
            raise ValueError(f"the PEFT model's LoRA layers do not match the layout of {layout.backbone!r}")
        self.full_precision = {name: layer.get_base_layer().weight.detach()
                               for name, layer in self.lora_layers.items()}
        self.heads = {name: module.modules_to_save[ADAPTER]
                      for name, module in peft_model.get_base_model().named_modules()
                      if isinstance(module, ModulesToSaveWrapper)}
        # Equal weights of equally named matrices quantize alike, so models of one backbone can share a cache.
        self.fingerprints = {name: (layout.backbone, name, tuple(w.shape), float(w.float().sum()))
                             for name, w in self.full_precision.items()}
        self.weight_cache = WeightCache() if cache is None else cache
        self._adjustments = _Adjustments()
        self.register_buffer("config_index", None, persistent=False)  # [N, 5], set with the configuration
        if theta is not None:
            for index, (name, layer) in enumerate(self.lora_layers.items()):
                layer.lora_variant[ADAPTER] = CoALoRAVariant(self._adjustments, index, name)

    def forward(self, *args, **kwargs):
        """The PEFT model's forward under the current configuration; theta runs once for all matrices."""
        if not self.is_set:
            raise RuntimeError("no quantization configuration is set: call "
                               "coalora.lora.set_configuration(model, configuration) before running the model")
        if self.theta is not None:
            self._adjustments.rows = self.theta.adjustments(self.config_index).unbind(0)  # N x [r, r]
        return self.peft_model(*args, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write this model's trained tensors and what rebuilds it (`from_pretrained`) to `directory`."""
        return save_pretrained(self, directory)

    def extra_repr(self) -> str:
        c = self.configuration
        if not self.is_set:
            current = "none"
        else:
            current = "full precision" if c is None else f"{c.digest()} ({c.avg_bits:.3f} bits)"
        return f"backbone={self.layout.backbone!r}, matrices={len(self.layout)}, configuration={current}"


def build_lora_model(backbone_model: nn.Module, layout: Layout, space: QuantSpace, rank: int = 8, alpha: int = 16,
                     dropout: float = 0.0, config_aware: bool = True, task_type: str = "classification",
                     cache: WeightCache | None = None) -> CoALoRAModel:
    """Wrap `backbone_model` (in place, as `peft.get_peft_model` does) with LoRA of rank `rank` on
    every matrix of `layout`, and with theta when `config_aware`. Call `set_configuration` before use.

    `task_type` "classification" also trains the classification head (PEFT's `modules_to_save`),
    dense layer and projection (`coalora.models.head_modules`). `cache` holds the fake-quantized
    weights (default: a cache of this model's own, DEFAULT_CACHE_BYTES of weights and DEFAULT_CODE_BYTES
    of codes at most); models of one backbone may share one.
    """
    check_task_type(task_type)
    if matrix_layout(backbone_model, layout.backbone) != layout:
        raise ValueError(f"layout of {layout.backbone!r} ({len(layout)} matrices) does not match this model's "
                         f"quantized matrices; build it with coalora.models.matrix_layout(model, name)")
    for name, linear in quantized_linears(backbone_model).items():
        if type(linear) is not nn.Linear:
            raise ValueError(f"{name!r} is a {type(linear).__name__}; fake quantization needs the full-precision "
                             f"torch.nn.Linear layers of an unquantized backbone")
    family = family_of(backbone_model)
    config = LoraConfig(task_type=PEFT_TASK_TYPES[task_type], r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=lora_target_modules(family),
                        modules_to_save=head_modules(family) if task_type == "classification" else None)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias while it wraps a model: a
        # FutureWarning per model about the two libraries, nothing a caller of coalora can change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(backbone_model, config)
    theta = None
    if config_aware:
        device = next(backbone_model.parameters()).device
        theta = ConfigAwareModel(layout, space, rank).to(device)
    model = CoALoRAModel(peft_model, layout, space, theta, cache, task_type)
    log.info("%s r=%d on %d matrices of %s: %d trainable parameters%s",
             "CoA-LoRA" if config_aware else "plain LoRA", rank, len(layout), layout.backbone,
             sum(p.numel() for p in trainable_parameters(model)),
             f" ({sum(p.numel() for p in theta.parameters())} in theta)" if theta is not None else "")
    return model


def set_configuration(model: CoALoRAModel, configuration: Configuration | None) -> CoALoRAModel:
    """Run `model` under `configuration` from now on: each target base weight becomes
    fake_quantize(original weight, configuration[name]), taken from the weight cache when there.
    `None` runs the unquantized weights (a plain LoRA only: theta needs a configuration)."""
    if configuration is None:
        if model.theta is not None:
            raise ValueError("a configuration-aware model needs a quantization configuration; "
                             "full precision (None) is for plain LoRA models")
    else:
        check_layout(configuration, model.layout)
        if model.theta is not None:
            model.config_index = model.theta.config_index(configuration)  # also checks the space
    for name, layer in model.lora_layers.items():
        base = layer.get_base_layer()
        original, like = model.full_precision[name], base.weight
        if configuration is None:
            weight = original.to(like.device, like.dtype)
        else:
            lq = configuration[name]
            weight = model.weight_cache.quantized(model.fingerprints[name], original, lq, like.device, like.dtype)
        # A new Parameter rather than `.data =`: graphs of earlier forwards keep the weights they used.
        base.weight = nn.Parameter(weight, requires_grad=False)
    model.configuration, model.is_set = configuration, True
    model._adjustments.rows = None
    cache = model.weight_cache
    log.debug("configuration %s set (weight cache: %d hits, %d misses, %.1f MiB; codes: %d hits, %d misses, "
              "%.1f MiB)", "full precision" if configuration is None else configuration.digest(), cache.hits,
              cache.misses, cache.nbytes / 2**20, cache.codes.hits, cache.codes.misses, cache.codes.nbytes / 2**20)
    return model


@contextlib.contextmanager
def base_weights_in(model: CoALoRAModel, dtype: torch.dtype) -> Iterator[CoALoRAModel]:
    """Hold the frozen base weights in `dtype` inside the block: the current ones converted, and every
    `set_configuration` there quantizes into `dtype`. For a block of bf16-autocast forwards only.

    Autocast caches the bf16 copy of a weight that trains, but casts a frozen one again at every
    forward (22M weights per MiniLM-L6 forward). Held in bf16, the cast is done once per configuration,
    with the same rounding, so every number stays as it was; a step gains 1-5 % on 2 CPU threads
    (docs/measurements.md#training-step). The block also turns off PEFT's cast of each LoRA layer's
    input to its fp32 A (`cast_input_dtype_enabled`): autocast casts it straight back to bf16, both
    casts exact, so that pair of copies per layer and pass is all it removes, 5-13 % of a bf16 step.
    On exit the weights of entry come back, or, if a configuration was set inside the block, the
    current configuration is set again in the entry's dtype (an `override_base_weight` made inside the
    block does not survive it).
    """
    entry = {name: layer.get_base_layer().weight for name, layer in model.lora_layers.items()}
    casts = {name: layer.cast_input_dtype_enabled for name, layer in model.lora_layers.items()}
    held = {name: nn.Parameter(weight.detach().to(dtype), requires_grad=False) for name, weight in entry.items()}
    for name, layer in model.lora_layers.items():
        layer.get_base_layer().weight = held[name]
        layer.cast_input_dtype_enabled = False
    try:
        yield model
    finally:
        reset = any(layer.get_base_layer().weight is not held[name] for name, layer in model.lora_layers.items())
        for name, layer in model.lora_layers.items():
            layer.get_base_layer().weight = entry[name]
            layer.cast_input_dtype_enabled = casts[name]
        if reset and model.is_set:
            set_configuration(model, model.configuration)


def quantize_weights_(model: nn.Module, configuration: Configuration) -> nn.Module:
    """Fake-quantize the target weights of a plain backbone in place under `configuration` and return
    it: the base a materialized adapter for `configuration` is loaded on."""
    check_layout(configuration, matrix_layout(model, configuration.backbone))
    with torch.no_grad():
        for name, module in quantized_linears(model).items():
            module.weight.copy_(fake_quantize(module.weight, configuration[name]))
    return model


@dataclass
class MaterializedAdapter:
    """A plain PEFT LoRA adapter for one configuration, A' = M_i A folded in (same B and head).

    `state_dict` uses PEFT's on-disk keys (`base_model.model.<module>.lora_A.weight`, ...);
    `save_pretrained(directory)` writes what `PeftModel.from_pretrained(base, directory)` reads, plus
    the configuration as JSON, where `base` is the backbone after `quantize_weights_(base, configuration)`.
    """

    peft_config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    configuration: Configuration

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter as a stock PEFT directory (whole or not at all)."""
        def write(staging: Path) -> None:
            save_file(self.state_dict, staging / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
            config = copy.deepcopy(self.peft_config)
            config.inference_mode = True
            config.save_pretrained(staging)
            (staging / CONFIGURATION_FILE).write_text(self.configuration.to_json())
        return repro.write_directory(directory, write)


@torch.no_grad()
def materialize(model: CoALoRAModel, configuration: Configuration) -> MaterializedAdapter:
    """The plain LoRA that `model` amounts to under `configuration`: theta on that configuration and
    one r x r @ r x in product per matrix; no base weight is quantized."""
    check_layout(configuration, model.layout)
    adjust = None if model.theta is None else model.theta.adjustments(model.theta.config_index(configuration))
    state = {}
    for i, (name, layer) in enumerate(model.lora_layers.items()):
        a = layer.lora_A[ADAPTER].weight  # [r, in]
        state[f"{_SAVED_PREFIX}{name}.lora_A.weight"] = a.clone() if adjust is None else adjust[i].to(a.dtype) @ a
        state[f"{_SAVED_PREFIX}{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.clone()  # [out, r]
    for name, head in model.heads.items():
        state.update({f"{_SAVED_PREFIX}{name}.{key}": value.clone() for key, value in head.state_dict().items()})
    return MaterializedAdapter(model.peft_model.peft_config[ADAPTER], state, configuration)


def trainable_parameters(model: CoALoRAModel) -> list[nn.Parameter]:
    """What the optimizer updates: LoRA A and B, the task head and theta (with gamma)."""
    return [p for p in model.parameters() if p.requires_grad]


# ---- what the training engine (coalora.training) swaps and restores --------------------------------

def adapter_state(model: CoALoRAModel) -> dict[str, torch.Tensor]:
    """A copy of every trainable tensor (A, B, head, theta), by parameter name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_adapter_state(model: CoALoRAModel, state: dict[str, torch.Tensor]) -> None:
    """Copy an `adapter_state` back into the model's trainable tensors."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        raise ValueError(f"adapter state does not fit this model: missing {sorted(params.keys() - state.keys())[:3]}, "
                         f"unexpected {sorted(state.keys() - params.keys())[:3]}")
    for name, p in params.items():
        p.copy_(state[name])


@torch.no_grad()
def set_lora_factors(layer: LoraLayer, a: torch.Tensor, b: torch.Tensor) -> None:
    """Overwrite one layer's A [r, in] and B [out, r] (e.g. LQ-LoRA's SVD initialisation)."""
    layer.lora_A[ADAPTER].weight.copy_(a)
    layer.lora_B[ADAPTER].weight.copy_(b)


def override_base_weight(model: CoALoRAModel, name: str, weight: torch.Tensor) -> None:
    """Replace the base weight of matrix `name` for the current configuration only (not cached: the
    next `set_configuration` restores the plain quantized weight)."""
    base = model.lora_layers[name].get_base_layer()
    base.weight = nn.Parameter(weight.to(base.weight.device, base.weight.dtype), requires_grad=False)


# ---- save and reload --------------------------------------------------------------------------------

def _saved_config(model: CoALoRAModel) -> dict:
    lora_config = model.peft_model.peft_config[ADAPTER]
    plain = model.peft_model.get_base_model()
    task_type, theta = model.task_type, model.theta
    return {
        "format": SAVED_FORMAT,
        "backbone": model.layout.backbone,
        "model_type": plain.config.model_type,
        "name_or_path": getattr(plain.config, "_name_or_path", ""),
        "task_type": task_type,
        "num_labels": getattr(plain.config, "num_labels", None) if task_type == "classification" else None,
        "labels": ([plain.config.id2label[i] for i in range(plain.config.num_labels)]
                   if task_type == "classification" else None),  # output i is labels[i]
        "rank": lora_config.r, "alpha": lora_config.lora_alpha, "dropout": lora_config.lora_dropout,
        "config_aware": theta is not None,
        "theta": None if theta is None else {"embed_dim": theta.embed_dim, "hidden": theta.hidden},
        "space": {"name": model.space.name, "kind": model.space.kind,
                  **{f: list(getattr(model.space, f)) for f in FIELDS}},
        "layout": [[m.name, list(m.shape), m.block, m.module_type] for m in model.layout.matrices],
    }


def save_pretrained(model: CoALoRAModel, directory: str | Path) -> Path:
    """Save a (trained) CoALoRAModel to `directory`: SAVED_CONFIG (backbone identity and layout,
    quantization space, rank, alpha, dropout, task type, theta's size) and SAVED_WEIGHTS (LoRA A and
    B, the head, theta). The directory appears whole or not at all: it is written beside its final
    place and renamed. `from_pretrained(base, directory)` loads it back onto the same backbone."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save to {str(directory)!r}: it exists and is not a directory")
    processes = repro.processes()
    if processes.is_main_process:  # under `accelerate launch` the others hold the same weights
        _write_saved(model, directory)
    processes.wait_for_everyone()
    return directory


def _write_saved(model: CoALoRAModel, directory: Path) -> None:
    state = {name: t.detach().cpu().contiguous() for name, t in adapter_state(model).items()}

    def write(staging: Path) -> None:
        save_file(state, staging / SAVED_WEIGHTS, metadata={"format": "pt"})
        (staging / SAVED_CONFIG).write_text(json.dumps(_saved_config(model), indent=1))
    repro.write_directory(directory, write)


def read_saved_config(directory: str | Path) -> dict:
    """The SAVED_CONFIG of a saved CoALoRAModel directory, checked for its format."""
    path = Path(directory) / SAVED_CONFIG
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a saved CoA-LoRA model: it has no {SAVED_CONFIG} "
                         f"(save one with model.save_pretrained(directory))")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != SAVED_FORMAT:
        raise ValueError(f"{str(path)!r} has format {config.get('format') if isinstance(config, dict) else None!r}; "
                         f"this version of coalora reads format {SAVED_FORMAT}")
    return config


def saved_layout(config: dict) -> Layout:
    return Layout(config["backbone"], tuple(MatrixSpec(name, tuple(shape), block, module_type)
                                            for name, shape, block, module_type in config["layout"]))


def from_pretrained(base: nn.Module, directory: str | Path, cache: WeightCache | None = None) -> CoALoRAModel:
    """Load a model saved by `save_pretrained` onto `base`, a freshly loaded (unquantized) backbone of
    the same kind: same quantized matrices and shapes and, for classification, the same number of labels
    (`coalora.models.load_backbone(name, task_type, num_labels=...)`). Raises a ValueError naming what
    differs when `base` is another model. Call `set_configuration` before use, as after training."""
    config = read_saved_config(directory)
    layout = saved_layout(config)
    try:
        actual = matrix_layout(base, layout.backbone)
    except ValueError as err:
        raise ValueError(f"{str(directory)!r} was saved from a {config['model_type']!r} model "
                         f"({config['backbone']!r}); the base model given is not one: {err}") from err
    if actual != layout:
        differ = next((f"{a.name} {a.shape}" + (f" vs saved {b.name} {b.shape}" if b else " (not in the saved model)")
                       for a, b in zip(actual.matrices, [*layout.matrices, *[None] * len(actual)])
                       if a != b), f"their number ({len(actual)} vs {len(layout)})")
        raise ValueError(f"{str(directory)!r} was saved from backbone {config['backbone']!r} "
                         f"({config['model_type']}, {len(layout)} quantized matrices); the base model has "
                         f"{len(actual)} that differ first at {differ}: load the same backbone it was trained on")
    space = QuantSpace(config["space"]["name"], config["space"]["kind"],
                       **{f: tuple(config["space"][f]) for f in FIELDS})
    if config["task_type"] == "classification":
        labels = getattr(base.config, "num_labels", None)
        if labels != config["num_labels"]:
            raise ValueError(f"{str(directory)!r} has a {config['num_labels']}-label head; the base model has "
                             f"{labels} labels: load it with num_labels={config['num_labels']}")
    weights = Path(directory) / SAVED_WEIGHTS
    if not weights.is_file():  # checked before build_lora_model wraps `base` in place
        raise ValueError(f"{str(directory)!r} has no {SAVED_WEIGHTS}: the save is incomplete")
    if config.get("labels"):
        base.config.id2label = dict(enumerate(config["labels"]))
        base.config.label2id = {n: i for i, n in enumerate(config["labels"])}
    model = build_lora_model(base, layout, space, rank=config["rank"], alpha=config["alpha"],
                             dropout=config["dropout"], config_aware=config["config_aware"],
                             task_type=config["task_type"], cache=cache)
    if model.theta is not None and config["theta"] != {"embed_dim": model.theta.embed_dim,
                                                        "hidden": model.theta.hidden}:
        raise ValueError(f"{str(directory)!r} has theta {config['theta']}, which this version of coalora "
                         f"does not build")
    state = load_file(weights, device=str(next(base.parameters()).device))
    load_adapter_state(model, state)
    return model
