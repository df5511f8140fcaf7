"""Quantizer speed on the real MiniLM-L6 (36 quantized matrices, 10.6M weights).

Prints the seconds to fake-quantize the whole model under one uniform configuration per code and
bit-width, the NF4 ratio to bitsandbytes `quantize_4bit` + `dequantize_4bit` on the same weights
(block 64, with and without double-quantized scales), the NF level lookup against torch.bucketize, a
weight rebuilt from its stored codes against one quantized afresh (what the weight cache's second
tier saves), and the time to build the full NF cost table (every matrix x 432 options). Results:
docs/measurements.md#quantizer.

Run: `.venv/bin/python bench/quant.py` (part of `make bench`); `--quick` times each step once on
two matrices, to check that the benchmark runs.
"""

import argparse
import statistics
import time

import bitsandbytes.functional as bnbF
import torch

from coalora import load_backbone
from coalora.allocation import compute_cost_table
from coalora.configs import LayerQuant, Layout, QuantSpace
from coalora.models import matrix_layout, quantized_linears
from coalora.quant import _nf_midpoints, block_scales, dequantize, fake_quantize, nf_index, quantize, to_blocks


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat on two matrices: checks that it runs")
    args = parser.parse_args()
    repeats = 1 if args.quick else 5

    model, _ = load_backbone("minilm-l6")
    layout = matrix_layout(model, "minilm-l6")
    weights = {name: m.weight.detach() for name, m in quantized_linears(model).items()}
    if args.quick:
        weights = dict(list(weights.items())[:2])
    print(f"MiniLM-L6: {len(weights)} matrices, {sum(w.numel() for w in weights.values()) / 1e6:.2f}M weights, "
          f"torch threads {torch.get_num_threads()}")

    print("\nwhole-model fake quantization, uniform configuration (scale bits 8, fp32, B0 64, B1 256):")
    for kind in ("nf", "int"):
        for bits in (2, 3, 4, 8):
            lq = LayerQuant(kind=kind, bits=bits)
            seconds = median_seconds(lambda: [fake_quantize(w, lq) for w in weights.values()], repeats)
            print(f"  {kind}{bits}: {seconds * 1e3:7.1f} ms")

    print("\nNF4 vs bitsandbytes quantize_4bit + dequantize_4bit (block 64):")
    for double in (False, True):
        ours = median_seconds(lambda: [fake_quantize(w, LayerQuant(bits=4), quantize_scales=double)
                                       for w in weights.values()], repeats)

        def bnb():
            for w in weights.values():
                packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
                bnbF.dequantize_4bit(packed, state, blocksize=64, quant_type="nf4")

        theirs = median_seconds(bnb, repeats)
        label = "double-quantized scales" if double else "fp32 scales            "
        print(f"  {label}: coalora {ours * 1e3:6.1f} ms, bitsandbytes {theirs * 1e3:6.1f} ms, "
              f"ratio {ours / theirs:.2f} (< 1 means coalora is faster)")

    print("\nNF level index of the normalised weights (B0 64): cell lookup vs torch.bucketize:")
    for bits in (2, 4, 8):
        lq = LayerQuant(bits=bits)
        normalized = [to_blocks(w, 64) / block_scales(w, lq).clamp_min(1e-30)[:, None] for w in weights.values()]
        ours = median_seconds(lambda: [nf_index(x, bits) for x in normalized], repeats)
        theirs = median_seconds(lambda: [torch.bucketize(x, _nf_midpoints(bits)) for x in normalized], repeats)
        print(f"  nf{bits}: lookup {ours * 1e3:6.1f} ms, bucketize {theirs * 1e3:6.1f} ms, {theirs / ours:.1f} x faster")

    print("\na weight cache miss: quantized afresh vs rebuilt from its codes (second tier), fp32 and bf16:")
    for kind in ("nf", "int"):
        lq = LayerQuant(kind=kind, bits=4)
        codes = [quantize(w, lq) for w in weights.values()]
        for dtype in (torch.float32, torch.bfloat16):
            afresh = median_seconds(lambda: [fake_quantize(w, lq).to(dtype) for w in weights.values()], repeats)
            rebuilt = median_seconds(lambda: [dequantize(c, dtype) for c in codes], repeats)
            print(f"  {kind}4 {str(dtype)[6:]:8s}: afresh {afresh * 1e3:6.1f} ms, from codes {rebuilt * 1e3:6.1f} ms, "
                  f"{afresh / rebuilt:.1f} x faster; codes {sum(c.nbytes for c in codes) / 2**20:.1f} MiB")

    part = Layout(layout.backbone, layout.matrices[: len(weights)])
    start = time.perf_counter()
    compute_cost_table(weights, part, QuantSpace.nf())
    print(f"\nNF cost table ({len(part)} matrices x 432 options): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
