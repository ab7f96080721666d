"""A measured run's step as the predictor sees it: the real task graph and the model's call list, each task and
each call with its measured 1-core seconds.

A run directory is what `llmpy train ... --metrics-dir DIR --trace DIR/trace` writes; the trace's events.json is
what is read (its meta names the model, B, T, mode, threads, block size, bandwidth). Per task (tasks runs) or per
kernel call (sequential/forkjoin runs) the median over the measured steps (after the warm-up steps) is taken.
A directory may also hold several runs of one configuration in its subfolders (a tasks run and a forkjoin run,
say): each execution model then takes its costs from the run of its own granularity, the one on fewest threads.

The two execution models run the same work at two granularities: fork-join one GEMM over all B*T rows, tasks
one GEMM per block. A 64-row GEMM runs at a lower rate than a 256-row one, so a call's time is not the sum of
its tasks' times. For the GEMM and attention kernels the conversion between the two is measured here: the real
call and the sequence of its blocks timed in turn on this machine (`KernelTimer`, on the throwaway model's
buffers); the other kernels are loops over rows whose time adds up over blocks. The same timer measures a GEMM
call's scaling over OpenBLAS threads and how much slower blocks run side by side on separate cores.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from time import perf_counter

from threadpoolctl import threadpool_limits

from llmpy.observe.trace import EVENTS_FILE, Trace, is_communication

# (the `_chunk` names: the training classifier's GEMMs on a chunk of the rows, llmpy.kernels.specs.on_chunk)
GEMM_KERNELS = ("matmul_forward", "matmul_backward_input", "matmul_backward_weight", "matmul_forward_chunk",
                "matmul_backward_input_chunk")
# kernels whose call and blocks run at different rates (timed, see KernelTimer)
CONVERTED_KERNELS = GEMM_KERNELS + ("attention_forward", "attention_backward")
SIDE_LOOP_S = 0.05  # each loop of blocks side by side, alone and together
LOOP_S = 0.02  # each side of a timed ratio: a loop of calls at least this long (a few ms calls vary by 10%)


@dataclass
class MeasuredRun:
    """The medians of a measured run's steps (seconds; rank 0's for a data-parallel run)."""

    meta: dict
    step_s: float  # the median step, less the rank's time in MPI calls
    task_s: dict[str, float] = field(default_factory=dict)  # tasks runs: task name -> seconds
    # calls outside tasks (sequential/forkjoin runs: every kernel call; tasks inside ranks: the strategy's update):
    # (kernel, phase, layer, occurrence in the step) -> seconds
    call_s: dict[tuple, float] = field(default_factory=dict)
    task_gap_s: float = 0.0  # tasks runs: the scheduler's time between two tasks on a worker
    lead_s: float = 0.0  # tasks runs: step start to the first task, and last task to step end (calls outside excluded)
    tail_s: float = 0.0
    call_glue_s: float = 0.0  # call runs: Python between two kernel calls

    @property
    def is_tasks(self) -> bool:
        mode = self.meta.get("mode")
        return mode == "tasks" or (mode == "mpi" and self.meta.get("rank_mode") == "tasks")


def trace_path(run_dir: str) -> str:
    """run_dir/trace/events.json (or run_dir/events.json); a ValueError naming it and its command if missing."""
    for path in (os.path.join(run_dir, "trace", EVENTS_FILE), os.path.join(run_dir, EVENTS_FILE)):
        if os.path.isfile(path):
            return path
    wanted = os.path.join(run_dir, "trace", EVENTS_FILE)
    raise ValueError(f"{wanted}: not found; write it with `llmpy train --threads 1 --metrics-dir {run_dir} "
                     f"--trace {os.path.join(run_dir, 'trace')}` (a measured run, 1 core best)")


def load_measured_run(run_dir: str) -> MeasuredRun:
    """The medians of the run's measured steps: per task or per call, and the time between them."""
    path = trace_path(run_dir)
    trace = Trace.load(path)
    meta = trace.meta
    for key in ("model", "B", "T", "mode"):
        if key not in meta:
            raise ValueError(f"{path}: the trace's meta has no {key!r}; rewrite it with a current `llmpy train`")
    if meta.get("grad_accum", 1) != 1:
        raise ValueError(f"{path}: a run with --grad-accum {meta['grad_accum']}; measure with --grad-accum 1")
    steps = _measured_steps(trace)
    if not steps:
        raise ValueError(f"{path}: the trace holds no steps")
    by_step = defaultdict(list)  # rank 0's events of each step, on the calling thread or on task workers
    for event in trace.events:
        if event.rank == 0 and (event.thread == 0 or event.task):
            by_step[event.step].append(event)
    in_mpi = {s.step: sum(e.duration for e in by_step[s.step] if is_communication(e.name)) for s in steps}
    run = MeasuredRun(meta, statistics.median(s.duration - in_mpi[s.step] for s in steps))
    _read_calls(run, steps, by_step, os.path.dirname(os.path.dirname(path)))
    if run.is_tasks:
        _read_tasks(run, steps, by_step)
    return run


