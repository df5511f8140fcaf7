"""Seconds per training step against the floor set by this CPU's matmul throughput.

On the default preset's model and batch shape (MiniLM-L6, r = 8, 32 RT sentences padded to the batch's
longest), times a QLoRA step (one configuration) and a CoA-LoRA step (K = 2 configurations, gradients
summed) in fp32 and under `torch.autocast(dtype=torch.bfloat16)`, after warm-up with the quantized weights
cached; in bf16 the frozen base weights are held in bf16 as training holds them, without PEFT's cast of
each LoRA input to fp32 (`--no-held`: base weights in fp32, cast again at every forward, and PEFT's casts
kept), and dropout draws its masks as training does (`--mask-draw torch`: PyTorch's own draw).
Last, bf16 steps alternately with and without PEFT's input casts in one process, so that the machine's
drift falls on both alike. The floor of a step is its FLOPs (counted by `torch.utils.flop_counter` over
forward and backward) divided by the measured throughput of a large matmul in the same precision; the ratio
says how far the step is from what the arithmetic alone would take. Each timed step is followed by its own
throughput measurement and the ratio is the median of those pairs, so that a machine whose speed drifts
during the benchmark moves step and floor alike. `--compile` runs the model's forward through
`torch.compile` (inductor, which fuses the elementwise ops the FLOP count does not see); its first steps
compile and are not timed, and the casts' comparison is left out (each setting would compile anew). One
profiled step then splits the time by kind of op (`KINDS`): the matmuls against the same floor, and what
the FLOP count does not see.
Results: docs/measurements.md#training-step.

Run: `.venv/bin/python bench/train_step.py` on an otherwise idle machine (part of `make bench`);
`--quick` times one step of each, to check that the benchmark runs; `--threads 1` in two shells at once
measures what `make reproduce`'s two side-by-side runs get.
"""

