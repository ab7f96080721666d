"""Fork-join and tasks on N cores, predicted from a measured run's per-call and per-task costs (issue 14, item 2).

Both start from the measured 1-core seconds of the step's work (llmpy.predict.measured_tasks: tasks from a tasks
run, calls from a sequential/forkjoin run, converted between the two where the run has only one kind). With
BW(n) = min(n * b1, b_all) the memory bandwidth n cores draw (b1: one core's STREAM triad, b_all: all cores'):

fork-join, per kernel call with 1-core time t1 and cost-model bytes m:
    compute(N) = t1 * ceil(p / N) / p         a loop over p items (heads for attention, channel blocks, rows)
               = t1 * g(N)                    GEMMs: g(N) = time on N OpenBLAS threads over 1, timed here for
                                              N <= this machine's cores P; beyond, g(P) * P / N
    memory(N)  = min(t1, m / b1) * b1 / BW(N) the call's memory time at one core, at N cores' bandwidth
    time(N)    = max(compute(N), memory(N)) + glue   (glue: Python between calls, measured)
  and the step is the sum: every call ends at a barrier, so a kernel that stops scaling (memory-bound, or with
  fewer items than threads) holds every core.

tasks: list scheduling of the real task graph on N workers, the native runtime's rule (a free worker takes the
ready task of highest priority, the builder's critical-path estimate), each task taking its measured seconds plus
the scheduler's measured gap between tasks; tasks running at the same time share the memory bandwidth: a task
needs q = bytes / seconds (its bytes capped at what one core moves in its time), and when the running tasks need
more than BW(k) the bandwidth is shared max-min fairly (small needs met in full, the rest split evenly), a task
given b < q running at speed b / q. The step adds the measured time before the first task and after the last.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmpy.predict.measured_tasks import CONVERTED_KERNELS, GEMM_KERNELS, MeasuredStep, StepCall, measured_step

MODES = ("forkjoin", "tasks")
PHASES = ("forward", "backward", "update")
FORK_JOIN_S = 3e-6  # waking the pool and meeting at the barrier, per parallel call on more than 1 thread (assumed)
BOUND_SLACK = 1.1  # a schedule within 10% of a lower bound is limited by that bound


@dataclass(frozen=True)
class Machine:
    """What the prediction assumes of the cores: memory bandwidth per core and in all, cores measured here."""

    core_gbs: float  # GB/s one core draws alone (STREAM triad, 1 thread)
    total_gbs: float  # GB/s of the memory system (all cores)
    cores: int  # cores of this machine: GEMM scaling is timed up to here, extrapolated beyond

    def bandwidth(self, threads: int) -> float:
        """Bytes per second `threads` cores draw together."""
        return 1e9 * min(max(1, threads) * self.core_gbs, max(self.total_gbs, self.core_gbs))


def this_machine(meta: dict, bandwidth_gbs: float | None = None) -> Machine:
    """Bandwidth of one core from the run (its trace, when it ran on 1 thread) or the probe, of all cores from
    the probe on this machine's cores unless `bandwidth_gbs` names the target's."""
    from llmpy.execution.threads import available_cores
    from llmpy.observe.probes import measure_memory_bandwidth

    cores = available_cores()
    core = meta.get("bandwidth_gbs") if meta.get("threads") == 1 and meta.get("bandwidth_gbs") else None
    core = core or measure_memory_bandwidth(1)
    total = bandwidth_gbs or measure_memory_bandwidth(cores)
    return Machine(core, total, cores)


# ------------------------------------------------------------------ list scheduling
@dataclass
class Schedule:
    makespan: float
    start: list[float]
    end: list[float]


def list_schedule(work: Sequence[float], preds: Sequence, succs: Sequence, priority: Sequence[float],
                  workers: int, demand: Sequence[float] | None = None,
                  bandwidth: Callable[[int], float] | None = None,
                  beside: Sequence[float] | None = None) -> Schedule:
    """Tasks work[i] seconds at full speed on `workers` workers; a task is ready when its preds have ended, and a
    free worker takes the ready task of highest priority (ties: lowest index). demand[i]: bytes per second task i
    moves at full speed; bandwidth(k): bytes per second k running tasks share (see the module docstring);
    beside[i]: how much slower task i runs while another task runs beside it (shared caches)."""
    n = len(work)
    waiting = [len(p) for p in preds]
    ready = [(-priority[i], i) for i in range(n) if waiting[i] == 0]
    heapq.heapify(ready)
    start, end = [0.0] * n, [0.0] * n
    running: dict[int, float] = {}  # task -> full-speed seconds left
    now, finished = 0.0, 0
    while ready or running:
        while ready and len(running) < workers:
            _, i = heapq.heappop(ready)
            running[i], start[i] = work[i], now
        speed = _shared_speeds(running, demand, bandwidth) if demand is not None else {}
        if beside is not None and len(running) > 1:
            speed = {i: speed.get(i, 1.0) / beside[i] for i in running}
        step = min(left / speed.get(i, 1.0) for i, left in running.items())
        now += step
        done = []
        for i, left in running.items():
            left -= step * speed.get(i, 1.0)
            running[i] = left
            if left <= 1e-12 * max(1.0, work[i]) + 1e-15:
                done.append(i)
        for i in done:
            del running[i]
            end[i], finished = now, finished + 1
            for s in succs[i]:
                waiting[s] -= 1
                if waiting[s] == 0:
                    heapq.heappush(ready, (-priority[s], s))
    if finished != n:
        raise ValueError(f"the task graph has a cycle: {n - finished} tasks never became ready")
    return Schedule(now, start, end)


def _shared_speeds(running: dict[int, float], demand: Sequence[float], bandwidth) -> dict[int, float]:
    """Max-min fair shares of bandwidth(k) among the k running tasks: {task: speed < 1} for those slowed."""
    available = bandwidth(len(running))
    if sum(demand[i] for i in running) <= available:
        return {}
    speeds, order = {}, sorted(running, key=lambda i: demand[i])
    for position, i in enumerate(order):
        share = available / (len(order) - position)
        if demand[i] <= share:
            available -= demand[i]
        else:
            speeds[i] = share / demand[i]
            available -= share
    return speeds


def critical_path(work: Sequence[float], succs: Sequence, order: Sequence[int]) -> float:
    """The longest chain of work through the graph (`order`: a topological order)."""
    longest = [0.0] * len(work)
    for i in reversed(order):
        longest[i] = work[i] + max((longest[s] for s in succs[i]), default=0.0)
    return max(longest, default=0.0)


# ------------------------------------------------------------------ fork-join
def _chunks(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


def parallel_items(call: StepCall) -> int | None:
    """How many pieces the kernel's parallel variant cuts the call into (None: a loop over many rows)."""
    from llmpy.kernels import adamw, encoder, gelu, layernorm, residual

    a, kernel = call.args, call.kernel
    items = {
        "attention_forward": lambda: a[3],  # groups of heads side by side
        "attention_backward": lambda: a[5],
        "attention_llmc_forward": lambda: (a[6] - a[5]) * a[4] * (a[8] - a[7]),
        "attention_llmc_backward": lambda: (a[8] - a[7]) * a[6],
        "layernorm_backward_params": lambda: _chunks(a[7] - a[6], layernorm.CHANNEL_BLOCK),
        "encoder_backward": lambda: _chunks(a[6] - a[5], encoder.CHANNEL_BLOCK),
        "adamw_update": lambda: _chunks(a[0].size, adamw.CHUNK),
        "gelu_forward": lambda: _chunks(a[0].size, gelu.CHUNK),
        "gelu_backward": lambda: _chunks(a[0].size, gelu.CHUNK),
        "residual_forward": lambda: _chunks(a[0].size, residual.CHUNK),
        "residual_backward": lambda: _chunks(a[0].size, residual.CHUNK),
    }
    if kernel in items:
        return int(items[kernel]())
    first = a[0] if a else None
    return int(first.shape[0]) if getattr(first, "ndim", 0) == 2 else None  # token rows


