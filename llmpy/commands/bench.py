"""`llmpy bench`: time training steps over a matrix of execution models, thread counts and runtimes.

Configurations that can share a process (same numba threading layer) run in one worker process,
interleaved step by step (A B C A B C ...) on one model, so machine drift hits them alike; each threading
layer gets its own worker process (numba picks its layer once per process). Mode tasks runs every
(task runtime, K, workers) of --runtime x --block-tokens x --threads in the first layer's process (its
kernels are serial) and reports each worker's idle fraction from the recorded tasks. The first steps are warm-up.
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

from llmpy.core.config import ATTENTION_KINDS, CLASSIFIER_ROWS, PRESETS, RECOMPUTE_LEVELS, ActivationOptions
from llmpy.execution.factory import MODES
from llmpy.execution.threads import THREADING_LAYERS, available_cores
from llmpy.execution.options import RUNTIMES as TASK_RUNTIMES, TaskOptions

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
    parser.add_argument("--threading-layer", default="omp",
                        help=f"comma list of numba threading layers for forkjoin: {', '.join(THREADING_LAYERS)} (default omp)")
    parser.add_argument("--block-tokens", default="16", help="mode tasks: comma list of token-block sizes K, each "
                        "dividing -T (default 16)")
    parser.add_argument("--runtime", default="native", help=f"mode tasks: comma list of task runtimes: "
                        f"{', '.join(TASK_RUNTIMES)} (default native); --threads gives the worker counts")
    parser.add_argument("--gemm-split", default="rows", help="mode tasks: comma list of GEMM splits: rows, lm_head, "
                        "channels (default rows; see train --gemm-split); shown as RUNTIME+SPLIT unless rows")
    parser.add_argument("--peak-gflops", type=float, help="peak of one core for MFU (default: measured per thread count)")
    parser.add_argument("--json", metavar="FILE", help="write the results, one object per configuration")
    parser.add_argument("--csv", metavar="FILE", help="write the results as CSV")
    parser.add_argument("--plots", metavar="DIR", help="write scaling plots (PNG) into DIR")
    parser.add_argument("--trace", metavar="DIR", help="write one trace per configuration into DIR/MODE-RUNTIME-THREADS/")
    parser.add_argument("--vs", choices=("torch",), help="also run PyTorch eager (same model, init, batch, fused "
                        "AdamW, threads) interleaved step by step, and print llmpy's time ratio to it")
    parser.add_argument("--shapes", metavar="BxT,...", help="run the whole benchmark once per shape, e.g. "
                        "4x64,4x256,1x1024,4x1024,8x1024 (overrides -B, -T), then print ms/step, ratio, MFU and peak "
                        "RSS per shape (and with --plots, time and memory against T)")
    parser.add_argument("--attention", default="flash", choices=ATTENTION_KINDS, help="llmpy's attention (default flash)")
    parser.add_argument("--recompute", type=int, default=0, choices=RECOMPUTE_LEVELS,
                        help="llmpy: recompute GELU (1) or GELU and layernorm (2) outputs in backward (default 0)")
    parser.add_argument("--classifier-rows", type=int, default=CLASSIFIER_ROWS, metavar="R",
                        help="llmpy: token rows per classifier chunk (default 0: the whole batch; see train "
                             "--classifier-rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: RUNTIME:MODE:THREADS,... in this process


# A configuration: (mode, threads, K, task runtime); K = 0 and task runtime "-" outside mode tasks.
Config = tuple[str, int, int, str]


def _config_spec(config: Config) -> str:
    """How a worker is told a configuration: MODE/THREADS, or tasks/WORKERS/K/TASK_RUNTIME."""
    mode, threads, block_tokens, task_runtime = config
    return f"{mode}/{threads}" + (f"/{block_tokens}/{task_runtime}" if mode == "tasks" else "")


def _parse_config(spec: str) -> Config:
    mode, threads, *task = spec.split("/")
    return (mode, int(threads), int(task[0]), task[1]) if task else (mode, int(threads), 0, "-")


def _config_label(config: Config) -> str:
    mode, threads, block_tokens, task_runtime = config
    return f"{mode} x{threads}" + (f" K{block_tokens} {task_runtime}" if mode == "tasks" else "")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of integers, got {text!r}") from None


def _configurations(args) -> dict[str, list[Config]]:
    """numba threading layer -> [(mode, threads, K, task runtime)], sequential once (1 thread) and the task
    configurations (serial kernels: any numba layer) with the first layer."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runtimes = [r.strip() for r in args.threading_layer.split(",") if r.strip()]
    threads = _int_list(args.threads, "--threads")
    for mode in modes:
        if mode == "mpi":
            raise ValueError("llmpy bench runs one process per threading layer; for MPI ranks run "
                             "`python bench/distributed.py` (it starts mpiexec itself)")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} in --modes; choose from {', '.join(MODES)}")
    for runtime in runtimes:
        if runtime not in THREADING_LAYERS:
            raise ValueError(f"unknown threading layer {runtime!r} in --threading-layer; choose from "
                             f"{', '.join(THREADING_LAYERS)}")
    cores = available_cores()
    if not threads or min(threads) < 1 or max(threads) > cores:
        raise ValueError(f"--threads must be between 1 and the {cores} cores available, got {args.threads!r}")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 1:
        raise ValueError("--steps, -B and -T must be positive and --warmup >= 0")
    ActivationOptions(args.attention, args.recompute, args.classifier_rows)  # refused here, before any worker starts
    groups: dict[str, list[Config]] = {runtime: [] for runtime in runtimes}
    if "sequential" in modes:
        groups[runtimes[0]].append(("sequential", 1, 0, "-"))
    if "forkjoin" in modes:
        for runtime in runtimes:
            groups[runtime].extend(("forkjoin", t, 0, "-") for t in threads)
    if "tasks" in modes:
        block_sizes = _int_list(args.block_tokens, "--block-tokens")
        task_runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
        splits = [s.strip() for s in args.gemm_split.split(",") if s.strip()]
        if not block_sizes or not task_runtimes or not splits:
            raise ValueError("--block-tokens, --runtime and --gemm-split need at least one value each")
        for k in block_sizes:  # each combination is validated as train validates it
            for name in task_runtimes:
                for split in splits:
                    TaskOptions(k, name, gemm_split=split).tokens_per_block(args.seq_len)
        # the split rides in the task runtime's name: "native" (rows) or "native+channels"
        task_runtimes = [name if split == "rows" else f"{name}+{split}" for name in task_runtimes for split in splits]
        groups[runtimes[0]].extend(("tasks", t, k, name) for name in task_runtimes for k in block_sizes for t in threads)
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
    from llmpy.core.config import preset
    from llmpy.core.model import GPT2
    from llmpy.core.optim import AdamW
    from llmpy.execution.factory import make_execution_model
    from llmpy.execution.options import TaskOptions
    from llmpy.observe.metrics import kernel_summary, phase_summary, step_flops
    from llmpy.observe.probes import measure_memory_bandwidth, measure_peak_gflops
    from llmpy.observe.recorder import Recorder

    threading_layer, _, spec = args.worker.partition(":")
    configs = [_parse_config(item) for item in spec.split(",")]
    config = preset(args.model)
    B, T = args.batch_size, args.seq_len
    model = GPT2(config, B, T, activations=ActivationOptions(args.attention, args.recompute, args.classifier_rows))
    model.init_random(args.seed)
    optimizer = AdamW(model.params)
    inputs, targets = _batch(config, B, T, args.seed)

    def execution_model(c: Config):
        mode, threads, block_tokens, task_runtime = c
        if mode != "tasks":
            return make_execution_model(mode, threads, threading_layer)
        runtime, _, split = task_runtime.partition("+")
        return make_execution_model(mode, threads, threading_layer, TaskOptions(block_tokens, runtime,
                                                                                 gemm_split=split or "rows"))

    # the configurations of this process take turns, each step under its own execution model's thread settings
    executions = {c: execution_model(c) for c in configs}
    # task configurations: every task on the trace (their idle time per worker)
    recorders = {c: Recorder(threads=c[1], keep_calls=True) if c[0] == "tasks" else
                 Recorder(per_thread=bool(args.trace), threads=c[1]) for c in configs}
    peaks = {t: (args.peak_gflops * t if args.peak_gflops else measure_peak_gflops(t)) for t in {c[1] for c in configs}}
    flops = step_flops(config, B, T)
    losses: dict[Config, list[float]] = {c: [] for c in configs}
    try:
        for round_index in _lockstep_rounds():
            for c in configs:
                execution, recorder = executions[c], recorders[c]
                model.kernels = optimizer.kernels = execution.kernels
                model.observer = optimizer.observer = recorder
                with execution.activate():
                    loss = execution.train_step(model, optimizer, [(inputs, targets)], 1e-4, recorder, round_index + 1)
                losses[c].append(loss)
        tasks_per_step = {c: len(execution.tasks.step_graph(model, optimizer).graph)
                          for c, execution in executions.items() if c[0] == "tasks"}
    finally:
        for execution in executions.values():
            execution.close()

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for c in configs:
        mode, threads, block_tokens, task_runtime = c
        recorder = recorders[c]
        measured = recorder.steps[args.warmup:]
        ms = np.array([1e3 * s.duration for s in measured])
        phases = phase_summary(recorder.steps, args.warmup)
        median = float(np.median(ms))
        result = {
            "model": args.model, "mode": mode, "attention": args.attention, "recompute": args.recompute,
            "classifier_rows": args.classifier_rows,
            "runtime": threading_layer if mode == "forkjoin" else f"{task_runtime} K{block_tokens}" if mode == "tasks" else "-",
            "threads": threads, "ranks": 1, "cores": threads, "B": B, "T": T, "steps": len(measured),
            "ms_per_step_median": median, "ms_per_step_min": float(ms.min()), "ms_per_step_max": float(ms.max()),
            "forward_ms": phases["forward"], "zero_grad_ms": phases["zero_grad"], "backward_ms": phases["backward"],
            "update_ms": phases["update"], "tokens_per_s": B * T / median * 1e3,
            "tokens_per_s_per_core": B * T / median * 1e3 / threads,
            "mfu": flops / (median / 1e3) / (peaks[threads] * 1e9), "peak_gflops": peaks[threads],
            "peak_rss_mb": peak_rss_mb, "process_configs": len(configs),
            "ms_per_step": ms.tolist(), "first_loss": losses[c][0],
            "kernels": [k.as_dict() for k in kernel_summary(recorder.kernel_totals, recorder.steps, args.warmup)],
        }
        meta = {k: result[k] for k in ("model", "mode", "runtime", "threads", "ranks", "B", "T", "peak_gflops")}
        meta.update(warmup_steps=args.warmup, num_layers=config.num_layers)
        if mode == "tasks":
            meta.update(runtime=task_runtime, block_tokens=block_tokens)
            trace = recorder.to_trace(meta)
            result.update(block_tokens=block_tokens, task_runtime=task_runtime, tasks_per_step=tasks_per_step[c],
                          idle_fraction_per_worker=idle_fraction_per_worker(trace, args.warmup, threads))
        if args.trace:
            name = f"tasks-{task_runtime}-{threads}-K{block_tokens}" if mode == "tasks" else \
                f"{mode}-{result['runtime']}-{threads}"
            directory = os.path.join(args.trace, name)
            meta.update(bandwidth_gbs=measure_memory_bandwidth(threads))
            recorder.to_trace(meta).save(directory)
            result["trace"] = directory
        print(RESULT_PREFIX + json.dumps(result), flush=True)


