"""Adapting to a configuration, on the real MiniLM-L6 at r = 8.

Prints (1) the median time of `materialize` for a configuration never seen before (theta on that
configuration + folding (I + gamma U) A into A; goal < 10 ms), and separately the time to quantize
the base weights for it; (2) the time of one CoA-LoRA training step (K = 2 configurations, already
cached, on one batch of 32 x 64 tokens) relative to K plain LoRA steps on the same batch (goal:
theta adds <= 5 %). Results: docs/measurements.md#adapting-to-a-configuration.

Run: `.venv/bin/python bench/adapt.py` on an otherwise idle machine (part of `make bench`);
`--quick` times a few repeats only, to check that the benchmark runs.
"""

import argparse
import statistics
import time

import torch

from coalora import Configuration, QuantSpace, allocate, build_lora_model, load_backbone, materialize, set_configuration
from coalora.lora import trainable_parameters
from coalora.models import matrix_layout

NF = QuantSpace.nf()
K = 2


def build(config_aware: bool):
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone("minilm-l6")
    layout = matrix_layout(backbone, "minilm-l6")
    return build_lora_model(backbone, layout, NF, rank=8, config_aware=config_aware), tokenizer, layout


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few repeats: checks that it runs")
    args = parser.parse_args()
    n_fresh, n_quantize, n_steps = (8, 2, 1) if args.quick else (60, 10, 7)

    model, tokenizer, layout = build(config_aware=True)
    fresh = [Configuration.random(layout, NF, seed) for seed in range(n_fresh)]
    times = [timed(lambda c=c: materialize(model, c)) for c in fresh]
    print(f"materialize, new configuration: median {statistics.median(times[5:]) * 1e3:.2f} ms "
          f"over {len(times) - 5} configurations (goal < 10 ms)")
    quantize = [timed(lambda c=c: set_configuration(model, c)) for c in fresh[:n_quantize]]
    print(f"quantizing the base weights for a new configuration (not part of materialize): "
          f"median {statistics.median(quantize):.2f} s")

    texts = ["a gorgeous, witty, seductive movie that never quite finds its footing"] * 32
    batch = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    batch["labels"] = torch.zeros(32, dtype=torch.long)
    configs = [allocate("minilm-l6", b) for b in (2.5, 3.5)][:K]
    plain, _, _ = build(config_aware=False)

    def step(m, configurations):
        params = trainable_parameters(m)
        m.train()
        for p in params:
            p.grad = None
        for c in configurations:
            set_configuration(m, c)
            m(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)

    for m in (model, plain):
        for c in configs:
            set_configuration(m, c)  # fill the weight caches
        step(m, configs)  # warm-up
    coa = statistics.median(timed(lambda: step(model, configs)) for _ in range(n_steps))
    base = statistics.median(timed(lambda: step(plain, configs)) for _ in range(n_steps))
    print(f"training step with K={K} configurations: CoA-LoRA {coa:.3f} s, {K} plain LoRA steps {base:.3f} s, "
          f"ratio {coa / base:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
