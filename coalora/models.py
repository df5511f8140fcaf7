"""Backbones and their quantized matrices.

A registry of the backbones each preset runs (offline stand-ins and the paper's hub models), one
loader for them, and the per-family rule for which linear layers are quantized and carry LoRA:
the attention and MLP projections inside the transformer blocks, never embeddings, pooler,
classification head or lm_head (docs/method.md#configuration-space). `matrix_layout` turns that rule into the ordered
`configs.Layout` a quantization configuration is written against.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from coalora.configs import Layout, MatrixSpec
from coalora.names import check_name, lookup
from coalora.presets import TASK_TYPES, check_task_type

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: where its weights come from and how to label it in results.

    `source` is an offline asset name (`coalora.assets`) when `offline`, else a model-hub repo id; a
    backbone given as a local transformers folder has `folder` set (and is `offline`).
    `dtype` is the default load precision: float32 for the small models, bfloat16 from ~1B
    parameters up: half the memory, the precision Qwen2.5 is published in and the Qwen2.5-Coder
    asset is stored in, and on a CPU with AVX512-BF16 about 4x faster than float32 at the same
    perplexity (docs/measurements.md#offline-models). `load_backbone(..., dtype=torch.float32)`
    overrides it.
    """

    name: str
    family: str  # a key of FAMILIES
    source: str
    offline: bool
    label: str
    dtype: torch.dtype = torch.float32
    stands_in_for: str | None = None
    folder: str | None = None

    @property
    def architecture(self) -> str:
        """"encoder" or "decoder", the family's."""
        return FAMILIES[self.family].architecture

    @property
    def task_types(self) -> tuple[str, ...]:
        """Encoders only classify; decoders also get a (newly initialised) classification head."""
        return ("classification",) if self.architecture == "encoder" else TASK_TYPES

    @property
    def cache_id(self) -> str:
        """A file-name-safe identity for caches (cost tables): the registered name, the hub id with
        "--" for "/", or for a local folder its family and a digest of its config and weights (so a
        copied or moved model keeps its identity, and a changed one gets a new one)."""
        if self.folder is None:
            return self.name.replace("/", "--")
        folder = Path(self.folder).resolve()
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _model_files(folder))
        return f"{self.family}-{_folder_digest(str(folder), stamp)}"


