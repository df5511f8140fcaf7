"""Configuration-search speed and GP kernel choice (coalora.search), on CPU.

Default: seconds per search round (GP fit + S starts x T steps of batched qLogEHVI over all +-1
neighbours) with a pool of 50 configurations (ILP allocations over 2.25-7.25 bits and random ones)
and a synthetic loss, for MiniLM-L6 (36 matrices, d = 180) and a RoBERTa-Large-sized layout
(24 blocks x 6 matrices = 144, d = 720). Goal: <= 5 s per round at d = 720.

Use `--threads 1` on a machine with other work running: with 2 threads and a busy second core,
OpenMP waits made one acquisition call 10x slower (1.27 s vs 0.13 s at d = 720).

`--kernels`: held-out prediction error of each GP kernel in coalora.search.KERNELS on synthetic
and real data (80 configurations per data set: 16 ILP allocations, 32 perturbations of them,
32 random; 3 random splits of 44 train / 36 test). Results: docs/measurements.md#gp-kernel.

Run: `.venv/bin/python bench/search.py [--kernels] [--threads 2]` (part of `make bench`);
`--quick` runs one round and a one-split kernel comparison on a 10-matrix layout.
"""

import argparse
import statistics
import time
import zlib

import numpy as np
import scipy.stats
import torch

from coalora import allocation, models
from coalora.configs import Configuration, Layout, MatrixSpec, QuantSpace, unique
from coalora.search import KERNELS, ConfigurationSearch, Encoder, SearchConfig, fit_loss_gp, neighbours

NF = QuantSpace.nf()
BUDGETS = np.linspace(2.25, 7.25, 16)


# ---- problems --------------------------------------------------------------------------------------

def roberta_large_layout() -> Layout:
    """RoBERTa-Large's 144 quantized matrices (24 blocks; hidden 1024, FFN 4096), no weights."""
    shapes = {"query": (1024, 1024), "key": (1024, 1024), "value": (1024, 1024),
              "attention.output": (1024, 1024), "intermediate": (4096, 1024), "output": (1024, 4096)}
    return Layout("roberta-large-sized", tuple(
        MatrixSpec(f"layer.{b}.{kind}", shape, b, kind) for b in range(24) for kind, shape in shapes.items()))


def option_error(space: QuantSpace) -> np.ndarray:
    """[J] a quantization-error-like number per option: halves per bit, grows with block size,
    shrinks with scale bits, a little worse for 16-bit second-level scales."""
    return np.array([2.0 ** -o.bits * (1 + o.block_size / 64) * (1 + 2.0 ** (2 - o.scale_bits))
                     * (1.05 if o.scale_dtype != "fp32" else 1.0) for o in space.options()])


def synthetic_table(layout: Layout, seed: int = 0) -> allocation.CostTable:
    """Cost table with per-matrix sensitivities w_i (log-uniform in [0.1, 10]) x option_error."""
    w = np.exp(np.random.default_rng(seed).uniform(np.log(0.1), np.log(10.0), len(layout)))
    return allocation.CostTable(layout, NF, w[:, None] * option_error(NF)[None, :], "synthetic")


def table_loss(table: allocation.CostTable, log: bool = False, noise: float = 0.002):
    """loss(c) = 0.3 + mean_i cost[i, option of c_i] (or its log), plus noise seeded by the id."""
    column = {o: j for j, o in enumerate(NF.options())}

    def loss(c: Configuration) -> float:
        total = table.costs[np.arange(len(table.layout)), [column[lq] for lq in c.layers.values()]].mean()
        value = float(np.log(total) if log else 0.3 + total)
        return value + np.random.default_rng(zlib.crc32(c.digest().encode())).normal(0.0, noise)
    return loss


def sample_configurations(table: allocation.CostTable, n_ilp: int, n_perturbed: int, n_random: int,
                          seed: int = 0) -> list[Configuration]:
    """ILP allocations at budgets over 2.25-7.25 bits, random +-1 walks (1-12 moves) from them, and
    uniformly random configurations: roughly what the search's GP sees."""
    rng = np.random.default_rng(seed)
    encoder = Encoder(NF, table.layout)
    ilp = unique(allocation.allocate(table, float(b)) for b in np.linspace(2.25, 7.25, n_ilp))
    out = list(ilp)
    for _ in range(n_perturbed):
        index = encoder.indices([ilp[rng.integers(len(ilp))]])[0]
        for _ in range(rng.integers(1, 13)):
            options = neighbours(index, encoder.top)
            index = options[rng.integers(len(options))]
        out.append(encoder.configurations(index[None])[0])
    out += [Configuration.random(table.layout, NF, int(rng.integers(2**31))) for _ in range(n_random)]
    return unique(out)


# ---- timing ------------------------------------------------------------------------------------------