def idle_fraction_per_worker(trace, skip_steps: int, workers: int) -> list[float]:
    """For each task worker (trace row), the share of the measured steps' wall time it ran no task: over
    the steps after the first `skip_steps`, each step's span only (other configurations interleaved between
    the steps are not this one's idle time), from the POP table's per-row useful time."""
    from llmpy.observe.analysis import pop_table

    steps = [r.metrics for r in pop_table(trace, skip_steps) if r.step != "total" and r.region == "step"]
    wall = sum(m.runtime for m in steps)
    if wall <= 0.0:
        return [0.0] * workers
    return [max(0.0, 1.0 - sum(m.useful.get((0, w), 0.0) for m in steps) / wall) for w in range(workers)]


def _run_torch_worker(args) -> None:
    """The PyTorch eager baseline (llmpy.commands.torch_baseline) on the same config, init and batch, one step per
    thread count each round."""
    from llmpy.core.config import preset
    from llmpy.core.layout import parameter_buffer
    from llmpy.core.model import init_parameters
    from llmpy.commands.torch_baseline import TorchGPT2Baseline, import_torch

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
    command = [sys.executable, "-m", "llmpy", "bench", "--model", args.model, "-B", str(args.batch_size),
               "-T", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seed", str(args.seed), "--attention", args.attention, "--recompute", str(args.recompute),
               "--classifier-rows", str(args.classifier_rows), "--worker", worker]
    if args.peak_gflops:
        command += ["--peak-gflops", str(args.peak_gflops)]
    if args.trace:
        command += ["--trace", args.trace]
    return command


