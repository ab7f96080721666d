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
READY_LINE = "LLMPY-BENCH-READY"
ROUND_DONE_LINE = "LLMPY-BENCH-ROUND-DONE"


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
    parser.add_argument("--vs", choices=("torch",), help="also run PyTorch eager (same model, init, batch, fused "
                        "AdamW, threads) interleaved step by step, and print llmpy's time ratio to it")
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


# --------------------------------------------------------------------------- workers (one process each)
# Workers run in lock-step: each builds its model, prints READY and then runs one round (one training
# step of each of its configurations) per "round" line the driver sends, so the steps of all processes
# interleave (A B C A B C ...) and only one process computes at a time.
def _lockstep_rounds():
    """Yields the round index for each "round" line the driver sends; ends at "finish"."""
    print(READY_LINE, flush=True)
    rounds = 0
    for line in sys.stdin:
        command = line.strip()
        if command == "finish":
            return
        if command == "round":
            yield rounds
            rounds += 1
            print(ROUND_DONE_LINE, flush=True)
    raise SystemExit("the benchmark driver went away")


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
    inputs, targets = _batch(config, B, T, args.seed)
    kernel_sets = {False: KernelSet(parallel=False), True: KernelSet(parallel=True)}
    recorders = {c: Recorder(per_thread=bool(args.trace), threads=c[1]) for c in configs}
    peaks = {t: (args.peak_gflops * t if args.peak_gflops else measure_peak_gflops(t)) for _, t in configs}
    flops = step_flops(config, B, T)
    losses: dict[tuple[str, int], list[float]] = {c: [] for c in configs}

    for round_index in _lockstep_rounds():
        for mode, threads in configs:
            recorder = recorders[(mode, threads)]
            model.kernels = optimizer.kernels = kernel_sets[mode == "forkjoin"]
            model.observer = optimizer.observer = recorder
            if mode == "forkjoin":
                numba.set_num_threads(threads)
            with threadpool_limits(limits=threads, user_api="blas"):
                loss = train_step(model, optimizer, [(inputs, targets)], 1e-4, recorder, round_index + 1)
            losses[(mode, threads)].append(loss)

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
            "ms_per_step": ms.tolist(), "first_loss": losses[(mode, threads)][0],
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


def _run_torch_worker(args) -> None:
    """The PyTorch eager baseline (llmpy.torch_baseline) on the same config, init and batch, one step per
    thread count each round."""
    from llmpy.config import preset
    from llmpy.layout import parameter_buffer
    from llmpy.model import init_parameters
    from llmpy.torch_baseline import TorchGPT2Baseline, import_torch

    torch = import_torch()
    thread_counts = [int(t) for t in args.worker.partition(":")[2].split(",")]
    config = preset(args.model)
    B, T = args.batch_size, args.seq_len
    params = parameter_buffer(config)
    init_parameters(params, config, args.seed)
    baseline = TorchGPT2Baseline(config, params)
    inputs, targets = _batch(config, B, T, args.seed)
    times: dict[int, list[float]] = {t: [] for t in thread_counts}
    losses: dict[int, list[float]] = {t: [] for t in thread_counts}
    for _ in _lockstep_rounds():
        for threads in thread_counts:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            losses[threads].append(baseline.train_step(inputs, targets))
            times[threads].append(1e3 * (time.perf_counter() - start))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for threads in thread_counts:
        ms = np.array(times[threads][args.warmup:])
        print(RESULT_PREFIX + json.dumps({
            "model": args.model, "mode": "torch", "runtime": "eager", "torch_version": torch.__version__,
            "threads": threads,
            "ranks": 1, "cores": threads, "B": B, "T": T, "steps": len(ms),
            "ms_per_step_median": float(np.median(ms)), "ms_per_step_min": float(ms.min()),
            "ms_per_step_max": float(ms.max()), "ms_per_step": ms.tolist(), "first_loss": losses[threads][0],
            "tokens_per_s": B * T / float(np.median(ms)) * 1e3,
            "tokens_per_s_per_core": B * T / float(np.median(ms)) * 1e3 / threads,
            "peak_rss_mb": peak_rss_mb, "process_configs": len(thread_counts),
        }), flush=True)


