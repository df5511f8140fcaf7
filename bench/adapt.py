"""Adapting to a configuration, on the real MiniLM-L6 at r = 8, 2 CPU cores.

Prints (1) the median time of `materialize` for a configuration never seen before (theta on that
configuration + folding (I + gamma U) A; goal < 10 ms), and separately the time to quantize the base
weights for it; (2) the time of one CoA-LoRA training step (K configurations, already cached, on one
batch of 32 x 64 tokens) relative to K plain LoRA steps on the same batch (goal: theta adds <= 5 %).
Run: `.venv/bin/python bench/adapt.py` on an otherwise idle machine.
"""

import statistics
import time

import torch

from coalora import lora, models
from coalora.allocate import allocate
from coalora.configs import Configuration, QuantSpace

NF = QuantSpace.nf()
K = 2


def build(config_aware: bool):
    torch.manual_seed(0)
    backbone, tokenizer = models.load_backbone("minilm-l6")
    layout = models.matrix_layout(backbone, "minilm-l6")
    return lora.build_lora_model(backbone, layout, NF, rank=8, config_aware=config_aware), tokenizer, layout


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    model, tokenizer, layout = build(config_aware=True)
    fresh = [Configuration.random(layout, NF, seed) for seed in range(60)]
    times = [timed(lambda c=c: lora.materialize(model, c)) for c in fresh]
    print(f"materialize, new configuration: median {statistics.median(times[5:]) * 1e3:.2f} ms "
          f"over {len(times) - 5} configurations (goal < 10 ms)")
    quantize = [timed(lambda c=c: lora.set_configuration(model, c)) for c in fresh[:10]]
    print(f"quantizing the base weights for a new configuration (not part of materialize): "
          f"median {statistics.median(quantize):.2f} s")

    texts = ["a gorgeous, witty, seductive movie that never quite finds its footing"] * 32
    batch = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    batch["labels"] = torch.zeros(32, dtype=torch.long)
    configs = [allocate("minilm-l6", b) for b in (2.5, 3.5)][:K]
    plain, _, _ = build(config_aware=False)

    def step(m, configurations):
        params = lora.trainable_parameters(m)
        m.train()
        for p in params:
            p.grad = None
        for c in configurations:
            lora.set_configuration(m, c)
            m(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)

    for m in (model, plain):
        for c in configs:
            lora.set_configuration(m, c)  # fill the weight caches
        step(m, configs)  # warm-up
    coa = statistics.median(timed(lambda: step(model, configs)) for _ in range(7))
    base = statistics.median(timed(lambda: step(plain, configs)) for _ in range(7))
    print(f"training step with K={K} configurations: CoA-LoRA {coa:.3f} s, {K} plain LoRA steps {base:.3f} s, "
          f"ratio {coa / base:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
