"""Backbone registry, loading and the quantized-matrix layout.

Layout rules are checked on tiny randomly initialised models of every family (the only place random
models are allowed); the real offline backbones are checked on the fetched assets.
"""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, Gemma2Config,
                          GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, MPNetConfig, Qwen2Config,
                          RobertaConfig)

from coalora import assets, models
from coalora.configs import MatrixSpec

H, I, LAYERS = 32, 64, 2
TYPES = {
    "bert": ["query", "key", "value", "attention.output", "intermediate", "output"],
    "roberta": ["query", "key", "value", "attention.output", "intermediate", "output"],
    "mpnet": ["q", "k", "v", "o", "intermediate", "output"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    **dict.fromkeys(("qwen2", "mistral", "gemma", "gemma2"),
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
DECODERS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig,
            "gemma2": Gemma2Config}
# (out, in) per module type for the tiny configs below: 4 heads, 2 KV heads of dim 8 for llama/qwen2.
SHAPES = {
    "encoder": [(H, H)] * 4 + [(I, H), (H, I)],
    "causal": [(H, H), (16, H), (16, H), (H, H), (I, H), (I, H), (H, I)],
}
NEVER = ("embed", "pooler", "classifier", "score", "lm_head")


def tiny_model(family: str, head: str = "default", layers: int = LAYERS) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=I)
    if family in DECODERS:
        config = DECODERS[family](num_key_value_heads=2, head_dim=H // 4, **common)
        auto = AutoModelForSequenceClassification if head == "classification" else AutoModelForCausalLM
    else:
        config = {"bert": BertConfig, "roberta": RobertaConfig, "mpnet": MPNetConfig}[family](**common)
        auto = AutoModelForSequenceClassification
    return auto.from_config(config).eval()


def arch(family: str) -> str:
    return "causal" if family in DECODERS else "encoder"


CASES = [("bert", "default"), ("roberta", "default"), ("mpnet", "default"),
         ("llama", "default"), ("qwen2", "default"), ("llama", "classification"), ("qwen2", "classification"),
         ("mistral", "default"), ("gemma", "default"), ("gemma2", "classification")]


# ---- registry ------------------------------------------------------------------------------------

def test_registry_names_and_labels():
    offline = {n for n, s in models.BACKBONES.items() if s.offline}
    assert offline == {"minilm-l6", "mpnet-base", "smollm2-135m", "qwen2.5-coder-1.5b"}
    assert {n for n in models.BACKBONES if n not in offline} == {"roberta-large", "qwen2.5-1.5b", "qwen2.5-3b",
                                                                 "llama-2-7b"}
    for spec in models.BACKBONES.values():
        assert spec.family in models.FAMILIES and spec.architecture in ("encoder", "decoder")
        assert ("stands in for" in spec.label) == (spec.stands_in_for is not None) == spec.offline
        if spec.stands_in_for:
            assert not models.BACKBONES[spec.stands_in_for].offline
    assert "GGUF" in models.BACKBONES["smollm2-135m"].label
    assert models.BACKBONES["qwen2.5-coder-1.5b"].dtype == torch.bfloat16
    assert models.BACKBONES["minilm-l6"].dtype == torch.float32


# ---- layout on tiny models -----------------------------------------------------------------------

@pytest.mark.parametrize("family,head", CASES)
def test_layout_of_every_family(family, head):
    model = tiny_model(family, head)
    assert models.family_of(model) == family
    layout = models.matrix_layout(model, f"tiny-{family}")
    types = TYPES[family]
    assert len(layout) == LAYERS * len(types)
    assert [m.block for m in layout.matrices] == [b for b in range(LAYERS) for _ in types]
    assert [m.module_type for m in layout.matrices] == types * LAYERS
    assert [m.shape for m in layout.matrices] == SHAPES[arch(family)] * LAYERS
    linears = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for m in layout.matrices:
        assert tuple(linears[m.name]) == m.shape
        assert not any(word in m.name for word in NEVER)
    # every linear left out is outside the transformer blocks (head, pooler, lm_head)
    assert all(any(word in n for word in NEVER) for n in set(linears) - set(layout.names))
    assert list(models.quantized_linears(model)) == list(layout.names)


def test_block_index_parses_multi_digit_layers():
    for family in ("bert", "llama"):  # layer.N. and layers.N. naming
        layout = models.matrix_layout(tiny_model(family, layers=12), "tiny")
        assert layout.n_blocks == 12
        assert [m.block for m in layout.matrices][-1] == 11
        assert all(f"layer{'s' if family == 'llama' else ''}.{m.block}." in m.name for m in layout.matrices)


@pytest.mark.parametrize("family,head", CASES)
def test_peft_targets_wrap_exactly_the_layout(family, head):
    model = tiny_model(family, head)
    layout = models.matrix_layout(model, "tiny")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=models.lora_target_modules(family)))
    wrapped = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert wrapped == list(layout.names)
    # the PeftModel reports the plain model's names, and the LoRA layers as modules
    linears = models.quantized_linears(peft_model)
    assert list(linears) == list(layout.names)
    assert all(isinstance(m, LoraLayer) for m in linears.values())
    assert models.matrix_layout(peft_model, "tiny") == layout
    assert models.family_of(peft_model) == family


