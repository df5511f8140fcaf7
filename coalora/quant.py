"""Block-wise NF-k / INT-k fake quantization with double-quantized scales (docs/method.md#quantizer).

Stateless functions in the HQQ manner: every function takes a weight tensor and a per-matrix
quantization description `q` (anything with the fields kind, bits, scale_bits, scale_dtype,
block_size, group_size, e.g. `coalora.configs.LayerQuant`) and returns tensors. "Fake" quantization
returns the dequantized weight, which is all training and evaluation need; `storage_bits` says what
the packed form would cost.

Pipeline for a weight W (flattened row-major, zero-padded to whole blocks):
    blocks  [n_blocks, B0]     first-level blocks of B0 consecutive weights
    s       [n_blocks]         absmax per block
    s_hat   [n_blocks]         s double-quantized: offset o = min(s); (s - o) in groups of B1 blocks
                               is stored as unsigned b0-bit integers against a per-group maximum
                               rounded to dtype b1
    W_hat = code(W / s_hat) * s_hat, code = nearest NF-k level (the count of level midpoints below W / s_hat)
            or symmetric INT-k rounding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
from scipy.stats import norm

SCALE_DTYPE_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}
_SCALE_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# QLoRA's NF offset: the outermost quantile, so that +-1 are the extreme levels.
NF_OFFSET = 0.9677083


class QuantParams(Protocol):
    kind: str
    bits: int
    scale_bits: int
    scale_dtype: str
    block_size: int
    group_size: int


def storage_bits(q: QuantParams) -> float:
    """Bits per weight: b + b0/B0 + bits(b1)/(B0*B1) (docs/method.md#storage-bits; the per-tensor offset is ignored)."""
    return q.bits + q.scale_bits / q.block_size + SCALE_DTYPE_BITS[q.scale_dtype] / (q.block_size * q.group_size)


@functools.lru_cache(maxsize=None)
def nf_codebook(bits: int) -> torch.Tensor:
    """The 2**bits NormalFloat levels in [-1, 1], sorted, with an exact 0 (QLoRA's construction,
    generalised to k bits): 2**(k-1) positive and 2**(k-1) - 1 negative normal quantiles."""
    if bits < 2:
        raise ValueError(f"NF codes need at least 2 bits, got bits={bits}")
    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1].numpy())
    values = torch.tensor([*negative, 0.0, *positive], dtype=torch.float64).sort().values
    return (values / values.max()).to(torch.float32)


@functools.lru_cache(maxsize=None)
def _nf_midpoints(bits: int) -> torch.Tensor:
    code = nf_codebook(bits)
    return (code[1:] + code[:-1]) / 2


# The NF level index is looked up rather than binary-searched: [-1, 1] is cut into _NF_CELLS equal
# cells, each cell stores how many midpoints lie below it and the one midpoint that may lie inside,
# and one comparison finishes the count. Same index as torch.bucketize for every non-NaN float (a
# test checks all NF-k at the midpoints and their neighbours); 3 x faster for NF-4, 8 x for NF-8
# (bench/quant.py).
# 4096 cells keep at most one NF-8 midpoint within a cell and its two neighbours (NF-8's closest
# midpoints are 0.005 apart, three cells 0.0015), so rounding in the cell arithmetic cannot matter.
_NF_CELLS = 4096


@functools.lru_cache(maxsize=None)
def _nf_cells(bits: int, device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints below each cell [C] int32, the next midpoint [C] float32; +inf past the last), on `device`."""
    mids = _nf_midpoints(bits)
    width = 2 / _NF_CELLS
    lower = torch.arange(_NF_CELLS, dtype=torch.float64) * width - 1
    below = torch.searchsorted(mids.double(), lower - width, right=True)     # surely below any x of the cell
    above = torch.searchsorted(mids.double(), lower + 2 * width, right=True)
    if int((above - below).max()) > 1:
        raise AssertionError(f"NF-{bits} has two midpoints within three of {_NF_CELLS} cells: use more cells")
    following = torch.cat([mids, torch.tensor([float("inf")])])[below]
    return below.to(device, torch.int32), following.to(device)  # int32: adding to int64 is 7 x slower on a CPU


def nf_index(normalized: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest NF-k level for each value (int32, same shape): the number of level
    midpoints strictly below it, which is torch.bucketize(normalized, midpoints, out_int32=True).
    NaN has no index: callers refuse non-finite weights first."""
    below, following = _nf_cells(bits, normalized.device)
    flat = normalized.reshape(-1)
    cell = ((flat + 1) * (_NF_CELLS / 2)).clamp_(0, _NF_CELLS - 1).to(torch.int32)  # truncation = floor for >= 0
    index = below.index_select(0, cell) + (flat > following.index_select(0, cell)).to(torch.int32)
    return index.view(normalized.shape)


