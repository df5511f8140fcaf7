import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalora.configs import FIELDS, Configuration, LayerQuant, Layout, MatrixSpec, QuantSpace

SPACES = [QuantSpace.nf(), QuantSpace.integer()]


@pytest.mark.parametrize(("field", "value", "valid"), [
    ("kind", "fp", "'nf', 'int'"),
    ("bits", 5, "2, 3, 4, 8"),
    ("bits", True, "2, 3, 4, 8"),
    ("scale_bits", 16, "2, 3, 4, 8"),
    ("scale_dtype", "fp64", "'bf16', 'fp16', 'fp32'"),
    ("block_size", 128, "16, 32, 64"),
    ("group_size", 32, "16, 64, 256"),
])
def test_invalid_layer_quant_names_field_value_and_choices(field, value, valid):
    with pytest.raises(ValueError) as err:
        LayerQuant(**{field: value})
    assert f"invalid {field}={value!r}" in str(err.value)
    assert valid in str(err.value)


def test_spaces_have_the_papers_sizes():
    nf = QuantSpace.nf()
    assert nf.n_choices == (4, 4, 3, 3, 3)
    assert len(nf.options()) == 432 == len(set(nf.options()))
    assert {o.kind for o in QuantSpace.integer().options()} == {"int"}
    lo, hi = nf.bits_range()
    assert lo == pytest.approx(2 + 2 / 64 + 16 / (64 * 256))
    assert hi == pytest.approx(8.625)
    with pytest.raises(ValueError, match="unknown quantization space 'fp8'; valid quantization spaces: nf, int"):
        QuantSpace.named("fp8")
    with pytest.raises(ValueError, match="invalid bits=5"):
        QuantSpace("odd", "nf", bits=(2, 5))


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_option_index_round_trip(space):
    for option in space.options():
        assert space.from_index(space.index_of(option)) == option
        assert option in space
    assert LayerQuant(kind="int" if space.kind == "nf" else "nf") not in space
    with pytest.raises(ValueError, match="out of range; valid: 0..3"):
        space.from_index((4, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="not in space"):
        space.index_of(LayerQuant(kind="int" if space.kind == "nf" else "nf"))


def test_average_bits_is_numel_weighted(toy_layout):
    small, big = LayerQuant(bits=2), LayerQuant(bits=8)
    layers = {m.name: small if m.module_type == "attn" else big for m in toy_layout.matrices}
    config = Configuration(toy_layout, layers)
    expected = (3 * 1024 * small.storage_bits + 3 * 2048 * big.storage_bits) / (3 * 1024 + 3 * 2048)
    assert config.avg_bits == pytest.approx(expected)
    assert Configuration.uniform(toy_layout, small).avg_bits == pytest.approx(small.storage_bits)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), space_index=st.integers(0, 1))
def test_json_and_index_vector_round_trips(seed, space_index):
    layout = Layout("toy", tuple(MatrixSpec(f"l.{i}", (8, 16 * (i + 1)), i // 2, "ab"[i % 2]) for i in range(6)))
    space = SPACES[space_index]
    config = Configuration.random(layout, space, seed)
    assert Configuration.from_json(config.to_json(), layout) == config
    vector = config.encode(space)
    assert vector.shape == (len(FIELDS) * len(layout),)
    assert np.all(vector >= 0) and np.all(vector < np.tile(space.n_choices, len(layout)))
    assert Configuration.decode(vector, space, layout) == config
    assert config.digest() == Configuration.from_json(config.to_json(), layout).digest()


def test_random_is_seeded(toy_layout):
    space = QuantSpace.nf()
    assert Configuration.random(toy_layout, space, 3) == Configuration.random(toy_layout, space, 3)
    assert Configuration.random(toy_layout, space, 3) != Configuration.random(toy_layout, space, 4)


def test_configuration_for_another_backbone_is_rejected(toy_layout):
    lq = LayerQuant()
    layers = {n: lq for n in toy_layout.names}
    with pytest.raises(ValueError, match=r"does not match backbone 'toy'.*missing \['layers.0.attn'\]"):
        Configuration(toy_layout, {k: v for k, v in layers.items() if k != "layers.0.attn"})
    with pytest.raises(ValueError, match=r"extra \['encoder.layer.0.query'\]"):
        Configuration(toy_layout, {**layers, "encoder.layer.0.query": lq})
    other = Layout("minilm-l6", toy_layout.matrices)
    with pytest.raises(ValueError, match="configuration is for backbone 'minilm-l6', not 'toy'"):
        Configuration.from_json(Configuration.uniform(other, lq).to_json(), toy_layout)
    with pytest.raises(ValueError, match="index vector for 'toy' has length 30"):
        Configuration.decode(np.zeros(29, dtype=int), QuantSpace.nf(), toy_layout)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "malformed configuration JSON"),
    ("[1, 2]", "must be an object with keys 'backbone' and 'layers'"),
    (json.dumps({"backbone": "toy", "layers": []}), "'layers' must map matrix names"),
])
def test_malformed_json_is_rejected(toy_layout, text, message):
    with pytest.raises(ValueError, match=message):
        Configuration.from_json(text, toy_layout)


def test_json_with_a_bad_layer_names_the_field(toy_layout):
    data = Configuration.uniform(toy_layout, LayerQuant()).to_dict()
    data["layers"]["layers.1.mlp"]["bits"] = 6
    with pytest.raises(ValueError, match="invalid bits=6; valid choices: 2, 3, 4, 8"):
        Configuration.from_json(json.dumps(data), toy_layout)
    data["layers"]["layers.1.mlp"] = {"bitz": 4}
    with pytest.raises(ValueError, match=r"unknown layer quantization field\(s\) \['bitz'\]"):
        Configuration.from_json(json.dumps(data), toy_layout)


def test_layout_rejects_empty_and_duplicates():
    with pytest.raises(ValueError, match="no quantized matrices"):
        Layout("x", ())
    spec = MatrixSpec("a", (2, 2), 0, "q")
    with pytest.raises(ValueError, match="duplicate matrix names"):
        Layout("x", (spec, spec))
