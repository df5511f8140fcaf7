import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import BertConfig, BertForSequenceClassification

from coalora.allocation import (CostTable, allocate, compute_cost_table, configuration_from_choice, cost_table,
                              fisher_diagonal, matrix_costs, pareto_options, solve_allocation)
from coalora import allocation, models
from coalora.configs import Configuration, Layout, MatrixSpec, QuantSpace

BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)


@pytest.fixture(scope="module")
def minilm_table():
    return cost_table("minilm-l6", "nf")


@pytest.fixture(autouse=True)
def solution_store(tmp_path, monkeypatch):
    """Solutions go to a store of each test's own, so what a test counts does not depend on earlier runs."""
    store, real = tmp_path / "allocations", allocation._solution_path
    monkeypatch.setattr(allocation, "_solution_path", lambda digest, budget: store / real(digest, budget).name)
    return store


def test_ilp_meets_budgets_on_minilm(minilm_table):
    costs = []
    for budget in BUDGETS:
        choice, cost = solve_allocation(minilm_table, budget)
        config = configuration_from_choice(minilm_table, choice)
        assert budget - 0.1 <= config.avg_bits <= budget + 1e-9, (budget, config.avg_bits)
        costs.append(cost)
    assert all(b <= a for a, b in zip(costs, costs[1:])), costs


def test_allocate_by_name_returns_a_configuration_of_the_backbone(minilm_table):
    config = allocate("minilm-l6", 3.0, "nf")
    assert isinstance(config, Configuration)
    assert config.layout == minilm_table.layout and len(config) == 36
    assert config.avg_bits <= 3.0
    assert len(set(config.layers.values())) > 1  # really mixed precision


def test_integer_space_allocation(minilm_weights):
    layout = Layout("minilm-int", tuple(
        MatrixSpec(n, tuple(w.shape), int(n.split(".")[2]), n.split(".")[-2]) for n, w in minilm_weights.items()))
    table = compute_cost_table(dict(itertools.islice(minilm_weights.items(), 36)), layout, QuantSpace.integer())
    config = allocate(table, 4.0)
    assert {lq.kind for lq in config.layers.values()} == {"int"}
    assert 3.9 <= config.avg_bits <= 4.0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_cost_table_refuses_non_finite_weights(value, toy_layout):
    weights = {m.name: torch.randn(m.shape) for m in toy_layout.matrices}
    bad = toy_layout.matrices[1].name
    weights[bad][0, 0] = value
    with pytest.raises(ValueError, match=rf"matrix {bad!r} of .* has 1 NaN or infinite weights"):
        compute_cost_table(weights, toy_layout, QuantSpace.nf())


def test_ilp_matches_brute_force_on_a_small_table():
    rng = np.random.default_rng(0)
    space = QuantSpace("small", "nf", bits=(2, 4), scale_bits=(2, 8), scale_dtype=("fp32",), block_size=(64,),
                       group_size=(256,))
    layout = Layout("toy", tuple(MatrixSpec(f"m{i}", (8, 8 * (i + 1)), i, "x") for i in range(4)))
    bits = np.array([o.storage_bits for o in space.options()])
    costs = np.sort(rng.uniform(1, 10, (4, 4)), axis=1)[:, ::-1] * (bits < 5) + rng.uniform(0, 1, (4, 4))
    table = CostTable(layout, space, costs, "none")
    share = layout.numels / layout.numels.sum()
    for budget in (2.2, 2.6, 3.0, 3.5, 4.0, 4.12):
        best = min((costs[range(4), c].sum(), c) for c in itertools.product(range(4), repeat=4)
                   if (share * bits[list(c)]).sum() <= budget + 1e-12)
        _, cost = solve_allocation(table, budget)
        assert cost == pytest.approx(best[0])


def test_solutions_are_remembered_by_table_contents(monkeypatch):
    solves = count_milp(monkeypatch)
    table = toy_table("toy-memo")
    layout, space = table.layout, table.space
    first, cost = solve_allocation(table, 3.2)
    first[:] = -1  # the caller's copy, not the remembered solution
    again, again_cost = solve_allocation(table, 3.2)
    assert len(solves) == 1 and again_cost == cost and (again >= 0).all()
    m2_gains_most = CostTable(layout, space, np.array([[9.0, 1.0], [8.0, 2.0], [20.0, 3.0]]), "none")
    moved, _ = solve_allocation(m2_gains_most, 3.2)
    assert len(solves) == 2 and again.tolist() == [1, 0, 0] and moved.tolist() == [0, 0, 1]


def toy_table(name: str = "toy") -> CostTable:
    space = QuantSpace("small", "nf", bits=(2, 4), scale_bits=(8,), scale_dtype=("fp32",), block_size=(64,),
                       group_size=(256,))
    layout = Layout(name, tuple(MatrixSpec(f"m{i}", (8, 64), i, "x") for i in range(3)))
    return CostTable(layout, space, np.array([[9.0, 1.0], [8.0, 2.0], [7.0, 3.0]]), "none")


def count_milp(monkeypatch) -> list:
    solves, real_milp = [], allocation.milp
    monkeypatch.setattr(allocation, "milp", lambda *a, **k: solves.append(1) or real_milp(*a, **k))
    return solves


