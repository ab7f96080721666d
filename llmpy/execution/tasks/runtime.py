"""Runtimes that execute a `TaskGraph` on N worker threads.

- `NativeRuntime`: llmpy's own scheduler. Each task has a counter of unfinished predecessors; tasks whose
  counter reaches zero go into one ready heap ordered by priority (the task's critical path to the end of
  the graph, longest first: the chain that bounds the step's time is fed first). N persistent worker
  threads pop the heap, run the task (a nogil numba kernel or a 1-thread BLAS call, so workers run in
  parallel), then count down the successors under one lock, take the next task in the same critical
  section, and wake idle workers when more than one task became ready.
  A task whose function returns a `Completion` (llmpy.execution.deferred: MPI collectives it started) releases
  its successors when that completes, not when the function returns; its worker goes on with other tasks.
- `DaskRuntime`: the same graph as a Dask task graph run by `dask.threaded.get` with N workers (Dask orders
  tasks by its own heuristic, `dask.order`).

Both call `on_done(task_index, worker, start, end)` from the worker thread after each task, with start/end
from `time.perf_counter()`, so every task lands in the trace on the row of the worker that ran it.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from time import perf_counter

from llmpy.execution.deferred import Completion
from llmpy.execution.options import RUNTIMES
from llmpy.execution.tasks.graph import TaskGraph


TaskLog = Callable[[int, int, float, float], None]


class TaskFailed(RuntimeError):
    pass


class NativeRuntime:
    """Dependency counting, a critical-path priority heap and N persistent worker threads."""

    name = "native"

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"a runtime needs at least 1 worker, got {workers}")
        self.workers = workers
        self._cond = threading.Condition(threading.Lock())
        self._ready: list[tuple[float, int]] = []
        self._graph: TaskGraph | None = None
        self._remaining: list[int] = []
        self._done = 0
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._on_done: TaskLog | None = None
        self._on_idle: TaskLog | None = None
        self._deferred = 0  # tasks whose Completion is pending
        self._idle_since: dict[int, float] = {}  # worker -> since when it waits with only Completions pending
        self._shutdown = False
        self._threads = [threading.Thread(target=self._work, args=(w,), name=f"llmpy-task-worker-{w}", daemon=True)
                         for w in range(workers)]
        for thread in self._threads:
            thread.start()

    def run(self, graph: TaskGraph, on_done: TaskLog | None = None, on_idle: TaskLog | None = None) -> None:
        """Run every task of `graph` (validated: priorities set) and return when all have finished.
        on_idle(-1, worker, start, end): a span a worker waited with no task ready while a Completion was
        pending (waiting for communication, not for other workers)."""
        tasks = graph.tasks
        if not tasks:
            return
        with self._cond:
            self._graph = graph
            self._remaining = [len(t.preds) for t in tasks]
            self._done = 0
            self._error = None
            self._on_done, self._on_idle = on_done, on_idle
            self._deferred = 0
            self._finished.clear()
            self._ready = [(-t.priority, t.index) for t in tasks if not t.preds]
            heapq.heapify(self._ready)
            self._cond.notify(min(len(self._ready), self.workers))
        self._finished.wait()
        with self._cond:
            self._graph = None
            error, self._error = self._error, None
        if error is not None:
            raise TaskFailed(f"a task failed: {error!r}") from error

    def _release(self, finished: int) -> None:
        """Count `finished` done and its successors one predecessor fewer (under the lock)."""
        graph = self._graph
        remaining = self._remaining
        for s in graph.tasks[finished].succs:
            remaining[s] -= 1
            if remaining[s] == 0:
                heapq.heappush(self._ready, (-graph.tasks[s].priority, s))
        self._done += 1
        if self._done == len(graph.tasks):
            self._finished.set()

    def _complete_later(self, index: int, error: BaseException | None) -> None:
        """A task's Completion fired (from whatever thread saw its work end): release its successors."""
        with self._cond:
            if error is not None and self._error is None:
                self._error = error
            self._deferred -= 1
            self._release(index)
            if self._finished.is_set():  # the graph's last wait is over: close the idle spans in this run
                for waiting in list(self._idle_since):
                    self._end_idle(waiting)
            self._cond.notify(len(self._ready))

    def _end_idle(self, worker: int) -> None:
        """(Under the lock.) Report the worker's idle span, if one is open."""
        since = self._idle_since.pop(worker, None)
        if since is not None:
            self._on_idle(-1, worker, since, perf_counter())

    def _work(self, worker: int) -> None:
        cond = self._cond
        finished = None  # the task this worker just ran
        while True:
            with cond:
                if finished is not None:
                    self._release(finished)
                    finished = None
                ready = self._ready
                while not ready:
                    if self._shutdown:
                        return
                    if self._deferred and self._on_idle is not None:
                        self._idle_since[worker] = perf_counter()
                    cond.wait()
                    self._end_idle(worker)
                    ready = self._ready
                _, index = heapq.heappop(ready)
                if ready:
                    cond.notify(len(ready))
                task = self._graph.tasks[index]
                on_done = self._on_done
            start = perf_counter()
            result = None
            try:
                if self._error is None:
                    result = task.fn(*task.args)
            except BaseException as error:  # noqa: BLE001  (handed to the caller of run)
                self._error = error
            end = perf_counter()
            if on_done is not None:
                on_done(index, worker, start, end)
            if isinstance(result, Completion):  # its successors wait for its work to end, this worker does not
                with cond:
                    self._deferred += 1
                result.on_complete(lambda error, index=index: self._complete_later(index, error))
            else:
                finished = index

    def close(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)


