"""CoA-LoRA on PEFT: the variant, configuration switching and its cache, gradients, and export to a
stock PEFT adapter.

Tiny randomly initialised BERT / Llama / Qwen2 models (the only place random models are allowed)
cover the mechanics; the real MiniLM-L6 checks the export round trip once.
"""

import contextlib
import copy
import math
import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, LlamaConfig,
                          Qwen2Config)

from coalora import lora, models
from coalora.configs import Configuration, LayerQuant, QuantSpace
from coalora.quant import fake_quantize, quantize

NF = QuantSpace.nf()
VOCAB = 64
LOW = LayerQuant(bits=2, scale_bits=4, scale_dtype="fp16", block_size=16, group_size=16)
HIGH = LayerQuant(bits=8, scale_bits=8, scale_dtype="fp32", block_size=64, group_size=256)
# (family, task type): PEFT-style case table; classification trains a head, causal-lm does not.
CASES = [("bert", "classification"), ("llama", "causal-lm"), ("qwen2", "classification")]


def tiny_backbone(family: str, task_type: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, initializer_range=0.2, pad_token_id=0)
    if family == "bert":
        config = BertConfig(**common)
    else:
        config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](num_key_value_heads=2, **common)
    auto = AutoModelForCausalLM if task_type == "causal-lm" else AutoModelForSequenceClassification
    return auto.from_config(config).eval()


def build(family: str, task_type: str, config_aware: bool = True, **kwargs):
    """A CoA-LoRA (or plain LoRA) model of a tiny backbone, and an untouched twin of that backbone."""
    backbone = tiny_backbone(family, task_type)
    twin = copy.deepcopy(backbone)
    layout = models.matrix_layout(backbone, f"tiny-{family}")
    model = lora.build_lora_model(backbone, layout, NF, config_aware=config_aware, task_type=task_type, **kwargs)
    return model, twin


