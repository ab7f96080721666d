"""Trace export: Chrome Trace Event JSON (Perfetto UI, chrome://tracing) and Paraver (.prv/.pcf/.row).

`Trace.save` calls both writers. Each takes a `Trace` (llmpy.observe.trace) and writes its files atomically.

Chrome Trace Event JSON (`write_chrome_trace`)
    {"displayTimeUnit": "ms", "traceEvents": [...], "otherData": meta}. One process per rank, one track per
    thread row, plus one "steps" track per rank. Times are microseconds (floats, whole nanoseconds).
    Perfetto gives pid 0 and tid 0 a meaning of their own (the kernel's idle "swapper" process/thread) and
    matches threads by tid across processes, so ids are offset: pid = rank + 1 and tid = pid * TID_STRIDE +
    row + 1, and the steps track is tid = pid * TID_STRIDE (see `chrome_pid`, `chrome_tid`); the names
    ("rank R", "thread N", "steps") and sort indexes (rank, row, -1) carry the real numbers, and every
    kernel slice has args rank and thread too.

Paraver (`write_paraver`)
    One application, one task per rank, one thread per thread row of the rank (row 0 always), and one node
    with one CPU per (rank, row). Time unit ns. Per thread: state records Idle (0) / Running (1) tiling
    [0, end of trace]; event records at each kernel call's start (Kernel = kernel id, Layer = layer + 1)
    and end (both 0), and on row 0 the Step type at each step's start (step number) and end (0). Pairs at
    the same time on the same thread are merged into one record unless a type would repeat (an end and a
    start of the same type at one time stay two records, end first). Records are sorted by time.
"""

from __future__ import annotations

import gc
import json
import math
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from operator import itemgetter

from llmpy.io.formats import atomic_write_bytes

# ---------------------------------------------------------------- Chrome / Perfetto ids
TID_STRIDE = 100_000  # tids of rank r: (r + 1) * TID_STRIDE (steps) and (r + 1) * TID_STRIDE + row + 1

# ---------------------------------------------------------------- Paraver types and states
STATE_IDLE = 0
STATE_RUNNING = 1
STATES = {STATE_IDLE: "Idle", STATE_RUNNING: "Running"}
STATE_COLORS = {STATE_IDLE: (117, 195, 255), STATE_RUNNING: (0, 0, 255)}

EVENT_KERNEL = 60000001
EVENT_LAYER = 60000002
EVENT_STEP = 60000003
EVENT_TYPE_NAMES = {EVENT_KERNEL: "Kernel", EVENT_LAYER: "Layer", EVENT_STEP: "Step"}

PCF_HEADER = """DEFAULT_OPTIONS

LEVEL               THREAD
UNITS               NANOSEC
LOOK_BACK           100
SPEED               1
FLAG_ICONS          ENABLED
NUM_OF_STATE_COLORS 1000
YMAX_SCALE          37


DEFAULT_SEMANTIC

THREAD_FUNC          State As Is
"""


def chrome_pid(rank: int) -> int:
    """Chrome/Perfetto process id of a rank (pid 0 is special in Perfetto)."""
    return rank + 1


def chrome_tid(rank: int, row: int | None) -> int:
    """Chrome/Perfetto thread id of a thread row of a rank; row None = the rank's "steps" track."""
    base = chrome_pid(rank) * TID_STRIDE
    return base if row is None else base + row + 1


def _json_safe(value):
    """Meta made strictly JSON-serialisable: non-finite floats become null, tuples lists, others str."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:  # numpy scalars and the like
        return _json_safe(value.item())
    except AttributeError:
        return str(value)


@contextmanager
def _gc_paused():
    """The writers build millions of small tuples and strings and no cycles: the cyclic collector, run over
    and over as they pile up, would take more than half of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _us(ns: int) -> float:
    return ns / 1000.0


def _thread_rows(trace) -> dict[int, list[int]]:
    """rank -> sorted thread rows; row 0 is always there (the calling thread carries the steps)."""
    rows: dict[int, set[int]] = {rank: {0} for rank in trace.ranks()}
    for e in trace.events:
        rows[e.rank].add(e.thread)
    if not rows:
        rows[0] = {0}
    return {rank: sorted(rows[rank]) for rank in sorted(rows)}