def _worker_environment(spec: str) -> dict:
    """The torch baseline runs with torch's own OpenMP defaults, not the sleeping pools llmpy sets for
    itself (PASSIVE wait policy measured 10-25% slower for torch eager on 2 threads); llmpy's workers get
    the driver's environment (llmpy's settings, or the user's)."""
    from llmpy import THREAD_ENV_SET_BY_LLMPY

    env = dict(os.environ)
    if spec.startswith("torch:"):
        env["LLMPY_KEEP_THREAD_ENV"] = "1"
        for name in THREAD_ENV_SET_BY_LLMPY:  # what the user set stays
            env.pop(name, None)
    return env


class _Worker:
    """One worker process and the lines it answers on stdout (its stderr goes to a temporary file)."""

    def __init__(self, name: str, command: list[str], env: dict | None = None):
        import tempfile

        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, bufsize=1, env=env)
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
    rw = max([7] + [len(str(r["runtime"])) for r in results])  # runtime column ("native K16" in mode tasks)
    lines = [f"{'mode':11s} {'runtime':{rw}s} {'thr':>3s} {'ms/step':>8s} {'min-max':>13s} {'fwd':>7s} {'bwd':>7s} "
             f"{'update':>7s} {'tok/s':>7s} {'tok/s/core':>10s} {'MFU':>6s} {'speedup':>7s} {'eff':>5s} {'RSS MB':>7s}"]
    number = lambda value, fmt, width: format(value, fmt) if value is not None else "-".rjust(width)
    for r in results:
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6s}"
        lines.append(
            f"{r['mode']:11s} {r['runtime']:{rw}s} {r['threads']:3d} {r['ms_per_step_median']:8.0f} "
            f"{r['ms_per_step_min']:6.0f}-{r['ms_per_step_max']:<6.0f} {number(r.get('forward_ms'), '7.0f', 7)} "
            f"{number(r.get('backward_ms'), '7.0f', 7)} {number(r.get('update_ms'), '7.0f', 7)} "
            f"{r['tokens_per_s']:7.0f} {r['tokens_per_s_per_core']:10.0f} {mfu} "
            f"{number(r.get('speedup'), '7.2f', 7)} {number(r.get('efficiency'), '5.2f', 5)} {r['peak_rss_mb']:7.0f}")
    return "\n".join(lines)


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        b, _, t = item.lower().partition("x")
        if not (b.isdigit() and t.isdigit() and int(b) > 0 and int(t) > 0):
            raise ValueError(f"--shapes takes a comma list of BxT with positive B and T (e.g. 4x64,1x1024), got {item!r}")
        shapes.append((int(b), int(t)))
    if not shapes:
        raise ValueError("--shapes needs at least one BxT")
    return shapes