@pytest.mark.parametrize("family,task_type", CASES)
def test_building_warns_nothing(family, task_type):
    """Wrapping is silent: a warning here would repeat for every run and every test."""
    backbone = tiny_backbone(family, task_type)
    layout = models.matrix_layout(backbone, f"tiny-{family}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.build_lora_model(backbone, layout, NF, task_type=task_type)


@torch.no_grad()
def perturb_(model: lora.CoALoRAModel, seed: int = 1) -> lora.CoALoRAModel:
    """Non-zero B (PEFT starts it at 0) and a clearly non-zero U, so every term of the update matters."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.lora_layers.values():
        b = layer.lora_B[lora.ADAPTER].weight
        b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    if model.theta is not None:
        w = model.theta.mlp[-1].weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)
        model.theta.gamma.fill_(0.7)
    return model


def tokens(seed: int = 0, shape=(2, 6)) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def uniform(model, lq: LayerQuant) -> Configuration:
    return Configuration.uniform(model.layout, lq)


@pytest.fixture
def count_quantizations(monkeypatch):
    """Counts the quantizations (calls of coalora.lora's quantize) a weight cache does."""
    calls = []

    def counting(weight, q, *args, **kwargs):
        calls.append(q)
        return quantize(weight, q, *args, **kwargs)

    monkeypatch.setattr(lora, "quantize", counting)
    return calls


# ---- structure -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,task_type", CASES)
def test_variant_on_every_layout_matrix(family, task_type):
    model, _ = build(family, task_type)
    assert list(model.lora_layers) == list(model.layout.names)
    for i, layer in enumerate(model.lora_layers.values()):
        variant = layer.lora_variant[lora.ADAPTER]
        assert isinstance(variant, lora.CoALoRAVariant) and variant.index == i
        assert "forward" not in vars(layer) and type(layer).forward is PeftLoraLinear.forward  # nothing patched
    plain, _ = build(family, task_type, config_aware=False)
    assert plain.theta is None and all(not layer.lora_variant for layer in plain.lora_layers.values())


@pytest.mark.parametrize("config_aware", [True, False])
@pytest.mark.parametrize("family,task_type", CASES)
def test_trainable_parameters(family, task_type, config_aware):
    model, _ = build(family, task_type, config_aware=config_aware)
    trainable = {id(p) for p in lora.trainable_parameters(model)}
    expected = [layer.lora_A[lora.ADAPTER].weight for layer in model.lora_layers.values()]
    expected += [layer.lora_B[lora.ADAPTER].weight for layer in model.lora_layers.values()]
    expected += [p for head in model.heads.values() for p in head.parameters()]
    expected += list(model.theta.parameters()) if config_aware else []
    assert trainable == {id(p) for p in expected}
    assert bool(model.heads) == (task_type == "classification")
    if task_type == "classification":  # a dense layer and a projection, as RoBERTa's head
        names = {name.split(".")[-1] for name in model.heads}
        assert names == ({"pooler", "classifier"} if family == "bert" else {"score"})


# ---- forward ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,task_type", CASES)
def test_zero_u_equals_plain_peft_lora(family, task_type):
    """With theta's last layer at zero (M = I), CoA-LoRA is exactly PEFT's LoRA on the same weights."""
    coa, _ = build(family, task_type)
    plain, _ = build(family, task_type, config_aware=False)
    perturb_(coa)
    with torch.no_grad():
        coa.theta.mlp[-1].weight.zero_()
    plain.peft_model.load_state_dict(coa.peft_model.state_dict())
    configuration = Configuration.random(coa.layout, NF, seed=0)
    lora.set_configuration(coa, configuration)
    lora.set_configuration(plain, configuration)
    ids = tokens()
    torch.testing.assert_close(logits(coa, ids), logits(plain, ids), rtol=0, atol=1e-6)
    with coa.peft_model.disable_adapter():  # the LoRA term is not negligible
        assert (logits(coa, ids) - logits(plain, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("family,task_type", CASES)
def test_forward_runs_on_quantized_weights_with_full_precision_bias(family, task_type):
    model, twin = build(family, task_type)
    configuration = Configuration.random(model.layout, NF, seed=2)
    lora.set_configuration(model, configuration)
    twin_linears = models.quantized_linears(twin)
    for name, layer in model.lora_layers.items():
        base, original = layer.get_base_layer(), twin_linears[name]
        assert torch.equal(base.weight, fake_quantize(original.weight, configuration[name]))
        assert not base.weight.requires_grad
        assert torch.equal(model.full_precision[name], original.weight)
        if original.bias is not None:
            assert torch.equal(base.bias, original.bias)


def test_theta_runs_once_per_forward():
    model, _ = build("llama", "causal-lm")
    calls = []
    model.theta.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    lora.set_configuration(model, uniform(model, LOW))
    logits(model, tokens())
    assert calls == [(len(model.layout), 8, 8)]


@pytest.mark.parametrize("family,task_type", CASES)
def test_configurations_change_outputs(family, task_type):
    model, _ = build(family, task_type)
    perturb_(model)
    ids = tokens()
    low = logits(lora.set_configuration(model, uniform(model, LOW)), ids)
    high = logits(lora.set_configuration(model, uniform(model, HIGH)), ids)
    assert (low - high).abs().max() > 1e-3
    assert model.configuration == uniform(model, HIGH)
    assert torch.equal(logits(lora.set_configuration(model, uniform(model, LOW)), ids), low)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_causal_lm_evaluation_scores_the_models_own_loss_without_asking_for_it(precision, monkeypatch):
    """Perplexity is exp of the model's mean token loss, while the model itself never gets the labels
    (it would compute that loss over the whole vocabulary a second time)."""
    from coalora.metrics import evaluate
    from coalora.training import autocast, held_weights
    model, _ = build("llama", "causal-lm", config_aware=False)
    perturb_(model)
    configuration = uniform(model, LOW)
    batches = [{"input_ids": tokens(seed, (2, 7)), "labels": tokens(seed, (2, 7))} for seed in (0, 1)]
    lora.set_configuration(model, configuration)
    with torch.no_grad(), held_weights(model, precision), autocast(torch.device("cpu"), precision):
        losses = [model(**batch).loss for batch in batches]  # HF's mean over each batch's 2 x 6 tokens
    forward, given = model.forward, []
    monkeypatch.setattr(model, "forward", lambda **kw: given.append(set(kw)) or forward(**kw))
    result = evaluate(model, configuration, batches, "causal-lm", precision)
    assert given == [{"input_ids"}] * 2
    assert result["loss"] == pytest.approx(float(torch.stack(losses).float().mean()), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["per_example"].shape == (4,)


# ---- weight cache ----------------------------------------------------------------------------------

def test_switching_back_does_not_requantize(count_quantizations):
    model, _ = build("bert", "classification")
    n = len(model.layout)
    lora.set_configuration(model, uniform(model, LOW))
    lora.set_configuration(model, uniform(model, HIGH))
    assert len(count_quantizations) == 2 * n
    lora.set_configuration(model, uniform(model, LOW))
    lora.set_configuration(model, uniform(model, HIGH))
    assert len(count_quantizations) == 2 * n
    assert (model.weight_cache.hits, model.weight_cache.misses, len(model.weight_cache)) == (2 * n, 2 * n, 2 * n)


def test_models_of_one_backbone_share_a_cache_and_never_mix_up_weights(count_quantizations):
    shared = lora.WeightCache()
    first, _ = build("bert", "classification", cache=shared)
    second, _ = build("bert", "classification", config_aware=False, cache=shared)
    n = len(first.layout)
    lora.set_configuration(first, uniform(first, LOW))
    lora.set_configuration(second, uniform(second, LOW))  # the same weights: all from the cache
    assert len(count_quantizations) == n and shared.hits == n
    backbone = tiny_backbone("bert", "classification")
    with torch.no_grad():  # other weights under the same names: quantized afresh, never served stale
        for linear in models.quantized_linears(backbone).values():
            linear.weight.add_(1.0)
    other = lora.build_lora_model(backbone, first.layout, NF, cache=shared)
    lora.set_configuration(other, uniform(other, LOW))
    assert len(count_quantizations) == 2 * n


def test_full_precision_runs_the_original_weights_for_plain_lora_only():
    model, twin = build("bert", "classification", config_aware=False)
    lora.set_configuration(model, None)
    assert model.is_set and model.configuration is None
    for name, layer in model.lora_layers.items():
        assert torch.equal(layer.get_base_layer().weight, dict(twin.named_modules())[name].weight)
    aware, _ = build("bert", "classification")
    with pytest.raises(ValueError, match="needs a quantization configuration"):
        lora.set_configuration(aware, None)


def test_cache_budget_smaller_than_one_configuration(count_quantizations):
    reference, _ = build("bert", "classification")
    one_matrix = max(w.numel() * w.element_size() for w in reference.full_precision.values())
    for budget in (0, one_matrix):
        model, _ = build("bert", "classification", cache=lora.WeightCache(budget))
        for m in (model, reference):
            perturb_(m)
        ids = tokens()
        for lq in (LOW, HIGH, LOW):
            lora.set_configuration(model, uniform(model, lq))
            lora.set_configuration(reference, uniform(reference, lq))
            torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=0)
            assert model.weight_cache.nbytes <= budget and len(model.weight_cache) < len(model.layout)
        assert model.weight_cache.misses == 3 * len(model.layout)  # evicted, so rebuilt again
        codes = model.weight_cache.codes  # ... from codes kept of the first LOW: quantized once per option
        assert (codes.misses, codes.hits) == (2 * len(model.layout), len(model.layout))


@pytest.mark.parametrize("kind", ["nf", "int"])
def test_weights_rebuilt_from_codes_equal_fresh_quantization(kind, count_quantizations):
    """With no room for weights, every switch rebuilds them from the codes tier, bit for bit what
    fake_quantize gives, in fp32 and bf16, and nothing is quantized twice."""
    cache = lora.WeightCache(0)
    model, _ = build("bert", "classification", cache=cache)
    space = QuantSpace.named(kind)
    options = [next(o for o in space.options() if o.bits == bits) for bits in (2, 8)]  # NF-8 codes reach 255
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        for lq in options:
            for name, original in model.full_precision.items():
                rebuilt = cache.quantized(model.fingerprints[name], original, lq, original.device, dtype)
                assert rebuilt.dtype == dtype and rebuilt.shape == original.shape
                assert torch.equal(rebuilt, fake_quantize(original, lq).to(dtype))
    assert len(count_quantizations) == len(options) * len(model.layout) == len(cache.codes.entries)
    numel = sum(w.numel() for w in model.full_precision.values())
    assert len(cache) == 0 and cache.codes.nbytes == sum(numel * (1 + 4 / o.block_size) for o in options)


# ---- gradients --------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_aware", [True, False])
@pytest.mark.parametrize("family,task_type", CASES)
def test_gradients_reach_lora_head_and_theta_only(family, task_type, config_aware):
    model, _ = build(family, task_type, config_aware=config_aware)
    perturb_(model)
    model.train()
    lora.set_configuration(model, Configuration.random(model.layout, NF, seed=0))
    ids = tokens()
    labels = ids if task_type == "causal-lm" else torch.tensor([0, 1])
    model(input_ids=ids, labels=labels).loss.backward()
    trainable = lora.trainable_parameters(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    if config_aware:
        assert model.theta.gamma.grad.abs() > 0
    frozen = [p for p in model.parameters() if not p.requires_grad]
    frozen += [layer.get_base_layer().weight for layer in model.lora_layers.values()]
    assert all(p.grad is None for p in frozen)


def test_switching_before_backward_keeps_each_forwards_weights():
    """K=2 losses may be summed after both forwards: each graph keeps its own weights and M."""
    def grads(interleaved: bool):
        model, _ = build("llama", "causal-lm")
        perturb_(model)
        ids = tokens()
        losses = []
        for lq in (LOW, HIGH):
            lora.set_configuration(model, uniform(model, lq))
            losses.append(model(input_ids=ids, labels=ids).loss)
            if not interleaved:
                losses.pop().backward()
        if interleaved:
            sum(losses).backward()
        return [p.grad.clone() for p in lora.trainable_parameters(model)]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("config_aware", [True, False])
@pytest.mark.parametrize("family,task_type", CASES)
def test_base_weights_held_in_bf16_change_no_number_under_autocast(family, task_type, config_aware):
    """bf16-autocast loss and gradients are bitwise the same with the frozen weights held in bf16, and
    the block gives back the weights of entry (a switch inside it: the configuration again, in fp32)."""
    def loss_and_grads(hold: bool):
        model, _ = build(family, task_type, config_aware=config_aware)
        perturb_(model)
        model.train()
        configurations = [Configuration.random(model.layout, NF, seed=s) for s in (0, 1)]
        lora.set_configuration(model, configurations[0])
        entry = [layer.get_base_layer().weight for layer in model.lora_layers.values()]
        ids = tokens()
        labels = ids if task_type == "causal-lm" else torch.tensor([0, 1])
        losses = []
        with lora.base_weights_in(model, torch.bfloat16) if hold else contextlib.nullcontext():
            for configuration in configurations:
                lora.set_configuration(model, configuration)
                dtypes = {layer.get_base_layer().weight.dtype for layer in model.lora_layers.values()}
                assert dtypes == {torch.bfloat16 if hold else torch.float32}
                casts = {layer.cast_input_dtype_enabled for layer in model.lora_layers.values()}
                assert casts == {not hold}  # held: no cast of the input to A's fp32 that autocast undoes
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                losses.append(loss.detach())
        weights = [layer.get_base_layer().weight for layer in model.lora_layers.values()]
        assert all(w.dtype == torch.float32 and not w.requires_grad for w in weights)
        assert all(layer.cast_input_dtype_enabled for layer in model.lora_layers.values())
        expected = [model.weight_cache.get((model.fingerprints[name], configurations[1][name], w.device, w.dtype),
                                           lambda: None) for name, w in zip(model.layout.names, weights)]
        assert all(torch.equal(w, e) for w, e in zip(weights, expected))  # the last configuration, in fp32
        assert not any(w is e for w, e in zip(weights, entry))
        return losses, [p.grad.clone() for p in lora.trainable_parameters(model)]

    held, plain = loss_and_grads(True), loss_and_grads(False)
    assert all(torch.equal(a, b) for a, b in zip(held[0], plain[0]))
    assert all(torch.equal(a, b) for a, b in zip(held[1], plain[1]))


def test_base_weights_held_give_back_the_very_weights_of_entry():
    model, _ = build("bert", "classification", config_aware=False)
    configuration = uniform(model, LOW)
    lora.set_configuration(model, configuration)
    name = model.layout.names[0]
    override = torch.zeros_like(model.full_precision[name])
    lora.override_base_weight(model, name, override)  # an LQ-LoRA-style base the block must keep
    entry = [layer.get_base_layer().weight for layer in model.lora_layers.values()]
    with lora.base_weights_in(model, torch.bfloat16):
        assert torch.equal(model.lora_layers[name].get_base_layer().weight, override.to(torch.bfloat16))
    assert all(layer.get_base_layer().weight is w for layer, w in zip(model.lora_layers.values(), entry))


# ---- export -----------------------------------------------------------------------------------------

def assert_round_trip(model, twin, configuration, ids, tmp_path, count_quantizations):
    """materialize -> save_pretrained -> stock PeftModel.from_pretrained on the quantized twin."""
    model.eval()
    lora.set_configuration(model, configuration)
    expected = logits(model, ids)
    count_quantizations.clear()
    adapter = lora.materialize(model, configuration)
    assert count_quantizations == []  # no base weight is quantized by materialize
    peft_keys = get_peft_model_state_dict(model.peft_model, save_embedding_layers=False)
    assert {k: v.shape for k, v in adapter.state_dict.items()} == {k: v.shape for k, v in peft_keys.items()}
    folded = [adapter.state_dict[f"base_model.model.{name}.lora_A.weight"] for name in model.layout.names]
    assert not any(torch.allclose(a, layer.lora_A[lora.ADAPTER].weight)
                   for a, layer in zip(folded, model.lora_layers.values()))

    adapter.save_pretrained(tmp_path / "adapter")
    base = lora.quantize_weights_(twin, configuration)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-5)
    with loaded.disable_adapter():  # the adapter is what makes them agree
        assert (logits(loaded, ids) - expected).abs().max() > 1e-3
    saved = (tmp_path / "adapter" / lora.CONFIGURATION_FILE).read_text()
    assert Configuration.from_json(saved, model.layout) == configuration


@pytest.mark.parametrize("family,task_type", CASES)
def test_materialize_round_trip_tiny(family, task_type, tmp_path, count_quantizations):
    model, twin = build(family, task_type)
    perturb_(model)
    assert_round_trip(model, twin, Configuration.random(model.layout, NF, seed=4), tokens(), tmp_path,
                      count_quantizations)


def test_materialize_round_trip_minilm(tmp_path, count_quantizations):
    torch.manual_seed(0)
    backbone, tokenizer = models.load_backbone("minilm-l6", num_labels=2)
    twin = copy.deepcopy(backbone)
    model = lora.build_lora_model(backbone, models.matrix_layout(backbone, "minilm-l6"), NF)
    perturb_(model)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B[lora.ADAPTER].weight.mul_(0.1)
    ids = tokenizer(["a gripping, beautifully acted film", "flat and tedious"], padding=True,
                    return_tensors="pt")["input_ids"]
    # Mixed per-matrix choices; block size 64 only, as smaller blocks take seconds to quantize on MiniLM.
    fast = QuantSpace(name="nf-b64", kind="nf", block_size=(64,))
    assert_round_trip(model, twin, Configuration.random(model.layout, fast, seed=5), ids, tmp_path,
                      count_quantizations)


def test_materialize_plain_lora_is_its_own_adapter():
    model, _ = build("bert", "classification", config_aware=False)
    perturb_(model)
    adapter = lora.materialize(model, uniform(model, LOW))
    for name, layer in model.lora_layers.items():
        assert torch.equal(adapter.state_dict[f"base_model.model.{name}.lora_A.weight"],
                           layer.lora_A[lora.ADAPTER].weight)


# ---- helpers for the training engine -------------------------------------------------------------

def test_deepcopy_is_an_independent_model():
    model, _ = build("llama", "causal-lm")
    perturb_(model)
    lora.set_configuration(model, uniform(model, LOW))
    ids = tokens()
    before = logits(model, ids)
    clone = copy.deepcopy(model)
    lora.set_configuration(clone, uniform(clone, HIGH))
    assert all(v.adjustments is clone._adjustments
               for layer in clone.lora_layers.values() for v in layer.lora_variant.values())
    assert not torch.equal(logits(clone, ids), before)
    assert torch.equal(logits(model, ids), before)


def test_adapter_state_round_trip():
    model, _ = build("bert", "classification")
    state = lora.adapter_state(model)
    perturb_(model)
    lora.load_adapter_state(model, state)
    assert all(torch.equal(state[n], p) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="does not fit this model"):
        lora.load_adapter_state(model, {k: v for k, v in list(state.items())[1:]})


# ---- bad inputs --------------------------------------------------------------------------------------

def test_bad_inputs():
    model, _ = build("bert", "classification")
    with pytest.raises(RuntimeError, match="no quantization configuration is set"):
        model(input_ids=tokens())
    other, _ = build("llama", "causal-lm")
    foreign = uniform(other, LOW)
    for call in (lora.set_configuration, lora.materialize):
        with pytest.raises(ValueError, match="'tiny-llama'.*'tiny-bert'"):
            call(model, foreign)
    with pytest.raises(ValueError, match="'tiny-llama'"):
        lora.quantize_weights_(tiny_backbone("bert", "classification"), foreign)
    with pytest.raises(ValueError, match="unknown task type 'TOKEN_CLS'; valid task types: classification, causal-lm"):
        lora.build_lora_model(tiny_backbone("bert", "classification"), model.layout, NF, task_type="TOKEN_CLS")
    with pytest.raises(ValueError, match="does not match this model"):
        lora.build_lora_model(tiny_backbone("qwen2", "causal-lm"), model.layout, NF)
    lora.set_configuration(model, uniform(model, LOW))
    with pytest.raises(NotImplementedError, match="materialize"):
        model.peft_model.merge_and_unload()
    with pytest.raises(RuntimeError, match="call the CoALoRAModel itself"):
        model.peft_model(input_ids=tokens())  # bypasses theta


# ---- bitsandbytes ------------------------------------------------------------------------------------

def test_disable_bnb_cpu_repacking_keeps_gradients():
    """An eval()/no_grad forward must not turn later LoRA gradients to zero
    (docs/measurements.md#bitsandbytes-on-cpu)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            self.down = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    def lora_a_grad(eval_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        net = TwoLayers().to("cpu")  # quantizes
        assert models.disable_bnb_cpu_repacking(net) == 2
        # LoRA on `up` only: its A gets gradient solely through `down`'s 4-bit weight.
        peft_model = get_peft_model(net, LoraConfig(r=4, target_modules=["up"]))
        nn.init.normal_(peft_model.base_model.model.up.lora_B["default"].weight, std=0.1)
        x = torch.randn(8, 64)
        if eval_first:
            peft_model.eval()
            with torch.no_grad():
                peft_model(x)
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                       for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit))
        peft_model.train()
        peft_model(x).pow(2).sum().backward()
        return peft_model.base_model.model.up.lora_A["default"].weight.grad

    after_eval = lora_a_grad(eval_first=True)
    assert after_eval.abs().sum() > 0
    torch.testing.assert_close(after_eval, lora_a_grad(eval_first=False))


def test_bnb_layers_are_rejected_for_fake_quantization():
    bnb = pytest.importorskip("bitsandbytes")
    backbone = tiny_backbone("bert", "classification")
    layout = models.matrix_layout(backbone, "tiny-bert")
    query = backbone.bert.encoder.layer[0].attention.self
    query.query = bnb.nn.Linear4bit(32, 32, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="'bert.encoder.layer.0.attention.self.query' is a Linear4bit"):
        lora.build_lora_model(backbone, layout, NF)


# ---- save and reload ------------------------------------------------------------------------------

@pytest.mark.parametrize("family,task_type", CASES)
@pytest.mark.parametrize("config_aware", [True, False])
def test_saved_model_reloads_with_identical_logits_and_adapter(tmp_path, family, task_type, config_aware):
    model, twin = build(family, task_type, config_aware=config_aware)
    perturb_(model)
    for head in model.heads.values():  # a trained head differs from a fresh one
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.1)
    low, high = uniform(model, LOW), uniform(model, HIGH)
    before = {c.digest(): logits(lora.set_configuration(model, c), tokens()) for c in (low, high)}
    saved = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == sorted([lora.SAVED_CONFIG, lora.SAVED_WEIGHTS])

    reloaded = lora.from_pretrained(twin, saved)
    assert (reloaded.theta is None) == (not config_aware) and reloaded.task_type == task_type
    for c in (low, high):
        assert torch.equal(logits(lora.set_configuration(reloaded, c), tokens()), before[c.digest()])
        a, b = lora.materialize(model, c).state_dict, lora.materialize(reloaded, c).state_dict
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_replaces_an_earlier_one_whole_and_leaves_no_staging(tmp_path):
    model, _ = build("bert", "classification")
    model.save_pretrained(tmp_path / "saved")
    perturb_(model)
    model.save_pretrained(tmp_path / "saved")
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]
    state = lora.load_file(tmp_path / "saved" / lora.SAVED_WEIGHTS)
    name = next(k for k in state if "lora_B" in k)
    assert state[name].abs().sum() > 0  # the perturbed B, not PEFT's zero start


def test_reload_refuses_another_backbone_or_head_or_a_broken_directory(tmp_path):
    model, _ = build("bert", "classification")
    saved = model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="saved from backbone 'tiny-bert'.*load the same backbone"):
        lora.from_pretrained(tiny_backbone("qwen2", "classification"), saved)
    bigger = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="differ first at"):
        lora.from_pretrained(bigger, saved)
    three = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3))
    with pytest.raises(ValueError, match="2-label head.*num_labels=2"):
        lora.from_pretrained(three, saved)
    with pytest.raises(ValueError, match="not a saved CoA-LoRA model"):
        lora.from_pretrained(tiny_backbone("bert", "classification"), tmp_path)
    (saved / lora.SAVED_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lora.from_pretrained(tiny_backbone("bert", "classification"), saved)