def _rows_of_spans(trace, what: str) -> dict[tuple[int, int], list[tuple[int, int, object]]]:
    """(rank, row) -> [(start ns, end ns, event)] in time order. A row runs one call at a time: a call that
    starts before the previous one on its row ended is clipped to start there (and warned about)."""
    by_row: dict[tuple[int, int], list] = defaultdict(list)
    for e in trace.events:
        by_row[(e.rank, e.thread)].append(e)
    spans: dict[tuple[int, int], list[tuple[int, int, object]]] = {}
    clipped = 0
    for key, events in by_row.items():
        cursor, out = 0, []
        for e in sorted(events, key=lambda e: (e.start, e.end)):
            start, end = max(0, _ns(e.start)), max(0, _ns(e.end))
            if start < cursor:
                clipped += 1
                start = cursor
            end = max(end, start)
            out.append((start, end, e))
            cursor = max(cursor, end)
        spans[key] = out
    if clipped:
        warnings.warn(f"{what} export: {clipped} kernel event(s) overlapped the previous one on their thread row "
                      "and were clipped to start where it ended", RuntimeWarning, stacklevel=4)
    return spans


# ==================================================================== Chrome Trace Event JSON


def write_chrome_trace(trace, path: str) -> str:
    """Write `trace` as Chrome Trace Event JSON to `path` (atomically); returns `path`."""
    with _gc_paused():
        return _write_chrome_trace(trace, path)


def _write_chrome_trace(trace, path: str) -> str:
    mode = trace.meta.get("mode") if isinstance(trace.meta, dict) else None
    rows = _thread_rows(trace)
    ranks_with_steps = {s.rank for s in trace.steps}
    events: list[dict] = []

    for rank, thread_rows in rows.items():
        pid = chrome_pid(rank)
        name = f"rank {rank}" + (f" ({mode})" if mode else "")
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": chrome_tid(rank, 0),
                       "args": {"name": name}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": chrome_tid(rank, 0),
                       "args": {"sort_index": rank}})
        tracks = [(row, f"worker {row}" if mode == "tasks" else f"thread {row} (calls kernels)" if row == 0
                   else f"thread {row}", row) for row in thread_rows]
        if rank in ranks_with_steps:
            tracks.insert(0, (None, "steps", -1))
        for row, thread_name, sort_index in tracks:
            tid = chrome_tid(rank, row)
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                           "args": {"name": thread_name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                           "args": {"sort_index": sort_index}})

    timed: list[tuple[int, int, dict]] = []  # (ts ns, order, event): steps before their phases and kernels
    for s in trace.steps:
        pid, tid = chrome_pid(s.rank), chrome_tid(s.rank, None)
        start, end = _ns(s.start), max(_ns(s.start), _ns(s.end))
        loss = float(s.loss)
        args = {"step": int(s.step), "tokens": int(s.tokens)}
        if math.isfinite(loss):
            args["loss"] = loss
        timed.append((start, 0, {"ph": "X", "ts": _us(start), "dur": _us(end - start), "pid": pid, "tid": tid,
                                 "name": f"step {int(s.step)}", "cat": "step", "args": args}))
        phases = sorted(s.phases.items(), key=lambda item: (item[1][0], item[1][1]))
        cursor = start
        for phase, (p_start, p_end) in phases:  # nested in the step, clipped to it and to each other
            p0 = min(max(_ns(p_start), cursor), end)
            p1 = min(max(_ns(p_end), p0), end)
            if p1 > p0:
                timed.append((p0, 1, {"ph": "X", "ts": _us(p0), "dur": _us(p1 - p0), "pid": pid, "tid": tid,
                                      "name": str(phase), "cat": "phase", "args": {"step": int(s.step)}}))
                cursor = p1
        if math.isfinite(loss):
            timed.append((end, 3, {"ph": "C", "ts": _us(end), "pid": pid, "tid": tid, "name": "loss",
                                   "args": {"loss": loss}}))
        if end > start:
            timed.append((end, 3, {"ph": "C", "ts": _us(end), "pid": pid, "tid": tid, "name": "tokens/s",
                                   "args": {"tokens/s": int(s.tokens) / ((end - start) * 1e-9)}}))

    for start, end, e in (span for spans in _rows_of_spans(trace, "Chrome trace").values() for span in spans):
        args = {"layer": int(e.layer), "step": int(e.step), "rank": int(e.rank), "thread": int(e.thread)}
        flops = float(e.flops)
        if flops > 0 and math.isfinite(flops):
            args["gflop"] = flops / 1e9
        if e.task:
            args["task"] = str(e.task)
        if e.sent or e.received:
            args["sent MB"], args["received MB"] = e.sent / 1e6, e.received / 1e6
        timed.append((start, 2, {"ph": "X", "ts": _us(start), "dur": _us(end - start), "pid": chrome_pid(e.rank),
                                 "tid": chrome_tid(e.rank, e.thread), "name": str(e.name), "cat": str(e.phase),
                                 "args": args}))

    timed.sort(key=lambda item: (item[0], item[1]))
    events.extend(item[2] for item in timed)
    # displayTimeUnit first and traceEvents before otherData: some Perfetto versions only look for the
    # former at the start of the file and stop reading at a key they do not know. ensure_ascii=False: they
    # do not read \u escapes either.
    def dumps(value) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    text = ('{"displayTimeUnit":"ms","traceEvents":[\n' + ",\n".join(dumps(event) for event in events)
            + '\n],"otherData":' + dumps(_json_safe(trace.meta)) + "}\n")
    atomic_write_bytes(path, text.encode())
    return path


