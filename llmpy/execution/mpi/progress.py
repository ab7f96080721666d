"""MPI's progress of the collectives in flight, driven from a thread of its own that sleeps between tests.

MPICH over TCP (UCX's tcp transport, libfabric's tcp provider) moves a non-blocking collective's data only
inside MPI calls: each MPI_Test pushes about a socket buffer's worth (~1.4 MB here) and runs the schedule's
next round. Testing after each kernel leaves a d12 bucket (28 MB) half sent at the end of backward, so
nothing finishes early. This thread tests every `interval_s` while requests are in flight and blocks on a
condition, using no CPU, while none are: the copies TCP needs anyway, not a spinning core (MPICH's own
MPIR_CVAR_ASYNC_PROGRESS thread spins). It needs MPI_THREAD_MULTIPLE, since the main thread makes other MPI
calls (the loss average, barriers) while it runs; the strategy's lock keeps the two threads from testing
the same request objects at once.
"""

from __future__ import annotations

import threading
import time

# Every 0.1 ms: each test runs one round of every collective's schedule, so owners' ~250 reduces and broadcasts
# of at most 4 MiB per d12 step need many rounds; at 0.5 ms 8 reduces of 2 MiB took 154 ms between two
# namespace hosts (0.87 Gbit/s on a 7.7 Gbit/s link), at 0.1 ms 58 ms; zero1's d12 step did not slow.
INTERVAL_S = 1e-4


class ProgressThread:
    """Tests the requests handed to `watch` until they complete; `close` stops it. A `Completion` watched with a
    group of requests completes when they all have, or after `watchdog.timeout_s` with the watchdog's error
    naming the peers that stopped answering (llmpy.execution.mpi.watchdog), so a task waiting for it never
    waits forever."""

    def __init__(self, MPI, lock, interval_s: float = INTERVAL_S, watchdog=None):
        self._MPI, self._lock, self._interval, self._watchdog = MPI, lock, interval_s, watchdog
        self._requests: list = []
        self._groups: list[tuple[list, object, float, str]] = []  # (requests, completion, since, what)
        self._changed = threading.Condition()
        self._closed = False
        self.tests = 0
        self._thread = threading.Thread(target=self._loop, name="mpi-progress", daemon=True)
        self._thread.start()

    def watch(self, requests: list, completion=None, what: str = "collectives") -> None:
        live = [r for r in requests if r]
        if completion is not None and not live:
            completion.complete()
            return
        with self._changed:
            self._requests += live
            if completion is not None:
                self._groups.append((live, completion, time.monotonic(), what))
            self._changed.notify()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._requests and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
            with self._lock:  # the strategy's: no other thread tests or waits on these requests meanwhile
                pending = [r for r in self._requests if r]  # completed ones are MPI_REQUEST_NULL by now
                if pending:
                    self._MPI.Request.Testsome(pending)
                    self.tests += 1
            with self._changed:
                self._requests = [r for r in self._requests if r]
                ended = self._ended_groups()
            for completion, error in ended:  # outside every lock: it releases tasks of the runtime
                completion.complete(error)
            time.sleep(self._interval)

    def _ended_groups(self) -> list[tuple]:
        """(completion, error or None) of the groups whose requests all completed or that waited too long."""
        now, ended, kept = time.monotonic(), [], []
        for group in self._groups:
            requests, completion, since, what = group
            if not any(requests):
                ended.append((completion, None))
            elif self._watchdog is not None and now - since > self._watchdog.timeout_s:
                ended.append((completion, self._watchdog.timeout_error(what)))
            else:
                kept.append(group)
        self._groups = kept
        return ended

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()
