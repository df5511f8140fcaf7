"""The training engine on a tiny randomly initialised BERT (unit test only): every method learns a
learnable toy task, keeps per-configuration adapters apart, and rejects bad input."""

import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, BertConfig

from coalora import lora, models, training
from coalora.allocation import allocate
from coalora.configs import Configuration, LayerQuant, QuantSpace
from coalora.methods import METHODS
from coalora.metrics import evaluate
from coalora.quant import fake_quantize
from coalora.training import (MAX_LQLORA_ITERATIONS, HyperParams, draw_configurations, low_rank_fit, lr_factor,
                              micro_batches, train)

NF = QuantSpace.nf()
VOCAB = 32
CONFIGS = [LayerQuant(bits=2, scale_bits=4, block_size=64, group_size=64), LayerQuant(bits=4), LayerQuant(bits=8)]


def toy_batches(n_batches: int = 6, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """Label 1 iff token 7 occurs in the sequence: learnable by attention in a few steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_batches * batch_size):
        ids = torch.randint(8, VOCAB, (12,), generator=g)
        label = int(torch.rand(1, generator=g) < 0.5)
        if label:
            ids[torch.randint(0, 12, (1,), generator=g)] = 7
        rows.append({"input_ids": ids, "labels": torch.tensor(label)})
    return DataLoader(rows, batch_size=batch_size, shuffle=False,
                      collate_fn=lambda items: {k: torch.stack([i[k] for i in items]) for k in items[0]})


def padded_batches(n_batches: int = 2, batch_size: int = 10, seed: int = 0) -> DataLoader:
    """The toy task with sentences of 3 to 12 tokens, padded (id 0) to each batch's longest."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in toy_batches(n_batches, batch_size, seed).dataset:
        length = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.zeros(12, dtype=torch.long)
        ids[:length] = row["input_ids"][:length]
        rows.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": row["labels"]})

    def collate(items):
        batch = {k: torch.stack([i[k] for i in items]) for k in items[0]}
        width = int(batch["attention_mask"].sum(dim=1).max())
        return {k: (t[:, :width] if t.dim() == 2 else t) for k, t in batch.items()}
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)


def tiny_model(config_aware: bool, dropout: float = 0.1):
    torch.manual_seed(0)
    backbone = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    layout = models.matrix_layout(backbone, "tiny-bert")
    model = lora.build_lora_model(backbone, layout, NF, rank=4, config_aware=config_aware)
    return model, [Configuration.uniform(layout, lq) for lq in CONFIGS]


HP = HyperParams(rank=4, lr=3e-3, epochs=8, weight_decay=0.0)


TRAINED = [m for m in METHODS if METHODS[m].training != "none"]


@pytest.mark.parametrize("method", TRAINED)
def test_each_method_lowers_the_loss_and_records_what_it_trained_on(method):
    spec = METHODS[method]
    model, configs = tiny_model(config_aware=spec.theta)
    trained = train(method, model, configs, toy_batches(), HP, seed=0)
    history = trained.history
    if spec.per_configuration:
        assert len(trained.states) == len(configs) == len(trained.train_seconds)
        for c in configs:
            losses = [h["loss"] for h in history if h["configuration"] == c.digest()]
            assert losses[-1] < losses[0], (c, losses)
    else:
        assert list(trained.states) == ["shared"]
        assert history[-1]["loss"] < history[0]["loss"], history
    assert all(s > 0 for s in trained.train_seconds.values())
    served = [None] if spec.training == "full-precision" else configs
    assert trained.trained_on == ({"full-precision"} if served == [None] else {c.digest() for c in configs})
    for c in served:  # every trained configuration can be served and evaluated
        result = evaluate(trained.load_for(c), c, toy_batches(2, seed=1), "classification")
        assert 0.0 <= result["accuracy"] <= 1.0 and result["eval_seconds"] > 0
        assert result["per_example"].shape == (32,) and result["accuracy"] == result["per_example"].mean()


