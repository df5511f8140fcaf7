"""Quantizer speed on the real MiniLM-L6 (36 quantized matrices, 10.6M weights), 2 CPU cores.

Prints: seconds to fake-quantize the whole model under one uniform configuration per bit-width
(NF and INT), the NF4 ratio to bitsandbytes quantize_4bit + dequantize_4bit on the same weights
(same settings: block 64, with and without double-quantized scales), and the time to build the full
cost table (36 matrices x 432 options). Run: `.venv/bin/python bench/quant.py` (or `make bench`).
"""

import statistics
import time

import bitsandbytes.functional as bnbF
import torch

from coalora import allocate, models
from coalora.configs import LayerQuant, QuantSpace
from coalora.quant import fake_quantize


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    model, _ = models.load_backbone("minilm-l6")
    weights = [m.weight.detach() for m in models.quantized_linears(model).values()]
    layout = models.matrix_layout(model, "minilm-l6")
    print(f"MiniLM-L6: {len(weights)} matrices, {sum(w.numel() for w in weights) / 1e6:.2f}M weights, "
          f"torch threads {torch.get_num_threads()}")

    print("\nwhole-model fake quantization, uniform configuration (scale bits 8, fp32, B0 64, B1 256):")
    for kind in ("nf", "int"):
        for bits in (2, 3, 4, 8):
            lq = LayerQuant(kind=kind, bits=bits)
            seconds = median_seconds(lambda: [fake_quantize(w, lq) for w in weights])
            print(f"  {kind}{bits}: {seconds * 1e3:7.1f} ms")

    print("\nNF4 vs bitsandbytes quantize_4bit + dequantize_4bit (block 64):")
    for double in (False, True):
        ours = median_seconds(lambda: [fake_quantize(w, LayerQuant(bits=4), quantize_scales=double) for w in weights])

        def bnb():
            for w in weights:
                packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
                bnbF.dequantize_4bit(packed, state, blocksize=64, quant_type="nf4")

        theirs = median_seconds(bnb)
        label = "double-quantized scales" if double else "fp32 scales            "
        print(f"  {label}: coalora {ours * 1e3:6.1f} ms, bitsandbytes {theirs * 1e3:6.1f} ms, "
              f"ratio {ours / theirs:.2f} (< 1 means coalora is faster)")

    start = time.perf_counter()
    allocate.compute_cost_table(dict(zip(layout.names, weights)), layout, QuantSpace.nf())
    print(f"\nfull NF cost table (36 x 432 options): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
