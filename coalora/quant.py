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
    W_hat = code(W / s_hat) * s_hat, code = nearest NF-k level (bucketize against level midpoints)
            or symmetric INT-k rounding.
"""

from __future__ import annotations

import functools
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
    scales = to_blocks(weight, q.block_size).abs().amax(dim=1)
    if not quantize_scales:
        return scales
    return double_quantize_scales(scales, q.scale_bits, q.scale_dtype, q.group_size)


def snap_to_code(normalized: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """Map values normalised by their block scale to the nearest representable level.

    NF: the nearest NF-k level (values beyond +-1 snap to +-1). INT: symmetric integers
    q = clamp(round(x * m), -m - 1, m) / m with m = 2**(bits-1) - 1 (int2 is ternary).
    """
    if kind == "nf":
        index = torch.bucketize(normalized, _nf_midpoints(bits))
        return nf_codebook(bits)[index]
    if kind == "int":
        m = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(normalized * m), -m - 1, m) / m
    raise ValueError(f"unknown quantization kind {kind!r}; valid kinds: 'nf', 'int'")


def dequantize_blocks(blocks: torch.Tensor, scales: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """blocks [n, B0], scales [n] -> fake-quantized blocks [n, B0]."""
    scales = scales[:, None]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return snap_to_code(blocks / safe, kind, bits) * scales


def fake_quantize(weight: torch.Tensor, q: QuantParams, quantize_scales: bool = True) -> torch.Tensor:
    """The weight after quantizing and dequantizing it under `q`: same shape and dtype as `weight`.

    `quantize_scales=False` keeps fp32 absmax scales (no double quantization), which is what
    bitsandbytes' `quantize_4bit` does without `compress_statistics`. An empty weight, or one with
    NaN or infinite entries (which would spread through their block's scale), is a ValueError.
    """
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight (shape {tuple(weight.shape)})")
    bad = int((~torch.isfinite(weight.detach())).sum())
    if bad:
        raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)} with {bad} NaN or infinite "
                         f"entries: check the checkpoint it was loaded from")
    blocks = to_blocks(weight, q.block_size)
    scales = block_scales(weight, q, quantize_scales)
    out = dequantize_blocks(blocks, scales, q.kind, q.bits)
    return out.reshape(-1)[: weight.numel()].view(weight.shape).to(weight.dtype)