def test_no_adapter_trains_nothing_and_serves_the_quantized_backbone():
    model, configs = tiny_model(config_aware=False)
    before = lora.adapter_state(model)
    trained = train("no-adapter", model, configs, toy_batches(), HP, seed=0)
    assert trained.train_seconds == {"shared": 0.0} and not trained.trained_on and trained.history == []
    assert all(torch.equal(before[k], v) for k, v in trained.states["shared"].items())


def test_pool_training_samples_k_configurations_per_step_with_and_without_theta():
    for method, aware in (("coalora", True), ("coalora-no-theta", False)):
        model, configs = tiny_model(config_aware=aware, dropout=0.0)
        calls = []
        model.peft_model.get_input_embeddings().register_forward_hook(lambda *_, calls=calls: calls.append(1))
        train(method, model, configs, toy_batches(3), HyperParams(rank=4, epochs=1, configs_per_step=2), seed=0)
        assert len(calls) == 3 * 2, method  # batches x K


def test_micro_batches_are_length_sorted_trimmed_and_cover_the_batch():
    batch = next(iter(padded_batches(1, 10)))
    lengths = batch["attention_mask"].sum(dim=1)
    parts = micro_batches(batch, 3)
    assert [share for share, _ in parts] == pytest.approx([0.4, 0.3, 0.3])
    seen = []
    for _, part in parts:
        part_lengths = part["attention_mask"].sum(dim=1)
        assert part["input_ids"].shape[1] == int(part_lengths.max())  # padded to its own longest
        assert part["input_ids"].shape == part["attention_mask"].shape
        seen += [(tuple(ids[:n].tolist()), int(label)) for ids, n, label in
                 zip(part["input_ids"], part_lengths, part["labels"])]
    whole = [(tuple(ids[:n].tolist()), int(label)) for ids, n, label in
             zip(batch["input_ids"], lengths, batch["labels"])]
    assert sorted(seen) == sorted(whole)
    assert parts[0][1]["input_ids"].shape[1] < batch["input_ids"].shape[1]
    assert [n for _, part in parts for n in part["attention_mask"].sum(dim=1).tolist()] == sorted(lengths.tolist())
    unpadded = next(iter(toy_batches(1)))
    lm = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["input_ids"]}
    for whole_batch, k in ((batch, 1), (unpadded, 2), (lm, 2)):  # split off, no padding, per-token labels
        assert micro_batches(whole_batch, k) == [(1.0, whole_batch)]