def _measured_steps(trace: Trace) -> list:
    steps = sorted((s for s in trace.steps if s.rank == 0), key=lambda s: s.step)
    warmup = int(trace.meta.get("warmup_steps", 1))
    return steps[warmup:] if len(steps) > warmup else steps


def _read_tasks(run: MeasuredRun, steps, by_step) -> None:
    """Per task name the median seconds; the scheduler's gap between tasks on a worker; lead and tail (less the
    calls outside tasks and MPI calls after the last task: a strategy's update)."""
    durations, gaps, leads, tails = defaultdict(list), [], [], []
    for step in steps:
        events = [e for e in by_step[step.step] if e.task]
        if not events:
            continue
        for event in events:
            durations[event.task].append(event.duration)
        for worker in {e.thread for e in events}:
            row = sorted((e for e in events if e.thread == worker), key=lambda e: e.start)
            gaps += [max(0.0, b.start - a.end) for a, b in zip(row, row[1:])]
        last = max(e.end for e in events)
        after = sum(e.duration for e in by_step[step.step] if not e.task and e.start >= last)
        leads.append(min(e.start for e in events) - step.start)
        tails.append(step.end - last - after)
    if not durations:
        raise ValueError("a tasks run whose trace holds no task events; rerun it with --trace")
    run.task_s = {name: statistics.median(values) for name, values in durations.items()}
    run.task_gap_s = statistics.fmean(gaps) if gaps else 0.0
    run.lead_s, run.tail_s = max(0.0, statistics.median(leads)), max(0.0, statistics.median(tails))


def _read_calls(run: MeasuredRun, steps, by_step, metrics_dir: str) -> None:
    """Per (kernel, phase, layer, occurrence in the step) the median seconds of the calls outside tasks on row 0,
    the calling thread; Python's glue per call: what the step holds beyond its calls. Row 0 holds the thread's CPU
    time in the call, so where kernels.csv (the wall time per kernel, the metrics folder beside the trace) is
    there, each kernel's calls are scaled by its wall over CPU time: time the thread lost to other processes stays
    with the kernel, not with the glue."""
    durations, cpu = defaultdict(list), defaultdict(float)
    calls_per_step = []
    for step in steps:
        events = sorted((e for e in by_step[step.step] if not e.task and not is_communication(e.name)),
                        key=lambda e: e.start)
        seen = defaultdict(int)
        for event in events:
            key = (event.name, event.phase, event.layer)
            durations[key + (seen[key],)].append(event.duration)
            seen[key] += 1
            cpu[event.name] += event.duration / len(steps)
        calls_per_step.append(len(events))
    wall = {} if run.is_tasks else _wall_ms_per_step(os.path.join(metrics_dir, "kernels.csv"))
    run.call_s = {key: statistics.median(values) * (wall[key[0]] / 1e3 / cpu[key[0]] if cpu[key[0]] > 0 and
                                                     key[0] in wall else 1.0) for key, values in durations.items()}
    if not run.is_tasks:
        calls = max(1, statistics.median(calls_per_step))
        run.call_glue_s = max(0.0, (run.step_s - sum(run.call_s.values())) / calls)


