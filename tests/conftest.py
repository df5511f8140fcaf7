"""Shared fixtures. Real-model fixtures need the offline assets (`make test` fetches them first)."""

import re

import pytest
import torch
from safetensors.torch import load_file

from coalora import assets
from coalora.configs import Layout, MatrixSpec


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    """The 36 quantized weight matrices of the real all-MiniLM-L6-v2, keyed by module name."""
    state = load_file(assets.path("minilm-l6") / "model.safetensors")
    pattern = re.compile(r"layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                         r"|intermediate\.dense|output\.dense)\.weight$")
    return {k[: -len(".weight")]: v for k, v in state.items() if pattern.search(k)}


@pytest.fixture
def toy_layout() -> Layout:
    """A small layout of made-up matrices of two sizes (no model needed)."""
    return Layout("toy", tuple(
        MatrixSpec(f"layers.{b}.{kind}", shape, b, kind)
        for b in range(3) for kind, shape in (("attn", (32, 32)), ("mlp", (64, 32)))))
