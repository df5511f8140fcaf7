"""The package's top-level names: each resolves to its module's object, loaded on first use."""

import subprocess
import sys

import pytest

import coalora


@pytest.mark.parametrize("name", coalora.__all__)
def test_each_top_level_name_is_its_modules_object(name):
    module = __import__(f"coalora.{coalora._EXPORTS[name]}", fromlist=[name])
    assert getattr(coalora, name) is getattr(module, name)
    assert name in dir(coalora)


def test_a_submodule_is_an_attribute_without_importing_it_first():
    code = "import coalora; print(coalora.configs.QuantSpace.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "coalora.configs"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="'nope'"):
        coalora.nope
    assert not hasattr(coalora, "nope") and not hasattr(coalora, "_nope")


def test_import_coalora_loads_no_torch_and_assets_runs_as_a_module_without_warning():
    """`import coalora` is cheap, and `python -m coalora.assets` (the set-up command) is not already in
    sys.modules when runpy executes it, which would print a RuntimeWarning."""
    code = "import sys, coalora; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "coalora.assets", "list"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr


def test_importing_the_stack_prints_nothing():
    """bitsandbytes' notice about a hub kernel coalora never uses is dropped, and nothing else is said."""
    code = "import coalora.lora, coalora.models"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr == "" and done.stdout == ""
