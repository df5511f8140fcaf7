"""theta, the configuration-aware model: shapes, size, initialisation, batching and input checks."""

import pytest
import torch

from coalora.configs import FIELDS, Configuration, LayerQuant, Layout, MatrixSpec, QuantSpace
from coalora.hypernet import ConfigAwareModel, check_layout

NF = QuantSpace.nf()


def roberta_like_layout(blocks: int = 32, types=("query", "key", "value", "output.dense", "intermediate.dense")):
    """The official code's table sizes: 32 positions, 5 module types (docs/method.md#the-configuration-aware-model)."""
    return Layout("roberta-like", tuple(MatrixSpec(f"layer.{b}.{t}", (64, 64), b, t)
                                        for b in range(blocks) for t in types))


def expected_parameters(layout: Layout, space: QuantSpace, r: int, e: int = 8, hidden: int = 128) -> int:
    tables = e * (sum(space.n_choices) + layout.n_blocks + len(layout.module_types))
    width = 7 * e
    return tables + 2 * width + (width * hidden + hidden) + (hidden * r * r + r * r) + 1  # ... + gamma


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_shapes_and_near_identity_at_init(toy_layout, rank):
    torch.manual_seed(0)
    theta = ConfigAwareModel(toy_layout, NF, rank)
    index = theta.config_index(Configuration.random(toy_layout, NF, seed=1))
    assert index.dtype == torch.long and index.shape == (len(toy_layout), len(FIELDS))
    u = theta(index)
    assert u.shape == (len(toy_layout), rank, rank)
    assert 0 < u.abs().max() < 0.05  # last layer ~ N(0, 1e-3): U ~ 0, not exactly 0
    m = theta.adjustments(index)
    assert m.shape == (len(toy_layout), rank, rank)
    torch.testing.assert_close(m, torch.eye(rank).expand_as(m) + u)  # gamma = 1 at init
    assert theta.gamma.item() == 1.0


@pytest.mark.parametrize("rank", [4, 8, 16])
@pytest.mark.parametrize("space", [QuantSpace.nf(), QuantSpace.integer()], ids=["nf", "int"])
def test_parameter_count_formula(toy_layout, rank, space):
    assert n_parameters(ConfigAwareModel(toy_layout, space, rank)) == expected_parameters(toy_layout, space, rank)


@pytest.mark.parametrize("rank,count", [(8, 16_097), (16, 40_865), (64, 536_225)])
def test_parameter_count_matches_the_official_code(rank, count):
    assert n_parameters(ConfigAwareModel(roberta_like_layout(), NF, rank)) == count


def test_tables_and_positions_come_from_the_layout(toy_layout):
    layout = roberta_like_layout(blocks=6, types=("q", "k", "v", "o", "up", "down", "gate"))
    theta = ConfigAwareModel(layout, NF, 8)
    sizes = {name: table.num_embeddings for name, table in theta.embeddings.items()}
    assert sizes == {**dict(zip(FIELDS, NF.n_choices)), "block": 6, "module_type": 7}
    assert theta.block_index.tolist() == [m.block for m in layout.matrices]
    assert [layout.module_types[i] for i in theta.module_index] == [m.module_type for m in layout.matrices]
    assert theta.state_dict().keys().isdisjoint({"block_index", "module_index"})  # derived, not saved


def test_all_matrices_in_one_batched_call(toy_layout):
    torch.manual_seed(0)
    theta = ConfigAwareModel(toy_layout, NF, 4)
    torch.nn.init.normal_(theta.mlp[-1].weight)  # make rows clearly distinct
    calls = []
    theta.mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    index = theta.config_index(Configuration.random(toy_layout, NF, seed=3))
    u = theta(index)
    assert calls == [(len(toy_layout), 56)]
    # Row i depends only on matrix i: evaluating it alone gives the same matrix.
    for i in range(len(toy_layout)):
        columns = [*index[i], theta.block_index[i], theta.module_index[i]]
        z = torch.cat([table(c[None]) for table, c in zip(theta.embeddings.values(), columns)], dim=1)
        torch.testing.assert_close(theta.mlp(z).view(4, 4), u[i])


def test_configuration_changes_the_output(toy_layout):
    torch.manual_seed(0)
    theta = ConfigAwareModel(toy_layout, NF, 4)
    low = Configuration.uniform(toy_layout, LayerQuant(bits=2, scale_bits=2, block_size=16, group_size=16))
    high = Configuration.uniform(toy_layout, LayerQuant(bits=8))
    assert not torch.allclose(theta(theta.config_index(low)), theta(theta.config_index(high)))
    # Same configuration, but matrices at different blocks / of different types get different U.
    u = theta(theta.config_index(low))
    assert not torch.allclose(u[0], u[1]) and not torch.allclose(u[0], u[2])


def test_gradients_reach_every_parameter(toy_layout):
    torch.manual_seed(0)
    theta = ConfigAwareModel(toy_layout, NF, 4)
    index = theta.config_index(Configuration.random(toy_layout, NF, seed=1))
    (theta.adjustments(index) * torch.randn(len(toy_layout), 4, 4)).sum().backward()
    for name, p in theta.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_integer_space(toy_layout):
    theta = ConfigAwareModel(toy_layout, QuantSpace.integer(), 4)
    configuration = Configuration.random(toy_layout, QuantSpace.integer(), seed=0)
    assert theta(theta.config_index(configuration)).shape == (len(toy_layout), 4, 4)
    with pytest.raises(ValueError, match="kind 'nf' is not in space 'int'"):
        theta.config_index(Configuration.uniform(toy_layout, LayerQuant()))


def test_bad_inputs(toy_layout):
    theta = ConfigAwareModel(toy_layout, NF, 4)
    other = roberta_like_layout(blocks=2)
    with pytest.raises(ValueError, match="'roberta-like'.*'toy'"):
        theta.config_index(Configuration.uniform(other, LayerQuant()))
    same_name = Layout("toy", toy_layout.matrices[:-1])  # same backbone name, one matrix fewer
    with pytest.raises(ValueError, match="another layout"):
        check_layout(Configuration.uniform(same_name, LayerQuant()), toy_layout)
    with pytest.raises(ValueError, match="expected a coalora Configuration"):
        theta.config_index({"layers.0.attn": LayerQuant()})
    with pytest.raises(ValueError, match=r"shape \(6, 5\)"):
        theta(torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        ConfigAwareModel(toy_layout, NF, 0)
