"""Trace export: Chrome Trace Event JSON and Paraver (.prv/.pcf/.row), on small traces built by hand.

The Paraver files are checked with pertalde's `ptd` (a test dependency): `ptd comprovar -e` (every record
well formed), `ptd comptar --all` (records counted per state and per event type, names from the .pcf) and
`ptd entendre` (kernel ids translated to names through the .pcf); and by parsing the .prv here (header,
resources, order, states tiling each thread, every event pair).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections import Counter, defaultdict

import pytest

from llmpy.observe.trace import KernelEvent, StepRecord, Trace
from llmpy.observe.trace_export import (
    EVENT_KERNEL,
    EVENT_LAYER,
    EVENT_STEP,
    chrome_pid,
    chrome_tid,
    paraver_kernel_ids,
    write_chrome_trace,
    write_paraver,
)

# ---------------------------------------------------------------------------- synthetic traces

# (kernel, phase, layer, seconds on row 0, seconds on row 1 or None, gap after it)
STEP_KERNELS = [
    ("encoder_forward", "forward", -1, 120e-6, None, 0.0),
    ("matmul_forward", "forward", 0, 800e-6, 610e-6, 0.0),  # back to back with the next call on row 0
    ("gelu_forward", "forward", 0, 90e-6, 40e-6, 15e-6),
    ("matmul_forward", "forward", 1, 805e-6, 600e-6, 30e-6),
    ("matmul_backward", "backward", 1, 1.6e-3, 1.2e-3, 10e-6),
    ("adamw_update", "update", -1, 300e-6, None, 0.0),
]
FLOPS = {"encoder_forward": 1.5e6, "matmul_forward": 4.0e9, "gelu_forward": 2.0e7, "matmul_backward": 8.0e9,
         "adamw_update": 3.0e7}
TOKENS = 4 * 64


def build_trace(ranks=(0, 1), helpers=True, origin=0.0123456789, meta=None) -> Trace:
    """2 steps per rank; row 0 calls every kernel (with flops), row 1 helps in some; ranks offset in time."""
    events, steps = [], []
    for rank in ranks:
        t = origin + rank * 3.3e-6
        for step in (1, 2):
            step_start = t
            phases = {}
            for name, phase, layer, busy, helper, gap in STEP_KERNELS:
                start = t
                phases.setdefault(phase, [start, start])
                events.append(KernelEvent(name, phase, layer, step, rank, 0, start, start + busy, FLOPS[name],
                                          1e6))
                if helpers and helper is not None:
                    events.append(KernelEvent(name, phase, layer, step, rank, 1, start + 2e-6,
                                              start + 2e-6 + helper))
                t = start + busy + gap
                phases[phase][1] = t
            loss = 10.0 - step - 0.5 * rank
            steps.append(StepRecord(step, rank, step_start, t, loss, TOKENS,
                                    {p: (a, b) for p, (a, b) in phases.items()}))
            t += 250e-6  # between steps
    meta = meta if meta is not None else {"model": "d2", "mode": "numba", "threads": 2, "ranks": len(ranks)}
    return Trace(events, steps, dict(meta))


def ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def read_text(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------- ptd


def ptd_executable() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ptd")
    found = candidate if os.access(candidate, os.X_OK) else shutil.which("ptd")
    if found is None:
        pytest.fail("pertalde's `ptd` (the Paraver trace checker) is not installed: install the test extra, "
                    "`pip install -e '.[test]'` (pertalde==0.1.5)")
    return found


def ptd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ptd_executable(), *args], capture_output=True, text=True, timeout=120)


def ptd_counts(prv: str) -> dict[tuple[str, str], int]:
    """`ptd comptar --all` table as {(kind, name): occurrences}."""
    result = ptd("comptar", "--all", prv)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("State", "Event") and cells[2].isdigit():
            counts[(cells[0], cells[1])] = int(cells[2])
    assert counts, result.stdout
    return counts


# ---------------------------------------------------------------------------- parsing the .prv here

HEADER = re.compile(r"^#Paraver \((\d\d/\d\d/\d\d) at (\d\d:\d\d)\):(\d+)_ns:(\d+)\((\d+)\):(\d+):(\d+)\(([\d:,]+)\)$")


def parse_prv(path: str):
    lines = read_text(path).splitlines()
    match = HEADER.match(lines[0])
    assert match, lines[0]
    final, nodes, cpus, apps, tasks = (int(match.group(i)) for i in (3, 4, 5, 6, 7))
    threads = []
    for item in match.group(8).split(","):
        nthreads, node = item.split(":")
        assert node == "1"
        threads.append(int(nthreads))
    states, events = [], []
    for line in lines[1:]:
        fields = [int(x) for x in line.split(":")]
        if fields[0] == 1:
            assert len(fields) == 8, line
            states.append(tuple(fields[1:]))  # cpu, appl, task, thread, begin, end, state
        elif fields[0] == 2:
            assert len(fields) >= 8 and len(fields) % 2 == 0, line
            events.append((tuple(fields[1:6]), list(zip(fields[6::2], fields[7::2]))))
        else:
            raise AssertionError(f"unexpected record {line!r}")
    return {"header": dict(final=final, nodes=nodes, cpus=cpus, apps=apps, tasks=tasks, threads=threads),
            "lines": lines, "states": states, "events": events}


def thread_keys(trace: Trace) -> dict[tuple[int, int], tuple[int, int, int]]:
    """(rank, row) -> (cpu, task, thread) as the exporter lays them out: ranks in order, rows in order."""
    layout, cpu = {}, 0
    for task, rank in enumerate(trace.ranks(), start=1):
        for thread, row in enumerate(sorted(set(trace.threads(rank)) | {0}), start=1):
            cpu += 1
            layout[(rank, row)] = (cpu, task, thread)
    return layout


def expected_pairs(trace: Trace, kernel_ids: dict[str, int]) -> Counter:
    """Multiset of (task, thread, time, type, value) the trace implies."""
    layout = thread_keys(trace)
    pairs = Counter()
    for e in trace.events:
        _, task, thread = layout[(e.rank, e.thread)]
        pairs[(task, thread, ns(e.start), EVENT_KERNEL, kernel_ids[e.name])] += 1
        pairs[(task, thread, ns(e.start), EVENT_LAYER, e.layer + 1)] += 1
        pairs[(task, thread, ns(e.end), EVENT_KERNEL, 0)] += 1
        pairs[(task, thread, ns(e.end), EVENT_LAYER, 0)] += 1
    for s in trace.steps:
        _, task, thread = layout[(s.rank, 0)]
        pairs[(task, thread, ns(s.start), EVENT_STEP, s.step)] += 1
        pairs[(task, thread, ns(s.end), EVENT_STEP, 0)] += 1
    return pairs


def expected_event_records(trace: Trace) -> int:
    """One record per (thread, time) with event pairs, plus one where a kernel ends and the next starts at
    the same time (kept apart so the Kernel and Layer types do not repeat in a record)."""
    times, starts, ends = defaultdict(set), defaultdict(set), defaultdict(set)
    for e in trace.events:
        key = (e.rank, e.thread)
        times[key] |= {ns(e.start), ns(e.end)}
        starts[key].add(ns(e.start))
        ends[key].add(ns(e.end))
    for s in trace.steps:
        times[(s.rank, 0)] |= {ns(s.start), ns(s.end)}
    return sum(len(times[k]) + len(starts[k] & ends[k]) for k in times)


def expected_idle_states(trace: Trace, final: int) -> int:
    count = 0
    for rank, row in thread_keys(trace):
        cursor = 0
        for start, end in sorted((ns(e.start), ns(e.end)) for e in trace.events if (e.rank, e.thread) == (rank, row)):
            count += start > cursor
            cursor = max(cursor, end)
        count += final > cursor
    return count


def check_prv(trace: Trace, prv: str) -> dict:
    """Everything the .prv must say about `trace`, parsed here."""
    parsed = parse_prv(prv)
    header = parsed["header"]
    layout = thread_keys(trace)
    ranks = trace.ranks() or [0]
    last = max([e.end for e in trace.events] + [s.end for s in trace.steps], default=0.0)
    assert header["final"] == math.ceil(last * 1e9)
    assert (header["nodes"], header["apps"]) == (1, 1)
    assert header["cpus"] == len(layout) == sum(header["threads"])
    assert header["tasks"] == len(ranks)
    assert header["threads"] == [max(1, len(set(trace.threads(r)) | {0})) for r in ranks]

    # sorted by time (state records by their begin time)
    times = [s[4] for s in parsed["states"]]
    record_times = [int(line.split(":")[5]) for line in parsed["lines"][1:]]
    assert record_times == sorted(record_times)
    assert times == sorted(times)

    # resources in range, one cpu per thread
    cpu_of = {(task, thread): cpu for cpu, task, thread in layout.values()}
    for cpu, appl, task, thread, *_ in parsed["states"] + [r[0] for r in parsed["events"]]:
        assert appl == 1 and (task, thread) in cpu_of and cpu_of[(task, thread)] == cpu

    # states tile [0, final] on every thread; Running exactly over the events
    by_thread = defaultdict(list)
    for cpu, appl, task, thread, begin, end, state in parsed["states"]:
        assert 0 <= begin < end <= header["final"]
        by_thread[(task, thread)].append((begin, end, state))
    for key in cpu_of:
        intervals = by_thread[key]
        if header["final"] == 0:
            assert intervals == []
            continue
        assert intervals[0][0] == 0 and intervals[-1][1] == header["final"]
        assert all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))
    running = Counter((t, th, b, e) for (t, th), ivs in by_thread.items() for b, e, s in ivs if s == 1)
    want = Counter()
    for ev in trace.events:
        _, task, thread = layout[(ev.rank, ev.thread)]
        want[(task, thread, ns(ev.start), ns(ev.end))] += 1
    assert running == want
    n_idle = sum(s == 0 for ivs in by_thread.values() for _, _, s in ivs)
    assert n_idle == expected_idle_states(trace, header["final"])
    assert len(parsed["states"]) == len(trace.events) + n_idle

    # event records: every pair the trace implies, no other; no type twice in one record
    got = Counter()
    for (cpu, appl, task, thread, t), pairs in parsed["events"]:
        assert t <= header["final"]
        assert len({k for k, _ in pairs}) == len(pairs)
        for k, v in pairs:
            got[(task, thread, t, k, v)] += 1
    assert got == expected_pairs(trace, paraver_kernel_ids(trace))
    assert len(parsed["events"]) == expected_event_records(trace)
    return parsed


def check_with_ptd(trace: Trace, prv: str, tmp_path) -> None:
    result = ptd("comprovar", "-e", prv)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr

    counts = ptd_counts(prv)
    n = len(trace.events)
    assert counts.get(("Event", "Kernel")) == 2 * n
    assert counts.get(("Event", "Layer")) == 2 * n
    assert counts.get(("Event", "Step"), 0) == 2 * len(trace.steps)
    assert counts.get(("State", "Running")) == n
    final = parse_prv(prv)["header"]["final"]
    assert counts.get(("State", "Idle"), 0) == expected_idle_states(trace, final)
    assert not any("Unknown" in name or name.isdigit() for _, name in counts)

    # kernel ids -> names through the .pcf, with the number of calls of each counted in the .prv here
    calls = Counter()
    for _, pairs in parse_prv(prv)["events"]:
        calls.update(v for k, v in pairs if k == EVENT_KERNEL and v != 0)
    table = tmp_path / "kernel_calls.csv"
    table.write_text("calls\tkernel\n" + "".join(f"{c}\t{v}\n" for v, c in sorted(calls.items())))
    result = ptd("entendre", str(table), str(EVENT_KERNEL), prv)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "kernel_calls.entender.csv") as f:
        named = {row["kernel"]: int(row["calls"]) for row in csv.DictReader(f)}
    assert named == dict(Counter(e.name for e in trace.events))


# ---------------------------------------------------------------------------- Chrome trace


def load_chrome(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def check_chrome(trace: Trace, path: str) -> dict:
    doc = load_chrome(path)
    assert doc["displayTimeUnit"] == "ms"
    assert doc["otherData"] == trace.meta
    events = doc["traceEvents"]
    meta = {(e["name"], e["pid"], e["tid"]): e["args"] for e in events if e["ph"] == "M"}
    mode = trace.meta.get("mode")
    for rank in trace.ranks():
        pid = chrome_pid(rank)
        names = {tid: args["name"] for (what, p, tid), args in meta.items() if what == "process_name" and p == pid}
        assert list(names.values()) == [f"rank {rank}" + (f" ({mode})" if mode else "")]
        assert [a["sort_index"] for (what, p, _), a in meta.items() if what == "process_sort_index" and p == pid] \
            == [rank]
        for row in sorted(set(trace.threads(rank)) | {0}):
            tid = chrome_tid(rank, row)
            assert meta[("thread_name", pid, tid)]["name"] == ("thread 0 (calls kernels)" if row == 0
                                                                else f"thread {row}")
            assert meta[("thread_sort_index", pid, tid)]["sort_index"] == row
        if any(s.rank == rank for s in trace.steps):
            assert meta[("thread_name", pid, chrome_tid(rank, None))]["name"] == "steps"
            assert meta[("thread_sort_index", pid, chrome_tid(rank, None))]["sort_index"] == -1

    step_tids = {chrome_tid(r, None) for r in trace.ranks()}
    kernels = [e for e in events if e["ph"] == "X" and e["tid"] not in step_tids]
    assert len(kernels) == len(trace.events)
    want = Counter((e.name, e.phase, chrome_pid(e.rank), chrome_tid(e.rank, e.thread), ns(e.start),
                    ns(e.end) - ns(e.start), e.layer, e.step, e.flops / 1e9 if e.flops > 0 else None)
                   for e in trace.events)
    got = Counter((x["name"], x["cat"], x["pid"], x["tid"], round(x["ts"] * 1000), round(x["dur"] * 1000),
                   x["args"]["layer"], x["args"]["step"], x["args"].get("gflop")) for x in kernels)
    assert got == want
    for x, e in zip(sorted(kernels, key=lambda x: (x["pid"], x["tid"], x["ts"])),
                    sorted(trace.events, key=lambda e: (e.rank, e.thread, e.start))):
        assert x["ts"] == pytest.approx(e.start * 1e6, abs=1e-3)
        assert x["dur"] == pytest.approx(e.duration * 1e6, abs=2e-3)

    # per thread track, the kernel slices do not overlap (in whole ns, as Perfetto reads them)
    tracks = defaultdict(list)
    for x in kernels:
        tracks[(x["pid"], x["tid"])].append((round(x["ts"] * 1000), round(x["ts"] * 1000) + round(x["dur"] * 1000)))
    for spans in tracks.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))

    # steps: a slice per step on the steps track, phases nested in it, counters at its end
    for s in trace.steps:
        pid, tid = chrome_pid(s.rank), chrome_tid(s.rank, None)
        [step] = [x for x in events if x["ph"] == "X" and x["tid"] == tid and x["name"] == f"step {s.step}"]
        assert (round(step["ts"] * 1000), round((step["ts"] + step["dur"]) * 1000)) == (ns(s.start), ns(s.end))
        nested = [x for x in events if x["ph"] == "X" and x["tid"] == tid and x["cat"] == "phase"
                  and x["args"]["step"] == s.step]
        assert {x["name"] for x in nested} == {p for p, (a, b) in s.phases.items() if ns(b) > ns(a)}
        for x in nested:
            assert step["ts"] <= x["ts"] and x["ts"] + x["dur"] <= step["ts"] + step["dur"] + 1e-6
        counters = {x["name"]: x for x in events if x["ph"] == "C" and x["pid"] == pid
                    and round(x["ts"] * 1000) == ns(s.end)}
        assert counters["loss"]["args"] == {"loss": s.loss}
        assert counters["tokens/s"]["args"]["tokens/s"] == pytest.approx(s.tokens / s.duration, rel=1e-6)
    assert sum(x["ph"] == "C" and x["name"] == "loss" for x in events) == len(trace.steps)
    assert sum(x["ph"] == "C" and x["name"] == "tokens/s" for x in events) == len(trace.steps)
    return doc


# ---------------------------------------------------------------------------- tests


def test_chrome_trace_two_ranks_two_threads(tmp_path):
    trace = build_trace()
    path = str(tmp_path / "trace.json")
    assert write_chrome_trace(trace, path) == path
    check_chrome(trace, path)


def test_chrome_trace_single_thread(tmp_path):
    trace = build_trace(ranks=(0,), helpers=False, meta={"model": "d2"})
    path = write_chrome_trace(trace, str(tmp_path / "trace.json"))
    doc = check_chrome(trace, path)
    assert {x["tid"] for x in doc["traceEvents"] if x["ph"] == "X" and x["cat"] != "step"
            and x["cat"] != "phase"} == {chrome_tid(0, 0)}


def test_chrome_trace_is_strict_json_with_odd_meta(tmp_path):
    np = pytest.importorskip("numpy")
    trace = build_trace(ranks=(0,), meta={"mode": "numba", "peak": float("nan"), "threads": np.int64(4),
                                          "shape": (4, 64), "note": "naïve — ü"})
    trace.steps[0].loss = float("nan")
    doc = load_chrome(write_chrome_trace(trace, str(tmp_path / "t.json")))
    assert doc["otherData"] == {"mode": "numba", "peak": None, "threads": 4, "shape": [4, 64], "note": "naïve — ü"}
    losses = [x for x in doc["traceEvents"] if x["ph"] == "C" and x["name"] == "loss"]
    assert len(losses) == len(trace.steps) - 1  # no counter for a NaN loss


def test_paraver_two_ranks_two_threads(tmp_path):
    trace = build_trace()
    base = str(tmp_path / "trace")
    paths = write_paraver(trace, base)
    assert paths == {"paraver_prv": base + ".prv", "paraver_pcf": base + ".pcf", "paraver_row": base + ".row"}
    parsed = check_prv(trace, paths["paraver_prv"])
    assert parsed["header"]["threads"] == [2, 2] and parsed["header"]["cpus"] == 4
    check_with_ptd(trace, paths["paraver_prv"], tmp_path)

    pcf = read_text(paths["paraver_pcf"])
    assert re.search(r"^STATES\n0\s+Idle\n1\s+Running$", pcf, re.M)
    assert re.search(r"^STATES_COLOR\n0\s+\{\d+,\d+,\d+\}\n1\s+\{\d+,\d+,\d+\}$", pcf, re.M)
    for kind, name in ((EVENT_KERNEL, "Kernel"), (EVENT_LAYER, "Layer"), (EVENT_STEP, "Step")):
        assert re.search(rf"^EVENT_TYPE\n0\s+{kind}\s+{name}\nVALUES\n0\s+\S", pcf, re.M)
    ids = paraver_kernel_ids(trace)
    assert list(ids) == ["encoder_forward", "matmul_forward", "gelu_forward", "matmul_backward", "adamw_update"]
    assert list(ids.values()) == [1, 2, 3, 4, 5]
    for name, value in ids.items():
        assert re.search(rf"^{value}\s+{name}$", pcf, re.M)
    assert re.search(r"^2\s+Layer 1$", pcf, re.M)

    row = read_text(paths["paraver_row"]).split("\n\n")
    assert row[0].splitlines()[0] == "LEVEL CPU SIZE 4" and len(row[0].splitlines()) == 5
    assert row[1].splitlines()[0] == "LEVEL NODE SIZE 1" and len(row[1].splitlines()) == 2
    assert row[2].splitlines() == ["LEVEL THREAD SIZE 4", "rank 0 thread 0", "rank 0 thread 1",
                                   "rank 1 thread 0", "rank 1 thread 1"]


def test_paraver_single_thread(tmp_path):
    trace = build_trace(ranks=(0,), helpers=False)
    paths = write_paraver(trace, str(tmp_path / "single"))
    parsed = check_prv(trace, paths["paraver_prv"])
    assert parsed["lines"][0].endswith(":1(1):1:1(1:1)")
    check_with_ptd(trace, paths["paraver_prv"], tmp_path)
    assert read_text(paths["paraver_row"]).rstrip().splitlines()[-1] == "rank 0 thread 0"


def test_paraver_rejects_what_ptd_rejects(tmp_path):
    """The ptd check is not vacuous: a record missing its value fails it."""
    trace = build_trace(ranks=(0,), helpers=False)
    prv = write_paraver(trace, str(tmp_path / "t"))["paraver_prv"]
    lines = read_text(prv).splitlines()
    broken = next(i for i, line in enumerate(lines) if line.startswith("2:"))
    lines[broken] = lines[broken].rsplit(":", 1)[0]
    with open(prv, "w") as f:
        f.write("\n".join(lines) + "\n")
    assert ptd("comprovar", "-e", prv).returncode != 0


def test_paraver_zero_length_and_overlapping_events(tmp_path):
    """A call shorter than a ns and one overlapping the previous call on its row do not break the files."""
    events = [
        KernelEvent("a", "forward", 0, 1, 0, 0, 1e-6, 5e-6, 1e3),
        KernelEvent("b", "forward", 0, 1, 0, 0, 5e-6, 5e-6),  # zero length, right where a ends
        KernelEvent("c", "forward", 1, 1, 0, 0, 5e-6, 9e-6),
        KernelEvent("d", "forward", 1, 1, 0, 0, 8e-6, 12e-6),  # overlaps c
    ]
    trace = Trace(events, [StepRecord(1, 0, 0.0, 13e-6, 1.0, 8, {"forward": (0.0, 13e-6)})], {})
    with pytest.warns(RuntimeWarning, match="1 kernel event"):
        prv = write_paraver(trace, str(tmp_path / "t"))["paraver_prv"]
    assert ptd("comprovar", "-e", prv).returncode == 0
    parsed = parse_prv(prv)
    states = [(b, e, s) for *_, b, e, s in parsed["states"]]
    assert states == [(0, 1000, 0), (1000, 5000, 1), (5000, 9000, 1), (9000, 12000, 1), (12000, 13000, 0)]
    counts = ptd_counts(prv)
    assert counts[("Event", "Kernel")] == 8 and counts[("State", "Running")] == 3
    kernel = [(t, v) for (*_, t), pairs in parsed["events"] for k, v in pairs if k == EVENT_KERNEL]
    ids = paraver_kernel_ids(trace)
    assert kernel == [(1000, ids["a"]), (5000, 0), (5000, ids["b"]), (5000, 0), (5000, ids["c"]), (9000, 0),
                      (9000, ids["d"]), (12000, 0)]
    times = [int(line.split(":")[5]) for line in parsed["lines"][1:]]
    assert times == sorted(times)

    with pytest.warns(RuntimeWarning, match="1 kernel event"):
        doc = load_chrome(write_chrome_trace(trace, str(tmp_path / "t.json")))
    slices = [(x["name"], round(x["ts"] * 1000), round(x["dur"] * 1000)) for x in doc["traceEvents"]
              if x["ph"] == "X" and x["tid"] == chrome_tid(0, 0)]
    assert slices == [("a", 1000, 4000), ("b", 5000, 0), ("c", 5000, 4000), ("d", 9000, 3000)]


def test_empty_trace(tmp_path):
    trace = Trace()
    prv = write_paraver(trace, str(tmp_path / "empty"))["paraver_prv"]
    assert ptd("comprovar", "-e", prv).returncode == 0
    assert parse_prv(prv)["header"] == dict(final=0, nodes=1, cpus=1, apps=1, tasks=1, threads=[1])
    doc = load_chrome(write_chrome_trace(trace, str(tmp_path / "empty.json")))
    assert not [x for x in doc["traceEvents"] if x["ph"] != "M"]


def test_save_writes_every_form_and_load_reads_it_back(tmp_path):
    trace = build_trace()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = trace.save(str(tmp_path / "run"))
    assert set(paths) == {"events", "chrome", "paraver_prv", "paraver_pcf", "paraver_row"}
    for path in paths.values():
        assert os.path.getsize(path) > 0
    assert os.path.basename(paths["chrome"]) == "trace.json"
    assert [os.path.basename(paths[k]) for k in ("paraver_prv", "paraver_pcf", "paraver_row")] == \
        ["trace.prv", "trace.pcf", "trace.row"]
    loaded = Trace.load(str(tmp_path / "run"))
    assert loaded.events == trace.events
    assert loaded.steps == trace.steps
    assert loaded.meta == trace.meta
    check_chrome(loaded, paths["chrome"])
    check_prv(loaded, paths["paraver_prv"])
    check_with_ptd(loaded, paths["paraver_prv"], tmp_path)
