"""Peak memory of a worker's runs against the weight cache's budget.

Runs the causal LM's CoA-LoRA and its theta-free twin (default preset, seed 0; `--task sst2` on SST-2)
one after the other in one process, as a `make reproduce` worker runs two of its runs, once per
weights-tier budget (`--budgets`, GiB; each in a fresh process, since a high-water mark only grows).
For each run it prints the seconds, the share of weight lookups the weights tier served, and resident
memory sampled every 0.2 s at its peak, split by glibc's heap (`mallinfo2`): in use, freed but kept by
the allocator, and mapped blocks. Every run is recomputed in a scratch COALORA_HOME that links this
home's assets, so cached runs stay as they are. Results: docs/measurements.md#weight-cache.

Run: `.venv/bin/python bench/memory.py` on an otherwise idle machine (part of `make bench`; about 13 min
on 2 threads); `--quick` runs the smoke preset's SST-2 runs at 1 GiB, to check that the benchmark runs.
"""

import argparse
import ctypes
import ctypes.util
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 1024**3
METHODS = ("coalora", "coalora-no-theta")  # the twin reuses CoA-LoRA's pool: its weights, cached or not


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _heap_reader():
    """GiB in use, freed but kept, and in mapped blocks, from glibc; None where the C library has no mallinfo2."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2

    def read() -> dict:
        info = libc.mallinfo2()
        return {"heap in use": info.uordblks / GIB, "heap kept free": info.fordblks / GIB,
                "mapped": info.hblkhd / GIB}
    return read


def child(preset: str, task: str, budget: float, threads: int) -> None:
    import psutil
    import torch

    from coalora import assets, studies
    from coalora.experiments import WEIGHT_CACHE, run_experiment

    torch.set_num_threads(threads)
    WEIGHT_CACHE.weights.max_bytes = int(budget * GIB)
    heap, process = _heap_reader(), psutil.Process()
    peak = {"resident": 0.0}

    def sample() -> None:
        while True:
            resident = process.memory_info().rss / GIB
            if resident > peak["resident"]:
                peak.update(resident=resident, **(heap() if heap else {}))
            time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()

    print(f"weights tier {budget:g} GiB, codes tier {WEIGHT_CACHE.codes.max_bytes / GIB:g} GiB, "
          f"{threads} threads, home {assets.home()}")
    for spec in studies.study_specs(preset, task, "nf", METHODS, seeds=[0]):
        peak["resident"] = 0.0
        hits, misses = WEIGHT_CACHE.hits, WEIGHT_CACHE.misses
        start = time.perf_counter()
        run_experiment(spec, recompute=True)
        seconds = time.perf_counter() - start
        hits, misses = WEIGHT_CACHE.hits - hits, WEIGHT_CACHE.misses - misses
        split = ", ".join(f"{name} {value:.2f}" for name, value in peak.items() if name != "resident")
        print(f"  {spec.method}: {seconds:.0f} s, weights tier served {hits / max(hits + misses, 1):.0%} of "
              f"{hits + misses} lookups, peak resident {peak['resident']:.2f} GiB ({split or 'no glibc heap'}); "
              f"tiers hold {WEIGHT_CACHE.nbytes / GIB:.2f} + {WEIGHT_CACHE.codes.nbytes / GIB:.2f} GiB", flush=True)
    print(f"  process high-water {process.memory_info().rss / GIB:.2f} GiB now, "
          f"{_high_water_gib():.2f} GiB at most")


def _high_water_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak / 1024**2  # bytes on macOS, KiB on Linux


def scratch_home(into: Path) -> Path:
    """A COALORA_HOME whose every entry but runs/ links this home's, so recomputed runs land apart."""
    from coalora import assets

    home = assets.home()
    for entry in home.iterdir():
        if entry.name != "runs":
            (into / entry.name).symlink_to(entry)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke preset on SST-2, 1 GiB: checks that it runs")
    parser.add_argument("--budgets", default="2,1", help="weights-tier budgets in GiB, comma-separated")
    parser.add_argument("--task", help="c4, the causal LM's (default), or a classification task (--quick: sst2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)  # one budget, in this process
    parser.add_argument("--preset", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.preset, args.task, args.child, args.threads)
        return
    preset, budgets = ("smoke", [1.0]) if args.quick else ("default", [float(b) for b in args.budgets.split(",")])
    task = args.task or ("sst2" if args.quick else "c4")  # quick: MiniLM-L6's runs, a quarter of SmolLM2's time
    for budget in budgets:
        with tempfile.TemporaryDirectory(prefix="coalora-memory-") as folder:
            env = {**os.environ, "COALORA_HOME": str(scratch_home(Path(folder)))}
            subprocess.run([sys.executable, __file__, "--child", str(budget), "--threads", str(args.threads),
                            "--preset", preset, "--task", task], env=env, check=True)
    print("memory per weights-tier budget: done")


if __name__ == "__main__":
    main()
