"""What llmpy's MPI progress thread costs a rank that has no spare core: compute alone against compute while the
thread tests a request in flight, on one core.

    python bench/polling_cost.py [--interval-ms 0.1] [--rounds 5] [--json FILE]

The process pins itself to one core (as a sequential rank with no spare core runs), posts a receive that no one
matches and hands it to llmpy.execution.mpi.progress.ProgressThread, which tests it every interval as it tests
the collectives in flight in a run. The compute is 1-thread GEMMs of d12's MLP shape (256 x 768 x 3072), ~1 s,
timed with and without the thread in turn. The share of the core the tests take,
1 - alone / with thread, is what `llmpy predict --network-poll-share` charges for each second data moves while a
rank computes. bench/predict_validation.py runs this to calibrate its predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

from llmpy.execution.mpi.progress import INTERVAL_S


def gemm_loop(seconds: float):
    """A function running 1-thread GEMMs for about `seconds`, returning its wall seconds."""
    import numpy as np

    a = np.random.default_rng(0).random((256, 768), dtype=np.float32)
    w = np.random.default_rng(1).random((768, 3072), dtype=np.float32)
    out = np.empty((256, 3072), np.float32)
    np.matmul(a, w, out=out)  # the warm-up
    start = time.perf_counter()
    np.matmul(a, w, out=out)
    reps = max(1, int(seconds / max(time.perf_counter() - start, 1e-6)))

    def run() -> float:
        begin = time.perf_counter()
        for _ in range(reps):
            np.matmul(a, w, out=out)
        return time.perf_counter() - begin

    return run


def measure(interval_s: float, rounds: int) -> dict:
    import mpi4py

    mpi4py.rc.thread_level = "multiple"
    import numpy as np
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    from llmpy.execution.mpi.progress import ProgressThread

    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    alone, polled, tests_per_s = [], [], []
    with threadpool_limits(limits=1, user_api="blas"):
        run = gemm_loop(1.0)
        run()
        for _ in range(rounds):
            alone.append(run())
            request = MPI.COMM_SELF.Irecv(np.empty(4, np.float32), source=0, tag=7321)
            progress = ProgressThread(MPI, threading.RLock(), interval_s=interval_s)
            progress.watch([request])
            before = progress.tests
            polled.append(run())
            tests_per_s.append((progress.tests - before) / polled[-1])
            progress.close()  # first: its tests and these calls on the same request must not run at once
            request.Cancel()
            request.Wait()
    share = 1.0 - statistics.median(alone) / statistics.median(polled)
    return {"interval_ms": 1e3 * interval_s, "alone_s": alone, "polled_s": polled,
            "tests_per_s": statistics.median(tests_per_s), "poll_share": max(0.0, share), "core": core}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval-ms", type=float, default=1e3 * INTERVAL_S,
                        help=f"the progress thread's interval (default {1e3 * INTERVAL_S:g}, llmpy's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if not args.interval_ms > 0 or args.rounds < 1:
        parser.error("--interval-ms must be positive and --rounds at least 1")
    result = measure(1e-3 * args.interval_ms, args.rounds)
    print(f"progress thread every {result['interval_ms']:g} ms on core {result['core']}: compute "
          f"{1e3 * statistics.median(result['alone_s']):.0f} ms alone, "
          f"{1e3 * statistics.median(result['polled_s']):.0f} ms beside the tests "
          f"({result['tests_per_s']:.0f} tests/s): the tests take {result['poll_share']:.1%} of the core")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