def test_bitsandbytes_4bit_layout(tmp_path):
    from transformers import BitsAndBytesConfig
    import bitsandbytes as bnb

    fp = tiny_model("roberta")
    fp.save_pretrained(tmp_path)
    q = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["classifier"]))
    layout = models.matrix_layout(q, "tiny")
    assert layout == models.matrix_layout(fp, "tiny")  # shapes from in/out_features, not packed weights
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in models.quantized_linears(q).values())


def test_layout_errors():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(ValueError, match="'gpt2'.*bert, roberta, mpnet, llama, qwen2"):
        models.family_of(gpt2)
    with pytest.raises(ValueError, match="'t5'.*supported families"):
        models.lora_target_modules("t5")
    with pytest.raises(ValueError, match="'mpnet' model but backbone 'minilm-l6' is 'bert'"):
        models.matrix_layout(tiny_model("mpnet"), "minilm-l6")


def test_lora_targets_are_suffixes_not_bare_dense():
    for family in models.FAMILIES:
        targets = models.lora_target_modules(family)
        assert "dense" not in targets
        targets.append("mutated")  # a copy: callers cannot change the table
        assert "mutated" not in models.lora_target_modules(family)


# ---- loading: bad inputs -------------------------------------------------------------------------

def test_load_backbone_bad_inputs():
    with pytest.raises(ValueError, match="'bert-base'.*minilm-l6.*llama-2-7b"):
        models.load_backbone("bert-base")
    with pytest.raises(ValueError, match="'minilm-l6' \\(encoder\\).*'causal-lm'.*classification"):
        models.load_backbone("minilm-l6", "causal-lm")
    with pytest.raises(ValueError, match="'seq2seq'.*classification, causal-lm"):
        models.load_backbone("smollm2-135m", "seq2seq")


def test_hub_backbone_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"(?s)'llama-2-7b'.*model hub.*'paper'.*HF_HUB_OFFLINE.*minilm-l6"):
        models.load_backbone("llama-2-7b", "causal-lm")


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    from transformers import AutoTokenizer

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(RuntimeError, match=r"(?s)'roberta-large'.*model hub.*couldn't connect.*smollm2-135m"):
        models.load_backbone("roberta-large")


# ---- real offline backbones ----------------------------------------------------------------------

def test_a_local_folder_is_a_backbone_with_its_family_and_its_own_cache_identity(tmp_path):
    folder = tmp_path / "my-minilm"
    folder.mkdir()
    for f in assets.path("minilm-l6").iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    spec = models.backbone_spec(str(folder))
    assert (spec.family, spec.architecture, spec.offline, spec.folder) == ("bert", "encoder", True, str(folder))
    identity = spec.cache_id
    assert identity.startswith("bert-") and "/" not in identity
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert models.backbone_spec(str(moved)).cache_id == identity  # the same model, by content
    moved.rename(folder)
    model, _ = models.load_backbone(str(folder), num_labels=3)
    reference, _ = models.load_backbone("minilm-l6", num_labels=3)
    layout = models.matrix_layout(model, str(folder))
    assert [(m.name, m.shape) for m in layout.matrices] == \
           [(m.name, m.shape) for m in models.matrix_layout(reference, "minilm-l6").matrices]
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                       reference.bert.encoder.layer[0].attention.self.query.weight)
    from coalora.experiments import RunSpec

    run = RunSpec(preset="smoke", task="sst2", method="qlora", backbone=str(folder))
    before = run.key()
    config = json.loads((folder / "config.json").read_text()) | {"hidden_dropout_prob": 0.2}
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    assert models.backbone_spec(str(folder)).cache_id != identity and run.key() != before  # edited: new


