"""`llmpy bench`: time training steps over a matrix of execution models, thread counts and runtimes.

Configurations that can share a process (same numba threading layer) run in one worker process,
interleaved step by step (A B C A B C ...) on one model, so machine drift hits them alike; each threading
layer gets its own worker process (numba picks its layer once per process). The first steps are warm-up.
Results: a table with speedup and efficiency, a per-kernel table per configuration, JSON/CSV, and scaling
plots (runtime, speedup, efficiency for the whole step, forward and backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from llmpy.config import PRESETS
from llmpy.execution import MODES, THREADING_LAYERS, available_cores

RESULT_PREFIX = "LLMPY-BENCH-RESULT "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="d12", choices=sorted(PRESETS), help="model preset (default d12)")
    parser.add_argument("-B", "--batch-size", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("-T", "--seq-len", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per configuration (default 1)")
    parser.add_argument("--modes", default="sequential,forkjoin", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    parser.add_argument("--runtime", default="omp", help=f"comma list of numba threading layers: {', '.join(THREADING_LAYERS)}")
    parser.add_argument("--peak-gflops", type=float, help="peak of one core for MFU (default: measured per thread count)")
    parser.add_argument("--json", metavar="FILE", help="write the results, one object per configuration")
    parser.add_argument("--csv", metavar="FILE", help="write the results as CSV")
    parser.add_argument("--plots", metavar="DIR", help="write scaling plots (PNG) into DIR")
    parser.add_argument("--trace", metavar="DIR", help="write one trace per configuration into DIR/MODE-RUNTIME-THREADS/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: RUNTIME:MODE:THREADS,... in this process


def _configurations(args) -> dict[str, list[tuple[str, int]]]:
    """runtime -> [(mode, threads)], sequential once (1 thread) with the first runtime."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
    try:
        threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--threads must be a comma list of integers, got {args.threads!r}") from None
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} in --modes; choose from {', '.join(MODES)}")
    for runtime in runtimes:
        if runtime not in THREADING_LAYERS:
            raise ValueError(f"unknown runtime {runtime!r} in --runtime; choose from {', '.join(THREADING_LAYERS)}")
    cores = available_cores()
    if not threads or min(threads) < 1 or max(threads) > cores:
        raise ValueError(f"--threads must be between 1 and the {cores} cores available, got {args.threads!r}")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 1:
        raise ValueError("--steps, -B and -T must be positive and --warmup >= 0")
    groups: dict[str, list[tuple[str, int]]] = {runtime: [] for runtime in runtimes}
    if "sequential" in modes:
        groups[runtimes[0]].append(("sequential", 1))
    if "forkjoin" in modes:
        for runtime in runtimes:
            groups[runtime].extend(("forkjoin", t) for t in threads)
    return {runtime: configs for runtime, configs in groups.items() if configs}