def _batch(config, B: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The one batch every configuration trains on (random tokens: the data does not change the work)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


# --------------------------------------------------------------------------- driver
def _worker_command(args, worker: str) -> list[str]:
    command = [sys.executable, "-m", "llmpy.cli", "bench", "--model", args.model, "-B", str(args.batch_size),
               "-T", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seed", str(args.seed), "--worker", worker]
    if args.peak_gflops:
        command += ["--peak-gflops", str(args.peak_gflops)]
    if args.trace:
        command += ["--trace", args.trace]
    return command


class _Worker:
    """One worker process and the lines it answers on stdout (its stderr goes to a temporary file)."""

    def __init__(self, name: str, command: list[str]):
        import tempfile

        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, bufsize=1)
        self.results: list[dict] = []

    def _fail(self, what: str):
        self.process.kill()
        self.process.wait()
        self.stderr.seek(0)
        error = self.stderr.read()[-3000:]
        return RuntimeError(f"benchmark worker {self.name} {what} (exit {self.process.returncode}):\n{error}")

    def expect(self, wanted: str) -> None:
        """Read lines until `wanted`, collecting results on the way."""
        for line in self.process.stdout:
            if line.startswith(RESULT_PREFIX):
                self.results.append(json.loads(line[len(RESULT_PREFIX):]))
            elif line.rstrip("\n") == wanted:
                return
        raise self._fail(f"stopped before {wanted!r}")

    def send(self, command: str) -> None:
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._fail("died") from None

    def finish(self) -> list[dict]:
        """Ask for the results and wait for the process to end."""
        self.send("finish")
        self.process.stdin.close()
        for line in self.process.stdout:
            if line.startswith(RESULT_PREFIX):
                self.results.append(json.loads(line[len(RESULT_PREFIX):]))
        if self.process.wait() != 0:
            raise self._fail("failed")
        return self.results

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


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
    number = lambda value, fmt, width: format(value, fmt) if value is not None else "-".rjust(width)
    for r in results:
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6s}"
        lines.append(
            f"{r['mode']:11s} {r['runtime']:7s} {r['threads']:3d} {r['ms_per_step_median']:8.0f} "
            f"{r['ms_per_step_min']:6.0f}-{r['ms_per_step_max']:<6.0f} {number(r.get('forward_ms'), '7.0f', 7)} "
            f"{number(r.get('backward_ms'), '7.0f', 7)} {number(r.get('update_ms'), '7.0f', 7)} "
            f"{r['tokens_per_s']:7.0f} {r['tokens_per_s_per_core']:10.0f} {mfu} "
            f"{number(r.get('speedup'), '7.2f', 7)} {number(r.get('efficiency'), '5.2f', 5)} {r['peak_rss_mb']:7.0f}")
    return "\n".join(lines)


