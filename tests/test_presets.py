"""The preset records: each names backbones that exist and fit its task types, offline presets
never need the hub, and only the default preset writes to the committed folders."""

import pytest

from coalora import models
from coalora.presets import OFFLINE_PRESETS, PRESETS, TASK_TYPES, RunSize, check_task_type, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_names_a_fitting_registered_backbone_per_task_type(name):
    p = preset(name)
    assert p.name == name and set(p.backbones) == set(p.sizes) == set(TASK_TYPES)
    for task_type in TASK_TYPES:
        spec = models.backbone_spec(p.backbone(task_type))
        assert task_type in spec.task_types
        assert spec.offline or p.needs_hub, f"{name} uses hub backbone {spec.name} without needing the hub"
        assert isinstance(p.size(task_type), RunSize)


def test_offline_presets_and_output_folders():
    assert OFFLINE_PRESETS == ("smoke", "default", "large")
    assert preset("paper").needs_hub
    assert preset("default").output_subfolder == ()
    assert {n: preset(n).output_subfolder for n in OFFLINE_PRESETS if n != "default"} == {
        "smoke": ("smoke",), "large": ("large",)}


def test_smoke_runs_are_the_smallest():
    for task_type in TASK_TYPES:
        smoke, default = preset("smoke").size(task_type), preset("default").size(task_type)
        assert smoke.n_train < default.n_train and smoke.epochs <= default.epochs


def test_bad_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid presets: smoke, default, large, paper"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown task type 'regression'; valid task types: classification, causal-lm"):
        check_task_type("regression")
    with pytest.raises(ValueError, match="'regression'.*classification, causal-lm"):
        preset("smoke").backbone("regression")
