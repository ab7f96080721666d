"""POP efficiencies and roofline of llmpy.observe.analysis on synthetic traces with answers worked out by hand, and the
PNGs of llmpy.plots."""

from __future__ import annotations

import csv
import os

import pytest

from llmpy.observe.analysis import (
    TOTAL,
    analyze,
    format_pop_table,
    format_roofline,
    kernel_calls,
    pop_metrics,
    pop_table,
    roofline_rows,
)
from llmpy.observe.report import write_analysis
from llmpy.observe.plots import roofline_png, scaling_bases, scaling_pngs, timeline_png
from llmpy.observe.trace import KernelEvent, StepRecord, Trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ev(thread, start, end, name="k", phase="forward", step=1, rank=0, layer=0, flops=0.0, nbytes=0.0):
    return KernelEvent(name, phase, layer, step, rank, thread, start, end, flops, nbytes)


def step_record(step, start, end, rank=0, **phases):
    return StepRecord(step, rank, start, end, loss=1.0, tokens=256, phases=dict(phases))


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


# ---------------------------------------------------------------------------------------------------------
# POP


def test_load_imbalance_one_thread_full_one_half():
    trace = Trace([ev(0, 0.0, 1.0), ev(1, 0.0, 0.5)], meta={"threads": 2})
    m = pop_metrics(trace, 0.0, 1.0)
    assert m.runtime == pytest.approx(1.0)
    assert m.useful == {(0, 0): pytest.approx(1.0), (0, 1): pytest.approx(0.5)}
    assert m.load_balance == pytest.approx(0.75)
    assert m.communication_efficiency == pytest.approx(1.0)
    assert m.serialization_efficiency == pytest.approx(1.0)
    assert m.transfer_efficiency == 1.0
    assert m.parallel_efficiency == pytest.approx(0.75)


def test_serial_gap_lowers_communication_efficiency():
    # both threads idle over [0.5, 0.75) at the same time: a serial section
    events = [ev(t, s, e) for t in (0, 1) for s, e in ((0.0, 0.5), (0.75, 1.0))]
    m = pop_metrics(Trace(events, meta={"threads": 2}), 0.0, 1.0)
    assert m.load_balance == pytest.approx(1.0)
    assert m.communication_efficiency == pytest.approx(0.75)
    assert m.serialization_efficiency == pytest.approx(0.75)  # TE = 1: SerE carries all of CommE
    assert m.transfer_efficiency == 1.0
    assert m.parallel_efficiency == pytest.approx(0.75)


def test_thread_that_never_ran_counts():
    events = [ev(0, 0.0, 1.0)]
    m = pop_metrics(Trace(events, meta={"threads": 2}), 0.0, 1.0)
    assert m.useful == {(0, 0): pytest.approx(1.0), (0, 1): 0.0}
    assert m.load_balance == pytest.approx(0.5)
    assert m.communication_efficiency == pytest.approx(1.0)
    assert m.parallel_efficiency == pytest.approx(0.5)
    # without meta threads, only the rows present count
    assert pop_metrics(Trace(events), 0.0, 1.0).load_balance == pytest.approx(1.0)


def test_ranks_multiply_the_processes():
    events = [ev(0, 0.0, 1.0, rank=0), ev(0, 0.0, 0.5, rank=1)]
    m = pop_metrics(Trace(events, meta={"threads": 2, "ranks": 2}), 0.0, 1.0)
    assert sorted(m.useful) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert m.load_balance == pytest.approx((1.0 + 0.5) / 4 / 1.0)
    assert m.parallel_efficiency == pytest.approx(1.5 / 4)


def test_overlapping_events_of_one_thread_count_once():
    m = pop_metrics(Trace([ev(0, 0.0, 0.6), ev(0, 0.4, 0.8)], meta={"threads": 1}), 0.0, 1.0)
    assert m.useful[(0, 0)] == pytest.approx(0.8)