def to_blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten row-major and zero-pad to whole blocks: [n_blocks, block_size] float32."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def double_quantize_scales(scales: torch.Tensor, scale_bits: int, scale_dtype: str, group_size: int) -> torch.Tensor:
    """Dequantized first-level scales after storing them as unsigned `scale_bits` integers.

    scales [n_blocks] -> [n_blocks]. The offset o = min(scales) is subtracted; each group of
    `group_size` centred scales is divided by its maximum a_g (rounded to `scale_dtype`), rounded to
    one of 2**scale_bits - 1 steps, and mapped back: q * a_g / (2**b0 - 1) + o.
    """
    offset = scales.min()
    centred = scales - offset
    pad = (-centred.numel()) % group_size
    groups = torch.nn.functional.pad(centred, (0, pad)).view(-1, group_size)          # [G, B1]
    group_max = groups.amax(dim=1, keepdim=True).to(_SCALE_TORCH_DTYPES[scale_dtype]).to(torch.float32)
    levels = 2 ** scale_bits - 1
    safe_max = torch.where(group_max > 0, group_max, torch.ones_like(group_max))
    q = torch.clamp(torch.round(groups * levels / safe_max), 0, levels)
    return (q * group_max / levels + offset).reshape(-1)[: scales.numel()]


def block_scales(weight: torch.Tensor, q: QuantParams, quantize_scales: bool = True) -> torch.Tensor:
    """Per-block scales [n_blocks] used by `fake_quantize`: absmax, double-quantized unless told not to."""
    return _finish_scales(to_blocks(weight, q.block_size).abs().amax(dim=1), q, quantize_scales)


def _finish_scales(absmax: torch.Tensor, q: QuantParams, quantize_scales: bool) -> torch.Tensor:
    return double_quantize_scales(absmax, q.scale_bits, q.scale_dtype, q.group_size) if quantize_scales else absmax


def code_index(normalized: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """The code of each value normalised by its block scale: NF, the index of the nearest NF-k level
    (int32; values beyond +-1 take the end levels); INT, the symmetric integer
    q = clamp(round(x * m), -m - 1, m) with m = 2**(bits-1) - 1 (float32 holding integers; int2 is
    ternary within +-1)."""
    if kind == "nf":
        return nf_index(normalized, bits)
    if kind == "int":
        m = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(normalized * m), -m - 1, m)
    raise ValueError(f"unknown quantization kind {kind!r}; valid kinds: 'nf', 'int'")


def code_values(index: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """The levels in [-1, 1] (float32, same shape) of codes from `code_index`, or of those codes
    stored as integers of any dtype."""
    if kind == "nf":
        code = nf_codebook(bits).to(index.device)
        return code.index_select(0, index.reshape(-1).to(torch.int32)).view(index.shape)
    if kind == "int":
        return index.to(torch.float32) / (2 ** (bits - 1) - 1)
    raise ValueError(f"unknown quantization kind {kind!r}; valid kinds: 'nf', 'int'")


def snap_to_code(normalized: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """Map values normalised by their block scale to the nearest representable level (`code_index`)."""
    return code_values(code_index(normalized, kind, bits), kind, bits)


@dataclass(frozen=True)
class Codes:
    """A weight quantized under `q` as it would be stored: one small integer per weight and the
    dequantized block scales, 1 + 4 / B0 bytes a weight against fp32's 4; `dequantize` rebuilds
    exactly what `fake_quantize` returns."""

    index: torch.Tensor   # [n_blocks, B0] uint8 NF level index, or int8 INT integer (zero padding included)
    scales: torch.Tensor  # [n_blocks] float32, double-quantized unless told not to
    shape: torch.Size     # of the weight
    kind: str
    bits: int

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.scales.numel() * self.scales.element_size()


def quantize(weight: torch.Tensor, q: QuantParams, quantize_scales: bool = True) -> Codes:
    """The codes of `weight` under `q` (see `fake_quantize`)."""
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight (shape {tuple(weight.shape)})")
    blocks = to_blocks(weight, q.block_size)                                      # [n, B0]
    absmax = blocks.abs().amax(dim=1)                                             # [n]
    # amax propagates NaN and inf, so the blocks' maxima check every entry at a fraction of a full pass.
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(blocks)).sum())
        raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)} with {bad} NaN or infinite "
                         f"entries (in float32): check the checkpoint it was loaded from")
    scales = _finish_scales(absmax, q, quantize_scales)                           # [n]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
    index = code_index(blocks / safe, q.kind, q.bits)
    storage = torch.uint8 if q.kind == "nf" else torch.int8                      # NF-8: 0..255; INT-8: -128..127
    return Codes(index.to(storage), scales, weight.shape, q.kind, q.bits)


def dequantize(codes: Codes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fake-quantized weight (codes.shape, `dtype`) the codes stand for."""
    out = code_values(codes.index, codes.kind, codes.bits) * codes.scales[:, None]
    return out.reshape(-1)[: codes.shape.numel()].view(codes.shape).to(dtype)


def fake_quantize(weight: torch.Tensor, q: QuantParams, quantize_scales: bool = True) -> torch.Tensor:
    """The weight after quantizing and dequantizing it under `q`: same shape and dtype as `weight`.

    `quantize_scales=False` keeps fp32 absmax scales (no double quantization), which is what
    bitsandbytes' `quantize_4bit` does without `compress_statistics`. An empty weight, or one with
    NaN or infinite entries (which would spread through their block's scale), is a ValueError.
    """
    return dequantize(quantize(weight, q, quantize_scales), weight.dtype)