def gemm_scaling(step: MeasuredStep, call: StepCall, threads: int, machine: Machine) -> float:
    """A GEMM call's time on `threads` OpenBLAS threads over its time on 1: timed here up to this machine's cores,
    beyond them the efficiency per thread at all cores held."""
    if threads == 1:
        return 1.0
    here = min(threads, machine.cores)
    ratio = step.timer.threads_over_one(call, here) if here > 1 else 1.0
    ratio = min(1.0, max(1.0 / here, ratio))
    return ratio if threads == here else ratio * here / threads


def forkjoin_call(step: MeasuredStep, call: StepCall, threads: int, machine: Machine) -> tuple[float, str]:
    """(seconds of the call on `threads` threads, what bounds it: compute, memory or imbalance)."""
    t1 = call.seconds
    if call.kernel in GEMM_KERNELS:
        compute, kind = t1 * gemm_scaling(step, call, threads, machine), "compute"
    else:
        items = parallel_items(call)
        share = 1.0 / threads if items is None else math.ceil(items / threads) / items
        kind = "imbalance" if share > 1.05 / threads else "compute"
        compute = t1 * share
    b1 = machine.bandwidth(1)
    memory = min(t1, call.bytes / b1) * b1 / machine.bandwidth(threads)
    return (memory, "memory") if memory > compute else (compute, kind)