def _wall_ms_per_step(kernels_csv: str) -> dict[str, float]:
    """kernels.csv's wall ms per step of each kernel ({} without the file)."""
    import csv

    try:
        with open(kernels_csv) as f:
            return {row["name"]: float(row["ms_per_step"]) for row in csv.DictReader(f)}
    except (OSError, KeyError, ValueError):
        return {}


# ------------------------------------------------------------------ the step's structure
@dataclass
class StepCall:
    """One kernel call of the step as fork-join runs it, and the graph's tasks it is cut into."""

    kernel: str
    name: str
    phase: str
    layer: int
    fn: object
    args: tuple
    tasks: list[int]
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0  # 1 core


@dataclass
class MeasuredStep:
    """The real task graph and call list of the runs' configuration, with measured 1-core seconds."""

    tasks_run: MeasuredRun | None  # the run the task costs come from (None: split from the calls run's)
    calls_run: MeasuredRun | None  # the run the call costs come from (None: summed from the tasks run's)
    graph: object  # TaskGraph
    calls: list[StepCall]
    task_s: list[float]
    matched_tasks: int  # tasks whose seconds were measured (0 without a tasks run)
    matched_calls: int
    timer: "KernelTimer"

    @property
    def reference(self) -> MeasuredRun:
        return self.tasks_run or self.calls_run

    @property
    def task_overhead_s(self) -> float:
        """The scheduler's time per task: measured between tasks, else Python's glue per call."""
        return self.tasks_run.task_gap_s if self.tasks_run else self.calls_run.call_glue_s

    @property
    def call_glue_s(self) -> float:
        """Python's time between two fork-join calls: measured, else the scheduler's time per task."""
        return self.calls_run.call_glue_s if self.calls_run else self.tasks_run.task_gap_s