def test_backbones_that_cannot_be_resolved_say_why(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="has no config.json.*minilm-l6"):
        models.backbone_spec(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="'gpt2'.*supported families: bert, roberta, mpnet, llama, qwen2, mistral"):
        models.backbone_spec(str(tmp_path))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.backbone_spec(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"(?s)'nobody/no-such-model'.*HF_HUB_OFFLINE.*minilm-l6.*local"):
        models.backbone_spec("nobody/no-such-model")


def test_minilm_l6():
    model, tokenizer = models.load_backbone("minilm-l6", num_labels=3)
    assert not model.training and model.device.type == "cpu" and model.dtype == torch.float32
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    layout = models.matrix_layout(model, "minilm-l6")
    assert len(layout) == 36 and layout.n_blocks == 6
    assert int(layout.numels.sum()) == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert layout.module_types == tuple(TYPES["bert"])
    batch = tokenizer(["a fine film", "a dull one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_smollm2_135m():
    model, tokenizer = models.load_backbone("smollm2-135m", "causal-lm")
    assert not model.training and model.device.type == "cpu"
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    layout = models.matrix_layout(model, "smollm2-135m")
    assert len(layout) == 30 * 7 and layout.n_blocks == 30
    assert layout.matrices[:7] == tuple(
        MatrixSpec(f"model.layers.0.{part}", shape, 0, part.split(".")[1]) for part, shape in (
            ("self_attn.q_proj", (576, 576)), ("self_attn.k_proj", (192, 576)), ("self_attn.v_proj", (192, 576)),
            ("self_attn.o_proj", (576, 576)), ("mlp.gate_proj", (1536, 576)), ("mlp.up_proj", (1536, 576)),
            ("mlp.down_proj", (576, 1536))))
    assert "lm_head" in dict(model.named_modules()) and "lm_head" not in layout.names


@pytest.mark.parametrize("name,task_type,n_matrices", [("mpnet-base", "classification", 12 * 6),
                                                        ("qwen2.5-coder-1.5b", "causal-lm", 28 * 7)])
def test_large_backbones(name, task_type, n_matrices):
    if not assets.is_present(name):
        pytest.skip(f"large asset {name!r} not fetched (python -m coalora.assets fetch --large)")
    model, _ = models.load_backbone(name, task_type)
    assert model.dtype == models.BACKBONES[name].dtype
    assert len(models.matrix_layout(model, name)) == n_matrices


# The paper's matrix counts and RoBERTa-Large / LLaMA-2-7B quantized numel (docs/method.md#storage-bits),
# from the published architectures on the meta device (no weights are created).
PAPER_ARCHS = [
    ("roberta-large", RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096), 144, 301_989_888),
    ("qwen2.5-1.5b", Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2), 196, None),
    ("qwen2.5-3b", Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                               num_attention_heads=16, num_key_value_heads=2), 252, None),
    ("llama-2-7b", LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32), 224, 6_476_005_376),
]


@pytest.mark.parametrize("name,config,n_matrices,numel", PAPER_ARCHS, ids=[a[0] for a in PAPER_ARCHS])
def test_paper_backbones_match_the_papers_counts(name, config, n_matrices, numel):
    auto = AutoModelForSequenceClassification if config.model_type == "roberta" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    layout = models.matrix_layout(model, name)
    assert len(layout) == n_matrices
    if numel is not None:
        assert int(layout.numels.sum()) == numel


