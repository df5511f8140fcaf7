"""The Pareto-guided configuration search on a synthetic problem (no model): exact bits, finite GP
predictions in corner cases, proposals that beat random extension on hypervolume, the segmented
Pareto filter's guarantees, the hook's modes; plus one run inside the real training engine."""

import json
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coalora import search
from coalora.configs import Configuration, LayerQuant, Layout, MatrixSpec, QuantSpace
from coalora.metrics import hypervolume
from coalora.search import (ConfigurationSearch, Encoder, SearchConfig, fit_loss_gp, log_ehvi,
                            segmented_pareto_filter)

NF = QuantSpace.nf()
LAYOUT = Layout("synthetic", tuple(MatrixSpec(f"layers.{i // 2}.{'attn' if i % 2 else 'mlp'}", (64, 64 * (1 + i % 3)),
                                              i // 2, "attn" if i % 2 else "mlp") for i in range(10)))
WEIGHTS = np.exp(np.random.default_rng(0).uniform(np.log(0.1), np.log(10.0), len(LAYOUT)))  # per-matrix sensitivity


def synthetic_loss(c: Configuration) -> float:
    """0.3 + mean_i w_i err(c_i): err halves per bit, grows with block size, shrinks with scale
    bits; plus small noise fixed by the configuration (re-scoring gives the same value)."""
    err = [w * 2.0 ** -lq.bits * (1 + lq.block_size / 64) * (1 + 2.0 ** (2 - lq.scale_bits))
           for w, lq in zip(WEIGHTS, c.layers.values())]
    return 0.3 + float(np.mean(err)) + np.random.default_rng(zlib.crc32(c.digest().encode())).normal(0, 0.002)


def scorer(model, configurations, batches):
    return [synthetic_loss(c) for c in configurations]


def hook(mode="pareto", seed=0, scorer=scorer, **config):
    return ConfigurationSearch(SearchConfig(mode, **config), NF, LAYOUT, [{}], seed=seed, scorer=scorer)


def random_pool(n: int, seed: int = 100) -> list[Configuration]:
    return [Configuration.random(LAYOUT, NF, seed + i) for i in range(n)]


# The loss of the worst configuration of the space bounds the hypervolume's loss axis.
WORST = Configuration.uniform(LAYOUT, LayerQuant(bits=2, scale_bits=2, scale_dtype="bf16", block_size=64))


def pool_hypervolume(search_hook) -> float:
    kept = search_hook.rounds[-1]["kept"]
    return hypervolume([b for _, b, _ in kept], [loss for _, _, loss in kept], NF.bits_range(),
                       (0.25, synthetic_loss(WORST) + 0.05), higher_is_better=False)


# ---- encoding, surrogate, acquisition --------------------------------------------------------------

def test_bits_are_exact_and_inputs_use_the_full_choice_range():
    encoder = Encoder(NF, LAYOUT)
    configs = random_pool(6) + [Configuration.uniform(LAYOUT, LayerQuant(bits=8, scale_bits=2, block_size=16))]
    x = encoder.normalise(encoder.indices(configs))  # [7, 50]
    assert x.shape == (7, 50) and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(encoder.bits(x).squeeze(-1), torch.tensor([c.avg_bits for c in configs],
                                                                     dtype=torch.float64), rtol=0, atol=1e-12)
    uniform = encoder.normalise(encoder.indices(configs[-1:]))[0].reshape(10, 5)
    assert uniform[:, 0].tolist() == [1.0] * 10  # 8 bits is the last of 4 choices: 3 / 3, not min/max of data
    assert encoder.configurations(encoder.indices(configs)) == configs


def test_constant_coordinates_and_equal_losses_give_finite_predictions():
    # Every configuration has bits=4 and group_size=64: those coordinates never vary.
    rng = np.random.default_rng(0)
    configs = [Configuration(LAYOUT, {n: LayerQuant(bits=4, scale_bits=int(rng.choice([2, 3, 4, 8])),
                                                    block_size=int(rng.choice([16, 32, 64])), group_size=64)
                                      for n in LAYOUT.names}) for _ in range(8)]
    encoder = Encoder(NF, LAYOUT)
    x = encoder.normalise(encoder.indices(configs))
    test = encoder.normalise(encoder.indices(random_pool(5)))
    for losses in (torch.tensor([synthetic_loss(c) for c in configs]), torch.full((8,), 0.7)):
        gp = fit_loss_gp(x, losses)
        with torch.no_grad():
            posterior = gp.posterior(test)
        assert torch.isfinite(posterior.mean).all() and torch.isfinite(posterior.variance).all()
        acq = log_ehvi(gp, encoder, [c.avg_bits for c in configs], losses)
        assert torch.isfinite(search.evaluate_acquisition(acq, test)).all()


def test_pointwise_posterior_matches_the_batched_gp():
    encoder = Encoder(NF, LAYOUT)
    configs = random_pool(12)
    x = encoder.normalise(encoder.indices(configs))
    gp = fit_loss_gp(x, torch.tensor([synthetic_loss(c) for c in configs]))
    test = encoder.normalise(encoder.indices(random_pool(7, seed=500))).unsqueeze(-2)  # [7, 1, d]
    with torch.no_grad():
        fast, slow = search._PointwiseGP(gp).posterior(test), gp.posterior(test)
    assert torch.allclose(fast.mean, slow.mean, atol=1e-10) and torch.allclose(fast.variance, slow.variance, atol=1e-10)


def test_reference_point_is_below_the_worst_point_and_never_the_origin():
    y = torch.tensor([[-3.0, -0.5], [-5.0, -0.4], [-2.5, -0.9]], dtype=torch.float64)  # (-bits, -loss)
    assert torch.allclose(search.reference_point(y), torch.tensor([-5.25, -0.95], dtype=torch.float64))
    single = search.reference_point(y[:1])
    assert (single < y[0]).all() and torch.isfinite(single).all()


# ---- the segmented Pareto filter --------------------------------------------------------------------

def _segments(bits, segments):
    bits = np.asarray(bits, dtype=np.float64)
    lo, hi = bits.min(), bits.max()
    if hi == lo:
        return np.zeros(len(bits), dtype=int)
    return np.clip(np.floor((bits - lo) / (hi - lo) * segments), 0, segments - 1).astype(int)


def _dominates(a, b):
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


@settings(max_examples=60, deadline=None)
@given(points=st.lists(st.tuples(st.sampled_from([2.1, 2.5, 3.0, 3.25, 4.1, 4.5, 6.0, 8.2]),
                                 st.floats(0.0, 3.0, allow_nan=False)), min_size=1, max_size=30),
       segments=st.integers(1, 12))
def test_segmented_filter_keeps_each_segments_front(points, segments):
    bits, losses = [p[0] for p in points], [p[1] for p in points]
    kept = segmented_pareto_filter(bits, losses, segments)
    segment = _segments(bits, segments)
    assert kept == sorted(set(kept))
    for u in set(segment):
        members = [i for i in range(len(points)) if segment[i] == u]
        kept_here = [i for i in members if i in kept]
        assert kept_here, f"segment {u} lost all its configurations"
        for i in members:
            dominated = any(_dominates(points[j], points[i]) for j in members)
            assert (i in kept) == (not dominated), (i, points[i])


def test_segmented_filter_edge_cases():
    assert segmented_pareto_filter([], [], 10) == []
    assert segmented_pareto_filter([4.0], [0.5], 10) == [0]
    assert segmented_pareto_filter([3.0, 3.0, 3.0], [0.5, 0.5, 0.6], 5) == [0, 1]  # equal points both kept
    assert segmented_pareto_filter([5.0, 3.0], [float("nan"), 0.4], 1) == [1]  # NaN loss: +inf
    with pytest.raises(ValueError, match="at least one segment"):
        segmented_pareto_filter([3.0], [0.5], 0)


# ---- the hook ------------------------------------------------------------------------------------------

def test_pareto_proposals_are_new_moved_and_recorded():
    h = hook(seed=0)
    pool = random_pool(10)
    new_pool = h(0, None, pool)
    r = h.rounds[0]
    pool_ids = {c.digest() for c in pool}
    proposal_ids = [cid for cid, _, _ in r["proposals"]]
    assert proposal_ids and len(proposal_ids) == len(set(proposal_ids)) == len(r["moves"]) <= 5
    assert not set(proposal_ids) & pool_ids
    assert all(1 <= m <= 10 for m in r["moves"])
    assert [cid for cid, _, _ in r["kept"]] == [c.digest() for c in new_pool]
    assert r["gp_points"] == len(pool) and set(r["seconds"]) >= {"score", "fit", "propose", "total"}
    for cid, bits, loss in r["proposals"]:
        assert bits == pytest.approx(h.configurations[cid].avg_bits) and np.isfinite(loss)
    assert {row["role"] for row in h.to_rows()} == {"pool", "proposal", "kept"}
    json.dumps(h.rounds)  # a run can save it as is
    h(1, None, new_pool)  # the GP data grows by every configuration scored
    assert h.rounds[1]["gp_points"] == len(pool) + len(proposal_ids)  # every configuration scored so far


def test_pareto_beats_random_extension_on_hypervolume():
    """Same initial pool, same number of rounds, at most as many new evaluations: the pool's
    hypervolume (normalised bits and loss) is higher after the GP-guided search."""
    wins, gains = 0, []
    for seed in range(4):
        result = {}
        for mode in ("pareto", "random"):
            h = hook(mode, seed=seed, segments=10)
            pool = random_pool(10, seed=1000 * seed)
            for epoch in range(3):
                pool = h(epoch, None, pool)
            result[mode] = pool_hypervolume(h)
            if mode == "pareto":
                assert sum(len(r["proposals"]) for r in h.rounds) <= 15
        wins += result["pareto"] > result["random"]
        gains.append(result["pareto"] - result["random"])
    assert wins >= 3 and np.mean(gains) > 0.02, gains  # measured: 4 wins of 4, +0.04 to +0.13


def test_single_point_pool_and_equal_losses():
    only = random_pool(1)
    h = hook(seed=3)
    pool = h(0, None, only)
    assert len(pool) >= 1
    assert len(h.rounds[0]["proposals"]) >= 1  # one start, and it moves
    flat = hook(seed=3, scorer=lambda model, configs, batches: [0.7] * len(configs))
    pool = flat(0, None, random_pool(6))
    assert pool and all(np.isfinite(loss) for _, _, loss in flat.rounds[0]["kept"])


def test_duplicate_proposals_are_removed(monkeypatch):
    pool = random_pool(6)
    encoder = Encoder(NF, LAYOUT)
    target = encoder.indices(random_pool(1, seed=999))[0]
    ends = iter([(target, 0.0, 3), (target.clone(), 0.0, 2), (encoder.indices(pool[:1])[0], 0.0, 1),
                 (target, 0.0, 0), (target, 0.0, 4)])
    monkeypatch.setattr(search, "coordinate_ascent", lambda *args: next(ends))
    h = hook(seed=0)
    h(0, None, pool + pool[:2])  # duplicates in the pool are dropped too
    r = h.rounds[0]
    assert len(r["pool"]) == 6
    assert [cid for cid, _, _ in r["proposals"]] == [encoder.configurations(target[None])[0].digest()]
    assert r["moves"] == [3]


def test_random_mode_adds_new_random_configurations():
    h = hook("random", seed=0, starts=4)
    pool = random_pool(5)
    h(0, None, pool)
    proposals = [cid for cid, _, _ in h.rounds[0]["proposals"]]
    assert len(proposals) == len(set(proposals)) == 4
    assert not set(proposals) & {c.digest() for c in pool}


def test_frozen_returns_the_pool_unchanged():
    h = hook("frozen")
    pool = random_pool(5)
    assert h(0, None, pool) == pool
    assert h.rounds[0]["proposals"] == [] and len(h.rounds[0]["kept"]) == 5


def test_search_leaves_the_training_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    hook(seed=1, steps=2)(0, None, random_pool(4))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "bayes"}, "unknown search mode 'bayes'; valid search modes: pareto, frozen, random"),
    ({"kernel": "linear"}, "unknown GP kernel 'linear'; valid GP kernels: rbf, matern, categorical"),
    ({"starts": 0}, "search starts must be an int >= 1"),
    ({"segments": 0}, "search segments must be an int >= 1"),
    ({"batches": 1.5}, "search batches must be an int >= 1"),
    ({"steps": True}, "search steps must be an int >= 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**{"mode": "pareto", **kwargs})
    assert search.SEARCH_MODES == ("pareto", "frozen", "random")


def test_needs_held_out_batches_a_config_and_a_valid_seed():
    with pytest.raises(ValueError, match="at least one held-out batch"):
        ConfigurationSearch(SearchConfig("pareto"), NF, LAYOUT, [])
    with pytest.raises(ValueError, match="expected a coalora.search.SearchConfig, got 'pareto'"):
        ConfigurationSearch("pareto", NF, LAYOUT, [{}])
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        ConfigurationSearch(SearchConfig("pareto"), NF, LAYOUT, [{}], seed=-1)


# ---- inside the training engine ----------------------------------------------------------------------

def test_pareto_search_inside_coalora_training():
    from test_training import tiny_model, toy_batches  # the tiny random BERT of the engine's tests

    from coalora.training import HyperParams, train

    model, configs = tiny_model(config_aware=True)
    held_out = search.fixed_batches(toy_batches(2, seed=5), n=2)
    h = ConfigurationSearch(SearchConfig("pareto", starts=3, steps=4), NF, model.layout, held_out, seed=0)
    trained = train("coalora", model, configs, toy_batches(2), HyperParams(rank=4, epochs=2), refine=h)
    assert len(h.rounds) == 2 and all(r["proposals"] for r in h.rounds)
    pools = [[c.digest() for c in configs]] + [row["pool"] for row in trained.history]
    assert pools[1] != pools[0] or pools[2] != pools[1]
    assert model.training and model.configuration is not None  # scoring restored the model
    assert all(np.isfinite(loss) for r in h.rounds for _, _, loss in r["pool"])
