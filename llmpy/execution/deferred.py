"""Work that a data-parallel strategy hands to a rank's task graph, and work that ends after its function.

A strategy (llmpy.execution.mpi) knows nothing of task graphs; it describes each piece of its work as a
`GraphWork`: the function, the array views it reads and writes (the task graph derives its edges from them) and
a cost estimate (its priority). A function that starts MPI collectives returns a `Completion`: the task's
successors are released only when the collectives have completed, and the worker that ran it is free
meanwhile (TAMPI's non-blocking mode in OmpSs-2: a task bound to MPI requests finishes when they do).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class GraphWork:
    """fn(*args) as a task named `name` (unique in its graph) of kernel `kernel` in `phase`, about `layer` (the
    bucket's part, -1 for none); `reads` and `writes` are array views inside the step's registered tensors;
    `seconds` is its cost estimate for the priority."""

    name: str
    kernel: str
    fn: Callable
    args: tuple
    reads: tuple
    writes: tuple
    seconds: float
    phase: str
    layer: int = -1


class Completion:
    """The end of a task's work, later than its function's return: `complete` (from whichever thread sees the
    work finished) runs the callback the runtime registered with `on_complete`, at once if it came later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callback: Callable[[BaseException | None], None] | None = None
        self._event = threading.Event()
        self.error: BaseException | None = None
        self.completed_at: float | None = None  # time.perf_counter()

    def on_complete(self, callback: Callable[[BaseException | None], None]) -> None:
        with self._lock:
            if self.completed_at is None:
                self._callback = callback
                return
        callback(self.error)

    def complete(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self.completed_at is not None:
                return
            self.completed_at, self.error = time.perf_counter(), error
            callback, self._callback = self._callback, None
        self._event.set()
        if callback is not None:
            callback(error)

    def wait(self) -> None:
        """Block until complete (a runtime that cannot release successors later: Dask); raise its error."""
        self._event.wait()
        if self.error is not None:
            raise self.error