def run(args, out=None) -> list[dict]:
    out = out if out is not None else sys.stdout  # the stream of the call, not of the import
    if args.worker:
        if args.worker.startswith("torch:"):
            _run_torch_worker(args)
        else:
            _run_worker(args)
        return []
    if not args.shapes:
        results = _run_shape(args, out)
    else:
        results = []
        for B, T in _shapes(args.shapes):  # each shape in processes of its own: peak RSS per shape
            args.batch_size, args.seq_len = B, T
            print(f"\n=== shape B={B} T={T} ===", file=out, flush=True)
            results += _run_shape(args, out)
        print("\n" + format_shape_table(results), file=out)
    _write_outputs(args, results, out)
    return results


def _run_shape(args, out) -> list[dict]:
    """The benchmark at one (-B, -T): every configuration (and torch with --vs) interleaved step by step."""
    from llmpy.observe.metrics import KernelSummary, format_kernel_table

    groups = _configurations(args)
    workers = [(f"numba {runtime}: " + ", ".join(_config_label(c) for c in configs),
                runtime + ":" + ",".join(_config_spec(c) for c in configs)) for runtime, configs in groups.items()]
    if args.vs == "torch":
        from llmpy.commands.torch_baseline import import_torch

        import_torch()  # fail here, clearly, when torch is missing
        thread_counts = sorted({c[1] for configs in groups.values() for c in configs})
        workers.append((f"torch eager: threads {','.join(map(str, thread_counts))}",
                        "torch:" + ",".join(map(str, thread_counts))))
    started = time.perf_counter()
    running: list[_Worker] = []
    try:
        for name, spec in workers:  # one at a time: each measures its peak undisturbed
            print(f"starting {name} ...", file=out, flush=True)
            running.append(_Worker(name, _worker_command(args, spec), _worker_environment(spec)))
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
    from llmpy.core.config import preset
    from llmpy.observe.metrics import step_flops

    add_torch_ratios(results, step_flops(preset(args.model), args.batch_size, args.seq_len) / 1e9)
    add_speedups(results)
    print(f"\n{args.model}, B={args.batch_size}, T={args.seq_len}: median of {args.steps} steps after "
          f"{args.warmup} warm-up, all configurations interleaved step by step; MFU against "
          f"{'--peak-gflops per core' if args.peak_gflops else 'the measured GEMM peak of the cores used'}", file=out)
    print(format_results(results), file=out)
    if any(r["mode"] == "tasks" for r in results):
        print("\n" + format_task_table(results), file=out)
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
    return results