# ==================================================================== Paraver


def paraver_kernel_ids(trace) -> dict[str, int]:
    """Kernel name -> Paraver value of the Kernel type: 1.. in order of first appearance in time."""
    ids: dict[str, int] = {}
    for e in sorted(trace.events, key=lambda e: (e.start, e.rank, e.thread)):
        if e.name not in ids:
            ids[e.name] = len(ids) + 1
    return ids


def write_paraver(trace, basename: str) -> dict[str, str]:
    """Write basename.prv, basename.pcf and basename.row; returns {"paraver_prv": ..., "paraver_pcf": ...,
    "paraver_row": ...}."""
    with _gc_paused():
        return _write_paraver(trace, basename)


def _write_paraver(trace, basename: str) -> dict[str, str]:
    if basename.endswith(".prv"):
        basename = basename[:-4]
    paths = {"paraver_prv": basename + ".prv", "paraver_pcf": basename + ".pcf", "paraver_row": basename + ".row"}
    rows = _thread_rows(trace)
    kernel_ids = paraver_kernel_ids(trace)

    # Resources: task = rank index + 1, thread = row index + 1, cpu = 1.. over (rank, row)
    where: dict[tuple[int, int], tuple[int, int, int]] = {}  # (rank, row) -> (cpu, task, thread)
    cpu = 0
    for task, (rank, thread_rows) in enumerate(rows.items(), start=1):
        for thread, row in enumerate(thread_rows, start=1):
            cpu += 1
            where[(rank, row)] = (cpu, task, thread)

    ends = [e.end for e in trace.events] + [s.end for s in trace.steps]
    starts = [e.start for e in trace.events] + [s.start for s in trace.steps]
    final = max(0, math.ceil(max(ends + starts, default=0.0) * 1e9))
    final = max(final, max((_ns(t) for t in ends + starts), default=0))

    spans_by_row = _rows_of_spans(trace, "Paraver")
    steps_by_rank: dict[int, list] = defaultdict(list)
    for s in trace.steps:
        steps_by_rank[s.rank].append(s)

    records: list[tuple[int, int, int, int, str]] = []  # (time, cpu, kind, seq, line)
    for (rank, row), (cpu, task, thread) in where.items():
        prefix = f"{cpu}:1:{task}:{thread}"
        # items at one time, in this order: ends (0), zero-length calls (1: start then end), starts (2)
        items: list[tuple[int, int, int, list[tuple[int, int]]]] = []  # (time, order, seq, pairs)
        cursor = 0
        for seq, (start, end, e) in enumerate(spans_by_row.get((rank, row), [])):
            if start > cursor:
                records.append((cursor, cpu, 1, 0, f"1:{prefix}:{cursor}:{start}:{STATE_IDLE}"))
            begin = [(EVENT_KERNEL, kernel_ids[e.name]), (EVENT_LAYER, max(e.layer, -1) + 1)]
            finish = [(EVENT_KERNEL, 0), (EVENT_LAYER, 0)]
            if end > start:
                records.append((start, cpu, 1, 0, f"1:{prefix}:{start}:{end}:{STATE_RUNNING}"))
                items.append((start, 2, 2 * seq, begin))
                items.append((end, 0, 2 * seq, finish))
            else:
                items.append((start, 1, 2 * seq, begin))
                items.append((start, 1, 2 * seq + 1, finish))
            cursor = max(cursor, end)
        if final > cursor:
            records.append((cursor, cpu, 1, 0, f"1:{prefix}:{cursor}:{final}:{STATE_IDLE}"))
        if row == 0:
            for seq, s in enumerate(sorted(steps_by_rank.get(rank, []), key=lambda s: s.start), start=len(items)):
                start = max(0, _ns(s.start))
                end = max(start, _ns(s.end))
                if end > start:
                    items.append((start, 2, -1, [(EVENT_STEP, max(s.step, 0))]))
                    items.append((end, 0, -1, [(EVENT_STEP, 0)]))
                else:
                    items.append((start, 1, 2 * seq, [(EVENT_STEP, max(s.step, 0))]))
                    items.append((start, 1, 2 * seq + 1, [(EVENT_STEP, 0)]))
        items.sort(key=itemgetter(0, 1, 2))
        # merge the pairs at one time into one record, starting a new one where a type would repeat
        seq, last, body, types = 0, None, [], set()
        for t, _, _, pairs in items:
            if t != last or any(k in types for k, _ in pairs):
                if body:
                    records.append((last, cpu, 2, seq, f"2:{prefix}:{last}:{':'.join(body)}"))
                    seq += 1
                last, body, types = t, [], set()
            for k, v in pairs:
                body.append(f"{k}:{v}")
                types.add(k)
        if body:
            records.append((last, cpu, 2, seq, f"2:{prefix}:{last}:{':'.join(body)}"))
    records.sort()  # (time, cpu, kind, seq) is unique, so the lines themselves are never compared

    date = time.strftime("%d/%m/%y at %H:%M", time.localtime())
    applist = ",".join(f"{len(thread_rows)}:1" for thread_rows in rows.values())
    header = f"#Paraver ({date}):{final}_ns:1({cpu}):1:{len(rows)}({applist})\n"
    atomic_write_bytes(paths["paraver_prv"], (header + "".join(r[4] + "\n" for r in records)).encode())
    atomic_write_bytes(paths["paraver_pcf"], _pcf(trace, kernel_ids).encode())
    atomic_write_bytes(paths["paraver_row"], _row(trace, rows).encode())
    return paths


