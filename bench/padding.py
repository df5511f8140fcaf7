"""How much of a default training step is spent on padding, and what do length-sorted micro-batches save?

A training batch of 32 RT sentences is padded to its longest sentence, so about half of its tokens are
padding. `coalora.train.micro_batches` splits each batch, sorted by length, into k parts padded on their own;
summing their losses weighted by their share of the batch gives the same loss and gradient (up to rounding;
checked here with dropout off) for fewer tokens. Training uses k = `HyperParams.micro_batches` (2, since run
version 2); with the backbone's dropout on, the random masks differ from the whole batch's.

Times QLoRA training steps of the default preset (MiniLM-L6, batch 32, 2 torch threads) whole and split.
Run: `.venv/bin/python bench/padding.py` on an otherwise idle 2-core machine (about 2 minutes).
"""

import time

import torch
from accelerate import Accelerator

from coalora import lora
from coalora.experiments import RunSpec, _setup, training_configurations
from coalora.train import _backward, micro_batches

STEPS = 12  # timed steps per layout, after one warm-up step
SPLITS = (1, 2, 4)


def padding_share(batches) -> float:
    real = padded = 0
    for batch in batches:
        mask = batch["attention_mask"]
        real, padded = real + int(mask.sum()), padded + mask.numel()
    return 1 - real / padded


def main() -> None:
    torch.set_num_threads(2)
    accelerator = Accelerator(cpu=True)
    spec = RunSpec(preset="default", task="sst2", method="qlora", seed=0).resolved()
    _, _, model, _, loader, _ = _setup(spec)
    lora.set_configuration(model, training_configurations(spec)[0])
    batches = [b for _, b in zip(range(STEPS + 1), loader)]
    print(f"padding: {padding_share(loader):.0%} of the tokens of an epoch's training batches")

    model.eval()  # dropout off: the split must not change the gradient
    params = lora.trainable_parameters(model)
    grads = {}
    for k in SPLITS:
        model.zero_grad(set_to_none=True)
        _backward(model, accelerator, micro_batches(batches[0], k))
        grads[k] = torch.cat([p.grad.reshape(-1) for p in params])
    for k in SPLITS[1:]:
        rel = (grads[k] - grads[1]).norm() / grads[1].norm()
        print(f"k={k}: gradient differs from the whole batch's by {rel:.1e} (relative, dropout off)")

    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    base = None
    for k in SPLITS:
        start = None
        for i, batch in enumerate(batches):
            if i == 1:
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            _backward(model, accelerator, micro_batches(batch, k))
            optimizer.step()
        seconds = (time.perf_counter() - start) / STEPS
        base = base or seconds
        print(f"k={k}: {seconds:.3f} s/step ({base / seconds:.2f} x the whole batch)")


if __name__ == "__main__":
    main()