# --------------------------------------------------------------------------- worker (one process)
def _run_worker(args) -> None:
    import numba
    from threadpoolctl import threadpool_limits

    from llmpy.config import preset
    from llmpy.execution import configure_numba_threads
    from llmpy.kernels import KernelSet
    from llmpy.metrics import kernel_summary, measure_memory_bandwidth, measure_peak_gflops, phase_summary, step_flops
    from llmpy.model import GPT2
    from llmpy.optim import AdamW
    from llmpy.recorder import Recorder
    from llmpy.train import train_step

    runtime, _, spec = args.worker.partition(":")
    configs = [(mode, int(threads)) for mode, threads in (item.split("/") for item in spec.split(","))]
    max_threads = max(t for _, t in configs)
    if any(mode == "forkjoin" for mode, _ in configs):
        configure_numba_threads(max_threads, runtime)
    config = preset(args.model)
    B, T = args.batch_size, args.seq_len
    model = GPT2(config, B, T)
    model.init_random(args.seed)
    optimizer = AdamW(model.params)
    rng = np.random.default_rng(args.seed)
    inputs = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    kernel_sets = {False: KernelSet(parallel=False), True: KernelSet(parallel=True)}
    recorders = {c: Recorder(per_thread=bool(args.trace), threads=c[1]) for c in configs}
    peaks = {t: (args.peak_gflops * t if args.peak_gflops else measure_peak_gflops(t)) for _, t in configs}
    flops = step_flops(config, B, T)

    for round_index in range(args.warmup + args.steps):
        for mode, threads in configs:
            recorder = recorders[(mode, threads)]
            model.kernels = optimizer.kernels = kernel_sets[mode == "forkjoin"]
            model.observer = optimizer.observer = recorder
            if mode == "forkjoin":
                numba.set_num_threads(threads)
            with threadpool_limits(limits=threads, user_api="blas"):
                train_step(model, optimizer, [(inputs, targets)], 1e-4, recorder, round_index + 1)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for mode, threads in configs:
        recorder = recorders[(mode, threads)]
        measured = recorder.steps[args.warmup:]
        ms = np.array([1e3 * s.duration for s in measured])
        phases = phase_summary(recorder.steps, args.warmup)
        median = float(np.median(ms))
        result = {
            "model": args.model, "mode": mode, "runtime": runtime if mode == "forkjoin" else "-",
            "threads": threads, "ranks": 1, "cores": threads, "B": B, "T": T, "steps": len(measured),
            "ms_per_step_median": median, "ms_per_step_min": float(ms.min()), "ms_per_step_max": float(ms.max()),
            "forward_ms": phases["forward"], "zero_grad_ms": phases["zero_grad"], "backward_ms": phases["backward"],
            "update_ms": phases["update"], "tokens_per_s": B * T / median * 1e3,
            "tokens_per_s_per_core": B * T / median * 1e3 / threads,
            "mfu": flops / (median / 1e3) / (peaks[threads] * 1e9), "peak_gflops": peaks[threads],
            "peak_rss_mb": peak_rss_mb, "process_configs": len(configs),
            "kernels": [k.as_dict() for k in kernel_summary(recorder.kernel_totals, recorder.steps, args.warmup)],
        }
        if args.trace:
            directory = os.path.join(args.trace, f"{mode}-{result['runtime']}-{threads}")
            meta = {k: result[k] for k in ("model", "mode", "runtime", "threads", "ranks", "B", "T", "peak_gflops")}
            meta.update(warmup_steps=args.warmup, bandwidth_gbs=measure_memory_bandwidth(threads),
                        num_layers=config.num_layers)
            recorder.to_trace(meta).save(directory)
            result["trace"] = directory
        print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- driver
def _worker_command(args, runtime: str, configs: list[tuple[str, int]]) -> list[str]:
    command = [sys.executable, "-m", "llmpy.cli", "bench", "--model", args.model, "-B", str(args.batch_size),
               "-T", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seed", str(args.seed),
               "--worker", runtime + ":" + ",".join(f"{mode}/{threads}" for mode, threads in configs)]
    if args.peak_gflops:
        command += ["--peak-gflops", str(args.peak_gflops)]
    if args.trace:
        command += ["--trace", args.trace]
    return command


def add_speedups(results: list[dict]) -> None:
    """speedup and efficiency against sequential on 1 thread (else the group's own 1-thread run)."""
    base = next((r for r in results if r["mode"] == "sequential"), None)
    for r in results:
        reference = base or next((o for o in results if o["mode"] == r["mode"] and o["runtime"] == r["runtime"]
                                  and o["threads"] == 1), None)
        if reference is None:
            r["speedup"] = r["efficiency"] = None
            continue
        r["speedup"] = reference["ms_per_step_median"] / r["ms_per_step_median"]
        r["efficiency"] = r["speedup"] / (r["threads"] * r.get("ranks", 1))


