import bitsandbytes.functional as bnbF
import pytest
import torch

from coalora.configs import LayerQuant
from coalora.quant import (_nf_midpoints, block_scales, dequantize, fake_quantize, nf_codebook, nf_index, quantize,
                           storage_bits, to_blocks)


def quantization_error(weight: torch.Tensor, q: LayerQuant) -> float:
    """||W - Q(W)||^2, the reference the cost tables are checked against."""
    return float(((weight.float() - fake_quantize(weight, q).float()) ** 2).sum())

# QLoRA's NF4 levels as published (bitsandbytes' hard-coded table).
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_codebook_equals_qlora():
    torch.testing.assert_close(nf_codebook(4), torch.tensor(QLORA_NF4), rtol=0, atol=1e-6)
    torch.testing.assert_close(nf_codebook(4), bnbF.get_4bit_type("nf4", device="cpu"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_codebook_structure(bits):
    code = nf_codebook(bits)
    assert code.numel() == 2 ** bits
    assert torch.all(code[1:] > code[:-1])
    assert code[0] == -1 and code[-1] == 1
    assert (code == 0).sum() == 1
    assert (code < 0).sum() == 2 ** (bits - 1) - 1 and (code > 0).sum() == 2 ** (bits - 1)
    # Both halves are normal quantiles: level spacing grows away from zero on each side.
    for half in (code[code > 0], -code[code < 0].flip(0)):
        gaps = torch.diff(torch.cat([torch.zeros(1), half]))
        assert torch.all(gaps[1:] >= gaps[:-1] - 1e-6)


def test_nf2_nf3_values_from_method():
    torch.testing.assert_close(nf_codebook(2), torch.tensor([-1, 0, 0.3379, 1.0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(
        nf_codebook(3), torch.tensor([-1, -0.4786, -0.2171, 0, 0.1609, 0.3379, 0.5626, 1.0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bits", range(2, 9))
def test_nf_index_is_bucketize_exactly(bits):
    """The cell lookup counts the same midpoints as a binary search, at the midpoints themselves,
    at their float neighbours, at +-1, +-0 and beyond, and on a dense random sample."""
    mids = _nf_midpoints(bits)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    edges = torch.tensor([-1.0, 1.0, 0.0, -0.0, -1.5, 1.5, -1e-30, 1e-30, -1e30, 1e30])
    grid = torch.linspace(-1.01, 1.01, 200_003)
    x = torch.cat([mids, mids.nextafter(up), mids.nextafter(down), edges, grid,
                   torch.randn(100_000, generator=torch.Generator().manual_seed(bits)) / 3])
    assert torch.equal(nf_index(x, bits), torch.bucketize(x, mids, out_int32=True))
    block = x[:7000].view(-1, 7)
    assert torch.equal(nf_index(block, bits), torch.bucketize(block, mids, out_int32=True))


def bucketize_fake_quantize(weight: torch.Tensor, q: LayerQuant) -> torch.Tensor:
    """fake_quantize as first written: binary search for the NF level, rounding for INT, no stored codes."""
    blocks = to_blocks(weight, q.block_size)
    scales = block_scales(weight, q)[:, None]
    normalized = blocks / torch.where(scales > 0, scales, torch.ones_like(scales))
    if q.kind == "nf":
        levels = nf_codebook(q.bits)[torch.bucketize(normalized, _nf_midpoints(q.bits))]
    else:
        m = 2 ** (q.bits - 1) - 1
        levels = torch.clamp(torch.round(normalized * m), -m - 1, m) / m
    return (levels * scales).reshape(-1)[: weight.numel()].view(weight.shape).to(weight.dtype)


@pytest.mark.parametrize("kind", ["nf", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_rebuild_the_bucketize_quantizer_exactly(kind, bits):
    """quantize + dequantize (what fake_quantize and the weight cache's codes do) equal the direct
    formula, with padding, an all-zero block, values at the scale and a bf16 weight; NF-8 and INT-8
    use the whole byte; the codes take 1 + 4 / B0 bytes a weight."""
    generator = torch.Generator().manual_seed(bits)
    for shape in [(7, 13), (33, 64)]:
        weight = torch.randn(shape, generator=generator) * 0.02
        weight.view(-1)[:64] = 0  # whole blocks of zeros: zero scales
        for dtype in (torch.float32, torch.bfloat16):
            for block_size in (16, 64):
                q = LayerQuant(kind=kind, bits=bits, block_size=block_size)
                w = weight.to(dtype)
                codes = quantize(w, q)
                assert codes.index.dtype == (torch.uint8 if kind == "nf" else torch.int8)
                assert codes.nbytes == codes.index.numel() * (1 + 4 / block_size)
                expected = bucketize_fake_quantize(w, q)
                assert torch.equal(dequantize(codes, dtype), expected)
                assert torch.equal(fake_quantize(w, q), expected)
    if bits == 8:  # the extreme codes survive the byte
        codes = quantize(torch.linspace(-1, 1, 4096).view(64, 64), LayerQuant(kind=kind, bits=8, block_size=64))
        index = codes.index.to(torch.int32)
        assert int(index.max()) == (255 if kind == "nf" else 127)
        assert int(index.min()) in ((0,) if kind == "nf" else (-128, -127))  # rounded scales may push past -1


@pytest.mark.parametrize("source", ["normal", "minilm"])
def test_nf4_block64_matches_bitsandbytes(source, minilm_weights):
    if source == "normal":
        weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    else:
        weight = minilm_weights["encoder.layer.0.intermediate.dense"].float()
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    reference = bnbF.dequantize_4bit(packed, state, blocksize=64, quant_type="nf4")
    ours = fake_quantize(weight, LayerQuant(bits=4, block_size=64), quantize_scales=False)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 * weight.abs().max().item())


@pytest.mark.parametrize("kind", ["nf", "int"])
def test_error_strictly_decreases_with_bits_on_minilm(kind, minilm_weights):
    for name in ["encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense"]:
        weight = minilm_weights[name]
        errors = [quantization_error(weight, LayerQuant(kind=kind, bits=b)) for b in (2, 3, 4, 8)]
        assert all(a > b for a, b in zip(errors, errors[1:])), (name, errors)


def test_error_decreases_with_scale_bits_and_smaller_blocks(minilm_weights):
    weight = minilm_weights["encoder.layer.2.attention.self.key"]
    by_scale_bits = [quantization_error(weight, LayerQuant(scale_bits=b)) for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(by_scale_bits, by_scale_bits[1:]))
    by_block = [quantization_error(weight, LayerQuant(block_size=b)) for b in (64, 32, 16)]
    assert all(a > b for a, b in zip(by_block, by_block[1:]))


@pytest.mark.parametrize(("lq", "expected"), [
    (LayerQuant("nf", 4, 8, "fp32", 64, 256), 4.126953125),
    (LayerQuant("nf", 3, 8, "fp32", 64, 256), 3.126953125),
    (LayerQuant("nf", 2, 2, "bf16", 64, 256), 2.0322265625),
    (LayerQuant("int", 8, 8, "fp32", 16, 16), 8.625),
    (LayerQuant("nf", 4, 4, "fp16", 32, 64), 4 + 4 / 32 + 16 / (32 * 64)),
])
def test_storage_bits_of_known_configurations(lq, expected):
    assert storage_bits(lq) == pytest.approx(expected, abs=1e-12)
    assert lq.storage_bits == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", [(7, 13), (3, 64), (1, 5000), (65, 33)])
@pytest.mark.parametrize("kind", ["nf", "int"])
def test_padding_keeps_shape_dtype_and_is_finite(shape, kind):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = fake_quantize(weight, LayerQuant(kind=kind, bits=3, block_size=16, group_size=16))
    assert out.shape == weight.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert (out.float() - weight.float()).abs().max() <= weight.float().abs().max()


def test_zero_and_repeated_input_are_exact_and_deterministic():
    lq = LayerQuant(bits=2, scale_bits=2)
    assert torch.equal(fake_quantize(torch.zeros(8, 64), lq), torch.zeros(8, 64))
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fake_quantize(weight, lq), fake_quantize(weight, lq))


def test_block_extremes_survive_without_scale_quantization():
    # Each block's absmax element maps to code level +-1 times its scale, i.e. exactly itself.
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    out = fake_quantize(weight, LayerQuant(bits=2, block_size=64), quantize_scales=False)
    idx = weight.abs().argmax(dim=1)
    rows = torch.arange(16)
    torch.testing.assert_close(out[rows, idx], weight[rows, idx])


@pytest.mark.parametrize("scale_bits", [2, 3, 4, 8])
def test_double_quantized_scales_take_at_most_2_to_b0_values_per_group(scale_bits):
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    lq = LayerQuant(bits=4, scale_bits=scale_bits, block_size=16, group_size=64)
    scales = block_scales(weight, lq).view(-1, 64)
    exact = block_scales(weight, lq, quantize_scales=False)
    assert scales.min() >= exact.min() - 1e-7
    for group in scales:
        assert torch.unique(group).numel() <= 2 ** scale_bits


def test_int2_is_ternary_per_block():
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    lq = LayerQuant(kind="int", bits=2, block_size=64)
    out = fake_quantize(weight, lq).view(-1, 64)
    scales = block_scales(weight, lq)
    for block, s in zip(out, scales):
        levels = torch.unique(block / s)
        assert set(levels.round().tolist()) <= {-2.0, -1.0, 0.0, 1.0}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_not_spread(value):
    weight = torch.randn(8, 16)
    weight[3, 5] = value
    with pytest.raises(ValueError, match=r"shape \(8, 16\) with 1 NaN or infinite entries"):
        fake_quantize(weight, LayerQuant())


def test_a_weight_beyond_float32_is_refused():
    weight = torch.randn(8, 16, dtype=torch.float64)
    weight[0, 0] = 1e300  # finite in float64, infinite once blocked in float32
    with pytest.raises(ValueError, match=r"with 1 NaN or infinite entries \(in float32\)"):
        fake_quantize(weight, LayerQuant())


def test_an_empty_weight_is_refused():
    with pytest.raises(ValueError, match=r"empty weight \(shape \(0, 16\)\)"):
        fake_quantize(torch.empty(0, 16), LayerQuant())