def test_phase_regions_count_only_the_overlap():
    # step 1 is warm-up; step 2: forward [10, 11), backward [11, 13), update [13, 13.5), step [9.9, 13.6)
    phases = {"forward": (10.0, 11.0), "zero_grad": (11.0, 11.0), "backward": (11.0, 13.0), "update": (13.0, 13.5)}
    events = [
        ev(0, 0.0, 5.0, step=1),  # warm-up only
        ev(0, 10.5, 11.5, name="straddle", step=2),  # 0.5 s in forward, 0.5 s in backward
        ev(1, 10.0, 10.25, step=2),  # forward
        ev(1, 12.0, 13.25, phase="backward", step=2),  # 1 s in backward, 0.25 s in update
        ev(0, 13.25, 13.5, phase="update", step=2),
    ]
    trace = Trace(events, [step_record(1, 0.0, 6.0), step_record(2, 9.9, 13.6, **phases)], {"threads": 2})
    rows = pop_table(trace, skip_steps=1)
    by = {(r.step, r.region): r.metrics for r in rows}
    # zero_grad is empty here: no row; warm-up step 1 has no rows
    assert [(r.step, r.region) for r in rows] == [
        (2, "step"), (2, "forward"), (2, "backward"), (2, "update"),
        (TOTAL, "step"), (TOTAL, "forward"), (TOTAL, "backward"), (TOTAL, "update")]
    assert by[(2, "forward")].runtime == pytest.approx(1.0)
    assert by[(2, "forward")].useful == {(0, 0): pytest.approx(0.5), (0, 1): pytest.approx(0.25)}
    assert by[(2, "forward")].load_balance == pytest.approx(0.375 / 0.5)
    assert by[(2, "forward")].communication_efficiency == pytest.approx(0.5)
    assert by[(2, "backward")].useful == {(0, 0): pytest.approx(0.5), (0, 1): pytest.approx(1.0)}
    assert by[(2, "backward")].parallel_efficiency == pytest.approx(0.75 / 2.0)
    assert by[(2, "update")].useful == {(0, 0): pytest.approx(0.25), (0, 1): pytest.approx(0.25)}
    assert by[(2, "update")].communication_efficiency == pytest.approx(0.5)
    assert by[(2, "step")].runtime == pytest.approx(3.7)
    assert by[(2, "step")].useful == {(0, 0): pytest.approx(1.25), (0, 1): pytest.approx(1.5)}
    # one kept step: the totals are that step
    assert by[(TOTAL, "backward")].useful == by[(2, "backward")].useful
    text = format_pop_table(rows)
    assert "TE" in text and "SerE = CommE" in text and "forward" in text


def test_totals_add_phases_over_the_kept_steps():
    events, steps = [], []
    for n in (1, 2, 3):
        t = 10.0 * n
        steps.append(step_record(n, t, t + 4.0, forward=(t, t + 2.0), backward=(t + 2.0, t + 4.0)))
        events += [ev(0, t, t + 2.0, step=n), ev(0, t + 2.0, t + 3.0, phase="backward", step=n)]
    rows = pop_table(Trace(events, steps, {"threads": 1}), skip_steps=1)
    by = {(r.step, r.region): r.metrics for r in rows}
    assert 1 not in {r.step for r in rows}
    assert by[(TOTAL, "forward")].runtime == pytest.approx(4.0)
    assert by[(TOTAL, "forward")].communication_efficiency == pytest.approx(1.0)
    assert by[(TOTAL, "backward")].runtime == pytest.approx(4.0)
    assert by[(TOTAL, "backward")].communication_efficiency == pytest.approx(0.5)
    # the whole run excluding warm-up: [20, 34], 6 s useful
    assert by[(TOTAL, "step")].runtime == pytest.approx(14.0)
    assert by[(TOTAL, "step")].parallel_efficiency == pytest.approx(6.0 / 14.0)


# ---------------------------------------------------------------------------------------------------------
# Roofline

N, C, OC = 4 * 64, 768, 3 * 768
MATMUL_FLOPS = 2 * N * C * OC
MATMUL_BYTES = 4 * (N * C + OC * C + N * OC)
RESIDUAL_FLOPS = N * C
RESIDUAL_BYTES = 4 * 3 * N * C
PEAK, BW = 100.0, 20.0  # GFLOP/s, GB/s: ridge at 5 FLOP/byte