def predict_forkjoin(step: MeasuredStep, threads: int, machine: Machine) -> dict:
    """The step as its calls in order, each with a barrier: the sum of the calls' times and the glue."""
    glue = step.call_glue_s + (FORK_JOIN_S if threads > 1 else 0.0)
    here = min(threads, machine.cores)  # GEMM scaling is timed up to this machine's cores (gemm_scaling)
    if here > 1:
        step.timer.time_threads([c for c in step.calls if c.kernel in GEMM_KERNELS], here)
    phases, by_kind, kernels_of = defaultdict(float), defaultdict(float), defaultdict(lambda: defaultdict(float))
    for call in step.calls:
        seconds, kind = forkjoin_call(step, call, threads, machine)
        phases[call.phase] += seconds + glue
        by_kind[kind] += seconds
        kernels_of[kind][_kernel_label(call, threads)] += seconds
    by_kind["glue"] = glue * len(step.calls)
    total = sum(phases.values())
    return _row("forkjoin", threads, total, phases, _forkjoin_limit(by_kind, kernels_of, total, threads, machine))


def _kernel_label(call: StepCall, threads: int) -> str:
    """The kernel's name, with its pieces when they are fewer than the threads (what holds the barrier)."""
    items = parallel_items(call)
    if items is not None and items < threads:
        return f"{call.kernel} ({items} pieces)"
    return call.kernel


def _forkjoin_limit(by_kind, kernels_of, total: float, threads: int, machine: Machine) -> str:
    """The largest share of the step that does not divide by the cores: memory-bound calls, calls with fewer
    pieces than threads, or Python's glue; else the work itself."""
    if threads == 1:
        return "work / cores (1 core)"
    kind = max(("memory", "imbalance", "glue"), key=lambda k: by_kind[k])
    share = by_kind[kind] / total if total > 0 else 0.0
    if share < 0.2:
        return "work / cores"
    top = ", ".join(k for k, _ in sorted(kernels_of[kind].items(), key=lambda kv: -kv[1])[:2])
    if kind == "memory":
        return f"memory bandwidth ({machine.bandwidth(threads) / 1e9:.0f} GB/s) of {top}: {share:.0%} of the step"
    if kind == "imbalance":
        return f"barriers: {top} has fewer pieces than threads: {share:.0%} of the step"
    return f"serial glue between calls: {share:.0%} of the step"


# ------------------------------------------------------------------ tasks
def predict_tasks(step: MeasuredStep, workers: int, machine: Machine) -> dict:
    """List scheduling of the graph's tasks with their measured costs on `workers` workers."""
    tasks = step.graph.tasks
    overhead = step.task_overhead_s
    work = [s + overhead for s in step.task_s]
    b1 = machine.bandwidth(1)
    moved = [min(t.bytes, s * b1) for t, s in zip(tasks, step.task_s)]
    demand = [m / w if w > 0 else 0.0 for m, w in zip(moved, work)]
    preds, succs = [t.preds for t in tasks], [t.succs for t in tasks]
    schedule = list_schedule(work, preds, succs, [t.priority for t in tasks], workers, demand, machine.bandwidth,
                             _side_by_side(step, min(workers, machine.cores)))
    run = step.tasks_run
    lead, tail = (run.lead_s, run.tail_s) if run else (0.0, 0.0)
    phases = {}
    for phase in PHASES:
        spans = [(schedule.start[i], schedule.end[i]) for i, t in enumerate(tasks) if t.phase == phase]
        phases[phase] = max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0
    path = critical_path(work, succs, step.graph.topological_order())
    row = _row("tasks", workers, lead + schedule.makespan + tail, phases,
               _tasks_limit(schedule, work, path, workers))
    row["critical_path_ms"] = 1e3 * path
    return row


def _side_by_side(step: MeasuredStep, cores: int) -> list[float] | None:
    """Per task, its slowdown beside `cores` - 1 others (timed for GEMM and attention blocks, 1 for the rest).
    The timed slowdown is of warm blocks run in a loop (caches shared by two hot working sets); in the step a
    block also waits on what the kernels before it evicted (a d12 block of 16 rows takes 2-3 times its warm
    time there), and that part did not slow down beside another in traced 2-worker runs. So the slowdown
    applies to the block's warm share of its measured time."""
    if cores < 2:
        return None
    beside = [1.0] * len(step.graph.tasks)
    step.timer.time_side_by_side([c for c in step.calls if c.kernel in CONVERTED_KERNELS], step.graph.tasks, cores)
    for call in step.calls:
        if call.kernel in CONVERTED_KERNELS:
            factor = step.timer.side_by_side_over_alone(call, step.graph.tasks, cores)
            warm, measured = step.timer.warm_block_seconds(call, cores), step.task_s[call.tasks[0]]
            share = min(1.0, warm / measured) if warm and measured > 0 else 1.0
            for i in call.tasks:
                beside[i] = 1.0 + (factor - 1.0) * share
    return beside