def _model_files(folder: Path) -> list[Path]:
    return [folder / "config.json", *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*.bin"))]


@functools.lru_cache(maxsize=None)
def _folder_digest(folder: str, stamp: tuple) -> str:
    """sha256 of a model folder's config.json and weight files, read again only when `stamp` (their
    names, sizes and modification times) changes."""
    h = hashlib.sha256((Path(folder) / "config.json").read_bytes())
    for weights in _model_files(Path(folder))[1:]:
        h.update(weights.name.encode())
        with open(weights, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:12]


def backbone_identity(name: str) -> str:
    """What a run's cache key holds for backbone `name`: the name itself, or for a local folder its
    family and content digest (`cache_id`). A hub id stays a name: resolving it needs the hub."""
    if name in BACKBONES or not Path(name).expanduser().is_dir():
        return name
    return backbone_spec(name).cache_id


BACKBONES = {spec.name: spec for spec in (
    BackboneSpec("minilm-l6", "bert", "minilm-l6", True,
                 "all-MiniLM-L6-v2 (BERT, 22.7M; offline, stands in for RoBERTa-Large)",
                 stands_in_for="roberta-large"),
    BackboneSpec("mpnet-base", "mpnet", "mpnet-base", True,
                 "all-mpnet-base-v2 (MPNet, 109.5M; offline, stands in for RoBERTa-Large)",
                 stands_in_for="roberta-large"),
    BackboneSpec("smollm2-135m", "llama", "smollm2-135m", True,
                 "SmolLM2-135M-Instruct (Llama, 134.5M; dequantized Q4_1 GGUF; offline, "
                 "stands in for Qwen2.5-1.5B)",
                 stands_in_for="qwen2.5-1.5b"),
    BackboneSpec("qwen2.5-coder-1.5b", "qwen2", "qwen2.5-coder-1.5b", True,
                 "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 1.78B; dequantized Q4_K_M GGUF, bf16; offline, "
                 "stands in for Qwen2.5-1.5B)",
                 dtype=torch.bfloat16, stands_in_for="qwen2.5-1.5b"),
    BackboneSpec("roberta-large", "roberta", "FacebookAI/roberta-large", False,
                 "RoBERTa-Large (355M; model hub)"),
    BackboneSpec("qwen2.5-1.5b", "qwen2", "Qwen/Qwen2.5-1.5B", False,
                 "Qwen2.5-1.5B (bf16; model hub)", dtype=torch.bfloat16),
    BackboneSpec("qwen2.5-3b", "qwen2", "Qwen/Qwen2.5-3B", False,
                 "Qwen2.5-3B (bf16; model hub)", dtype=torch.bfloat16),
    BackboneSpec("llama-2-7b", "llama", "meta-llama/Llama-2-7b-hf", False,
                 "LLaMA-2-7B (bf16; model hub, gated)", dtype=torch.bfloat16),
)}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of backbone `name`: a registered name (BACKBONES), a local transformers folder (with a
    config.json), or a model-hub id ("owner/model", needs the hub or its cache). The family comes from
    the model's `config.model_type`. Anything else is a ValueError listing the registered names."""
    if name in BACKBONES:
        return BACKBONES[name]
    folder = Path(name).expanduser()
    if folder.is_dir():
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"backbone folder {name!r} has no config.json: give a transformers model folder "
                             f"(model.save_pretrained(folder)) or a registered backbone: {', '.join(BACKBONES)}")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(config)!r} is not valid JSON: {err}") from err
        family = _check_family(str(model_type))
        return BackboneSpec(name, family, str(folder), True, f"{folder.name} ({model_type}; local folder)",
                            dtype=_config_dtype(config), folder=str(folder))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return _hub_spec(name)
    lookup(BACKBONES, name, "backbone")  # raises, naming the registered backbones
    raise AssertionError("unreachable")


def _config_dtype(config_path: Path) -> torch.dtype:
    """bfloat16 when a model's config says it is stored so (big models), else float32."""
    config = json.loads(config_path.read_text())
    stored = config.get("torch_dtype") or config.get("dtype")
    return torch.bfloat16 if stored == "bfloat16" else torch.float32


def _hub_spec(repo_id: str) -> BackboneSpec:
    from transformers import AutoConfig

    hub_kwargs = {"local_files_only": True} if _hub_offline() else {}
    try:
        config = AutoConfig.from_pretrained(repo_id, **hub_kwargs)
    except (OSError, ValueError) as err:
        offline = [n for n, s in BACKBONES.items() if s.offline]
        raise RuntimeError(f"backbone {repo_id!r} is not registered, not a local folder, and could not be read "
                           f"from the model hub{' or its cache (HF_HUB_OFFLINE is set)' if hub_kwargs else ''}: "
                           f"{err}\nBackbones that run offline: {', '.join(offline)}; or give a local "
                           f"transformers folder") from err
    family = _check_family(config.model_type)
    dtype = torch.bfloat16 if getattr(config, "torch_dtype", None) == torch.bfloat16 else torch.float32
    return BackboneSpec(repo_id, family, repo_id, False, f"{repo_id} ({config.model_type}; model hub)", dtype=dtype)


# ---- loading -------------------------------------------------------------------------------------

def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them only at import)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# Modules bitsandbytes must leave in full precision when it loads a backbone in 4 bits: everything that
# is not a quantized matrix of the family (heads, pooler). transformers matches these as regexes from
# the start of a module's name, up to a "." (so "bert.pooler.dense" needs ".*pooler").
NOT_QUANTIZED = [".*classifier", ".*pooler", ".*score", ".*lm_head"]


def bnb_4bit_config():
    """bitsandbytes' NF4 with double-quantized scales (configs.BNB_NF4) on the quantized matrices,
    computing in float32, as the deployment path of a materialized adapter."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=NOT_QUANTIZED)


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every dropout layer of `model` (the pretrained network and its head) to probability `p`;
    returns how many were set. Before LoRA wraps the model, so LoRA's own dropout is not among them."""
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for layer in layers:
        layer.p = p
    return len(layers)


