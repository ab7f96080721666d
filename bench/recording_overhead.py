"""Cost of llmpy's recording on a training step, measured side by side in one process.

    python bench/recording_overhead.py --model d12 --threads 2 --steps 8

Each round runs one step with no observer, one with the Recorder that every `llmpy train` uses (wall time
and cost of each kernel call), and one with per-thread CPU clocks (`--trace`), in turn; the first round is
warm-up. Prints the median step time of each and the overhead against no recording.
"""

from __future__ import annotations

import argparse
import time

import llmpy  # noqa: F401  (thread-pool environment before numpy loads)
import numpy as np

from llmpy.core.config import preset
from llmpy.execution.factory import make_execution_model
from llmpy.core.model import GPT2
from llmpy.core.optim import AdamW
from llmpy.observe.recorder import Recorder
from llmpy.execution.base import train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="d12")
    parser.add_argument("-B", type=int, default=4)
    parser.add_argument("-T", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    execution = make_execution_model("forkjoin" if args.threads > 1 else "sequential", args.threads)
    config = preset(args.model)
    model = GPT2(config, args.B, args.T, execution.kernels)
    model.init_random(0)
    optimizer = AdamW(model.params, kernels=execution.kernels)
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, config.vocab_size, (args.B, args.T))
    targets = rng.integers(0, config.vocab_size, (args.B, args.T))
    variants = {"none": None, "recorder": Recorder(), "recorder+threads": Recorder(per_thread=True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.steps + 1):
        for name, recorder in variants.items():
            model.observer = optimizer.observer = recorder
            start = time.perf_counter()
            train_step(model, optimizer, [(inputs, targets)], 1e-4, recorder, round_index + 1)
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    base = float(np.median(times["none"]))
    print(f"{args.model}, B={args.B}, T={args.T}, {execution.describe()}, {args.steps} interleaved steps each")
    for name, samples in times.items():
        median = float(np.median(samples))
        print(f"{name:18s} median {1e3 * median:8.1f} ms  min {1e3 * min(samples):8.1f} ms  "
              f"overhead {100 * (median - base) / base:+5.2f}% (median), "
              f"{100 * (min(samples) - min(times['none'])) / min(times['none']):+5.2f}% (min)")
    totals = variants["recorder"].kernel_totals
    calls = sum(entry[0] for step in totals.values() for entry in step.values())
    print(f"kernel calls recorded per step: {calls / len(totals):.0f}")
    execution.close()


if __name__ == "__main__":
    main()
