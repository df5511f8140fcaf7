"""coalora: a reproducible companion to CoA-LoRA (configuration-aware LoRA for quantized LLMs).

Data flows one way: quant -> configs -> allocate -> hypernet -> lora -> train -> metrics ->
experiments, with models/data/assets providing backbones, tasks and the offline files.
"""

from coalora.allocate import allocate
from coalora.configs import Configuration, LayerQuant, Layout, MatrixSpec, QuantSpace
from coalora.data import load_task
from coalora.experiments import RunSpec, run_experiment
from coalora.hypernet import ConfigAwareModel
from coalora.lora import build_lora_model, materialize, set_configuration
from coalora.metrics import evaluate, hypervolume
from coalora.models import load_backbone
from coalora.quant import fake_quantize, storage_bits
from coalora.repro import provenance, seed_everything
from coalora.train import train

__all__ = [
    "ConfigAwareModel", "Configuration", "LayerQuant", "Layout", "MatrixSpec", "QuantSpace", "RunSpec",
    "allocate", "build_lora_model", "evaluate", "fake_quantize", "hypervolume", "load_backbone", "load_task",
    "materialize", "provenance", "run_experiment", "seed_everything", "set_configuration", "storage_bits", "train",
]