def _tasks_limit(schedule: Schedule, work: Sequence[float], path: float, workers: int) -> str:
    """What the schedule shows: workers busy throughout (the work, slowed side by side or not), the critical path
    (the chain every other task waits on), or workers idle for dependencies."""
    if workers == 1:
        return "work / cores (1 core)"
    busy = sum(e - s for s, e in zip(schedule.start, schedule.end))
    idle = 1.0 - busy / (workers * schedule.makespan) if schedule.makespan > 0 else 0.0
    slower = busy / sum(work) - 1.0 if sum(work) > 0 else 0.0
    slowed = f", tasks {slower:.0%} slower side by side (caches, memory)" if slower > 0.05 else ""
    if idle < 1.0 - 1.0 / BOUND_SLACK:
        return "work / cores" + slowed
    if schedule.makespan <= BOUND_SLACK * path:
        return f"critical path ({1e3 * path:.1f} ms)" + slowed
    return f"dependencies: workers {idle:.0%} idle (critical path {1e3 * path:.1f} ms)" + slowed


def _row(mode: str, cores: int, step_s: float, phases: dict, limit: str) -> dict:
    return {"mode": mode, "cores": cores, "step_ms": 1e3 * step_s,
            "phases_ms": {p: 1e3 * phases.get(p, 0.0) for p in PHASES}, "limit": limit}


# ------------------------------------------------------------------ the command's entry
def predict_cores(run_dir: str, cores: list[int], modes: tuple[str, ...] = MODES, *,
                  bandwidth_gbs: float | None = None) -> list[dict]:
    """One dict per (mode, cores): {"mode", "cores", "step_ms", "phases_ms": {"forward", "backward", "update"},
    "limit"}; tasks rows also hold "critical_path_ms". `run_dir`: a measured run (or a folder of runs of one
    configuration, see llmpy.predict.measured_tasks); bandwidth_gbs: the target's memory bandwidth with all its
    cores (default: this machine's, measured)."""
    cores = [int(n) for n in cores]
    if not cores or any(n < 1 for n in cores):
        raise ValueError(f"cores must be positive numbers, got {cores}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r} for a core prediction; choose from {', '.join(MODES)}")
    if bandwidth_gbs is not None and not bandwidth_gbs > 0:
        raise ValueError(f"bandwidth_gbs must be positive, got {bandwidth_gbs}")
    step = measured_step(run_dir)
    return predict_step(step, cores, modes, this_machine(step.reference.meta, bandwidth_gbs))


def predict_step(step: MeasuredStep, cores: list[int], modes: tuple[str, ...], machine: Machine) -> list[dict]:
    """predict_cores for a measured step already read (its timings are kept: one step, one set of numbers)."""
    predict = {"forkjoin": predict_forkjoin, "tasks": predict_tasks}
    return [predict[mode](step, n, machine) for mode in modes for n in cores]


def where_tasks_overtake(rows: list[dict]) -> str:
    """One sentence: from how many cores on the task graph beats fork-join, and what bounds each there."""
    forkjoin = {r["cores"]: r for r in rows if r["mode"] == "forkjoin"}
    tasks = {r["cores"]: r for r in rows if r["mode"] == "tasks"}
    common = sorted(set(forkjoin) & set(tasks))
    if not common:
        return ""
    ahead = [n for n in common if tasks[n]["step_ms"] < forkjoin[n]["step_ms"]]
    if not ahead:
        n = common[-1]
        return (f"fork-join is faster at every core count predicted ({common[0]}-{n}); at {n} cores fork-join: "
                f"{forkjoin[n]['limit']}; tasks: {tasks[n]['limit']}")
    n = ahead[0]
    stays = all(m in ahead for m in common if m >= n)
    where = f"from {n} cores" if n != common[0] else f"already at {n} core{'s' if n > 1 else ''}"
    return (f"tasks overtake fork-join {where} ({tasks[n]['step_ms']:.1f} vs {forkjoin[n]['step_ms']:.1f} ms"
            f"{', and stay ahead' if stays else ', not at every count after'}): fork-join: {forkjoin[n]['limit']}; "
            f"tasks: {tasks[n]['limit']}")