def format_results(results: list[dict]) -> str:
    lines = [f"{'mode':11s} {'runtime':7s} {'thr':>3s} {'ms/step':>8s} {'min-max':>13s} {'fwd':>7s} {'bwd':>7s} "
             f"{'update':>7s} {'tok/s':>7s} {'tok/s/core':>10s} {'MFU':>6s} {'speedup':>7s} {'eff':>5s} {'RSS MB':>7s}"]
    for r in results:
        speedup = f"{r['speedup']:7.2f}" if r.get("speedup") else f"{'-':>7s}"
        efficiency = f"{r['efficiency']:5.2f}" if r.get("efficiency") else f"{'-':>5s}"
        lines.append(
            f"{r['mode']:11s} {r['runtime']:7s} {r['threads']:3d} {r['ms_per_step_median']:8.0f} "
            f"{r['ms_per_step_min']:6.0f}-{r['ms_per_step_max']:<6.0f} {r['forward_ms']:7.0f} {r['backward_ms']:7.0f} "
            f"{r['update_ms']:7.0f} {r['tokens_per_s']:7.0f} {r['tokens_per_s_per_core']:10.0f} "
            f"{100 * r['mfu']:5.1f}% {speedup} {efficiency} {r['peak_rss_mb']:7.0f}")
    return "\n".join(lines)


def run(args, out=sys.stdout) -> list[dict]:
    from llmpy.metrics import KernelSummary, format_kernel_table

    if args.worker:
        _run_worker(args)
        return []
    groups = _configurations(args)
    results: list[dict] = []
    for runtime, configs in groups.items():
        names = ", ".join(f"{m} x{t}" for m, t in configs)
        print(f"running {names} (numba {runtime}), {args.warmup}+{args.steps} interleaved steps each ...",
              file=out, flush=True)
        started = time.perf_counter()
        process = subprocess.run(_worker_command(args, runtime, configs), capture_output=True, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"benchmark worker for {runtime} failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
        found = [json.loads(line[len(RESULT_PREFIX):]) for line in process.stdout.splitlines()
                 if line.startswith(RESULT_PREFIX)]
        results.extend(found)
        print(f"  done in {time.perf_counter() - started:.0f} s", file=out, flush=True)
    add_speedups(results)
    print(f"\n{args.model}, B={args.batch_size}, T={args.seq_len}: median of {args.steps} steps after "
          f"{args.warmup} warm-up; MFU against the measured GEMM peak of the cores used", file=out)
    print(format_results(results), file=out)
    for r in results:
        rows = [KernelSummary(**k) for k in r["kernels"]]
        phases = {"forward": r["forward_ms"], "zero_grad": r["zero_grad_ms"], "backward": r["backward_ms"],
                  "update": r["update_ms"], "step": r["ms_per_step_median"]}
        print(f"\nkernels: {r['mode']} {r['runtime']} {r['threads']} thread(s)", file=out)
        print(format_kernel_table(rows, phases), file=out)
    _write_outputs(args, results, out)
    return results


def _write_outputs(args, results: list[dict], out) -> None:
    import csv
    import io

    from llmpy.formats import atomic_write_bytes

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_bytes(args.json, json.dumps(results, indent=1).encode())
        print(f"wrote {args.json}", file=out)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        flat = [{k: v for k, v in r.items() if k != "kernels"} for r in results]
        fields = sorted({k for r in flat for k in r}, key=lambda k: list(flat[0]).index(k) if k in flat[0] else 99)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
        atomic_write_bytes(args.csv, text.getvalue().encode())
        print(f"wrote {args.csv}", file=out)
    if args.plots:
        from llmpy.plots import scaling_pngs

        paths = scaling_pngs(results, args.plots)
        print(f"wrote {', '.join(paths)}", file=out)
    if args.trace:
        print(f"wrote traces under {args.trace}/ (`llmpy analyze DIR`, `llmpy plot timeline DIR`)", file=out)