def test_solutions_are_stored_and_read_back_by_another_process(minilm_table, solution_store, monkeypatch):
    solves = count_milp(monkeypatch)
    first = solve_allocation(minilm_table, 3.25)
    assert len(solves) == 1 and len(list(solution_store.iterdir())) == 1
    monkeypatch.setattr(allocation, "_SOLVED", {})  # a fresh process
    again = solve_allocation(minilm_table, 3.25)
    assert len(solves) == 1 and np.array_equal(again[0], first[0]) and again[1] == first[1]


def test_a_stored_solution_is_keyed_by_table_budget_and_solver(minilm_table, monkeypatch):
    digest = allocation._table_digest(minilm_table)
    path = allocation._solution_path(digest, 3.0)
    assert path == allocation._solution_path(digest, 3.0)
    assert path != allocation._solution_path(digest, 3.0 + 1e-9)
    assert path != allocation._solution_path(allocation._table_digest(toy_table()), 3.0)
    monkeypatch.setattr(allocation, "MILP_OPTIONS", dict(allocation.MILP_OPTIONS, mip_rel_gap=1e-4))
    assert path != allocation._solution_path(digest, 3.0)


@pytest.mark.parametrize("stored", ["{\"budget\": 3.2, \"choi", '{"choice": [1, 0]}', '{"choice": [1, 0, 2]}',
                                    '{"choice": [1, 1, 0]}', '{"choice": 1}'])
def test_an_unreadable_stored_solution_is_solved_again_and_replaced(stored, monkeypatch, caplog):
    table = toy_table()
    path = allocation._solution_path(allocation._table_digest(table), 3.2)
    path.parent.mkdir(parents=True)
    path.write_text(stored)  # cut short, too few matrices, an option the space lacks, over budget, no list
    monkeypatch.setattr(allocation, "_SOLVED", {})
    solves = count_milp(monkeypatch)
    choice, _ = solve_allocation(table, 3.2)
    assert len(solves) == 1 and choice.tolist() == [1, 0, 0]
    assert "solving again: the stored allocation" in caplog.text
    monkeypatch.setattr(allocation, "_SOLVED", {})
    assert solve_allocation(table, 3.2)[0].tolist() == [1, 0, 0] and len(solves) == 1


def test_a_solve_stopped_by_its_time_limit_is_not_stored(solution_store, monkeypatch):
    real = allocation._solve
    monkeypatch.setattr(allocation, "_solve", lambda table, budget: real(table, budget)[:2] + (False,))
    monkeypatch.setattr(allocation, "_SOLVED", {})
    solve_allocation(toy_table(), 3.2)
    assert not solution_store.exists()


def test_pareto_options_drops_dominated():
    bits = np.array([2.0, 3.0, 3.0, 4.0, 5.0])
    costs = np.array([5.0, 6.0, 2.0, 2.5, 1.0])
    assert pareto_options(bits, costs) == [0, 2, 4]


@pytest.mark.parametrize("budget", [1.9, 2.0, 8.7, 12])
def test_budget_outside_space_is_an_error(minilm_table, budget):
    with pytest.raises(ValueError, match=rf"budget {budget} bits is outside the reachable range of space 'nf': "
                                         r"\[2.0322, 8.6250\]"):
        solve_allocation(minilm_table, budget)


