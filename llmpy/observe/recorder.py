"""Recording a run: every kernel call's wall time, cost and phase, and optionally each thread's CPU time in it.

`Recorder` is the observer the model and the optimizer call every kernel through. With `per_thread=True` it
also reads, before and after each call, the CPU-time clock of every thread of the process (Linux
`clock_gettime` on the thread's CPU clock, about 0.4 us a read): the helper threads of numba's pool and of
OpenBLAS sleep when idle (llmpy sets OMP_WAIT_POLICY=PASSIVE and a short OpenBLAS spin), so a thread's CPU
time inside a call is the work it did there. That is what traces and the POP metrics show per thread.
"""

from __future__ import annotations

import math
import os
import threading
import time
from time import perf_counter
from typing import Callable

from llmpy.kernels.costs import kernel_cost
from llmpy.observe.trace import KernelEvent, StepRecord, Trace

# A helper thread busy for less than this inside a call did not take part in it.
MIN_THREAD_BUSY = 2e-6


def _thread_cpu_clock(tid: int) -> int:
    # Linux's clock id for "CPU time of thread tid": MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)
    return (~tid << 3) | 6


class ThreadClocks:
    """CPU-time clocks of the process's threads other than the calling one."""

    def __init__(self) -> None:
        self.clock_ids: list[int] = []
        self.refresh()

    def refresh(self) -> None:
        """Pick up threads started since (numba and OpenBLAS start their pools lazily)."""
        main = threading.get_native_id()
        try:
            tids = sorted(int(t) for t in os.listdir("/proc/self/task") if int(t) != main)
        except OSError:  # not Linux: no per-thread clocks, only the calling thread is measured
            tids = []
        self.clock_ids = [_thread_cpu_clock(tid) for tid in tids]

    def read(self) -> list[float]:
        values = []
        for clock_id in self.clock_ids:
            try:
                values.append(time.clock_gettime(clock_id))
            except OSError:  # the thread has ended
                values.append(math.nan)
        return values