# How a training forward draws the backbone's dropout masks. "torch": PyTorch's own dropout, whose CPU
# Bernoulli draw takes about 5.5 ns an element, and whose attention dropout sends SDPA to a math kernel
# 8 x slower than SDPA without it. "packed": four 16-bit uniforms from each 64-bit draw of the same
# seeded generator, about 1 ns an element, with the attention's softmax and product written out around
# it; drop probability round(p * 2^16) / 2^16 (within 8e-6 of p). It takes a sixth off the benchmark's
# MiniLM-L6 bf16 step and 7 % off the default SST-2 runs' training. On CPUs only: other devices keep PyTorch's fused dropout
# (docs/measurements.md#training-step).
MASK_DRAWS = ("torch", "packed")
_MASK_LEVELS = 1 << 16


def packed_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bernoulli keep-mask [shape] (bool), each element dropped with probability round(p * 2^16) / 2^16,
    drawn from torch's seeded generator as four 16-bit uniforms per 64-bit draw."""
    n = math.prod(shape)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    uniforms = words.view(torch.int16)[:n].view(shape)  # each uniform over [-2^15, 2^15)
    return uniforms >= round(p * _MASK_LEVELS) - _MASK_LEVELS // 2


def packed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of `x` with a `packed_keep_mask`; kept values scaled so the mean is kept.
    A p below 2^-17 drops nothing, one above 1 - 2^-17 everything."""
    levels = round(p * _MASK_LEVELS)
    if levels == 0:
        return x
    if levels == _MASK_LEVELS:
        return x * 0
    scale = 1 / (1 - levels / _MASK_LEVELS)
    keep = packed_keep_mask(x.shape, p, x.device)
    return x * (keep.to(x.dtype) * scale)


class PackedDropout(nn.Dropout):
    """nn.Dropout whose training-mode masks on CPU come from `packed_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu":
            return super().forward(x)
        return packed_dropout(x, self.p)


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except that a CPU forward of an encoder with attention dropout runs
    written out (query [B, H, L, d], key and value [B, H, S, d] -> [B, L, H, d], no weights): scores and
    product in the autocast precision, softmax in fp32, packed masks. Causal attention, grouped key heads
    (fewer than the query's) and other devices keep SDPA as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if dropout == 0 or causal or query.device.type != "cpu" or key.shape[1] != query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [B, H, L, S]
    if attention_mask is not None:  # SDPA's mask: bool (True attends) or additive
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(packed_dropout(weights, dropout), value)  # [B, H, L, d]
    return out.transpose(1, 2).contiguous(), None


PACKED_ATTENTION = "coalora_packed_sdpa"


def set_mask_draw(model: nn.Module, draw: str) -> int:
    """Make `model`'s dropout (its nn.Dropout layers) draw masks as `draw` (one of MASK_DRAWS) says;
    returns how many layers it set. "packed" also moves SDPA attention onto `_packed_attention`. Before
    LoRA wraps the model, so LoRA's own dropout keeps PyTorch's."""
    check_name(draw, MASK_DRAWS, "mask draw")
    layers = [m for m in model.modules() if type(m) in (nn.Dropout, PackedDropout)]  # not others' subclasses
    for layer in layers:
        layer.__class__ = PackedDropout if draw == "packed" else nn.Dropout
    config = getattr(model, "config", None)
    if draw == "packed" and config is not None and config._attn_implementation == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)  # the masks SDPA is given
        model.set_attn_implementation(PACKED_ATTENTION)
    elif draw == "torch" and config is not None and config._attn_implementation == PACKED_ATTENTION:
        model.set_attn_implementation("sdpa")
    return len(layers)


def disable_bnb_cpu_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking `Linear4bit` weights for AVX-512 BF16 CPU inference and return
    how many layers were changed. The repacked layout has no autograd kernel, so after one eval-mode
    forward under no_grad every later backward through those layers gives zero gradients
    (docs/measurements.md#bitsandbytes-on-cpu). `load_backbone(..., four_bit=True)` calls it."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_backbone(name: str, task_type: str = "classification", num_labels: int = 2,
                  dtype: torch.dtype | str | None = None, four_bit: bool = False):
    """Load backbone `name` for `task_type` and return `(model, tokenizer)`, in eval mode, on CPU.

    Classification uses AutoModelForSequenceClassification with `num_labels`: its head is newly
    (randomly) initialised - that is what fine-tuning trains - so seed before calling. Causal LMs
    get their eos token as pad token when they have none. `dtype` defaults to the spec's.
    `four_bit` loads the quantized matrices as real bitsandbytes NF4 layers (`bnb_4bit_config`), the
    base a materialized adapter at the uniform configs.BNB_NF4 configuration is deployed on.
    Offline backbones load from `coalora.assets`; hub backbones need the model hub (or its cache)
    and raise a RuntimeError naming the offline backbones when it cannot be reached.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    spec = backbone_spec(name)
    check_task_type(task_type)
    if task_type not in spec.task_types:
        raise ValueError(f"backbone {name!r} ({spec.architecture}) cannot be loaded for {task_type!r}; "
                         f"valid task types for it: {', '.join(spec.task_types)}")
    if task_type == "classification":
        auto, model_kwargs = AutoModelForSequenceClassification, {"num_labels": num_labels}
    else:
        auto, model_kwargs = AutoModelForCausalLM, {}
    dtype = spec.dtype if dtype is None else dtype
    if four_bit:
        model_kwargs |= {"quantization_config": bnb_4bit_config(),
                         "device_map": {"": 0} if torch.cuda.is_available() else "cpu"}

    start = time.perf_counter()
    if spec.offline:
        from coalora import assets

        # a plain HF folder; the offline assets' GGUFs were dequantized at fetch time
        folder = Path(spec.folder) if spec.folder else assets.path(spec.source)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = auto.from_pretrained(folder, dtype=dtype, **model_kwargs)
    else:
        hub_kwargs = {"local_files_only": True} if _hub_offline() else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.source, **hub_kwargs)
            model = auto.from_pretrained(spec.source, dtype=dtype, **hub_kwargs, **model_kwargs)
        except OSError as err:  # transformers reports unreachable, gated and uncached repos as OSError
            offline = [n for n, s in BACKBONES.items() if s.offline]
            raise RuntimeError(
                f"backbone {name!r} ({spec.source}) needs the model hub (the 'paper' preset) and could not be "
                f"loaded from it{' or its cache, HF_HUB_OFFLINE is set' if hub_kwargs else ''}: {err}\n"
                f"Backbones that run offline: {', '.join(offline)}") from err

    if spec.architecture == "decoder":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    if four_bit:
        disable_bnb_cpu_repacking(model)
    model.eval()
    log.info("loaded %s for %s (%s) in %.1f s", spec.label, task_type, model.dtype, time.perf_counter() - start)
    return model, tokenizer


# ---- quantized matrices --------------------------------------------------------------------------

# Per family: module path inside a transformer block -> module type. The two `output.dense` of
# BERT/RoBERTa (attention output and FFN output) are distinct types here; the official code
# conflated them (docs/method.md#configuration-space).
_BERT_BLOCK = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
               "attention.output.dense": "attention.output", "intermediate.dense": "intermediate",
               "output.dense": "output"}
_MPNET_BLOCK = {"attention.attn.q": "q", "attention.attn.k": "k", "attention.attn.v": "v", "attention.attn.o": "o",
                "intermediate.dense": "intermediate", "output.dense": "output"}
_LLAMA_BLOCK = ({f"self_attn.{p}": p for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
                | {f"mlp.{p}": p for p in ("gate_proj", "up_proj", "down_proj")})
# PEFT suffixes (a module matches when its name ends with "." + suffix) that select exactly those
# matrices: never a bare "dense", which would also catch pooler.dense and classifier.dense.
_BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
_MPNET_TARGETS = ("q", "k", "v", "o", "intermediate.dense", "output.dense")
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """How the models of one family (transformers' `config.model_type`) are quantized and fine-tuned.

    `head`: modules trained with a classification head besides PEFT's `classifier` / `score`, so that
    the trained head is a dense layer and a projection, as RoBERTa's (the paper's) is. BERT's classifier
    is a single projection on top of its pretrained pooler (dense + tanh), so the pooler trains too;
    RoBERTa and MPNet heads hold both already; decoders classify with a single projection (`score`).
    """

    architecture: str  # "encoder" (classification only) or "decoder"
    block: dict  # module path inside a transformer block -> module type
    lora_targets: tuple[str, ...]  # LoraConfig(target_modules=...) for exactly the `block` matrices
    head: tuple[str, ...] = ()


_DECODER = Family("decoder", _LLAMA_BLOCK, _LLAMA_TARGETS)
FAMILIES = {
    "bert": Family("encoder", _BERT_BLOCK, _BERT_TARGETS, head=("pooler",)),
    "roberta": Family("encoder", _BERT_BLOCK, _BERT_TARGETS),
    "mpnet": Family("encoder", _MPNET_BLOCK, _MPNET_TARGETS),
    **dict.fromkeys(("llama", "qwen2", "mistral", "gemma", "gemma2"), _DECODER),  # Llama-style naming
}


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unsupported model family {family!r} (the model's config.model_type); supported "
                         f"families: {', '.join(FAMILIES)}")
    return family


def _plain(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel, whose module names are the plain model's."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def family_of(model: nn.Module) -> str:
    """The family (a key of FAMILIES) from `model.config.model_type`."""
    return _check_family(_plain(model).config.model_type)


def _block_pattern(family: str) -> re.Pattern:
    """Matches `...layer.N.<path>` or `...layers.N.<path>` (BERT-style and Llama-style naming)."""
    paths = "|".join(map(re.escape, FAMILIES[family].block))
    return re.compile(rf"(?:^|.*\.)layers?\.(\d+)\.({paths})$")


def _linear(module: nn.Module) -> nn.Linear | None:
    """The nn.Linear behind `module` (bitsandbytes Linear4bit/Linear8bitLt subclass nn.Linear;
    a PEFT LoRA layer wraps one), or None."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return base if isinstance(base, nn.Linear) else None


def _matches(model: nn.Module):
    """(name, module, base linear, block, module type) of each quantized matrix, in model order."""
    model = _plain(model)
    family = family_of(model)
    pattern, types = _block_pattern(family), FAMILIES[family].block
    for name, module in model.named_modules():
        match = pattern.match(name)
        if match and (linear := _linear(module)) is not None:
            yield name, module, linear, int(match.group(1)), types[match.group(2)]


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers that are quantized and carry LoRA, by module name, in `named_modules` order.

    Accepts the plain model (fp, or bitsandbytes-quantized) or a PeftModel of it: names are always
    the plain model's, and for a LoRA-wrapped matrix the module is the PEFT LoRA layer.
    """
    return {name: module for name, module, *_ in _matches(model)}


def head_modules(family: str) -> list[str]:
    """Modules trained with a classification head of `family`, beyond PEFT's `classifier` / `score`."""
    return list(FAMILIES[_check_family(family)].head)


def lora_target_modules(family: str) -> list[str]:
    """`LoraConfig(target_modules=...)` suffixes that wrap exactly `quantized_linears` of `family`."""
    return list(FAMILIES[_check_family(family)].lora_targets)


def matrix_layout(model: nn.Module, backbone_name: str) -> Layout:
    """The ordered quantized matrices of `model`: name, (out_features, in_features), block, module type.

    `backbone_name` ties configurations to this layout; for a registered backbone the model's family
    must match the registry's.
    """
    family = family_of(model)
    spec = BACKBONES.get(backbone_name)
    if spec is not None and spec.family != family:
        raise ValueError(f"model is a {family!r} model but backbone {backbone_name!r} is {spec.family!r}")
    return Layout(backbone_name, tuple(
        MatrixSpec(name, (linear.out_features, linear.in_features), block, module_type)
        for name, _, linear, block, module_type in _matches(model)))
