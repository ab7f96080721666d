"""The `llmpy bench --vs torch` baseline on its own in this process: ms per step and peak RSS at one shape.

For shapes where llmpy's and PyTorch's worker processes together would not fit in memory (`llmpy bench` keeps
both alive to interleave their steps), e.g. d12 at B=8, T=1024 on a 24 GB machine:

    LLMPY_KEEP_THREAD_ENV=1 python bench/torch_alone.py --model d12 -B 8 -T 1024 --threads 2 --steps 3

(LLMPY_KEEP_THREAD_ENV=1: torch with its own OpenMP defaults, as `llmpy bench --vs torch` runs it.)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

from llmpy.commands.torch_baseline import TorchGPT2Baseline, import_torch
from llmpy.core.config import preset
from llmpy.core.layout import parameter_buffer
from llmpy.core.model import init_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="d12")
    parser.add_argument("-B", type=int, default=8)
    parser.add_argument("-T", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up step")
    args = parser.parse_args()
    torch = import_torch()
    torch.set_num_threads(args.threads)
    config = preset(args.model)
    params = parameter_buffer(config)
    init_parameters(params, config, 0)
    baseline = TorchGPT2Baseline(config, params)
    rng = np.random.default_rng(0)
    inputs, targets = (rng.integers(0, config.vocab_size, (args.B, args.T)) for _ in range(2))
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        baseline.train_step(inputs, targets)
        if step:
            times.append(1e3 * (time.perf_counter() - start))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__} eager, {args.model} B={args.B} T={args.T}, {args.threads} threads: "
          f"median {statistics.median(times):.0f} ms/step ({min(times):.0f}-{max(times):.0f}), peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