def time_rounds(name: str, table: allocation.CostTable, n_ilp: int, rounds: int = 2, pool_size: int = 50) -> None:
    loss = table_loss(table)
    pool = sample_configurations(table, n_ilp=n_ilp, n_perturbed=0, n_random=pool_size - n_ilp)
    hook = ConfigurationSearch(SearchConfig("pareto", starts=5, steps=10, segments=10), NF, table.layout, [{}],
                               seed=0, scorer=lambda model, configs, batches: [loss(c) for c in configs])
    d = 5 * len(table.layout)
    print(f"\n{name}: {len(table.layout)} matrices, d = {d}, pool {len(pool)}, S = 5, T = 10")
    for epoch in range(rounds):
        start = time.perf_counter()
        hook(epoch, None, pool)
        wall = time.perf_counter() - start
        r = hook.rounds[-1]
        steps = sum(r["moves"])
        print(f"  round {epoch}: {wall:5.2f} s  (GP fit on {r['gp_points']} points {r['seconds']['fit']:.2f} s, "
              f"search {r['seconds']['propose']:.2f} s for {steps} moves = {steps + 5} batched calls of <= {2 * d}"
              f" neighbours; {len(r['proposals'])} proposals)")


# ---- kernels -----------------------------------------------------------------------------------------

def embedding_distortion_loss():
    """log relative MSE of the real MiniLM-L6's mean-pooled sentence embeddings on 64 real
    sentences (the SST-2 stand-in), quantized under c vs full precision."""
    from coalora.data import load_task
    from coalora.quant import fake_quantize

    model, tokenizer = models.load_backbone("minilm-l6")
    encoder = model.base_model
    linears = models.quantized_linears(model)
    original = {name: m.weight.detach().clone() for name, m in linears.items()}
    sentences = list(load_task("sst2", "default").train.shuffle(seed=0).select(range(64))["text"])
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()

    @torch.no_grad()
    def embed():
        hidden = encoder(**batch).last_hidden_state
        return (hidden * mask).sum(1) / mask.sum(1)

    reference = embed()
    cache = {}

    @torch.no_grad()
    def loss(c: Configuration) -> float:
        for name, m in linears.items():
            key = (name, c[name])
            if key not in cache:
                cache[key] = fake_quantize(original[name], c[name])
            m.weight.copy_(cache[key])
        return float(torch.log(((embed() - reference) ** 2).mean() / (reference ** 2).mean()))
    return loss


def small_layout() -> Layout:
    """Ten synthetic matrices of three shapes over five blocks (d = 50)."""
    return Layout("synthetic-10", tuple(MatrixSpec(f"m{i}", (64, 64 * (1 + i % 3)), i // 2, f"t{i % 2}")
                                        for i in range(10)))


def compare_kernels(quick: bool = False) -> None:
    synthetic_small = synthetic_table(small_layout())
    datasets = [("synthetic, 10 matrices", synthetic_small, table_loss(synthetic_small))]
    if not quick:
        minilm = allocation.cost_table("minilm-l6")
        synthetic_minilm = synthetic_table(minilm.layout, seed=1)
        datasets += [("synthetic, MiniLM layout", synthetic_minilm, table_loss(synthetic_minilm)),
                     ("MiniLM quantization error", minilm, table_loss(minilm, log=True, noise=0.0))]
        start = time.perf_counter()
        datasets.append(("MiniLM embedding distortion", minilm, embedding_distortion_loss()))
        print(f"(loaded MiniLM-L6 in {time.perf_counter() - start:.1f} s)")
    sizes, n_train, splits = ((4, 8, 8), 12, 1) if quick else ((16, 32, 32), 44, 3)
    print(f"\n{'data (d)':36s}" + "".join(f"{k:>18s}" for k in KERNELS) + "   (RMSE / Spearman rho, fit s)")
    for name, table, loss in datasets:
        configs = sample_configurations(table, *sizes)
        encoder = Encoder(NF, table.layout)
        x = encoder.normalise(encoder.indices(configs))
        start = time.perf_counter()
        y = torch.tensor([loss(c) for c in configs], dtype=torch.float64)
        scored = time.perf_counter() - start
        results = {k: [] for k in KERNELS}
        for split in range(splits):
            order = torch.randperm(len(configs), generator=torch.Generator().manual_seed(split))
            train, test = order[:n_train], order[n_train:]
            for kernel in KERNELS:
                tick = time.perf_counter()
                gp = fit_loss_gp(x[train], y[train], kernel)
                fit = time.perf_counter() - tick
                with torch.no_grad():
                    pred = -gp.posterior(x[test]).mean.squeeze(-1)
                rmse = float(((pred - y[test]) ** 2).mean().sqrt() / y[train].std())
                rho = scipy.stats.spearmanr(pred.numpy(), y[test].numpy()).statistic
                results[kernel].append((rmse, rho, fit))
        cells = "".join(f"  {statistics.mean(r[0] for r in v):.2f} / {statistics.mean(r[1] for r in v):.2f}"
                        f" {statistics.mean(r[2] for r in v):3.1f}s" for v in results.values())
        print(f"{name + f' ({x.shape[1]})':36s}{cells}   (n = {len(configs)}, scored in {scored:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", action="store_true", help="compare GP kernels instead of timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="one round and a one-split kernel comparison on 10 matrices: checks that it runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}")
    if args.quick:
        time_rounds("synthetic, 10 matrices", synthetic_table(small_layout()), n_ilp=5, rounds=1, pool_size=20)
        compare_kernels(quick=True)
    elif args.kernels:
        compare_kernels()
    else:
        minilm, _ = models.load_backbone("minilm-l6")
        time_rounds("MiniLM-L6", synthetic_table(models.matrix_layout(minilm, "minilm-l6")), n_ilp=20)
        time_rounds("RoBERTa-Large-sized", synthetic_table(roberta_large_layout()), n_ilp=8)  # its ILP is slow


if __name__ == "__main__":
    main()
