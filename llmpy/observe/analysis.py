"""Performance analysis of a recorded `Trace`: POP efficiencies and a per-kernel roofline.

POP efficiencies (POP Centre of Excellence methodology), shared-memory form
--------------------------------------------------------------------------
The "processes" are the thread rows of every rank the run used: `meta["threads"] * meta["ranks"]` of them when
the run recorded its thread count (a row that never ran a kernel counts, with no useful time), else the rows
present in the trace. For a time region [t0, t1]:

  runtime   = t1 - t0                                   (wall time of the region)
  useful_i  = time thread row i spent in kernels inside [t0, t1]
              (not in MPI calls: data-parallel runs record those as events named MPI_*)
              (its events clipped to the region; overlapping events of one row count once)
  LB        = mean_i(useful_i) / max_i(useful_i)        Load balance efficiency
  CommE     = max_i(useful_i) / runtime                 Communication efficiency
  PE        = LB * CommE = mean_i(useful_i) / runtime   Parallel efficiency

POP splits CommE = SerE * TE (Serialization efficiency: time lost waiting on dependencies; Transfer efficiency:
time lost moving data). Separating them needs a replay of the run on an ideal network (as Dimemas does for MPI
traces); llmpy has no such model, so it reports TE = 1 and SerE = CommE: all of the non-useful time of the
busiest thread is attributed to serialization (the calling thread's Python between kernels, fork/join, waits).

Roofline
--------
Per kernel name, over the non-warm-up steps: FLOPs and bytes come from the cost model on each call's row-0 event.
A call is row 0's event together with the helper-row events of the same (rank, step, name, layer) that start
with it (helper events start at the call's start); the call's wall time is the latest end among those events
minus the start of row 0's event. Then AI = FLOPs / bytes, achieved GFLOP/s = FLOPs / wall, GB/s = bytes / wall,
attainable = min(peak_gflops, AI * bandwidth_gbs), bound = "memory" when AI * bandwidth_gbs < peak_gflops
(left of the ridge point) else "compute", and fraction of roof = achieved / attainable.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from llmpy.observe.trace import KernelEvent, StepRecord, Trace, is_communication

TE_NOTE = ("TE (transfer efficiency) = 1: llmpy has no ideal-network model to separate transfer from "
           "serialization, so SerE = CommE")
POP_FILE = "pop.csv"
ROOFLINE_FILE = "roofline.csv"
ROOFLINE_PNG = "roofline.png"
TABLE_PHASES = ("forward", "zero_grad", "backward", "update")  # order of the rows of each step
TOTAL = "total"
NAN = float("nan")

Process = tuple[int, int]  # (rank, thread row)


# ---------------------------------------------------------------------------------------------------------
# POP efficiencies


@dataclass
class PopMetrics:
    runtime: float  # seconds of wall time in the region(s)
    useful: dict[Process, float] = field(default_factory=dict)  # (rank, thread) -> seconds of useful time
    load_balance: float = NAN
    serialization_efficiency: float = NAN
    transfer_efficiency: float = 1.0
    communication_efficiency: float = NAN
    parallel_efficiency: float = NAN

    @property
    def processes(self) -> int:
        return len(self.useful)

    @property
    def useful_mean(self) -> float:
        return sum(self.useful.values()) / len(self.useful) if self.useful else 0.0

    @property
    def useful_max(self) -> float:
        return max(self.useful.values(), default=0.0)


@dataclass
class PopRow:
    step: int | str  # step number, or "total" (all non-warm-up steps)
    region: str  # "step" or a phase name
    metrics: PopMetrics


def _meta_int(meta: dict, key: str) -> int | None:
    try:
        value = int(meta[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value > 0 else None


def processes(trace: Trace) -> list[Process]:
    """The (rank, thread row) pairs POP counts: meta threads x ranks when recorded, plus any row that has events."""
    present = {(e.rank, e.thread) for e in trace.events}
    threads = _meta_int(trace.meta, "threads")
    if threads is None:
        procs = present or {(r, 0) for r in trace.ranks()}
    else:
        ranks = _meta_int(trace.meta, "ranks") or 1
        rank_ids = set(range(ranks)) | {r for r, _ in present} | {s.rank for s in trace.steps}
        procs = {(r, t) for r in rank_ids for t in range(threads)} | present
    return sorted(procs)


class _BusyIndex:
    """Per process, the union of its event intervals, sorted, with prefix sums: useful time in any region in
    O(log events), so a table of steps x phases stays fast on long traces."""

    def __init__(self, trace: Trace):
        self.procs = processes(trace)
        by_proc: dict[Process, list[tuple[float, float]]] = defaultdict(list)
        for e in trace.events:
            if e.end > e.start and not is_communication(e.name):  # time in MPI calls is not useful
                by_proc[(e.rank, e.thread)].append((e.start, e.end))
        self._starts: dict[Process, list[float]] = {}
        self._ends: dict[Process, list[float]] = {}
        self._cum: dict[Process, list[float]] = {}
        for proc, intervals in by_proc.items():
            intervals.sort()
            starts, ends, cum = [], [], [0.0]
            for s, e in intervals:
                if ends and s <= ends[-1]:  # overlaps (or touches) the previous one: merge
                    if e > ends[-1]:
                        cum[-1] += e - ends[-1]
                        ends[-1] = e
                    continue
                starts.append(s)
                ends.append(e)
                cum.append(cum[-1] + e - s)
            self._starts[proc], self._ends[proc], self._cum[proc] = starts, ends, cum

    def _busy_until(self, proc: Process, t: float) -> float:
        starts = self._starts.get(proc)
        if not starts:
            return 0.0
        i = bisect.bisect_right(starts, t)
        if i == 0:
            return 0.0
        return self._cum[proc][i - 1] + min(t, self._ends[proc][i - 1]) - starts[i - 1]

    def useful(self, proc: Process, t0: float, t1: float) -> float:
        if t1 <= t0:
            return 0.0
        return self._busy_until(proc, t1) - self._busy_until(proc, t0)


def _metrics(index: _BusyIndex, regions: list[tuple[float, float]]) -> PopMetrics:
    """POP metrics over one region or several disjoint ones (runtimes and useful times add up)."""
    runtime = sum(max(0.0, t1 - t0) for t0, t1 in regions)
    useful = {p: sum(index.useful(p, t0, t1) for t0, t1 in regions) for p in index.procs}
    m = PopMetrics(runtime=runtime, useful=useful)
    top = m.useful_max
    if top > 0:
        m.load_balance = m.useful_mean / top
    if runtime > 0:
        m.communication_efficiency = top / runtime
        m.serialization_efficiency = m.communication_efficiency  # TE = 1: see the module docstring
        m.transfer_efficiency = 1.0
        m.parallel_efficiency = m.useful_mean / runtime
    return m


def pop_metrics(trace: Trace, start: float, end: float) -> PopMetrics:
    """POP efficiencies of the region [start, end] (seconds since the trace began). TE is taken as 1 and
    SerE = CommE, for want of an ideal-network model (see the module docstring)."""
    return _metrics(_BusyIndex(trace), [(start, end)])


def warmup_steps(trace: Trace, skip_steps: int | None = None) -> int:
    """How many leading steps are warm-up: `skip_steps` when given, else meta["warmup_steps"] (what `llmpy
    train` and `llmpy bench` record), else 1."""
    if skip_steps is not None:
        return max(0, int(skip_steps))
    try:
        return max(0, int(trace.meta["warmup_steps"]))
    except (KeyError, TypeError, ValueError):
        return 1


def kept_steps(trace: Trace, skip_steps: int | None = None) -> tuple[list[int], list[int]]:
    """(kept, skipped) step numbers: the first `skip_steps` (default: `warmup_steps`) are warm-up. When that
    would leave nothing, all steps are kept."""
    numbers = sorted({s.step for s in trace.steps})
    skip = warmup_steps(trace, skip_steps)
    if skip >= len(numbers):
        return numbers, []
    return numbers[skip:], numbers[:skip]


def _step_span(records: list[StepRecord]) -> tuple[float, float]:
    return min(r.start for r in records), max(r.end for r in records)


def _phase_span(records: list[StepRecord], phase: str) -> tuple[float, float] | None:
    spans = [r.phases[phase] for r in records if phase in r.phases]
    spans = [(float(s), float(e)) for s, e in spans if e > s]
    if not spans:
        return None
    return min(s for s, _ in spans), max(e for _, e in spans)


def pop_table(trace: Trace, skip_steps: int | None = None) -> list[PopRow]:
    """Rows per non-warm-up step (warm-up: the first `skip_steps`, default meta["warmup_steps"] else 1): the
    step, then forward, zero_grad when recorded and non-empty, backward, update; then totals over those steps:
    "step" spans from the first kept step's start to the last one's end (gaps between steps included), each
    phase adds up that phase over the kept steps. With several ranks a step's region runs from the earliest
    rank's start to the latest rank's end."""
    index = _BusyIndex(trace)
    kept, _ = kept_steps(trace, skip_steps)
    by_step: dict[int, list[StepRecord]] = defaultdict(list)
    for record in trace.steps:
        by_step[record.step].append(record)
    rows: list[PopRow] = []
    phase_regions: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for number in kept:
        records = by_step[number]
        rows.append(PopRow(number, "step", _metrics(index, [_step_span(records)])))
        for phase in TABLE_PHASES:
            span = _phase_span(records, phase)
            if span is None:
                continue
            phase_regions[phase].append(span)
            rows.append(PopRow(number, phase, _metrics(index, [span])))
    if kept:
        first, last = by_step[kept[0]], by_step[kept[-1]]
        rows.append(PopRow(TOTAL, "step", _metrics(index, [(_step_span(first)[0], _step_span(last)[1])])))
        for phase in TABLE_PHASES:
            if phase_regions[phase]:
                rows.append(PopRow(TOTAL, phase, _metrics(index, phase_regions[phase])))
    return rows


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_pop_table(rows: list[PopRow]) -> str:
    """The POP table for the terminal: efficiencies in percent."""
    header = (f"{'step':>5s} {'region':<10s} {'runtime ms':>10s} {'procs':>5s} {'useful ms':>10s} "
              f"{'LB %':>6s} {'SerE %':>7s} {'TE %':>6s} {'CommE %':>8s} {'PE %':>6s}")
    lines = [header, "-" * len(header)]
    previous_step = None
    for row in rows:
        m = row.metrics
        if previous_step is not None and row.step != previous_step and row.region == "step":
            lines.append("")
        previous_step = row.step
        lines.append(f"{str(row.step):>5s} {row.region:<10s} {1e3 * m.runtime:10.2f} {m.processes:5d} "
                     f"{1e3 * m.useful_mean:10.2f} {_pct(m.load_balance):>6s} "
                     f"{_pct(m.serialization_efficiency):>7s} {_pct(m.transfer_efficiency):>6s} "
                     f"{_pct(m.communication_efficiency):>8s} {_pct(m.parallel_efficiency):>6s}")
    if not rows:
        lines.append("(no steps recorded)")
    lines.append("useful ms = mean over threads; LB = mean/max useful; CommE = max useful/runtime; "
                 "PE = LB*CommE = mean useful/runtime")
    lines.append(TE_NOTE)
    return "\n".join(lines)


POP_CSV_FIELDS = ("step", "region", "runtime_s", "processes", "useful_mean_s", "useful_max_s", "load_balance",
                  "serialization_efficiency", "transfer_efficiency", "communication_efficiency",
                  "parallel_efficiency")


def pop_csv(rows: list[PopRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(POP_CSV_FIELDS)
    for row in rows:
        m = row.metrics
        writer.writerow([row.step, row.region, repr(m.runtime), m.processes, repr(m.useful_mean),
                         repr(m.useful_max), repr(m.load_balance), repr(m.serialization_efficiency),
                         repr(m.transfer_efficiency), repr(m.communication_efficiency),
                         repr(m.parallel_efficiency)])
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Roofline


@dataclass
class KernelRoofline:
    name: str
    calls: int
    flops: float  # over all kept calls
    bytes: float
    time: float  # wall seconds, summed over calls
    cpu_time: float  # seconds of all threads' events in those calls
    arithmetic_intensity: float  # FLOP / byte (nan without bytes)
    gflops: float  # achieved GFLOP/s = flops / time
    gbs: float  # achieved GB/s = bytes / time
    attainable_gflops: float  # min(peak, AI * bandwidth); nan without a peak or bandwidth
    bound: str  # "memory", "compute", or "-" when unknown
    fraction_of_roof: float  # gflops / attainable_gflops


def meta_float(meta: dict, key: str) -> float | None:
    try:
        value = float(meta[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value > 0 and math.isfinite(value) else None


def kernel_calls(events: list[KernelEvent]) -> list[tuple[KernelEvent, float, float]]:
    """(row-0 event, wall seconds, cpu seconds of all rows) of each call. Helper-row events join the row-0
    event of the same (rank, step, name, layer) with the latest start at or before theirs (they start with
    the call, so usually at exactly its start); wall = latest end of the call's events - row 0's start."""
    callers: dict[tuple, list[KernelEvent]] = defaultdict(list)
    helpers: list[KernelEvent] = []
    for e in events:
        # row 0 calls the kernels; in task mode every worker's event is a call of its own
        (callers[(e.rank, e.step, e.name, e.layer)] if e.thread == 0 or e.task else helpers).append(e)
    starts: dict[tuple, list[float]] = {}
    for key, group in callers.items():
        group.sort(key=lambda e: e.start)
        starts[key] = [e.start for e in group]
    last_end = {id(e): e.end for group in callers.values() for e in group}
    cpu = {id(e): e.duration for group in callers.values() for e in group}
    for h in helpers:
        key = (h.rank, h.step, h.name, h.layer)
        if key not in starts:
            continue  # a helper row without its caller: no call to attach it to
        i = bisect.bisect_right(starts[key], h.start + 1e-9) - 1
        if i < 0:
            i = 0
        caller = callers[key][i]
        last_end[id(caller)] = max(last_end[id(caller)], h.end)
        cpu[id(caller)] += h.duration
    return [(e, last_end[id(e)] - e.start, cpu[id(e)]) for group in callers.values() for e in group]


def roofline_rows(trace: Trace, skip_steps: int | None = None, peak_gflops: float | None = None,
                  bandwidth_gbs: float | None = None) -> list[KernelRoofline]:
    """One row per kernel name over the non-warm-up steps, by total wall time, longest first. The roofs
    default to meta["peak_gflops"] and meta["bandwidth_gbs"]."""
    peak = peak_gflops if peak_gflops is not None else meta_float(trace.meta, "peak_gflops")
    bw = bandwidth_gbs if bandwidth_gbs is not None else meta_float(trace.meta, "bandwidth_gbs")
    kept = set(kept_steps(trace, skip_steps)[0]) if trace.steps else None
    events = [e for e in trace.events if (kept is None or e.step in kept) and not is_communication(e.name)]
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    for caller, wall, cpu in kernel_calls(events):
        t = totals[caller.name]
        t[0] += 1
        t[1] += caller.flops
        t[2] += caller.bytes
        t[3] += wall
        t[4] += cpu
    rows = []
    for name, (calls, flops, nbytes, wall, cpu) in totals.items():
        ai = flops / nbytes if nbytes > 0 else NAN
        gflops = flops / wall / 1e9 if wall > 0 else NAN
        gbs = nbytes / wall / 1e9 if wall > 0 else NAN
        attainable, bound = NAN, "-"
        if peak and bw and not math.isnan(ai):
            attainable = min(peak, ai * bw)
            bound = "memory" if ai * bw < peak else "compute"
        fraction = gflops / attainable if attainable > 0 and not math.isnan(gflops) else NAN
        rows.append(KernelRoofline(name, int(calls), flops, nbytes, wall, cpu, ai, gflops, gbs, attainable,
                                   bound, fraction))
    rows.sort(key=lambda r: (-r.time, r.name))
    return rows


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def format_roofline(rows: list[KernelRoofline], peak: float | None, bw: float | None) -> str:
    """The roofline table for the terminal, longest kernels first."""
    total = sum(r.time for r in rows)
    roofs = (f"roofs: peak {_num(peak or NAN, '.1f')} GFLOP/s, bandwidth {_num(bw or NAN, '.1f')} GB/s"
             + (f", ridge at {peak / bw:.2f} FLOP/byte" if peak and bw else " (not recorded: no bound)"))
    header = (f"{'kernel':<28s} {'calls':>6s} {'wall ms':>9s} {'% time':>6s} {'GFLOP':>9s} {'MB':>9s} "
              f"{'AI F/B':>7s} {'GFLOP/s':>8s} {'GB/s':>7s} {'attain.':>8s} {'bound':>7s} {'% roof':>6s}")
    lines = [roofs, header, "-" * len(header)]
    for r in rows:
        share = r.time / total if total > 0 else NAN
        lines.append(f"{r.name:<28s} {r.calls:6d} {1e3 * r.time:9.2f} {_pct(share):>6s} "
                     f"{r.flops / 1e9:9.3f} {r.bytes / 1e6:9.2f} {_num(r.arithmetic_intensity, '7.2f')} "
                     f"{_num(r.gflops, '8.2f')} {_num(r.gbs, '7.2f')} {_num(r.attainable_gflops, '8.1f')} "
                     f"{r.bound:>7s} {_pct(r.fraction_of_roof):>6s}")
    if not rows:
        lines.append("(no kernel calls recorded)")
    lines.append("wall = latest end of the call's thread events - call start; AI = FLOPs/bytes of the cost model; "
                 "attainable = min(peak, AI*bandwidth)")
    return "\n".join(lines)


ROOFLINE_CSV_FIELDS = ("kernel", "calls", "flops", "bytes", "wall_s", "cpu_s", "arithmetic_intensity", "gflops",
                       "gbs", "attainable_gflops", "bound", "fraction_of_roof")


def roofline_csv(rows: list[KernelRoofline]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ROOFLINE_CSV_FIELDS)
    for r in rows:
        writer.writerow([r.name, r.calls, repr(r.flops), repr(r.bytes), repr(r.time), repr(r.cpu_time),
                         repr(r.arithmetic_intensity), repr(r.gflops), repr(r.gbs), repr(r.attainable_gflops),
                         r.bound, repr(r.fraction_of_roof)])
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Reports

_META_ORDER = ("model", "mode", "runtime", "threads", "ranks", "B", "T", "peak_gflops", "bandwidth_gbs")


def describe(trace: Trace, skip_steps: int | None = None) -> str:
    """A few lines on the run: its meta, the steps analysed and their median wall time."""
    meta = trace.meta
    keys = [k for k in _META_ORDER if k in meta] + sorted(k for k in meta if k not in _META_ORDER)
    parts = [f"{k}={meta[k]}" for k in keys if not isinstance(meta[k], (dict, list))]
    kept, skipped = kept_steps(trace, skip_steps)
    lines = ["run: " + (", ".join(parts) if parts else "(no description recorded)")]
    if trace.steps:
        durations = [max(r.end for r in trace.steps if r.step == n) - min(r.start for r in trace.steps if r.step == n)
                     for n in kept]
        if skipped:
            warm = f"warm-up step{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))} excluded"
        elif warmup_steps(trace, skip_steps):
            warm = "no warm-up step excluded: too few steps"
        else:
            warm = "no warm-up steps"
        lines.append(f"steps: {len({s.step for s in trace.steps})} recorded, {len(kept)} analysed "
                     f"({warm}); median step {1e3 * statistics.median(durations):.2f} ms")
    procs = processes(trace)
    lines.append(f"events: {len(trace.events)} on {len(procs)} thread rows "
                 f"({len({r for r, _ in procs})} rank{'s' if len({r for r, _ in procs}) != 1 else ''})")
    return "\n".join(lines)


def format_idle_table(rows: list[PopRow]) -> str:
    """Per thread row (task mode: per worker): busy and idle time summed over the analysed steps (the per-step
    rows of the POP table: time between steps, validation for instance, is not counted)."""
    steps = [r.metrics for r in rows if r.step != TOTAL and r.region == "step"]
    wall = sum(m.runtime for m in steps)
    if wall <= 0:
        return "(no steps analysed)"
    useful: dict[Process, float] = defaultdict(float)
    for m in steps:
        for proc, seconds in m.useful.items():
            useful[proc] += seconds
    lines = [f"{'rank':>4s} {'thread':>6s} {'busy ms':>10s} {'idle ms':>10s} {'idle %':>7s}"]
    for (rank, row), busy in sorted(useful.items()):
        idle = max(0.0, wall - busy)
        lines.append(f"{rank:4d} {row:6d} {1e3 * busy:10.2f} {1e3 * idle:10.2f} {100 * idle / wall:7.1f}")
    lines.append(f"over {1e3 * wall:.2f} ms of wall time ({len(steps)} analysed steps)")
    return "\n".join(lines)


def analyze(trace_dir: str, skip_steps: int | None = None) -> str:
    """What `llmpy analyze TRACE_DIR` prints: the run, its POP efficiencies and its roofline."""
    trace = Trace.load(trace_dir)
    peak = meta_float(trace.meta, "peak_gflops")
    bw = meta_float(trace.meta, "bandwidth_gbs")
    table = pop_table(trace, skip_steps)
    return "\n\n".join([
        describe(trace, skip_steps),
        "POP efficiencies (processes = thread rows of all ranks)\n" + format_pop_table(table),
        "Idle time per thread (task mode: per worker)\n" + format_idle_table(table),
        "Roofline per kernel (non-warm-up steps)\n" + format_roofline(roofline_rows(trace, skip_steps), peak, bw),
    ])