def roofline_trace() -> Trace:
    events, steps = [], []
    for n in (1, 2):
        t = 10.0 * n
        steps.append(step_record(n, t, t + 1.0, forward=(t, t + 1.0)))
        wall = 0.050 if n == 1 else 0.004  # the warm-up step is slow and must not count
        for call_start in (t, t + 0.1):  # two calls of the same kernel and layer in one step
            events += [
                ev(0, call_start, call_start + wall - 0.001, "matmul_forward", step=n, flops=MATMUL_FLOPS,
                   nbytes=MATMUL_BYTES),
                ev(1, call_start, call_start + wall, "matmul_forward", step=n),  # the longest: sets the wall
                ev(2, call_start, call_start + wall / 2, "matmul_forward", step=n),
            ]
        events.append(ev(0, t + 0.5, t + 0.5 + 0.0002, "residual_forward", step=n, layer=1, flops=RESIDUAL_FLOPS,
                         nbytes=RESIDUAL_BYTES))
    return Trace(events, steps, {"model": "d12", "mode": "forkjoin", "runtime": "numba", "threads": 3,
                                 "ranks": 1, "B": 4, "T": 64, "peak_gflops": PEAK, "bandwidth_gbs": BW})


def test_kernel_calls_group_helpers_with_their_call():
    calls = kernel_calls([e for e in roofline_trace().events if e.step == 2 and e.name == "matmul_forward"])
    assert len(calls) == 2
    for caller, wall, cpu in calls:
        assert wall == pytest.approx(0.004)
        assert cpu == pytest.approx(0.003 + 0.004 + 0.002)


def test_roofline_matches_hand_counted_flops_and_bytes():
    rows = {r.name: r for r in roofline_rows(roofline_trace(), skip_steps=1)}
    mm = rows["matmul_forward"]
    assert mm.calls == 2
    assert mm.flops == pytest.approx(2 * MATMUL_FLOPS)
    assert mm.bytes == pytest.approx(2 * MATMUL_BYTES)
    assert mm.time == pytest.approx(2 * 0.004)
    ai = MATMUL_FLOPS / MATMUL_BYTES
    assert mm.arithmetic_intensity == pytest.approx(ai)
    assert mm.gflops == pytest.approx(MATMUL_FLOPS / 0.004 / 1e9)
    assert mm.gbs == pytest.approx(MATMUL_BYTES / 0.004 / 1e9)
    assert ai * BW > PEAK
    assert mm.bound == "compute"
    assert mm.attainable_gflops == pytest.approx(PEAK)
    assert mm.fraction_of_roof == pytest.approx(mm.gflops / PEAK)

    res = rows["residual_forward"]
    assert res.arithmetic_intensity == pytest.approx(1 / 12)
    assert res.bound == "memory"
    assert res.attainable_gflops == pytest.approx(BW / 12)
    assert res.gflops == pytest.approx(RESIDUAL_FLOPS / 0.0002 / 1e9)
    assert res.gbs == pytest.approx(RESIDUAL_BYTES / 0.0002 / 1e9)

    text = format_roofline(list(rows.values()), PEAK, BW)
    assert "matmul_forward" in text and "compute" in text and "memory" in text


def test_roofline_without_roofs_has_no_bound():
    trace = roofline_trace()
    del trace.meta["peak_gflops"], trace.meta["bandwidth_gbs"]
    rows = roofline_rows(trace)
    assert all(r.bound == "-" for r in rows)
    assert "matmul_forward" in format_roofline(rows, None, None)


# ---------------------------------------------------------------------------------------------------------
# Plots and reports


def test_timeline_png(tmp_path):
    trace = roofline_trace()
    assert_png(timeline_png(trace, str(tmp_path / "timeline.png")))
    assert_png(timeline_png(trace, str(tmp_path / "sub" / "timeline_step2.png"), steps=(2, 2)))


def test_roofline_png(tmp_path):
    rows = roofline_rows(roofline_trace())
    assert_png(roofline_png(rows, PEAK, BW, str(tmp_path / "roofline.png")))
    assert_png(roofline_png(rows, None, None, str(tmp_path / "roofline_noroof.png")))