def run(args, out=sys.stdout) -> list[dict]:
    from llmpy.metrics import KernelSummary, format_kernel_table

    if args.worker:
        if args.worker.startswith("torch:"):
            _run_torch_worker(args)
        else:
            _run_worker(args)
        return []
    groups = _configurations(args)
    workers = [(f"numba {runtime}: " + ", ".join(f"{m} x{t}" for m, t in configs),
                runtime + ":" + ",".join(f"{m}/{t}" for m, t in configs)) for runtime, configs in groups.items()]
    if args.vs == "torch":
        from llmpy.torch_baseline import import_torch

        import_torch()  # fail here, clearly, when torch is missing
        thread_counts = sorted({t for configs in groups.values() for _, t in configs})
        workers.append((f"torch eager: threads {','.join(map(str, thread_counts))}",
                        "torch:" + ",".join(map(str, thread_counts))))
    started = time.perf_counter()
    running: list[_Worker] = []
    try:
        for name, spec in workers:  # one at a time: each measures its peak undisturbed
            print(f"starting {name} ...", file=out, flush=True)
            running.append(_Worker(name, _worker_command(args, spec)))
            running[-1].expect(READY_LINE)
        rounds = args.warmup + args.steps
        print(f"running {rounds} rounds ({args.warmup} warm-up), one step of every configuration per round ...",
              file=out, flush=True)
        for _ in range(rounds):
            for worker in running:
                worker.send("round")
                worker.expect(ROUND_DONE_LINE)
        results = [result for worker in running for result in worker.finish()]
    finally:
        for worker in running:
            worker.close()
    print(f"  done in {time.perf_counter() - started:.0f} s", file=out, flush=True)
    from llmpy.config import preset
    from llmpy.metrics import step_flops

    add_torch_ratios(results, step_flops(preset(args.model), args.batch_size, args.seq_len) / 1e9)
    add_speedups(results)
    print(f"\n{args.model}, B={args.batch_size}, T={args.seq_len}: median of {args.steps} steps after "
          f"{args.warmup} warm-up, all configurations interleaved step by step; MFU against "
          f"{'--peak-gflops per core' if args.peak_gflops else 'the measured GEMM peak of the cores used'}", file=out)
    print(format_results(results), file=out)
    if args.vs == "torch":
        print("\n" + format_torch_ratios(results), file=out)
    for r in results:
        if "kernels" not in r:
            continue
        rows = [KernelSummary(**k) for k in r["kernels"]]
        phases = {"forward": r["forward_ms"], "zero_grad": r["zero_grad_ms"], "backward": r["backward_ms"],
                  "update": r["update_ms"], "step": r["ms_per_step_median"]}
        print(f"\nkernels: {r['mode']} {r['runtime']} {r['threads']} thread(s)", file=out)
        print(format_kernel_table(rows, phases), file=out)
    _write_outputs(args, results, out)
    return results


def add_torch_ratios(results: list[dict], step_gflop: float) -> None:
    """For each llmpy configuration, the torch baseline's median at the same thread count and the median
    of the per-round ratios llmpy ms / torch ms (paired steps of the same round: drift cancels). Torch rows
    get the MFU of llmpy's FLOP count against the same peak."""
    torch_rows = {r["threads"]: r for r in results if r["mode"] == "torch"}
    peaks = {r["threads"]: r["peak_gflops"] for r in results if r.get("peak_gflops")}
    for r in results:
        if r["mode"] == "torch":
            if r["threads"] in peaks:
                r["peak_gflops"] = peaks[r["threads"]]
                r["mfu"] = step_gflop / (r["ms_per_step_median"] / 1e3) / peaks[r["threads"]]
            continue
        baseline = torch_rows.get(r["threads"])
        if baseline is None:
            continue
        paired = np.array(r["ms_per_step"]) / np.array(baseline["ms_per_step"])
        r["torch_ms_per_step_median"] = baseline["ms_per_step_median"]
        r["torch_peak_rss_mb"] = baseline["peak_rss_mb"]
        r["ratio_vs_torch"] = float(np.median(paired))
        r["first_loss_torch"] = baseline["first_loss"]


def format_torch_ratios(results: list[dict]) -> str:
    lines = [f"{'vs torch eager':26s} {'llmpy ms':>9s} {'torch ms':>9s} {'ratio':>6s} {'llmpy RSS':>10s} "
             f"{'torch RSS':>10s} {'first loss llmpy/torch':>24s}"]
    for r in results:
        if "ratio_vs_torch" not in r:
            continue
        name = f"{r['mode']} {r['runtime']} x{r['threads']}"
        lines.append(f"{name:26s} {r['ms_per_step_median']:9.0f} {r['torch_ms_per_step_median']:9.0f} "
                     f"{r['ratio_vs_torch']:6.2f} {r['peak_rss_mb']:8.0f}MB {r['torch_peak_rss_mb']:8.0f}MB "
                     f"{r['first_loss']:11.6f}/{r['first_loss_torch']:.6f}")
    lines.append("ratio: median over rounds of llmpy ms / torch ms in the same round (< 1: llmpy faster)")
    return "\n".join(lines)


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