def test_micro_batches_train_like_whole_batches_without_dropout():
    states, forwards = {}, {}
    for k in (1, 2):
        model, configs = tiny_model(config_aware=True, dropout=0.0)
        calls = []
        model.peft_model.get_input_embeddings().register_forward_hook(lambda *_, calls=calls: calls.append(1))
        hp = HyperParams(rank=4, lr=1e-2, epochs=2, micro_batches=k)
        trained = train("coalora", model, configs, padded_batches(3), hp, seed=0)
        states[k], forwards[k] = (trained.states["shared"], [h["loss"] for h in trained.history]), len(calls)
    assert forwards[2] == 2 * forwards[1] == 2 * 2 * 3 * hp.configs_per_step  # epochs x batches x K
    (state_1, loss_1), (state_2, loss_2) = states[1], states[2]
    assert loss_2 == pytest.approx(loss_1, rel=1e-5)
    for name, tensor in state_1.items():
        torch.testing.assert_close(state_2[name], tensor, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        HyperParams(micro_batches=0)


def test_per_configuration_adapters_differ_and_are_restored():
    model, configs = tiny_model(config_aware=False)
    trained = train("qlora", model, configs, toy_batches(3), HyperParams(rank=4, lr=1e-2, epochs=1), seed=0)
    first, second = (trained.states[c.digest()] for c in configs[:2])
    assert any(not torch.equal(first[k], second[k]) for k in first)
    trained.load_for(configs[0])
    assert all(torch.equal(p, first[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lqlora", "loftq"])
def test_low_rank_inits_start_closer_to_the_full_precision_weight(method):
    model, configs = tiny_model(config_aware=False)
    name = next(iter(model.lora_layers))
    trained = train(method, model, configs[:1], toy_batches(1), HyperParams(rank=4, lr=1e-9, epochs=1), seed=0)
    trained.load_for(configs[0])
    layer = model.lora_layers[name]
    weight = model.full_precision[name]
    scaling = HP.alpha / HP.rank
    delta = scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    base = layer.get_base_layer().weight
    plain = fake_quantize(weight, configs[0][name])
    assert torch.linalg.norm(weight - base - delta) < 0.9 * torch.linalg.norm(weight - plain)
    assert torch.equal(base, plain) == (method == "loftq")  # LQ-LoRA's base is quant(W - L), LoftQ's quant(W)


def test_lqlora_base_weight_survives_evaluation_and_reloads_from_the_stored_fit():
    model, configs = tiny_model(config_aware=False)
    trained = train("lqlora", model, configs[:1], toy_batches(1), HyperParams(rank=4, lr=1e-9, epochs=1), seed=0)
    name = next(iter(model.lora_layers))
    trained.load_for(configs[0])
    evaluate(model, configs[0], toy_batches(1), "classification")
    base = model.lora_layers[name].get_base_layer().weight.clone()
    assert not torch.equal(base, fake_quantize(model.full_precision[name], configs[0][name]))
    lora.set_configuration(model, configs[1])  # away and back: the base is rebuilt from the stored fit
    trained.load_for(configs[0])
    assert torch.equal(model.lora_layers[name].get_base_layer().weight, base)


def test_lqlora_iterations_reach_every_fit(monkeypatch):
    caps = []

    def recording(weight, lq, rank, init, max_iterations=MAX_LQLORA_ITERATIONS):
        caps.append(max_iterations)
        return low_rank_fit(weight, lq, rank, init, max_iterations)
    monkeypatch.setattr(training, "low_rank_fit", recording)
    monkeypatch.setattr(training, "_LOW_RANK", type(training._LOW_RANK)())
    model, configs = tiny_model(config_aware=False)
    train("lqlora", model, configs[:1], toy_batches(1), HyperParams(rank=4, epochs=1, lqlora_iterations=1))
    assert caps and set(caps) == {1} and len(caps) == len(model.lora_layers)


def test_lqlora_stops_when_its_error_stops_falling_on_real_minilm_weights(minilm_weights):
    """LQ-LoRA's order (L from W - Q with Q = 0 first, then Q = quant(W - L)) never ends on a larger
    ||W - Q - L|| than its first iteration; LoftQ's one-shot order is reported beside it."""
    lq = allocate("minilm-l6", 2.5)["bert.encoder.layer.0.intermediate.dense"]
    weight = minilm_weights["encoder.layer.0.intermediate.dense"]
    b, a, errors = low_rank_fit(weight, lq, 8, "lqlora")
    final = float(torch.linalg.norm(weight - fake_quantize(weight - b @ a, lq) - b @ a))
    assert final == pytest.approx(min(errors)) and final <= errors[0]
    assert len(errors) < MAX_LQLORA_ITERATIONS or errors == sorted(errors, reverse=True)
    capped = low_rank_fit(weight, lq, 8, "lqlora", max_iterations=2)[2]
    assert capped == errors[:2]  # a cap keeps the same iterations, fewer of them
    *_, (loftq,) = low_rank_fit(weight, lq, 8, "loftq")
    print(f"||W - Q - L||: LQ-LoRA order {errors} (kept {final:.3f}), LoftQ order {loftq:.3f}")
    assert final < float(torch.linalg.norm(weight - fake_quantize(weight, lq)))


def test_search_hook_refines_the_coalora_pool():
    model, configs = tiny_model(config_aware=True)
    calls = []

    def keep_first_two(epoch, _model, pool):
        calls.append((epoch, len(pool)))
        return pool[:2]

    trained = train("coalora", model, configs, toy_batches(2), HyperParams(rank=4, epochs=2), refine=keep_first_two)
    assert calls == [(0, 3), (1, 2)]
    assert trained.configurations == configs[:2]
    assert [len(h["pool"]) for h in trained.history] == [2, 2]


@pytest.mark.parametrize(("method", "config_aware", "message"), [
    ("lora", False, "unknown method 'lora'; valid methods: qlora, lqlora, loftq, shared"),
    ("coalora", False, "needs a model built with config_aware=True"),
    ("qlora", True, "needs a model built with config_aware=False"),
])
def test_bad_methods(method, config_aware, message):
    model, configs = tiny_model(config_aware)
    with pytest.raises(ValueError, match=message):
        train(method, model, configs, toy_batches(1))


def test_empty_configuration_set_and_foreign_configuration():
    model, configs = tiny_model(config_aware=True)
    with pytest.raises(ValueError, match="needs at least one training configuration"):
        train("coalora", model, [], toy_batches(1))
    other = models.matrix_layout(AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)),
        "tiny-bert-3")
    with pytest.raises(ValueError, match="configuration is for backbone 'tiny-bert-3'"):
        train("coalora", model, [Configuration.uniform(other, LayerQuant())], toy_batches(1))
    trained = train("qlora", *tiny_model(False), toy_batches(1), HyperParams(rank=4, epochs=1))
    with pytest.raises(ValueError, match="qlora has no adapter for configuration"):
        trained.load_for(Configuration.uniform(configs[0].layout, LayerQuant(bits=3)))


def test_search_only_for_coalora():
    model, configs = tiny_model(False)
    with pytest.raises(ValueError, match="only refines CoA-LoRA"):
        train("shared", model, configs, toy_batches(1), refine=lambda e, m, p: p)


def test_bf16_autocast_trains_and_keeps_fp32_adapters():
    model, configs = tiny_model(config_aware=True)
    trained = train("coalora", model, configs, toy_batches(), HyperParams(rank=4, lr=3e-3, epochs=4,
                                                                          weight_decay=0.0, precision="bf16"))
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]
    assert all(t.dtype == torch.float32 for t in trained.states["shared"].values())
    result = evaluate(trained.load_for(configs[1]), configs[1], toy_batches(2, seed=1), "classification", "bf16")
    assert 0.0 <= result["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid precisions: fp32, bf16"):
        HyperParams(precision="fp8")


def test_linear_schedule_falls_to_near_zero_and_constant_stays():
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert {lr_factor("constant", s, 4) for s in range(4)} == {1.0}
    with pytest.raises(ValueError, match="'cosine'.*linear, constant"):
        HyperParams(lr_schedule="cosine")


def test_warmup_ramps_from_near_zero_then_runs_the_schedule_over_the_rest():
    assert [lr_factor("linear", s, 10, 0.2) for s in range(10)] == [0.5, 1.0] + [1 - k / 8 for k in range(8)]
    assert [lr_factor("constant", s, 8, 0.5) for s in range(8)] == [0.25, 0.5, 0.75, 1.0] + [1.0] * 4
    assert [lr_factor("linear", s, 4, 0.0) for s in range(4)] == [lr_factor("linear", s, 4) for s in range(4)]
    with pytest.raises(ValueError, match="warmup is a share of the training steps in \\[0, 1\\), got 1.0"):
        HyperParams(warmup=1.0)


def test_uniform_draw_is_the_papers_sample_and_by_error_favours_the_low_bits():
    pool = [SimpleNamespace(avg_bits=b) for b in (2.25, 2.5, 4.0, 7.25)]
    for seed in range(5):  # the paper's draw, so uniform runs keep their draws
        assert draw_configurations(random.Random(seed), pool, 2) == random.Random(seed).sample(pool, 2)
    assert len(draw_configurations(random.Random(0), pool, 9, "by-error")) == len(pool)
    rng = random.Random(0)
    pairs = [draw_configurations(rng, pool, 2, "by-error") for _ in range(4000)]
    assert all(a is not b for a, b in pairs)  # K distinct configurations
    singles = Counter(draw_configurations(rng, pool, 1, "by-error")[0].avg_bits for _ in range(20000))
    weights = {c.avg_bits: 2.0 ** -c.avg_bits for c in pool}
    for bits, weight in weights.items():  # each drawn in proportion to 2^-bits
        assert abs(singles[bits] / 20000 - weight / sum(weights.values())) < 0.015, bits
    with pytest.raises(ValueError, match="'lowest'.*uniform, by-error"):
        HyperParams(pool_draw="lowest")
