"""Task mode against fork-join: the native scheduler's overhead per task, then the `llmpy bench` matrix.

First measures the native runtime on graphs of empty tasks (independent ones: the ready heap and wake-ups;
chains of 10: each task releases the next), then runs `llmpy bench --modes sequential,forkjoin,tasks` over
the given workers x block sizes x task runtimes x GEMM splits: every configuration interleaved step by step,
with the idle fraction of each worker from the recorded tasks (see bench/README.md).

    python bench/tasks_scaling.py --model d12 -B 4 -T 64 --steps 3 --workers 1,2 --block-tokens 8,16,32,64
"""

from __future__ import annotations

import argparse
import sys
import time

import llmpy  # noqa: F401  (thread-pool environment before numpy/numba load)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="d12")
    parser.add_argument("-B", "--batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="comma list of worker / thread counts (default 1,2)")
    parser.add_argument("--block-tokens", default="8,16,32,64", help="comma list of K (default 8,16,32,64)")
    parser.add_argument("--runtimes", default="native,dask", help="comma list of task runtimes")
    parser.add_argument("--gemm-split", default="rows", help="comma list of GEMM splits (rows, lm_head, channels)")
    parser.add_argument("--json", metavar="FILE", help="write the benchmark results")
    parser.add_argument("--trace", metavar="DIR", help="write one trace per configuration into DIR/NAME/")
    parser.add_argument("--overhead-tasks", type=int, default=20000, help="empty tasks for the overhead test")
    parser.add_argument("--overhead-only", action="store_true", help="measure the scheduler overhead only")
    return parser.parse_args(argv)


def scheduler_overhead(workers: int, count: int) -> dict:
    """Wall time per task of `count` empty tasks on the native runtime: independent ones (the ready heap
    and wake-ups) and chains of 10 (each task releases the next)."""
    from llmpy.execution.tasks.runtime import NativeRuntime
    from llmpy.execution.tasks.graph import Region, Task, TaskGraph

    def empty():
        pass

    result = {}
    for shape in ("independent", "chains"):
        graph = TaskGraph()
        for i in range(count):
            region = Region(f"x{i // 10}" if shape == "chains" else f"x{i}", ((0, 1),))
            graph.add(Task(f"t{i}", "empty", empty, (), (region,) if shape == "chains" and i % 10 else (),
                           (region,)))
        graph.validate()
        runtime = NativeRuntime(workers)
        try:
            runtime.run(graph)  # warm-up
            best = min(_timed(runtime.run, graph) for _ in range(3))
        finally:
            runtime.close()
        result[shape] = 1e6 * best / count
    return result


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv=None) -> int:
    from llmpy.commands import bench

    args = parse_args(argv)
    for workers in sorted({int(w) for w in args.workers.split(",")}):
        overhead = scheduler_overhead(workers, args.overhead_tasks)
        print(f"native scheduler overhead, {workers} worker(s): {overhead['independent']:.1f} us/task (independent), "
              f"{overhead['chains']:.1f} us/task (chains of 10)", flush=True)
    if args.overhead_only:
        return 0
    bench_args = ["--model", args.model, "-B", str(args.batch_size), "-T", str(args.seq_len), "--steps",
                  str(args.steps), "--warmup", str(args.warmup), "--threads", args.workers,
                  "--modes", "sequential,forkjoin,tasks", "--block-tokens", args.block_tokens,
                  "--runtime", args.runtimes, "--gemm-split", args.gemm_split]
    if args.json:
        bench_args += ["--json", args.json]
    if args.trace:
        bench_args += ["--trace", args.trace]
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench.run(parser.parse_args(bench_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