def _pcf(trace, kernel_ids: dict[str, int]) -> str:
    out = [PCF_HEADER, "\nSTATES"]
    out += [f"{value}    {name}" for value, name in STATES.items()]
    out += ["\n\nSTATES_COLOR"]
    out += [f"{value}    {{{r},{g},{b}}}" for value, (r, g, b) in STATE_COLORS.items()]
    out += ["\n\nEVENT_TYPE", f"0    {EVENT_KERNEL}    {EVENT_TYPE_NAMES[EVENT_KERNEL]}", "VALUES", "0      End"]
    out += [f"{value}      {name}" for name, value in kernel_ids.items()]
    max_layer = max((e.layer for e in trace.events), default=-1)
    out += ["\n\nEVENT_TYPE", f"0    {EVENT_LAYER}    {EVENT_TYPE_NAMES[EVENT_LAYER]}", "VALUES",
            "0      None (outside the blocks)"]
    out += [f"{layer + 1}      Layer {layer}" for layer in range(max_layer + 1)]
    out += ["\n\nEVENT_TYPE", f"0    {EVENT_STEP}    {EVENT_TYPE_NAMES[EVENT_STEP]}", "VALUES", "0      End"]
    out += [f"{step}      Step {step}" for step in sorted({s.step for s in trace.steps if s.step > 0})]
    return "\n".join(out) + "\n\n"


def _row(trace, rows: dict[int, list[int]]) -> str:
    node = str(trace.meta.get("host") or "node 1") if isinstance(trace.meta, dict) else "node 1"
    names = [f"rank {rank} thread {row}" for rank, thread_rows in rows.items() for row in thread_rows]
    out = [f"LEVEL CPU SIZE {len(names)}"]
    out += [f"CPU {i} ({name})" for i, name in enumerate(names, start=1)]
    out += ["", "LEVEL NODE SIZE 1", node, "", f"LEVEL THREAD SIZE {len(names)}"]
    out += names
    return "\n".join(out) + "\n"
