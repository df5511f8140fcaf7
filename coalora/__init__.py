"""coalora: a reproducible companion to CoA-LoRA (configuration-aware LoRA for quantized LLMs).

Data flows one way: quant -> configs -> allocate, with models/data/assets providing backbones,
tasks and the offline files.
"""

from coalora.allocate import allocate
from coalora.configs import Configuration, LayerQuant, Layout, MatrixSpec, QuantSpace
from coalora.data import load_task
from coalora.models import load_backbone
from coalora.quant import fake_quantize, storage_bits
from coalora.repro import provenance, seed_everything

__all__ = [
    "Configuration", "LayerQuant", "Layout", "MatrixSpec", "QuantSpace",
    "allocate", "fake_quantize", "load_backbone", "load_task", "provenance", "seed_everything",
    "storage_bits",
]