import argparse
import contextlib
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from coalora import QuantSpace, allocate, build_lora_model, load_backbone, load_task, set_configuration
from coalora.lora import trainable_parameters
from coalora.models import MASK_DRAWS, matrix_layout, set_mask_draw
from coalora.training import HyperParams, held_weights

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# Kind of op -> the aten ops whose self time it sums; the rest of a step's ops count as "other". Dropout's
# masks are apart because PyTorch draws them one element at a time from its Mersenne Twister (on the AMD EPYC
# and the Intel Xeon measured alike), which `--mask-draw packed` replaces with a quarter as many 64-bit draws.
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "dropout masks": ("aten::bernoulli_", "aten::random_"),  # PyTorch's draw, and the packed one's
    "copies": ("aten::copy_",),  # mostly autocast's casts
}


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def time_by_kind(step) -> dict[str, float]:
    """Seconds of one call of `step` per kind of `KINDS` (self CPU time of its ops), and "other"."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    self_seconds = {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}
    kinds = {kind: sum(self_seconds.get(op, 0.0) for op in ops) for kind, ops in KINDS.items()}
    return dict(kinds, other=sum(self_seconds.values()) - sum(kinds.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed step of each: checks that it runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core); run two `--threads 1` at once to time "
                             "runs side by side")
    parser.add_argument("--no-held", dest="held", action="store_false",
                        help="keep the frozen base weights in fp32 under bf16 autocast (cast at every forward)")
    parser.add_argument("--mask-draw", default=HyperParams().mask_draw, choices=MASK_DRAWS,
                        help="how dropout draws its masks (default: training's)")
    parser.add_argument("--compile", action="store_true",
                        help="run the forward through torch.compile (compiling takes a minute or more a precision)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps, size, repeats = (1, 512, 2) if args.quick else (8, 2048, 10)
    print(f"torch threads {torch.get_num_threads()}, dropout masks {args.mask_draw}"
          + (", forward compiled" if args.compile else ""))
    throughput = {name: matmul_gflops(dtype or torch.float32, size, repeats) for name, dtype in PRECISIONS.items()}
    print("matmul throughput: " + ", ".join(f"{name} {g:.0f} GFLOPS" for name, g in throughput.items()))

    sentences = load_task("sst2", "default").train.shuffle(seed=0).select(range(32))
    configurations = [allocate("minilm-l6", b) for b in (2.5, 4.0)]
    for method, k in (("qlora", 1), ("coalora", 2)):
        torch.manual_seed(0)
        backbone, tokenizer = load_backbone("minilm-l6")
        set_mask_draw(backbone, args.mask_draw)
        model = build_lora_model(backbone, matrix_layout(backbone, "minilm-l6"), QuantSpace.nf(), rank=8,
                                 config_aware=method == "coalora")
        batch = tokenizer(list(sentences["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt")
        batch["labels"] = torch.tensor(list(sentences["label"]))
        params = trainable_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        forward = torch.compile(model) if args.compile else model

        def step(dtype, run=forward):
            optimizer.zero_grad(set_to_none=True)
            for configuration in configurations[:k]:
                set_configuration(model, configuration)
                autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
                with autocast:
                    loss = run(**batch).loss
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

        def held(name):
            """The base weights as training holds them: bf16 for a bf16 step (`training.held_weights`)."""
            return held_weights(model, name) if args.held else contextlib.nullcontext()

        for name, dtype in PRECISIONS.items():
            with held(name):
                for _ in range(3 if args.compile else 1):  # warm-up: weights cached, kernels chosen (compiled)
                    step(dtype)
                with FlopCounterMode(display=False) as counter:
                    step(dtype, run=model)  # the FLOPs of the arithmetic, compiled or not
                flops = counter.get_total_flops()
                seconds, floors = [], []
                for _ in range(steps):
                    start = time.perf_counter()
                    step(dtype)
                    seconds.append(time.perf_counter() - start)
                    floors.append(flops / (matmul_gflops(dtype or torch.float32, size, 2) * 1e9))
                kinds = time_by_kind(lambda: step(dtype))
            median, floor = statistics.median(seconds), statistics.median(floors)
            ratios = [s / f for s, f in zip(seconds, floors)]
            print(f"{method:8s} (K={k}) {name}: {median:.3f} s/step, {flops / 1e9:.1f} GFLOP, floor {floor:.3f} s, "
                  f"{statistics.median(ratios):.1f} x the floor (median of {steps} steps, each over the floor "
                  f"measured after it: {min(ratios):.1f}-{max(ratios):.1f} x; batch {tuple(batch['input_ids'].shape)})")
            print(f"{'':14s}profiled step: " + ", ".join(f"{kind} {s:.3f} s" for kind, s in kinds.items())
                  + f"; matmul alone {kinds['matmul'] / floor:.1f} x the floor")
        if not args.compile:
            cast_ab(model, lambda: step(torch.bfloat16), method, k, steps)


def cast_ab(model, step, method: str, k: int, steps: int) -> None:
    """Median seconds of bf16 steps with PEFT's cast of each LoRA input to A's fp32 dtype, which autocast
    casts straight back (`cast_input_dtype_enabled`, turned off by `held_weights`), and without it,
    alternating step by step."""
    seconds = {True: [], False: []}
    with held_weights(model, "bf16"):
        for i in range(2 + 2 * steps):  # the first pair warms up
            cast = i % 2 == 0
            for layer in model.lora_layers.values():
                layer.cast_input_dtype_enabled = cast
            start = time.perf_counter()
            step()
            if i >= 2:
                seconds[cast].append(time.perf_counter() - start)
    with_cast, without = (statistics.median(seconds[c]) for c in (True, False))
    print(f"{method:8s} (K={k}) bf16: {with_cast:.3f} s/step with PEFT's input casts, {without:.3f} s without "
          f"({without / with_cast - 1:+.0%}), medians of {steps} alternating steps each")


if __name__ == "__main__":
    main()