def model_config(meta: dict):
    """The GPT2Config of a run: its preset, or the preset with its layers and channels, or GPT-2's shape rule."""
    from llmpy.core.config import PRESETS, GPT2Config

    if meta["model"] in PRESETS:
        return PRESETS[meta["model"]]
    layers, channels = meta.get("num_layers"), meta.get("channels")
    for config in PRESETS.values():
        if config.num_layers == layers and config.channels == channels:
            return config
    if not layers or not channels:
        raise ValueError(f"model {meta['model']!r}: the trace's meta names neither a preset nor its shape")
    return GPT2Config(num_layers=layers, num_heads=max(1, channels // 64), channels=channels)


def _gemm_split(task_names) -> str:
    """The run's --gemm-split, read off its task names (the meta does not hold it)."""
    split = "rows"
    for name in task_names:
        if name.startswith(("matmul_forward", "matmul_backward_input")) and " c" in name:
            if " l-1" not in name and ".logits" not in name:
                return "channels"
            split = "lm_head"
    return split


def build_step(run: MeasuredRun, other: MeasuredRun | None = None):
    """(graph, calls) of the runs' configuration (`run` the tasks run when there is one): build_step_graph's graph
    (the model's buffers stay lazily zero, so this is cheap) and the model's list of calls in order, each with the
    consecutive graph tasks cut from it."""
    from llmpy.core.model import GPT2
    from llmpy.core.optim import AdamW, AdamWConfig
    from llmpy.core.step import kernel_calls
    from llmpy.execution.options import TaskOptions
    from llmpy.execution.tasks.execution import build_step_graph

    meta = run.meta
    B, T = int(meta["B"]), int(meta["T"])
    model = GPT2(model_config(meta), B, T)
    clips = any(n.startswith("sum_of_squares") for r in (run, other) if r for n in r.task_s) or any(
        k[0] == "sum_of_squares" for r in (run, other) if r for k in r.call_s)
    optimizer = AdamW(model.params, AdamWConfig(grad_clip=1.0 if clips else 0.0))
    block = meta.get("block_tokens") if run.is_tasks else None
    options = TaskOptions(block_tokens=block if block and T % block == 0 else None,
                          gemm_split=_gemm_split(run.task_s))
    graph = build_step_graph(model, optimizer, options=options).graph
    norm = [optimizer.grad_norm_call(model.grads.flat)] if clips else []
    calls = kernel_calls(model.forward_calls(B, T) + model.backward_calls(B, T, False) + norm
                         + optimizer.update_calls(model.params, model.grads))
    return graph, _calls_with_tasks(graph, calls)


def _calls_with_tasks(graph, calls) -> list[StepCall]:
    """Each call with its tasks: the builder adds a call's tasks one after the other, in call order."""
    from llmpy.kernels.costs import kernel_cost

    out, i, tasks = [], 0, graph.tasks
    for call in calls:
        j = i
        while j < len(tasks) and tasks[j].kernel == call.kernel:
            j += 1
        if j == i:
            raise ValueError(f"the task graph has no task for the call {call.name} of layer {call.layer}")
        flops, moved = kernel_cost(call.kernel, call.args)  # the whole call's: its blocks re-read shared inputs
        out.append(StepCall(call.kernel, call.name, call.phase, call.layer, call.fn, call.args, list(range(i, j)),
                            flops, moved))
        i = j
    if i != len(tasks):
        raise ValueError(f"the task graph has {len(tasks) - i} tasks beyond the model's calls ({tasks[i].name})")
    return out


# ------------------------------------------------------------------ measured seconds of every task and call
class KernelTimer:
    """Ratios of real kernel calls timed on this machine, once per (kernel, shape): a call over the sequence of
    its blocks (the granularity conversion), a call on N BLAS threads over 1 (a GEMM's scaling), and blocks
    side by side over one alone. The two sides of a ratio are timed in turn, so that what else runs on the
    machine slows both alike; the thread and side-by-side ratios over several rounds in which all the shapes
    asked for together take turns (time_threads, time_side_by_side)."""

    ROUNDS = 5  # at most: long calls stop after budget_s (see _ratio)
    THREAD_ROUNDS = 9
    SIDE_ROUNDS = 9

    def __init__(self) -> None:
        self._ratios: dict[tuple, float] = {}
        self._warm_s: dict[tuple, float] = {}  # side-by-side key -> the first block's seconds alone, in a loop

    def call_over_blocks(self, call: "StepCall", tasks) -> float:
        key = ("blocks", call.kernel, call.flops, call.bytes, len(call.tasks))
        if key not in self._ratios:
            blocks = [(tasks[i].fn, tasks[i].args) for i in call.tasks]
            self._ratios[key] = _ratio(lambda: call.fn(*call.args), lambda: [fn(*args) for fn, args in blocks],
                                       1, 1, self.ROUNDS)
        return self._ratios[key]

    def threads_over_one(self, call: "StepCall", threads: int) -> float:
        self.time_threads([call], threads)
        return self._ratios[self._threads_key(call, threads)]

    def time_threads(self, calls, threads: int) -> None:
        """Times threads_over_one of every shape among `calls` not timed yet, the shapes in turn each round: on
        a shared host a 2-thread GEMM's speed moves by 15% and more for seconds at a time, so each shape's rounds
        are spread over the whole timing rather than taken one after another in one such stretch."""
        pending = {}
        for call in calls:
            key = self._threads_key(call, threads)
            if key not in self._ratios:
                pending.setdefault(key, lambda call=call: call.fn(*call.args))
        reps = {key: _loop_reps(_seconds(run, threads)) for key, run in pending.items()}  # also the warm-up
        rounds = defaultdict(list)
        for _ in range(self.THREAD_ROUNDS):
            for key, run in pending.items():
                many, one = _seconds(run, threads, reps[key]), _seconds(run, 1, reps[key])
                rounds[key].append(many / one if one > 0 else 1.0)
        self._ratios.update({key: statistics.median(values) for key, values in rounds.items()})

    @staticmethod
    def _threads_key(call: "StepCall", threads: int) -> tuple:
        return ("threads", call.kernel, call.flops, call.bytes, threads)

    def side_by_side_over_alone(self, call: "StepCall", tasks, threads: int) -> float:
        """A block's time while `threads` - 1 other blocks of its call run on the other cores, over its time
        alone (shared caches and memory: two 1-thread GEMMs on two cores each run slower than one alone).
        1 for a call of fewer blocks than threads (its blocks never run side by side)."""
        self.time_side_by_side([call], tasks, threads)
        return self._ratios.get(self._side_key(call, threads), 1.0)

    def time_side_by_side(self, calls, tasks, threads: int) -> None:
        """Times side_by_side_over_alone of every shape among `calls` not timed yet, the shapes in turn each
        round (as time_threads, for the same reason); not those of fewer blocks than threads."""
        pending = {}
        for call in calls:
            key = self._side_key(call, threads)
            if threads >= 2 and len(call.tasks) >= threads and key not in self._ratios:
                pending.setdefault(key, [(tasks[i].fn, tasks[i].args) for i in call.tasks[:threads]])
        reps = {}
        for key, runs in pending.items():
            fn, args = runs[0]
            _seconds(lambda: fn(*args), 1)  # the warm-up: first touch, BLAS's buffers
            once = _seconds(lambda: fn(*args), 1)
            if once < self.MIN_SIDE_BY_SIDE_S:
                self._ratios[key] = 1.0
            else:
                reps[key] = max(3, min(100, int(SIDE_LOOP_S / once)))
        rounds, alone_s = defaultdict(list), defaultdict(list)
        with threadpool_limits(limits=1, user_api="blas"):
            for _ in range(self.SIDE_ROUNDS):
                for key, count in reps.items():
                    alone = _loop_times(pending[key][:1], count)[0]
                    rounds[key].append(statistics.fmean(_loop_times(pending[key], count)) / alone if alone > 0
                                       else 1.0)
                    alone_s[key].append(alone)
        self._ratios.update({key: min(2.0, max(1.0, statistics.median(v))) for key, v in rounds.items()})
        self._warm_s.update({key: statistics.median(v) for key, v in alone_s.items()})

    def warm_block_seconds(self, call: "StepCall", threads: int) -> float | None:
        """The first block's seconds in the loop side_by_side_over_alone timed it alone (None: not timed)."""
        return self._warm_s.get(self._side_key(call, threads))

    @staticmethod
    def _side_key(call: "StepCall", threads: int) -> tuple:
        return ("side", call.kernel, call.flops, call.bytes, len(call.tasks), threads)

    MIN_SIDE_BY_SIDE_S = 2e-4  # shorter blocks are timed by Python's overhead and its lock, not by the cores


def _seconds(run, threads: int, reps: int = 1) -> float:
    """Seconds per call of `reps` calls of run() on `threads` BLAS threads."""
    with threadpool_limits(limits=threads, user_api="blas"):
        start = perf_counter()
        for _ in range(reps):
            run()
        return (perf_counter() - start) / reps


def _loop_reps(once: float) -> int:
    """Calls in a loop of at least LOOP_S, for a call of `once` seconds."""
    return max(1, min(100, math.ceil(LOOP_S / once))) if once > 0 else 1


def _ratio(a, b, threads_a: int, threads_b: int, rounds: int, budget_s: float = 0.3) -> float:
    """The median over rounds of time(a) / time(b), after a warm-up of a (first touch of the lazily zero buffers,
    BLAS's own buffers; b touches the same data), each side a loop of at least LOOP_S. Fewer rounds for long
    calls: none after `budget_s` (the lm_head's GEMMs take a second a round at d12)."""
    reps = _loop_reps(_seconds(a, threads_a))
    ratios, spent = [], 0.0
    while len(ratios) < rounds and (not ratios or spent < budget_s):
        ta, tb = _seconds(a, threads_a, reps), _seconds(b, threads_b, reps)
        ratios.append(ta / tb if tb > 0 else 1.0)
        spent += reps * (ta + tb)
    return statistics.median(ratios)


def _loop_times(runs: list, reps: int) -> list[float]:
    """Each (fn, args) called `reps` times on a thread of its own, all started together: mean seconds per call."""
    import threading

    start, times = threading.Barrier(len(runs)), [0.0] * len(runs)

    def repeat(index: int) -> None:
        fn, args = runs[index]
        start.wait()
        begin = perf_counter()
        for _ in range(reps):
            fn(*args)
        times[index] = (perf_counter() - begin) / reps

    threads = [threading.Thread(target=repeat, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times


def estimate(flops: float, moved: float) -> float:
    """The builder's 1-core cost estimate without its per-task overhead (for costs the run did not measure)."""
    from llmpy.execution.tasks.builder import EST_BYTES, EST_FLOPS

    return max(flops / EST_FLOPS, moved / EST_BYTES)


def _fill_unmeasured(seconds: list, items: list) -> None:
    """seconds[i] None -> the cost model's estimate of items[i] (kernel, flops, bytes) times the measured
    seconds-per-estimate of that kernel (of all measured items if the kernel has none)."""
    measured, estimated = defaultdict(float), defaultdict(float)
    for s, (kernel, flops, moved) in zip(seconds, items):
        if s is not None:
            measured[kernel] += s
            estimated[kernel] += estimate(flops, moved)
    overall = sum(measured.values()) / sum(estimated.values()) if sum(estimated.values()) > 0 else 1.0
    for i, (kernel, flops, moved) in enumerate(items):
        if seconds[i] is None:
            rate = measured[kernel] / estimated[kernel] if estimated[kernel] > 0 else overall
            seconds[i] = estimate(flops, moved) * rate


def measured_step(run_dir: str, timer: KernelTimer | None = None) -> MeasuredStep:
    """The runs' graph and calls with 1-core seconds: the task costs measured by a tasks run, the call costs by a
    sequential/forkjoin run; where the directory has only one kind, converted from it (module docstring)."""
    tasks_run, calls_run = reference_runs(run_dir)
    graph, calls = build_step(tasks_run or calls_run, calls_run)
    timer = timer or KernelTimer()
    tasks, task_s, matched_tasks, matched_calls = graph.tasks, [None] * len(graph.tasks), 0, 0
    if tasks_run is not None:
        task_s = [tasks_run.task_s.get(t.name) for t in tasks]
        matched_tasks = sum(s is not None for s in task_s)
        _share_totals(task_s, tasks, _totals(tasks_run.call_s))  # a strategy's update, run outside the graph
        _fill_unmeasured(task_s, [(t.kernel, t.flops, t.bytes) for t in tasks])
    if calls_run is not None:
        call_s = _measured_calls(calls_run, calls)
        matched_calls = sum(s is not None for s in call_s)
        _fill_unmeasured(call_s, [(c.kernel, c.flops, c.bytes) for c in calls])
        for call, seconds in zip(calls, call_s):
            call.seconds = seconds
            if tasks_run is None:
                _split_call(call, tasks, task_s, timer)
    else:
        for call in calls:
            call.seconds = sum(task_s[i] for i in call.tasks) * _call_over_blocks(call, tasks, timer)
    return MeasuredStep(tasks_run, calls_run, graph, calls, task_s, matched_tasks, matched_calls, timer)


def _totals(call_s: dict[tuple, float]) -> dict[tuple[str, str], float]:
    """Measured seconds per step of each (kernel, phase)."""
    totals = defaultdict(float)
    for key, seconds in call_s.items():
        totals[key[:2]] += seconds
    return totals


def _share_totals(seconds: list, items, totals: dict[tuple[str, str], float]) -> None:
    """seconds[i] None -> its (kernel, phase)'s measured total in the cost model's shares among the unmeasured
    items of that (kernel, phase) (items: tasks or calls)."""
    open_items = defaultdict(list)
    for i, item in enumerate(items):
        if seconds[i] is None and (item.kernel, item.phase) in totals:
            open_items[item.kernel, item.phase].append(i)
    for key, indices in open_items.items():
        shares = [estimate(items[i].flops, items[i].bytes) for i in indices]
        whole = sum(shares)
        for i, share in zip(indices, shares):
            seconds[i] = totals[key] * (share / whole if whole > 0 else 1.0 / len(indices))


def _measured_calls(run: MeasuredRun, calls: list[StepCall]) -> list:
    """Each call's measured seconds: the trace's call of the same kernel, phase, layer and occurrence where the
    trace has as many calls of that kernel and phase as the model's list; else (an update cut by the strategy
    into buckets or tensors, say) the kernel's measured total in the cost model's shares; None if unmeasured."""
    in_trace, in_list = defaultdict(int), defaultdict(int)
    for key in run.call_s:
        in_trace[key[:2]] += 1
    for call in calls:
        in_list[call.kernel, call.phase] += 1
    occurrence, seconds = defaultdict(int), []
    for call in calls:
        key = (call.kernel, call.phase, call.layer)
        same = in_trace[key[:2]] == in_list[key[:2]]
        seconds.append(run.call_s.get(key + (occurrence[key],)) if same else None)
        occurrence[key] += 1
    totals = _totals(run.call_s)
    mismatched = {k: v for k, v in totals.items() if in_trace[k] != in_list[k]}
    _share_totals(seconds, calls, mismatched)
    return seconds


def reference_runs(run_dir: str) -> tuple[MeasuredRun | None, MeasuredRun | None]:
    """(tasks run, sequential/forkjoin run) of `run_dir`: the run itself, or of the runs in its subfolders the one
    of each kind on fewest threads. They must be runs of one configuration."""
    try:
        runs = [load_measured_run(run_dir)]
    except ValueError as missing:
        folders = sorted(os.path.join(run_dir, d) for d in os.listdir(run_dir)) if os.path.isdir(run_dir) else []
        runs = [load_measured_run(d) for d in folders if os.path.isdir(d) and _has_trace(d)]
        if not runs:
            raise missing from None
    for run in runs[1:]:
        for key in ("model", "B", "T"):
            if run.meta.get(key) != runs[0].meta.get(key):
                raise ValueError(f"{run_dir}: its runs differ in {key} ({runs[0].meta.get(key)} and "
                                 f"{run.meta.get(key)}); keep runs of one configuration together")
    fewest = lambda kind: min(kind, key=lambda r: r.meta.get("threads", 1), default=None)  # noqa: E731
    chosen = fewest([r for r in runs if r.is_tasks]), fewest([r for r in runs if not r.is_tasks])
    for run in chosen:
        # a run on more threads measured its calls already scaled, its tasks already slowed side by side
        if run is not None and run.meta.get("threads", 1) != 1:
            raise ValueError(f"{run_dir}: the {run.meta['mode']} run ran on {run.meta['threads']} threads; predictions "
                             "start from a 1-core run: `llmpy train --threads 1 --metrics-dir DIR --trace DIR/trace`")
    return chosen


def _has_trace(folder: str) -> bool:
    try:
        trace_path(folder)
        return True
    except ValueError:
        return False


def _call_over_blocks(call: StepCall, tasks, timer: KernelTimer) -> float:
    """A call's time over the sum of its blocks' times, as timed here: GEMMs and attention, whose rate depends
    on the block's shape (1 for the loops over rows, and for AdamW: its blocks add up, and timing it would touch
    the whole optimizer state)."""
    if call.kernel not in CONVERTED_KERNELS or len(call.tasks) == 1:
        return 1.0
    return timer.call_over_blocks(call, tasks)


def _split_call(call: StepCall, tasks, task_s: list, timer: KernelTimer) -> None:
    """A measured call's seconds over its tasks: in the cost model's shares, the blocks' sum being the call's
    over the timed call-over-blocks ratio."""
    shares = [estimate(tasks[i].flops, tasks[i].bytes) for i in call.tasks]
    total = sum(shares)
    blocks_s = call.seconds / _call_over_blocks(call, tasks, timer)
    for i, share in zip(call.tasks, shares):
        task_s[i] = blocks_s * (share / total if total > 0 else 1.0 / len(call.tasks))
