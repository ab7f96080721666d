"""Waiting for the other ranks without spinning, and not forever.

MPI's blocking waits spin a core at 100% while a peer is late, and wait forever for a peer that stopped
answering (a rank stopped with SIGSTOP, a host that froze). `wait_all` polls MPI_Testall with sleeps that grow
to LONGEST_SLEEP (MPI progresses inside each test), and after `timeout_s` without completion raises an
error naming the ranks that are not running: from their pids (gathered at startup) where they live on this
host (a stopped or vanished process), else all the others. The error ends the run through the usual
failure path (MPI_Abort), so every rank stops within the timeout.
"""

from __future__ import annotations

import os
import time

from llmpy.execution.threads import ExecutionError

# 0.1 ms: the update's waits run the collectives' schedules (a waiting rank holds the strategy's lock, so the
# progress thread is out meanwhile); with sleeps of 1 ms owners' many block reduces spent 6.2 s per d12 step
# waiting on an unshaped link and moved 0.45 Gbit/s; at 0.1 ms the step went from 10.7 to 4.9 s.
LONGEST_SLEEP = 1e-4


class Watchdog:
    """What a rank knows to name a silent peer: every rank's pid and host, and how long to wait."""

    def __init__(self, rank: int, pids: list[int], hosts: list[str], timeout_s: float):
        self.rank, self.pids, self.hosts, self.timeout_s = rank, pids, hosts, timeout_s

    def wait_all(self, MPI, requests: list, what: str) -> None:
        """MPI_Waitall of `requests`, polled (see the module docstring)."""
        start = time.monotonic()
        delay = 1e-6
        while not MPI.Request.Testall(requests):
            if time.monotonic() - start > self.timeout_s:
                raise self.timeout_error(what)
            time.sleep(delay)
            delay = min(2 * delay, LONGEST_SLEEP)

    def timeout_error(self, what: str) -> ExecutionError:
        """The error for `what` left unanswered for timeout_s, naming the silent ranks."""
        return ExecutionError(f"{what}: no answer for {self.timeout_s:g} s; {self.silent_ranks()}")

    def silent_ranks(self) -> str:
        here = self.hosts[self.rank]
        named = []
        for rank, (pid, host) in enumerate(zip(self.pids, self.hosts)):
            if rank == self.rank or host != here:
                continue
            state = _process_state(pid)
            if state in ("T", "t", None, "Z", "X"):
                named.append(f"rank {rank} (pid {pid}) is {_STATES.get(state, 'gone')}")
        if named:
            return ", ".join(named)
        others = [r for r in range(len(self.pids)) if r != self.rank]
        return f"one of ranks {', '.join(map(str, others))} stopped answering (not a process on this host)"


_STATES = {"T": "stopped", "t": "stopped (traced)", "Z": "dead", "X": "dead"}


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R running, S sleeping, T stopped, ...), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None if not os.path.exists(f"/proc/{pid}") else "?"