def test_cost_table_is_cached_on_disk(minilm_table, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached table should be used")
    monkeypatch.setattr(models, "load_backbone", fail)
    again = cost_table("minilm-l6", QuantSpace.nf())
    np.testing.assert_array_equal(again.costs, minilm_table.costs)
    assert again.layout == minilm_table.layout


def test_cost_table_save_load_round_trip(tmp_path, toy_layout):
    table = CostTable(toy_layout, QuantSpace.integer(), np.arange(6 * 432, dtype=float).reshape(6, 432), "x")
    table.save(tmp_path / "t.npz")
    loaded = CostTable.load(tmp_path / "t.npz")
    assert loaded.layout == toy_layout and loaded.space == table.space and loaded.importance == "x"
    np.testing.assert_array_equal(loaded.costs, table.costs)
    assert list(tmp_path.iterdir()) == [tmp_path / "t.npz"]  # no temporary files left


def test_cost_table_matches_quantization_error(minilm_weights):
    name = "encoder.layer.3.attention.self.value"
    weight = minilm_weights[name]
    space = QuantSpace.nf()
    row = matrix_costs(weight, space)
    from test_quant import quantization_error
    for j in (0, 17, 200, 431):
        assert row[j] == pytest.approx(quantization_error(weight, space.options()[j]), rel=1e-5)


@pytest.mark.parametrize("kind", ["nf", "int"])
def test_sampled_cost_estimates_the_exact_one(minilm_weights, kind):
    """A quarter of the chunks estimates every option's error closely and keeps the options' order."""
    weight = minilm_weights["encoder.layer.2.intermediate.dense"]                       # [1536, 384]
    space = QuantSpace.named(kind)
    exact, sampled = matrix_costs(weight, space), matrix_costs(weight, space, fraction=0.25)
    assert np.median(np.abs(sampled / exact - 1)) < 0.03
    assert stats.spearmanr(sampled, exact).statistic > 0.99
    assert not np.array_equal(sampled, exact)                                 # it really sampled
    np.testing.assert_array_equal(matrix_costs(weight, space, fraction=0.25), sampled)  # seeded


def test_sample_covers_whole_blocks_and_rejects_bad_fractions():
    from coalora.allocation import _chunk_rows
    chunks = torch.tensor([0, 10])                      # 700 weights: chunk 10 is the partial last one
    assert _chunk_rows(chunks, 16, n_blocks=44).tolist() == [0, 1, 2, 3, 40, 41, 42, 43]
    assert _chunk_rows(chunks, 64, n_blocks=11).tolist() == [0, 10]
    assert _chunk_rows(torch.tensor([1]), 32, n_blocks=3).tolist() == [2]   # row 3 is past the end
    weight = torch.randn(10, 70)
    space = QuantSpace(name="nf", kind="nf", bits=(4,), scale_bits=(8,), scale_dtype=("fp32",), group_size=(16,))
    np.testing.assert_array_equal(matrix_costs(weight, space, fraction=1.0), matrix_costs(weight, space))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            matrix_costs(weight, space, fraction=bad)


def test_sample_fraction_is_exact_for_small_models(minilm_table):
    from coalora.allocation import COST_TABLE_SAMPLE, sample_fraction
    assert sample_fraction(minilm_table.layout) == 1.0
    big = Layout("big", tuple(MatrixSpec(f"m{i}", (4096, 4096), 0, "q") for i in range(4)))
    assert sample_fraction(big) == pytest.approx(COST_TABLE_SAMPLE / (4 * 4096 * 4096))


def test_allocation_from_a_sampled_table_is_near_optimal(minilm_table, minilm_weights):
    """What sampling is for: the ILP's choice from a 10% sample costs within 1% of the exact optimum."""
    weights = {f"bert.{name}": w for name, w in minilm_weights.items()}       # the layout's module names
    sampled = compute_cost_table(weights, minilm_table.layout, QuantSpace.nf(), fraction=0.1)
    for budget in (3.0, 4.0, 5.0):
        _, optimum = solve_allocation(minilm_table, budget)
        choice, _ = solve_allocation(sampled, budget)
        assert minilm_table.costs[np.arange(len(choice)), choice].sum() <= 1.01 * optimum


def test_fisher_weighting_moves_bits_to_important_matrices():
    torch.manual_seed(0)  # a randomly initialised tiny BERT: unit test only
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    layout = models.matrix_layout(model, "tiny-bert")
    linears = models.quantized_linears(model)
    batches = [{"input_ids": torch.randint(0, 50, (4, 8)), "labels": torch.randint(0, 2, (4,))} for _ in range(3)]
    fisher = fisher_diagonal(model, linears, batches)
    assert set(fisher) == set(layout.names)
    assert all(f.shape == linears[n].weight.shape and (f >= 0).all() and f.sum() > 0 for n, f in fisher.items())
    assert all(not linears[n].weight.requires_grad or linears[n].weight.grad is None for n in fisher)
    weights = {n: m.weight for n, m in linears.items()}
    important = layout.names[0]
    boosted = {n: (f * 1e6 if n == important else f) for n, f in fisher.items()}
    plain = allocate(compute_cost_table(weights, layout, QuantSpace.nf(), fisher, "fisher"), 3.0)
    heavy = allocate(compute_cost_table(weights, layout, QuantSpace.nf(), boosted, "boosted"), 3.0)
    assert heavy[important].storage_bits > plain[important].storage_bits


def test_task_fisher_tables_differ_from_plain_ones_and_still_meet_the_budget():
    """On the real MiniLM-L6 and the SST-2 stand-in: the per-example Fisher of the task loss moves bits
    between matrices, and the ILP on the weighted table still lands within 0.1 bit under each budget."""
    model, fisher, label = allocation.task_fisher("minilm-l6", "sst2", "smoke", n_examples=16)
    assert "fisher: sst2" in label and "16 examples" in label
    layout = models.matrix_layout(model, "minilm-l6")
    weights = {n: m.weight for n, m in models.quantized_linears(model).items()}
    assert set(fisher) == set(layout.names) and all((f >= 0).all() and f.sum() > 0 for f in fisher.values())
    plain = compute_cost_table(weights, layout, QuantSpace.nf(), fraction=0.05)
    weighted = compute_cost_table(weights, layout, QuantSpace.nf(), fisher, label, fraction=0.05)
    moved = 0
    for budget in (2.5, 3.0, 3.5, 4.0):
        a, b = allocate(plain, budget), allocate(weighted, budget)
        assert budget - 0.1 <= b.avg_bits <= budget
        moved += a != b
    assert moved >= 2
    with pytest.raises(ValueError, match="needs the task"):
        cost_table("minilm-l6", "nf", weighting="fisher")
    with pytest.raises(ValueError, match="unknown cost weighting 'hessian'"):
        cost_table("minilm-l6", "nf", weighting="hessian")
