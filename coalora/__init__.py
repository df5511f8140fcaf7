"""coalora: a reproducible companion to CoA-LoRA (configuration-aware LoRA for quantized LLMs).

Data flows one way: quant -> configs -> allocation -> hypernet -> lora -> search -> training ->
metrics -> experiments -> studies -> plots, with presets/methods (the facts every layer shares) and
models/data/assets (backbones, tasks and the offline files) underneath.
"""

from coalora.allocation import allocate
from coalora.configs import Configuration, LayerQuant, Layout, MatrixSpec, QuantSpace
from coalora.data import load_task
from coalora.experiments import RunSpec, run_experiment
from coalora.hypernet import ConfigAwareModel
from coalora.lora import build_lora_model, from_pretrained, materialize, set_configuration
from coalora.methods import METHODS
from coalora.metrics import evaluate, hypervolume
from coalora.models import load_backbone
from coalora.quant import fake_quantize, storage_bits
from coalora.presets import PRESETS
from coalora.repro import provenance, seed_everything
from coalora.search import SearchConfig
from coalora.training import train

__all__ = [
    "METHODS", "PRESETS", "ConfigAwareModel", "Configuration", "LayerQuant", "Layout", "MatrixSpec", "QuantSpace",
    "RunSpec", "SearchConfig",
    "allocate", "build_lora_model", "evaluate", "fake_quantize", "from_pretrained", "hypervolume", "load_backbone", "load_task",
    "materialize", "provenance", "run_experiment", "seed_everything", "set_configuration", "storage_bits", "train",
]