# ---- dropout masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_packed_masks_drop_at_rate_p_in_every_lane_and_repeat_under_a_seed(p):
    torch.manual_seed(0)
    keep = models.packed_keep_mask((1 << 20,), p)
    torch.manual_seed(0)
    assert torch.equal(keep, models.packed_keep_mask((1 << 20,), p))
    assert not torch.equal(keep, models.packed_keep_mask((1 << 20,), p))  # the generator moved on
    sigma = (p * (1 - p) / (1 << 18)) ** 0.5  # per lane: a quarter of the draws
    for lane in range(4):  # the four 16-bit uniforms of each 64-bit draw
        assert abs((~keep.view(-1, 4)[:, lane]).float().mean().item() - p) < 5 * sigma


def test_packed_dropout_keeps_the_mean_and_is_off_in_eval_mode():
    layer = models.PackedDropout(0.25)
    x = torch.ones(256, 1024)
    torch.manual_seed(0)
    y = layer(x)
    assert torch.equal(y.unique(), torch.tensor([0.0, 4 / 3]))
    assert abs(y.mean().item() - 1) < 0.01
    assert torch.equal(layer.eval()(x), x)


def test_packed_dropout_edges():
    x = torch.ones(4, 8)
    assert torch.equal(models.packed_dropout(x, 2**-18), x)  # rounds to no level dropped
    assert torch.equal(models.packed_dropout(x, 1.0), torch.zeros(4, 8))


class _Attention(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


def test_packed_attention_drops_probabilities_at_rate_p_and_leaves_causal_attention_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q = torch.zeros(8, 4, 64, 2)  # equal scores: every weight 1/64, so each output is the kept share, scaled
    v = torch.ones(8, 4, 64, 2)
    torch.manual_seed(0)
    out, _ = models._packed_attention(_Attention(False), q, q, v, None, dropout=0.25, scaling=1.0)
    assert out.shape == (8, 64, 4, 2)
    assert abs(out.mean().item() - 1) < 0.01 and out.std().item() > 0.05  # mean kept, masks drawn
    for module, kwargs in ((_Attention(True), {}), (_Attention(False), {"is_causal": True})):
        torch.manual_seed(0)
        packed, _ = models._packed_attention(module, q, q, v, None, dropout=0.25, scaling=1.0, **kwargs)
        torch.manual_seed(0)
        sdpa, _ = sdpa_attention_forward(module, q, q, v, None, dropout=0.25, scaling=1.0, **kwargs)
        assert torch.equal(packed, sdpa)


def tiny_bert(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=I, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")


PADDED = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])}


def test_packed_attention_is_sdpa_when_nothing_is_dropped():
    """A p that rounds to no drop runs the packed math path: it must give SDPA's output, padding included."""
    packed, plain = tiny_bert(1e-9), tiny_bert(1e-9)
    assert models.set_mask_draw(packed, "packed") == 1 + 3 * LAYERS + 1  # embeddings, 3 per block, head
    assert packed.config._attn_implementation == models.PACKED_ATTENTION
    torch.testing.assert_close(packed.train()(**PADDED).logits, plain.train()(**PADDED).logits)


def test_mask_draw_changes_training_forwards_only_and_switches_back():
    packed, plain = tiny_bert(0.3), tiny_bert(0.3)
    models.set_mask_draw(packed, "packed")
    assert torch.equal(packed.eval()(**PADDED).logits, plain.eval()(**PADDED).logits)
    outputs = {}
    for name, model in (("packed", packed.train()), ("torch", plain.train())):
        torch.manual_seed(1)
        outputs[name] = model(**PADDED).logits
        torch.manual_seed(1)
        assert torch.equal(outputs[name], model(**PADDED).logits)  # seeded masks repeat
    assert not torch.equal(outputs["packed"], outputs["torch"])
    models.set_mask_draw(packed, "torch")
    assert packed.config._attn_implementation == "sdpa"
    assert all(type(m) is nn.Dropout for m in packed.modules() if isinstance(m, nn.Dropout))
    torch.manual_seed(1)
    assert torch.equal(packed(**PADDED).logits, outputs["torch"])
    with pytest.raises(ValueError, match="mask draw 'fast'.*packed"):
        models.set_mask_draw(packed, "fast")
