"""Is one 2-thread run or two 1-thread runs side by side the faster way through `make reproduce`?

Times QLoRA training steps of the default preset (MiniLM-L6, RT-sentence SST-2 stand-in, batch 32) in one
process with 2 torch threads, in one with 1 thread, and in two 1-thread processes at once, and prints the
throughput of each layout in steps per second. It also says whether 1 and 2 threads give bit-identical
losses (they need not: a different thread count changes the order of floating-point sums, so a run's
numbers depend on the threads it trained with).
Run: `.venv/bin/python bench/threads.py` on an otherwise idle 2-core machine (about 2 minutes).
"""

import json
import os
import subprocess
import sys
import time

STEPS = 6  # timed steps per process, after one warm-up step


def worker(threads: int) -> None:
    """Train STEPS + 1 QLoRA steps with `threads` torch threads; print JSON {seconds per step, losses}."""
    import torch

    torch.set_num_threads(threads)
    from coalora import lora
    from coalora.experiments import RunSpec, _setup, training_configurations

    spec = RunSpec(preset="default", task="sst2", method="qlora", seed=0).resolved()
    _, _, model, _, batches, _ = _setup(spec)
    lora.set_configuration(model, training_configurations(spec)[0])
    optimizer = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-3)
    model.train()
    losses, start = [], None
    for i, batch in zip(range(STEPS + 1), batches):
        if i == 1:
            start = time.perf_counter()
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(json.dumps({"seconds_per_step": (time.perf_counter() - start) / STEPS, "losses": losses}))


def launch(threads: int) -> subprocess.Popen:
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--worker", str(threads)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env_threads})


def result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    two = result(launch(2))
    one = result(launch(1))
    pair = [result(p) for p in [launch(1), launch(1)]]
    print(f"one process, 2 threads: {two['seconds_per_step']:.3f} s/step -> {1 / two['seconds_per_step']:.2f} steps/s")
    print(f"one process, 1 thread:  {one['seconds_per_step']:.3f} s/step -> {1 / one['seconds_per_step']:.2f} steps/s")
    both = sum(1 / r["seconds_per_step"] for r in pair)
    each = ", ".join(f"{r['seconds_per_step']:.3f}" for r in pair)
    print(f"two 1-thread processes at once: {each} s/step "
          f"-> {both:.2f} steps/s ({both * two['seconds_per_step']:.2f} x one 2-thread process)")
    diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    print(f"losses with 1 and 2 threads: largest difference {diff:.2e} (bit-identical: {diff == 0})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]))
    else:
        main()
