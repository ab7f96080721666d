"""Task mode against fork-join: step time over workers x block sizes x runtimes, with each worker's idle time.

All configurations run in one process on one model, interleaved step by step (A B C A B C ...), so machine
drift hits them alike: sequential (1 thread), forkjoin (numba omp + OpenBLAS) at each thread count, and tasks
for every (runtime, workers, K). `llmpy bench --modes sequential,forkjoin,tasks --block-tokens ... --task-runtime
native,dask` runs the same matrix in the scaling benchmark (lock-step worker processes, JSON/CSV/plots); this
script adds the native scheduler's overhead per task and runs everything in this one process. The first steps are warm-up. For task configurations the idle fraction of
each worker over the measured steps comes from the recorded trace (the POP table's per-thread useful time).
Also measures the native scheduler's overhead per task on a graph of empty tasks.

    python bench/tasks_scaling.py --model d12 -B 4 -T 64 --steps 3 --workers 1,2 --block-tokens 8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import llmpy  # noqa: F401  (thread-pool environment before numpy/numba load)
from llmpy.bench import add_speedups, format_results, idle_fraction_per_worker


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
    parser.add_argument("--no-baselines", action="store_true", help="skip sequential and forkjoin")
    parser.add_argument("--json", metavar="FILE", help="write the results")
    parser.add_argument("--trace", metavar="DIR", help="write one trace per configuration into DIR/NAME/")
    parser.add_argument("--overhead-tasks", type=int, default=20000, help="empty tasks for the overhead test")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def scheduler_overhead(workers: int, count: int) -> dict:
    """Wall time per task of `count` empty tasks on the native runtime: independent ones (the ready heap
    and wake-ups) and chains of 10 (each task releases the next)."""
    from llmpy.execution.runtime import NativeRuntime
    from llmpy.execution.taskgraph import Region, Task, TaskGraph

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
    import numba
    from threadpoolctl import threadpool_limits

    from llmpy.config import preset
    from llmpy.execution import available_cores, configure_numba_threads
    from llmpy.execution.tasks import TaskExecution
    from llmpy.kernels import KernelSet
    from llmpy.metrics import (
        kernel_summary,
        measure_peak_gflops,
        phase_summary,
        step_flops,
    )
    from llmpy.model import GPT2
    from llmpy.optim import AdamW
    from llmpy.recorder import Recorder
    from llmpy.train import train_step

    args = parse_args(argv)
    workers = sorted({int(w) for w in args.workers.split(",")})
    blocks = [int(k) for k in args.block_tokens.split(",")]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if max(workers) > available_cores():
        raise SystemExit(f"--workers up to {max(workers)} exceeds the {available_cores()} cores available")
    B, T = args.batch_size, args.seq_len
    for K in blocks:
        if T % K:
            raise SystemExit(f"block size {K} does not divide T={T}")

    overhead = {w: scheduler_overhead(w, args.overhead_tasks) for w in workers}
    for w, o in overhead.items():
        print(f"native scheduler overhead, {w} worker(s): {o['independent']:.1f} us/task (independent), "
              f"{o['chains']:.1f} us/task (chains of 10)", flush=True)

    configure_numba_threads(max(workers), "omp")
    config = preset(args.model)
    model = GPT2(config, B, T)
    model.init_random(args.seed)
    optimizer = AdamW(model.params)
    rng = np.random.default_rng(args.seed)
    inputs = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))

    configs: list[tuple[str, str, int, int]] = []  # (mode, runtime, threads, K)
    if not args.no_baselines:
        configs.append(("sequential", "-", 1, 0))
        configs += [("forkjoin", "omp", w, 0) for w in workers]
    configs += [("tasks", r, w, K) for r in runtimes for w in workers for K in blocks]
    executions = {c: TaskExecution(c[2], c[3], c[1]) for c in configs if c[0] == "tasks"}
    kernel_sets = {False: KernelSet(parallel=False), True: KernelSet(parallel=True)}
    recorders = {c: Recorder(keep_calls=c[0] == "tasks" or bool(args.trace)) for c in configs}
    peaks = {w: measure_peak_gflops(w) for w in {1, *workers}}
    flops = step_flops(config, B, T)

    try:
        for round_index in range(args.warmup + args.steps):
            for c in configs:
                mode, runtime, threads, K = c
                recorder = recorders[c]
                model.kernels = optimizer.kernels = kernel_sets[mode == "forkjoin"]
                model.observer = optimizer.observer = recorder
                if mode == "forkjoin":
                    numba.set_num_threads(threads)
                step = executions[c].train_step if mode == "tasks" else train_step
                with threadpool_limits(limits=threads if mode == "forkjoin" else 1, user_api="blas"):
                    loss = step(model, optimizer, [(inputs, targets)], 1e-4, recorder, round_index + 1)
                print(f"round {round_index + 1}: {mode} {runtime} x{threads} K={K or '-'}: "
                      f"{1e3 * recorder.steps[-1].duration:.0f} ms, loss {loss:.4f}", flush=True)
    finally:
        for execution in executions.values():
            execution.close()

    results = []
    for c in configs:
        mode, runtime, threads, K = c
        recorder = recorders[c]
        measured = recorder.steps[args.warmup:]
        ms = np.array([1e3 * s.duration for s in measured])
        phases = phase_summary(recorder.steps, args.warmup)
        median = float(np.median(ms))
        result = {
            "model": args.model, "mode": mode, "runtime": runtime, "threads": threads, "ranks": 1, "cores": threads,
            "block_tokens": K or None, "B": B, "T": T, "steps": len(measured), "ms_per_step_median": median,
            "ms_per_step_min": float(ms.min()), "ms_per_step_max": float(ms.max()),
            "forward_ms": phases["forward"], "zero_grad_ms": phases["zero_grad"],
            "backward_ms": phases["backward"], "update_ms": phases["update"],
            "tokens_per_s": B * T / median * 1e3, "tokens_per_s_per_core": B * T / median * 1e3 / threads,
            "mfu": flops / (median / 1e3) / (peaks[threads] * 1e9), "peak_gflops": peaks[threads],
            "peak_rss_mb": 0.0, "kernels": [k.as_dict() for k in kernel_summary(recorder.kernel_totals,
                                                                                 recorder.steps, args.warmup)],
        }
        if mode == "tasks":
            meta = {"model": args.model, "mode": "tasks", "runtime": runtime, "threads": threads, "ranks": 1,
                    "B": B, "T": T, "block_tokens": K, "warmup_steps": args.warmup, "peak_gflops": peaks[threads],
                    "num_layers": config.num_layers}
            trace = recorder.to_trace(meta)
            # per measured step (the other configurations' steps in between are not this one's idle time)
            result["idle_fraction_per_worker"] = idle_fraction_per_worker(trace, args.warmup, threads)
            result["tasks_per_step"] = len(executions[c].step_graph(model, optimizer).graph)
            if args.trace:
                directory = os.path.join(args.trace, f"tasks-{runtime}-{threads}-K{K}")
                trace.save(directory)
                result["trace"] = directory
        elif args.trace:
            directory = os.path.join(args.trace, f"{mode}-{runtime}-{threads}")
            recorder.to_trace({"model": args.model, "mode": mode, "runtime": runtime, "threads": threads,
                               "ranks": 1, "B": B, "T": T, "warmup_steps": args.warmup}).save(directory)
        results.append(result)

    add_speedups(results)
    print(f"\n{args.model}, B={B}, T={T}: median of {args.steps} steps after {args.warmup} warm-up, interleaved")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "scheduler_overhead_us": overhead}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def format_table(results: list[dict]) -> str:
    """format_results of llmpy bench plus K, tasks per step and each worker's idle %."""
    base = format_results(results).splitlines()
    fj = {r["threads"]: r["ms_per_step_median"] for r in results if r["mode"] == "forkjoin"}
    lines = [base[0] + f" {'K':>3s} {'tasks':>6s} {'vs fj':>6s}  idle % per worker"]
    for line, r in zip(base[1:], results):
        K = f"{r['block_tokens']:3d}" if r.get("block_tokens") else f"{'-':>3s}"
        n = f"{r['tasks_per_step']:6d}" if r.get("tasks_per_step") else f"{'-':>6s}"
        ref = fj.get(r["threads"])
        ratio = f"{ref / r['ms_per_step_median']:6.2f}" if ref and r["mode"] == "tasks" else f"{'-':>6s}"
        idle = " ".join(f"{100 * f:5.1f}" for f in r.get("idle_fraction_per_worker", []))
        lines.append(f"{line} {K} {n} {ratio}  {idle}")
    lines.append("vs fj = forkjoin ms/step at the same thread count / this ms/step (> 1: tasks faster)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