class Recorder:
    """Observer of kernel calls (see GPT2.observer) that keeps a timeline of the run."""

    def __init__(self, rank: int = 0, per_thread: bool = False, threads: int | None = None,
                 keep_calls: bool | None = None):
        """threads: the run's thread count; each call then shows at most threads - 1 helper rows, the
        busiest (a helper of the other pool still winding down from the previous call is not work).
        keep_calls: keep every call (needed for traces; default: with per_thread). Without it only
        per-step, per-kernel totals are kept, so memory stays small however long the run."""
        self.origin = perf_counter()
        self.rank = rank
        self.per_thread = per_thread
        self.keep_calls = per_thread if keep_calls is None else keep_calls
        # step -> kernel name -> [calls, wall seconds, flops, bytes]
        self.kernel_totals: dict[int, dict[str, list[float]]] = {}
        self.max_helpers = None if threads is None else max(0, threads - 1)
        self.enabled = True
        # (name, phase, layer, step, start, end, flops, bytes), wall seconds since origin
        self.calls: list[tuple[str, str, int, int, float, float, float, float]] = []
        # (name, phase, layer, step, thread row, start, end): CPU time of each thread in each call
        self.thread_events: list[tuple[str, str, int, int, int, float, float]] = []
        # (name, phase, layer, step, worker row, start, end, flops, bytes, task label): calls run by task workers
        self.task_events: list[tuple[str, str, int, int, int, float, float, float, float, str]] = []
        # (step, start) of an MPI call -> (bytes sent, bytes received) by this rank (llmpy.execution.mpi)
        self.traffic: dict[tuple[int, float], tuple[int, int]] = {}
        self.steps: list[StepRecord] = []
        self.step = 0
        self.phase = "forward"
        self._clocks = ThreadClocks() if per_thread else None
        self._step_start = 0.0
        self._phase_start = 0.0
        self._phases: dict[str, tuple[float, float]] = {}

    def now(self) -> float:
        return perf_counter() - self.origin

    # ------------------------------------------------------------ steps and phases
    def begin_step(self, step: int) -> None:
        if self._clocks is not None:
            self._clocks.refresh()
        self.step = step
        self._phases = {}
        self._step_start = self._phase_start = self.now()

    def set_phase(self, phase: str) -> None:
        now = self.now()
        if self._phase_start < now and self.phase in self._phases:
            start, _ = self._phases[self.phase]
            self._phases[self.phase] = (start, now)
        self.phase = phase
        self._phase_start = now
        self._phases.setdefault(phase, (now, now))

    def end_step(self, loss: float, tokens: int, phases: dict[str, tuple[float, float]] | None = None) -> StepRecord:
        """phases: (start, end) per phase in seconds since origin, for runs whose phases overlap (task
        mode); default: the spans marked with set_phase."""
        end = self.now()
        if self.phase in self._phases:
            self._phases[self.phase] = (self._phases[self.phase][0], end)
        if phases is not None:
            self._phases = dict(phases)
        record = StepRecord(self.step, self.rank, self._step_start, end, float(loss), int(tokens), dict(self._phases))
        self.steps.append(record)
        return record

    # ------------------------------------------------------------ kernel calls
    def __call__(self, name: str, layer: int, kernel: Callable, args: tuple):
        if not self.enabled:
            return kernel(*args)
        clocks = self._clocks
        if clocks is None:
            start = perf_counter()
            result = kernel(*args)
            end = perf_counter()
        else:
            helpers_before = clocks.read()
            main_before = time.thread_time()
            start = perf_counter()
            result = kernel(*args)
            end = perf_counter()
            main_busy = time.thread_time() - main_before
            helpers_after = clocks.read()
            self._record_threads(name, layer, start - self.origin, end - start, main_busy,
                                 helpers_before, helpers_after)
        flops, moved = kernel_cost(name, args)
        self._add_to_totals(name, end - start, flops, moved)
        if self.keep_calls:
            self.calls.append((name, self.phase, layer, self.step, start - self.origin, end - self.origin, flops, moved))
        return result

    def note_traffic(self, name: str, sent: int, received: int) -> None:
        """The network bytes of the MPI call `name` just recorded (a collective this rank started)."""
        if self.enabled and self.keep_calls and self.calls and self.calls[-1][0] == name:
            self.traffic[(self.calls[-1][3], self.calls[-1][4])] = (sent, received)

    def record_task(self, name: str, phase: str, layer: int, row: int, start: float, end: float, flops: float,
                    moved: float, task: str = "") -> None:
        """A kernel call that a task worker ran (llmpy.execution.tasks.step): `row` is the worker, start and end are
        perf_counter() seconds. Call from one thread (the task model folds its workers' logs in after a step)."""
        if not self.enabled:
            return
        self._add_to_totals(name, end - start, flops, moved)
        if self.keep_calls:
            self.task_events.append((name, phase, layer, self.step, row, start - self.origin, end - self.origin,
                                     flops, moved, task))

    def _add_to_totals(self, name: str, seconds: float, flops: float, moved: float) -> None:
        """Per step and kernel: [calls, seconds, FLOPs, bytes]."""
        entry = self.kernel_totals.setdefault(self.step, {}).setdefault(name, [0, 0.0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        entry[2] += flops
        entry[3] += moved

    def _record_threads(self, name, layer, start, wall, main_busy, before, after) -> None:
        busy = sorted((a - b for a, b in zip(after, before) if a - b > MIN_THREAD_BUSY), reverse=True)
        if self.max_helpers is not None:
            busy = busy[: self.max_helpers]
        events = self.thread_events
        events.append((name, self.phase, layer, self.step, 0, start, start + min(main_busy, wall)))
        for row, seconds in enumerate(busy, start=1):
            events.append((name, self.phase, layer, self.step, row, start, start + min(seconds, wall)))

    # ------------------------------------------------------------ results
    def to_trace(self, meta: dict) -> Trace:
        """The recorded run as a Trace: per-thread CPU events when recorded per thread, else one row of
        wall-time events; flops and bytes on row 0."""
        if not self.keep_calls:
            raise RuntimeError("this Recorder kept only totals; create it with keep_calls=True to build a trace")
        events: list[KernelEvent] = []
        if self.per_thread:
            costs = {(c[0], c[2], c[3], c[4]): (c[6], c[7]) for c in self.calls}
            for name, phase, layer, step, row, start, end in self.thread_events:
                flops, moved = costs.get((name, layer, step, start), (0.0, 0.0)) if row == 0 else (0.0, 0.0)
                sent, received = self.traffic.get((step, start), (0, 0)) if row == 0 else (0, 0)
                events.append(KernelEvent(name, phase, layer, step, self.rank, row, start, end, flops, moved,
                                          sent=sent, received=received))
        else:
            for name, phase, layer, step, start, end, flops, moved in self.calls:
                sent, received = self.traffic.get((step, start), (0, 0))
                events.append(KernelEvent(name, phase, layer, step, self.rank, 0, start, end, flops, moved,
                                          sent=sent, received=received))
        for name, phase, layer, step, row, start, end, flops, moved, task in self.task_events:
            events.append(KernelEvent(name, phase, layer, step, self.rank, row, start, end, flops, moved, task))
        return Trace(events, list(self.steps), dict(meta))
