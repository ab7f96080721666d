"""Training-step time of GPT-2 for several execution settings, interleaved step by step in one process.

    python bench/step_times.py --model d12 -B 4 -T 64 --steps 6 --configs sequential:1,forkjoin:1,forkjoin:2

Each round runs one step of every configuration in turn (A B C A B C ...), so machine drift hits all of
them alike; the first round is warm-up and not counted. Prints median and min-max ms/step, tokens/s and
MFU against the float32 GEMM peak measured on the configuration's thread count (or --peak-gflops, the peak of
the largest thread count, scaled per thread).
"""

from __future__ import annotations

import argparse
import time

import llmpy  # noqa: F401  (thread-pool environment before numpy loads)
import numba
import numpy as np
from threadpoolctl import threadpool_limits

from llmpy.config import preset
from llmpy.execution import configure_numba_threads
from llmpy.kernels import KernelSet
from llmpy.metrics import measure_peak_gflops, step_flops
from llmpy.model import GPT2
from llmpy.optim import AdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="d12")
    parser.add_argument("-B", type=int, default=4)
    parser.add_argument("-T", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="measured rounds (after 1 warm-up round)")
    parser.add_argument("--configs", default="sequential:1,forkjoin:1,forkjoin:2", help="MODE:THREADS,...")
    parser.add_argument("--threading-layer", default="omp")
    parser.add_argument("--peak-gflops", type=float)
    args = parser.parse_args()

    configs = [(mode, int(threads)) for mode, threads in (c.split(":") for c in args.configs.split(","))]
    max_threads = max(threads for _, threads in configs)
    configure_numba_threads(max_threads, args.threading_layer)
    config = preset(args.model)
    kernels = {False: KernelSet(parallel=False), True: KernelSet(parallel=True)}
    model = GPT2(config, args.B, args.T)
    model.init_random(0)
    optimizer = AdamW(model.params)
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, config.vocab_size, (args.B, args.T))
    targets = rng.integers(0, config.vocab_size, (args.B, args.T))
    # MFU of each configuration against the peak of the cores it uses
    peaks = {t: args.peak_gflops * t / max_threads if args.peak_gflops else measure_peak_gflops(t)
             for t in {threads for _, threads in configs}}
    flops = step_flops(config, args.B, args.T)
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}

    for round_index in range(args.steps + 1):
        for mode, threads in configs:
            parallel = mode == "forkjoin"
            model.kernels = optimizer.kernels = kernels[parallel]
            numba.set_num_threads(threads)
            with threadpool_limits(limits=threads, user_api="blas"):
                start = time.perf_counter()
                model.forward(inputs, targets)
                model.backward()
                optimizer.update(model.params, model.grads, 1e-4)
                elapsed = time.perf_counter() - start
            if round_index > 0:
                times[(mode, threads)].append(elapsed)
            print(f"round {round_index} {mode}:{threads} {1e3 * elapsed:.0f} ms", flush=True)

    peak_text = ", ".join(f"{t} thread(s) {p:.0f}" for t, p in sorted(peaks.items()))
    print(f"\n{args.model}, B={args.B}, T={args.T}, {args.steps} interleaved steps each; MFU vs GFLOP/s peak of {peak_text}")
    print(f"{'mode':12s} {'threads':>7s} {'median ms':>10s} {'min-max ms':>14s} {'tok/s':>8s} {'MFU':>6s}")
    base = None
    for (mode, threads), samples in times.items():
        median = float(np.median(samples))
        base = base or median
        print(f"{mode:12s} {threads:7d} {1e3 * median:10.0f} {1e3 * min(samples):6.0f}-{1e3 * max(samples):<7.0f}"
              f" {args.B * args.T / median:8.0f} {100 * flops / median / (peaks[threads] * 1e9):5.1f}%"
              f"  (x{base / median:.2f} vs first)")


if __name__ == "__main__":
    main()