def _dask_task(runtime: DaskRuntime, index: int, *_predecessors) -> int:
    task = runtime.graph.tasks[index]
    worker = runtime.worker_row()
    start = perf_counter()
    result = task.fn(*task.args)
    if isinstance(result, Completion):  # Dask releases successors only when the function returns
        result.wait()
    end = perf_counter()
    if runtime.on_done is not None:
        runtime.on_done(index, worker, start, end)
    return index


class DaskRuntime:
    """The graph as a Dask graph {key: (function, index, *predecessor keys)}, run by dask.threaded.get."""

    name = "dask"

    def __init__(self, workers: int):
        import dask  # noqa: F401  (a clear ImportError here rather than mid-step)

        if workers < 1:
            raise ValueError(f"a runtime needs at least 1 worker, got {workers}")
        self.workers = workers
        self.graph: TaskGraph | None = None
        self.on_done: TaskLog | None = None
        self._rows: dict[int, int] = {}
        self._rows_lock = threading.Lock()
        self._dsk_for: tuple[int, dict, list] | None = None

    def worker_row(self) -> int:
        ident = threading.get_ident()
        row = self._rows.get(ident)
        if row is None:
            with self._rows_lock:
                row = self._rows.setdefault(ident, len(self._rows))
        return row

    def _dask_graph(self, graph: TaskGraph) -> tuple[dict, list]:
        if self._dsk_for is None or self._dsk_for[0] != id(graph):
            keys = [f"t{t.index}" for t in graph.tasks]
            dsk = {keys[t.index]: (_dask_task, self, t.index, *[keys[p] for p in sorted(t.preds)]) for t in graph.tasks}
            self._dsk_for = (id(graph), dsk, keys)
        return self._dsk_for[1], self._dsk_for[2]

    def run(self, graph: TaskGraph, on_done: TaskLog | None = None, on_idle: TaskLog | None = None) -> None:
        from dask.threaded import get  # (its workers block in a Completion's wait: no idle spans to report)

        self.graph, self.on_done = graph, on_done
        dsk, keys = self._dask_graph(graph)
        try:
            get(dsk, keys, num_workers=self.workers)
        finally:
            self.graph = self.on_done = None

    def close(self) -> None:
        pass


def make_runtime(name: str, workers: int):
    if name == "native":
        return NativeRuntime(workers)
    if name == "dask":
        return DaskRuntime(workers)
    raise ValueError(f"unknown task runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