def format_shape_table(results: list[dict]) -> str:
    """One row per (shape, llmpy configuration): ms/step, torch's, the paired ratio, MFU, both peak RSS, and the
    attention kernels' share of the step."""
    lines = [f"{'B x T':>10s} {'configuration':24s} {'ms/step':>8s} {'torch ms':>9s} {'ratio':>6s} {'MFU':>6s} "
             f"{'RSS MB':>7s} {'torch RSS':>9s} {'attention':>9s} {'att GF/s':>8s} {'GEMM GF/s':>9s}"]
    dash = lambda width: "-".rjust(width)
    for r in results:
        if r["mode"] == "torch":
            continue
        kernels = r.get("kernels", [])
        attention, attention_gflops = _kernel_group(kernels, "attention")
        _, gemm_gflops = _kernel_group(kernels, "matmul")
        ratio = f"{r['ratio_vs_torch']:6.2f}" if "ratio_vs_torch" in r else dash(6)
        torch_ms = f"{r['torch_ms_per_step_median']:9.0f}" if "torch_ms_per_step_median" in r else dash(9)
        torch_rss = f"{r['torch_peak_rss_mb']:9.0f}" if "torch_peak_rss_mb" in r else dash(9)
        name = f"{r['mode']} {r['runtime']} x{r['threads']}"
        lines.append(f"{r['B']:>4d} x {r['T']:<5d}{name:24s} {r['ms_per_step_median']:8.0f} {torch_ms} {ratio} "
                     f"{100 * r['mfu']:5.1f}% {r['peak_rss_mb']:7.0f} {torch_rss} "
                     f"{100 * attention / r['ms_per_step_median']:8.1f}% {attention_gflops:8.1f} {gemm_gflops:9.1f}")
    lines.append("ratio: median over rounds of llmpy ms / torch ms in the same round; attention: share of the step "
                 "in the attention kernels (forward and backward) and their GFLOP/s (causal FLOPs only), beside the "
                 "GEMMs' (matmul kernels)")
    return "\n".join(lines)


def _kernel_group(kernels: list[dict], prefix: str) -> tuple[float, float]:
    """ms per step and GFLOP/s of the kernels whose name starts with `prefix`."""
    group = [k for k in kernels if k["name"].startswith(prefix)]
    ms = sum(k["ms_per_step"] for k in group)
    flops = sum(k["gflops"] * k["ms_per_step"] for k in group)  # GFLOP/s x ms = MFLOP per step
    return ms, (flops / ms if ms > 0 else 0.0)


def format_task_table(results: list[dict]) -> str:
    """Mode tasks rows: K, tasks per step, speed against forkjoin at the same thread count, idle % per worker."""
    forkjoin: dict[int, float] = {}
    for r in results:  # the fastest numba threading layer at each thread count
        if r["mode"] == "forkjoin":
            forkjoin[r["threads"]] = min(forkjoin.get(r["threads"], np.inf), r["ms_per_step_median"])
    lines = [f"{'tasks':18s} {'K':>4s} {'tasks/step':>10s} {'ms/step':>8s} {'vs forkjoin':>11s}  idle % per worker"]
    for r in results:
        if r["mode"] != "tasks":
            continue
        reference = forkjoin.get(r["threads"])
        ratio = f"{reference / r['ms_per_step_median']:11.2f}" if reference else f"{'-':>11s}"
        idle = " ".join(f"{100 * f:5.1f}" for f in r.get("idle_fraction_per_worker", []))
        lines.append(f"{r['task_runtime'] + ' x' + str(r['threads']):18s} {r['block_tokens']:4d} "
                     f"{r.get('tasks_per_step', 0):10d} {r['ms_per_step_median']:8.0f} {ratio}  {idle}")
    lines.append("vs forkjoin: forkjoin ms/step at the same thread count / tasks ms/step (> 1: tasks faster); idle: "
                 "share of the measured steps' wall time a worker ran no task (from the recorded task events)")
    return "\n".join(lines)


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

    from llmpy.io.formats import atomic_write_bytes

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
        from llmpy.observe.plots import scaling_pngs

        if args.shapes:  # the thread-scaling plots would mix the shapes
            from llmpy.observe.plots import shape_png

            paths = [shape_png(results, os.path.join(args.plots, "shapes.png"))]
        else:
            paths = scaling_pngs(results, args.plots)
        print(f"wrote {', '.join(paths)}", file=out)
    if args.trace:
        print(f"wrote traces under {args.trace}/ (`llmpy analyze DIR`, `llmpy plot timeline DIR`)", file=out)
