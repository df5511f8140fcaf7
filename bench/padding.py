"""How much of a default training step is spent on padding, and what would length-sorted micro-batches save?

A training batch of 32 RT sentences is padded to its longest sentence, so about half of its tokens are
padding. Splitting each batch, sorted by length, into k micro-batches padded on their own, and summing their
losses weighted by their share of the batch, gives the same loss and gradient (up to rounding; checked here
with dropout off) for fewer tokens. With the backbone's dropout on, the random masks differ, so adopting it
changes every training run's numbers (a new RUN_VERSION and a cold `make reproduce`).

Times QLoRA training steps of the default preset (MiniLM-L6, batch 32, 2 torch threads) whole and split.
Run: `.venv/bin/python bench/padding.py` on an otherwise idle 2-core machine (about 2 minutes).
"""

import time

import torch

from coalora import lora
from coalora.experiments import RunSpec, _setup, training_configurations

STEPS = 12  # timed steps per layout, after one warm-up step
SPLITS = (1, 2, 4)


def micro_batches(batch: dict, k: int) -> list[tuple[float, dict]]:
    """(share of the batch, micro-batch trimmed to its own longest sentence) for k length-sorted parts."""
    lengths = batch["attention_mask"].sum(dim=1)
    order = lengths.argsort(stable=True)
    parts = []
    for rows in order.tensor_split(k):
        width = int(lengths[rows].max())
        part = {name: (t[rows, :width] if t.dim() == 2 else t[rows]) for name, t in batch.items()}
        parts.append((len(rows) / len(order), part))
    return parts


def step(model, batch: dict, k: int) -> float:
    """Accumulate the gradient of the batch's mean loss over k micro-batches; returns the loss."""
    total = 0.0
    for share, part in micro_batches(batch, k):
        loss = model(**part).loss * share
        loss.backward()
        total += loss.item()
    return total


def padding_share(batches) -> float:
    real = padded = 0
    for batch in batches:
        mask = batch["attention_mask"]
        real, padded = real + int(mask.sum()), padded + mask.numel()
    return 1 - real / padded


def main() -> None:
    torch.set_num_threads(2)
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
        step(model, batches[0], k)
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
            step(model, batch, k)
            optimizer.step()
        seconds = (time.perf_counter() - start) / STEPS
        base = base or seconds
        print(f"k={k}: {seconds:.3f} s/step ({base / seconds:.2f} x the whole batch)")


if __name__ == "__main__":
    main()
