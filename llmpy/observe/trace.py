"""Execution traces: what each thread (of each rank) ran, and when.

A `Trace` holds `KernelEvent`s (one per kernel call per thread that worked in it) and `StepRecord`s (one per
training step per rank). `Trace.save(directory)` writes:
  - events.json: llmpy's own form of the trace, read back by `Trace.load` (`llmpy analyze`, `llmpy plot`);
  - trace.json: Chrome Trace Event JSON, opens in the Perfetto UI (https://ui.perfetto.dev);
  - trace.prv / trace.pcf / trace.row: Paraver.

Threads: row 0 of a rank is the thread that calls the kernels; rows 1.. are the helper threads that worked
inside a parallel kernel (numba's pool or OpenBLAS's), ordered by how busy they were in that call. An event
spans [start, end] where end - start is the CPU time that thread spent in the call (its useful time); row 0's
event starts when the call starts. Times are seconds since the trace began.
In task mode (`--mode tasks`) row r is task worker r, and every event is a whole kernel call on a block: it
carries its task's name, its own flops and bytes, and its wall time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

PHASES = ("forward", "zero_grad", "backward", "update")
EVENTS_FILE = "events.json"
CHROME_FILE = "trace.json"
PARAVER_BASENAME = "trace"
TRACE_FORMAT_VERSION = 1


def is_communication(name: str) -> bool:
    """Events named after an MPI function (MPI_Iallreduce, MPI_Waitall, ...) are a rank's communication (data-
    parallel runs, llmpy.execution.mpi), not kernels: no useful time, no roofline row."""
    return name.startswith("MPI_")


@dataclass(frozen=True)
class KernelEvent:
    name: str  # kernel, e.g. "matmul_forward"
    phase: str  # one of PHASES
    layer: int  # transformer block, -1 outside the blocks
    step: int  # training step, from 1
    rank: int  # MPI rank (0 without MPI)
    thread: int  # thread row within the rank: 0 = calling thread
    start: float  # seconds since the trace began
    end: float
    flops: float = 0.0  # floating-point operations of the whole call (on row 0 only; 0 on helper rows)
    bytes: float = 0.0  # bytes the whole call reads and writes, by the kernel's cost model (row 0 only)
    task: str = ""  # task mode: the task's name (kernel, layer, block); each task event is a call of its own
    sent: int = 0  # an MPI collective's start: bytes this rank sends over the network in it (row 0 only)
    received: int = 0  # ... and receives (llmpy.execution.mpi.strategies.network_bytes)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class StepRecord:
    step: int
    rank: int
    start: float
    end: float
    loss: float
    tokens: int
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (start, end)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Trace:
    """Events, steps and a description of the run (`meta`: model, mode, threads, runtime, ranks, B, T,
    peak_gflops, bandwidth_gbs, ...)."""

    events: list[KernelEvent] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def ranks(self) -> list[int]:
        return sorted({e.rank for e in self.events} | {s.rank for s in self.steps})

    def threads(self, rank: int = 0) -> list[int]:
        return sorted({e.thread for e in self.events if e.rank == rank})

    def save(self, directory: str) -> dict[str, str]:
        """Write every form of the trace into `directory`; returns {form: path}."""
        from llmpy.observe.trace_export import write_chrome_trace, write_paraver

        paths = {"events": self.save_events(directory)}
        paths["chrome"] = write_chrome_trace(self, os.path.join(directory, CHROME_FILE))
        paths.update(write_paraver(self, os.path.join(directory, PARAVER_BASENAME)))
        return paths

    def save_events(self, directory: str) -> str:
        """Write llmpy's own form (events.json, what `load` reads) into `directory`; returns its path."""
        from llmpy.io.formats import atomic_write_bytes

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, EVENTS_FILE)
        payload = {
            "version": TRACE_FORMAT_VERSION,
            "meta": self.meta,
            "steps": [asdict(s) for s in self.steps],
            "events": [list(asdict(e).values()) for e in self.events],
            "event_fields": list(KernelEvent.__dataclass_fields__),
        }
        atomic_write_bytes(path, json.dumps(payload).encode())
        return path

    @classmethod
    def load(cls, directory: str) -> "Trace":
        path = directory if directory.endswith(".json") else os.path.join(directory, EVENTS_FILE)
        try:
            with open(path) as f:
                payload = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path}: no llmpy trace here (run with --trace DIR first)") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a valid llmpy trace: {error}") from None
        if payload.get("version") != TRACE_FORMAT_VERSION:
            raise ValueError(f"{path}: trace version {payload.get('version')!r}, expected {TRACE_FORMAT_VERSION}")
        fields = payload["event_fields"]
        events = [KernelEvent(**dict(zip(fields, values))) for values in payload["events"]]
        steps = []
        for s in payload["steps"]:
            s["phases"] = {k: tuple(v) for k, v in s["phases"].items()}
            steps.append(StepRecord(**s))
        return cls(events, steps, payload["meta"])