SCALING_RESULTS = [
    {"mode": "sequential", "runtime": "numpy", "threads": 1, "ms_per_step_median": 800.0, "forward_ms": 300.0,
     "backward_ms": 450.0},
    {"mode": "forkjoin", "runtime": "numba", "threads": 1, "ms_per_step_median": 900.0, "forward_ms": 330.0,
     "backward_ms": 520.0},
    {"mode": "forkjoin", "runtime": "numba", "threads": 2, "ms_per_step_median": 480.0, "forward_ms": 180.0,
     "backward_ms": 270.0},
    {"mode": "forkjoin", "runtime": "numba", "threads": 4, "ms_per_step_median": 260.0, "forward_ms": 100.0,
     "backward_ms": 140.0},
    {"mode": "mpi", "runtime": "numpy", "threads": 1, "ranks": 2, "ms_per_step_median": 420.0, "forward_ms": 160.0,
     "backward_ms": 230.0},
]


def test_scaling_pngs(tmp_path):
    paths = scaling_pngs(SCALING_RESULTS, str(tmp_path / "scaling"))
    assert [os.path.basename(p) for p in paths] == ["scaling_runtime.png", "scaling_speedup.png",
                                                     "scaling_efficiency.png"]
    for path in paths:
        assert_png(path)


def test_scaling_base_is_sequential_when_present():
    bases = scaling_bases(SCALING_RESULTS)
    assert {entry["mode"] for entry, _ in bases.values()} == {"sequential"}
    without = scaling_bases([r for r in SCALING_RESULTS if r["mode"] != "sequential"])
    base, _ = without[("forkjoin", "numba", 1)]
    assert base["threads"] == 1 and base["mode"] == "forkjoin"


def test_write_analysis_and_analyze(tmp_path):
    directory = str(tmp_path / "trace")
    roofline_trace().save_events(directory)
    paths = write_analysis(directory)
    with open(paths["pop"]) as f:
        pop = list(csv.DictReader(f))
    assert {(row["step"], row["region"]) for row in pop} == {("2", "step"), ("2", "forward"), ("total", "step"),
                                                            ("total", "forward")}
    for row in pop:
        assert int(row["processes"]) == 3
        assert float(row["transfer_efficiency"]) == 1.0
        assert float(row["serialization_efficiency"]) == pytest.approx(float(row["communication_efficiency"]))
        assert 0.0 < float(row["parallel_efficiency"]) <= 1.0
    with open(paths["roofline"]) as f:
        roof = {row["kernel"]: row for row in csv.DictReader(f)}
    assert set(roof) == {"matmul_forward", "residual_forward"}
    assert float(roof["matmul_forward"]["flops"]) == pytest.approx(2 * MATMUL_FLOPS)
    assert float(roof["matmul_forward"]["bytes"]) == pytest.approx(2 * MATMUL_BYTES)
    assert roof["matmul_forward"]["bound"] == "compute"
    assert roof["residual_forward"]["bound"] == "memory"
    assert_png(paths["roofline_png"])

    text = analyze(directory)
    for expected in ("model=d12", "forkjoin", "warm-up step 1 excluded", "POP", "SerE = CommE",
                     "matmul_forward", "residual_forward"):
        assert expected in text


def test_warmup_defaults_to_meta_warmup_steps():
    events, steps = [], []
    for n in (1, 2, 3):
        steps.append(step_record(n, 10.0 * n, 10.0 * n + 1.0, forward=(10.0 * n, 10.0 * n + 1.0)))
        events.append(ev(0, 10.0 * n, 10.0 * n + 0.5, step=n, flops=1e6, nbytes=1e6))
    trace = Trace(events, steps, {"threads": 1, "warmup_steps": 2})
    assert {r.step for r in pop_table(trace)} == {3, TOTAL}
    assert roofline_rows(trace)[0].calls == 1
    trace.meta["warmup_steps"] = 0
    assert {r.step for r in pop_table(trace)} == {1, 2, 3, TOTAL}
    assert roofline_rows(trace)[0].calls == 3
    assert {r.step for r in pop_table(trace, skip_steps=1)} == {2, 3, TOTAL}  # an explicit count wins


def test_analysis_of_a_trace_written_by_trace_save(tmp_path):
    directory = str(tmp_path / "saved")
    roofline_trace().save(directory)
    paths = write_analysis(directory)
    with open(paths["roofline"]) as f:
        assert {row["kernel"] for row in csv.DictReader(f)} == {"matmul_forward", "residual_forward"}
