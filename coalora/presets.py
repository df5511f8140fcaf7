"""The four presets (one code path, four sizes) and the check that names the valid ones.

`smoke` and `default` run offline on a laptop CPU, `large` runs offline on a GPU, `paper` needs
the model hub. Sizes of each preset's runs live with the experiments that use them.
"""

PRESETS = ("smoke", "default", "large", "paper")
OFFLINE_PRESETS = ("smoke", "default", "large")


def check_preset(preset: str) -> str:
    """Return `preset` if it is a known preset, else raise a ValueError naming the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return preset
