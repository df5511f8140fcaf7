"""coalora: a reproducible companion to CoA-LoRA (configuration-aware LoRA for quantized LLMs).

Data flows one way: quant -> configs -> allocation -> hypernet -> lora -> search -> training ->
metrics -> experiments -> studies -> plots, with presets/methods (the facts every layer shares) and
models/data/assets (backbones, tasks and the offline files) underneath.

The names below load on first use (PEP 562), so `import coalora` stays cheap and `python -m
coalora.assets` runs a module that the package has not already imported.
"""

import importlib as _importlib
import logging as _logging

# On AVX-512 BF16 CPUs bitsandbytes, at import (which peft triggers), tries to fetch a fused inference kernel
# from the model hub and logs a warning when it cannot. coalora never takes that path: it turns off the
# repacking the kernel serves (models.disable_bnb_cpu_repacking), so offline every command would print the
# line for nothing. Only that message is dropped.
_HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith(_HUB_KERNEL_NOTICE))

# name -> the module that defines it
_EXPORTS = {
    "allocate": "allocation",
    "Configuration": "configs", "LayerQuant": "configs", "Layout": "configs", "MatrixSpec": "configs",
    "QuantSpace": "configs",
    "load_task": "data",
    "RunSpec": "experiments", "run_experiment": "experiments",
    "ConfigAwareModel": "hypernet",
    "build_lora_model": "lora", "from_pretrained": "lora", "materialize": "lora", "set_configuration": "lora",
    "METHODS": "methods",
    "evaluate": "metrics", "hypervolume": "metrics",
    "load_backbone": "models",
    "fake_quantize": "quant", "storage_bits": "quant",
    "PRESETS": "presets",
    "provenance": "repro", "seed_everything": "repro",
    "SearchConfig": "search",
    "train": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f"coalora.{_EXPORTS[name]}"), name)
    elif not name.startswith("_"):  # a submodule: `import coalora; coalora.configs` as an eager package allows
        try:
            value = _importlib.import_module(f"coalora.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"coalora.{name}":
                raise
            raise AttributeError(f"module 'coalora' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'coalora' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
